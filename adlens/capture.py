"""Capture per-head attention weights with forward hooks, on any model built from
`torch.nn.MultiheadAttention` (including inside `nn.TransformerEncoderLayer`) or from attention
modules that expose their weights (the project's AD network does).

    >>> with capture_attention(model) as rec:
    ...     logits = model(tokens)
    >>> rec.weights["blocks.0.attn"][0].shape       # (B, H, Tq, Tk), rows sum to 1

Hooks live exactly as long as the `with` block (removed in `finally`, also on exceptions). Hooks only
observe: outputs are unchanged. A module that exposes its weights has a boolean `record` attribute
and a `hook_weights` submodule (an identity the `(B, H, Tq, Tk)` weights pass through when `record`
is on); capturing switches `record` on, so such a module can use a fused kernel the rest of the time. For `nn.MultiheadAttention`, a forward pre-hook asks for per-head weights
(`need_weights=True, average_attn_weights=False`, overriding `nn.TransformerEncoderLayer`'s
`need_weights=False`), and PyTorch's fused MHA fast path, which bypasses the module, is switched off
for the duration and restored afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn as nn

from adlens.errors import ConfigError


class AttentionRecord:
    """What a capture collected: `weights[name]` is a list with one `(B, H, Tq, Tk)` tensor per
    forward call of the attention module `name` (its name in `model.named_modules()`), in call order."""

    def __init__(self, names: list[str]):
        self.names = names
        self.weights: dict[str, list[torch.Tensor]] = defaultdict(list)

    def clear(self) -> None:
        self.weights.clear()

    def stacked(self, call: int = -1) -> torch.Tensor:
        """One call's weights of every captured module stacked: (L, B, H, Tq, Tk)."""
        return torch.stack([self.weights[n][call] for n in self.names])


def exposes_weights(module: nn.Module) -> bool:
    """True for an attention module that hands out its weights (a `record` flag and a `hook_weights` submodule)."""
    return isinstance(getattr(module, "hook_weights", None), nn.Module) and isinstance(getattr(module, "record", None), bool)


def is_hf_attention(module: nn.Module) -> bool:
    """A Hugging Face `transformers` self-attention module (e.g. GPT2Attention): it returns
    (output, weights), and the weights exist only with the eager attention implementation."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention") and hasattr(module, "config")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module the capture understands, in registration order."""
    return [
        (n, m) for n, m in model.named_modules() if exposes_weights(m) or isinstance(m, nn.MultiheadAttention) or is_hf_attention(m)
    ]


@contextmanager
def capture_attention(
    model: nn.Module,
    layers: Iterable[int | str] | None = None,
    device: str | torch.device = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Record the attention weights of `model` inside the block.

    layers    : indices into `attention_modules(model)` or module names; None = all
    device    : where the recorded (detached) tensors are stored
    transform : applied to each (B, H, Tq, Tk) tensor before storing (e.g. keep the last query row)
    """
    found = attention_modules(model)
    if not found:
        raise ConfigError("model has no attention module to capture (nn.MultiheadAttention, a Hugging Face attention or a module with hook_weights)")
    if layers is not None:
        by_name = dict(found)
        chosen = []
        for sel in layers:
            if isinstance(sel, int):
                if not -len(found) <= sel < len(found):
                    raise ConfigError(f"layer {sel} out of range: the model has {len(found)} attention modules")
                chosen.append(found[sel])
            elif sel in by_name:
                chosen.append((sel, by_name[sel]))
            else:
                raise ConfigError(f"unknown attention module {sel!r}; valid: {[n for n, _ in found]}")
        found = chosen
    rec = AttentionRecord([n for n, _ in found])
    handles, restore = [], []

    def store(name: str, w: torch.Tensor) -> None:
        w = w.detach()
        rec.weights[name].append((transform(w) if transform else w).to(device))

    try:
        for name, mod in found:
            if exposes_weights(mod):
                restore.append((mod, "record", mod.record))
                mod.record = True
                handles.append(mod.hook_weights.register_forward_hook(lambda _m, _i, out, name=name: store(name, out)))
            elif is_hf_attention(mod):  # eager attention for the duration: only it computes the weights
                restore.append((mod.config, "_attn_implementation", mod.config._attn_implementation))
                mod.config._attn_implementation = "eager"
                handles.append(mod.register_forward_hook(lambda _m, _i, out, name=name: store(name, out[1])))
            else:
                handles.append(mod.register_forward_pre_hook(_ask_per_head_weights, with_kwargs=True))
                handles.append(mod.register_forward_hook(lambda _m, _i, out, name=name: store(name, out[1])))
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield rec
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
    finally:
        for h in handles:
            h.remove()
        for obj, attr, was in reversed(restore):  # reversed: a config shared by several layers ends as it was
            setattr(obj, attr, was)


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _ask_per_head_weights(_module, args, kwargs):
    kwargs = dict(zip(_MHA_ARGS[3:], args[3:])) | kwargs | {"need_weights": True, "average_attn_weights": False}
    return args[:3], kwargs
