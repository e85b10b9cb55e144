"""Compress the token history of a model that re-runs its window every step, without editing it.

    >>> comp = make_compression("fixed_window", ratio=0.2, interval=20)
    >>> with HistoryCompressor(model.transformer, comp, max_context=241, step_of=lambda: rec.t):
    ...     my_rollout(model, venv, n_steps)          # the user's own loop, unchanged

A forward pre-hook on the module that receives the token history (an `nn.TransformerEncoder`, or a
Hugging Face model called with `inputs_embeds`) replaces that history by the compressed one, so every
layer really computes over the shorter sequence; a forward hook puts the outputs back at the
positions the model expects (the newest token's output is exact; positions the compression dropped
get zeros, and a merged slot's output goes to the position of its newest token).

Token convention (what each position of the history is): the newest token belongs to the current
rollout step, the older ones to consecutive earlier steps, `tokens_per_step` each; the window slides.
A codebase with another convention passes `token_steps(n_tokens, step) -> (n,) step of each position`.

Compression follows the strategy's schedule (`due`, `plan`) exactly as the project's engines do:
once `interval` steps have passed and the history holds more than the budget, the strategy plans over
the tokens the model currently sees (scores: the attention those tokens received from the queries of
the steps since the last compression, read from that step's forward, H2O-style), and from the next
step on the history is that plan plus every newer token. The plan lives inside the window the
user's rollout supplies: a kept token that slides out of that window is gone, as it would be without
compression. Environments keep one length: where a slide removes more kept slots from one
environment than another, the others drop their oldest extra slots (never more than the budget).
Masks: a causal mask is rebuilt for the shorter sequence, a key-padding mask is compressed along with
the tokens; a mask of any other kind is refused.

Strategies that read each token's reward and episode (`needs_meta`: reward_anchor, episode_pool,
reward_recent) are refused here: the hook sees embeddings, and which reward a position carries
depends on how the user's model lays out its tokens, which the adapter does not declare.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from adlens.capture import capture_attention
from adlens.compression import STRATEGIES, Compression, merge_rows
from adlens.errors import UserError

_ENCODER_ARGS = ("src", "mask", "src_key_padding_mask", "is_causal")


def default_token_steps(tokens_per_step: int) -> Callable[[int, int], torch.Tensor]:
    """The default convention: the newest token is the current step, older ones `tokens_per_step` per step."""

    def token_steps(n: int, step: int) -> torch.Tensor:
        if (n - 1) % tokens_per_step:
            raise UserError(
                f"a forward with {n} history tokens fits no step alignment with TOKENS_PER_STEP = {tokens_per_step} "
                "(expected 1 + a multiple of it: the newest token for the current step, then whole earlier steps); "
                "define token_steps(n_tokens, step) in the adapter if your model lays out its tokens differently"
            )
        back = torch.arange(n - 1, -1, -1)  # tokens before the newest
        return step - (back + tokens_per_step - 1) // tokens_per_step

    return token_steps


def causal_mask_kind(mask: torch.Tensor | None, n: int) -> str | None:
    """'bool' or 'float' for a causal (n, n) mask (True / -inf above the diagonal), None for no mask;
    raises UserError for any other mask."""
    if mask is None:
        return None
    if mask.dim() == 2 and tuple(mask.shape) == (n, n):
        upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
        if mask.dtype == torch.bool and torch.equal(mask, upper):
            return "bool"
        if mask.is_floating_point() and bool((mask[upper] < -1e4).all()) and bool((mask[~upper] == 0).all()):
            return "float"
    raise UserError(
        f"the history module was given an attention mask of shape {tuple(mask.shape)} that is not a causal mask; "
        "compression can rebuild only a causal mask (a key-padding mask is fine)"
    )


def causal_mask(n: int, kind: str, like: torch.Tensor) -> torch.Tensor:
    upper = torch.ones(n, n, dtype=torch.bool, device=like.device).triu(1)
    return upper if kind == "bool" else torch.zeros(n, n, dtype=like.dtype, device=like.device).masked_fill(upper, float("-inf"))


class HistoryCompressor:
    """Context manager: compress the history `module` receives, following `comp`'s schedule.

    module      : the module whose first input (or `inputs_embeds`, Hugging Face) is the (B, n, D) history
    comp        : a strategy from `adlens.compression` (None or ratio 1.0: the hook changes nothing)
    max_context : the model's context in tokens (the budget is round(ratio * max_context))
    step_of     : () -> the current rollout step (steps completed so far)
    token_steps : (n, step) -> (n,) rollout step of each position (default: `default_token_steps(1)`)
    score_model : module whose attention gives the scores of score-based strategies (default: `module`)
    """

    def __init__(self, module: nn.Module, comp: Compression | None, max_context: int, step_of: Callable[[], int],
                 token_steps: Callable | None = None, score_model: nn.Module | None = None):  # fmt: skip
        if comp is not None and comp.needs_meta and comp.budget(max_context) < max_context:
            name = next((k for k, v in STRATEGIES.items() if v is type(comp)), type(comp).__name__)
            raise UserError(
                f"{name} needs each history token's reward and episode, which the history hook cannot tell from the "
                "embeddings it sees; use it with the project's kv or rerun engine, or a strategy without rewards here"
            )
        self.module, self.comp, self.T, self.step_of = module, comp, max_context, step_of
        self.token_steps = token_steps or default_token_steps(1)
        self.score_model = score_model or module
        self.hf = _is_hf(module)
        self.batch_first = self.hf or _batch_first(module)
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.plan = None  # (ids (B, M), slot (B, M), weight (B, M), n_slots): tokens of steps < plan_step
        self.plan_step = -1
        self.since = 0
        self.last_step = None
        self.lengths: list[int] = []  # tokens the module computed over, per forward
        self._pending = None

    # ---- hooks -----------------------------------------------------------------------------------
    def __enter__(self):
        self.reset()
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._pending is not None and self._pending.get("capture") is not None:
            self._pending["capture"].__exit__(None, None, None)
        self._pending = None
        return False

    def _split(self, args, kwargs):
        """(history (B, n, D), kwargs with every argument by name)."""
        if self.hf:
            if "inputs_embeds" not in kwargs or kwargs["inputs_embeds"] is None:
                raise UserError("the Hugging Face history module must be called with inputs_embeds=... (the token history)")
            return kwargs["inputs_embeds"], dict(kwargs)
        named = dict(zip(_ENCODER_ARGS, args)) | kwargs
        x = named.pop("src")
        return (x if self.batch_first else x.transpose(0, 1)), named

    def _pre(self, _module, args, kwargs):
        x, named = self._split(args, kwargs)
        B, n, _ = x.shape
        if self.comp is None:  # the uncompressed baseline: only count the tokens, nothing on its hot path
            self.lengths.append(n)
            return None
        step = int(self.step_of())
        if step != self.last_step:  # a new rollout step (a step may run several forwards)
            self.since += 1
            self.last_step = step
        ids = torch.as_tensor(self.token_steps(n, step), dtype=torch.long)  # (n,) step of each position
        if ids.shape != (n,):
            raise UserError(f"token_steps({n}, {step}) must return {n} step indices, got shape {tuple(ids.shape)}")
        uid = _token_uids(ids)  # (n,) unique, identifies a token across forwards
        assign, weight, n_out = self._current_plan(uid, ids, B, n)
        due = self.comp is not None and self.comp.due(self.since, n_out, self.T)
        pending = {"uid": uid, "ids": ids, "assign": assign, "weight": weight, "n": n, "n_out": n_out, "step": step, "due": due, "B": B}
        if due and self.comp.needs_scores:
            pending["capture"] = capture_attention(self.score_model, transform=lambda w: w[..., -self._query_rows(ids, step) :, :])
            pending["rec"] = pending["capture"].__enter__()
        self._pending = pending
        self.lengths.append(n_out)
        if assign is None:
            return None  # nothing to compress: the forward runs exactly as without the hook
        return self._compressed_call(args, x, named, assign.to(x.device), weight.to(x.device), n_out, n)

    def _post(self, _module, _args, _kwargs, output):
        p, self._pending = self._pending, None
        if p is None:
            return None
        scores = None
        if p.get("capture") is not None:
            rec = p["rec"]
            p["capture"].__exit__(None, None, None)
            # H2O-style scores: attention received from the queries of the steps since the last compression
            w = torch.stack([rec.weights[name][-1] for name in rec.names])  # (L, B, H, q, n_out)
            scores = w.float().sum(3).mean((0, 2)).cpu()  # (B, n_out)
        if p["due"]:
            self._replan(p, scores)
        if p["assign"] is None:
            return None
        return self._expand_output(output, p)

    # ---- plans -----------------------------------------------------------------------------------
    def _query_rows(self, ids: torch.Tensor, step: int) -> int:
        """Positions whose tokens came since the last compression (their rows are the queries that score)."""
        return max(1, int((ids > step - self.since).sum()))

    def _current_plan(self, uid, ids, B, n):
        """Plan for this forward: the stored plan mapped onto this window, then every newer token."""
        if self.plan is None:
            return None, None, n
        p_uid, p_slot, p_w, n_slots = self.plan
        order = uid.argsort()
        sorted_uid = uid[order]
        idx = torch.searchsorted(sorted_uid, p_uid).clamp(max=n - 1)  # (B, M)
        found = sorted_uid[idx] == p_uid
        pos = order[idx]  # (B, M) window position of each plan member
        alive = torch.zeros(B, n_slots).scatter_add_(1, p_slot, found.float()) > 0  # (B, n_slots)
        count = alive.sum(1)
        keep_n = int(count.min())
        rank_from_newest = alive.flip(1).cumsum(1).flip(1)  # 1 = newest alive slot
        keep = alive & (rank_from_newest <= keep_n)
        new_slot = keep.long().cumsum(1) - 1  # (B, n_slots)
        member_ok = found & keep.gather(1, p_slot)
        assign = torch.full((B, n), -1, dtype=torch.long)
        weight = torch.zeros(B, n)
        rows = torch.arange(B)[:, None].expand_as(pos)
        assign[rows[member_ok], pos[member_ok]] = new_slot.gather(1, p_slot)[member_ok]
        weight[rows[member_ok], pos[member_ok]] = p_w[member_ok]
        fresh = ids >= self.plan_step  # (n,) tokens of steps since the plan: each its own slot
        n_fresh = int(fresh.sum())
        assign[:, fresh] = keep_n + torch.arange(n_fresh)
        weight[:, fresh] = 1.0
        return assign, weight, keep_n + n_fresh

    def _replan(self, p, scores):
        """Plan over the tokens this forward computed on; store it in terms of token uids."""
        B = p["B"]
        a2, w2, n2 = self.comp.plan(p["n_out"], self.T, scores=scores, batch=B)  # over the current slots
        if p["assign"] is None:  # current slots are the window tokens themselves
            a1 = torch.arange(p["n"]).expand(B, -1)
            w1 = torch.ones(B, p["n"])
        else:
            a1, w1 = p["assign"], p["weight"]
        # compose: token -> current slot (a1, w1) -> new slot (a2, w2); weights normalised per current slot
        ok = a1 >= 0
        cur = a1.clamp(min=0)
        den = torch.zeros(B, p["n_out"]).scatter_add_(1, cur, torch.where(ok, w1, 0.0))
        w_tok = torch.where(ok, w1 / den.gather(1, cur).clamp(min=1e-12), 0.0)
        new = a2.gather(1, cur)
        w_new = w2.gather(1, cur) * w_tok
        keep = ok & (new >= 0) & (p["ids"] < p["step"])[None, :]  # the newest step joins "fresh" tokens
        counts = keep.sum(1)
        M = int(counts.max()) if B else 0
        # pack each row's kept members to the front (same M for all rows; padding has weight 0, slot 0)
        rank = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(a1, M))
        p_uid = torch.full((B, M + 1), -1, dtype=torch.long)
        p_slot = torch.zeros(B, M + 1, dtype=torch.long)
        p_w = torch.zeros(B, M + 1)
        p_uid.scatter_(1, rank, p["uid"].expand(B, -1).clone())
        p_slot.scatter_(1, rank, torch.where(keep, new, 0))
        p_w.scatter_(1, rank, torch.where(keep, w_new, 0.0))
        p_uid, p_slot, p_w = p_uid[:, :M], p_slot[:, :M], p_w[:, :M]
        n_slots = int(new[keep].max()) + 1 if bool(keep.any()) else 1  # slots holding only current-step tokens stay "fresh"
        p_uid = torch.where(p_w > 0, p_uid, torch.full_like(p_uid, -(2**62)))  # padding never matches a token
        self.plan = (p_uid, p_slot, p_w, n_slots)
        self.plan_step = p["step"]
        self.since = 0

    # ---- applying a plan to one forward ----------------------------------------------------------
    def _compressed_call(self, args, x, named, assign, weight, n_out, n):
        xs = merge_rows(x, assign, weight, n_out)  # (B, n_out, D)
        if self.hf:
            named["inputs_embeds"] = xs
            pos = named.get("position_ids")
            if pos is None:
                pos = torch.arange(n, device=x.device).expand(x.shape[0], -1)
            named["position_ids"] = _newest_member(assign, n_out, pos.expand(x.shape[0], -1))  # learned positions stay what training saw
            am = named.get("attention_mask")
            if am is not None:
                named["attention_mask"] = (merge_rows(am[..., None].float(), assign, torch.ones_like(weight), n_out)[..., 0] > 0.5).to(
                    am.dtype
                )
            return args, named
        kind = causal_mask_kind(named.get("mask"), n)
        if kind is not None:
            named["mask"] = causal_mask(n_out, kind, named["mask"])
        pad = named.get("src_key_padding_mask")
        if pad is not None:
            padded = pad.float() if pad.dtype == torch.bool else (pad < -1e4).float()
            merged = merge_rows(padded[..., None], assign, torch.ones_like(weight), n_out)[..., 0] > 0.999  # all members padded
            named["src_key_padding_mask"] = (
                merged if pad.dtype == torch.bool else torch.zeros_like(merged, dtype=pad.dtype).masked_fill(merged, float("-inf"))
            )
        named["src"] = xs if self.batch_first else xs.transpose(0, 1)
        return (), named

    def _expand_output(self, output, p):
        """Put each slot's output at its newest token's position; other positions get zeros."""
        if self.hf:
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        else:
            hidden = output
        if not self.hf and not self.batch_first:
            hidden = hidden.transpose(0, 1)
        assign = p["assign"].to(hidden.device)
        B, n = assign.shape
        slot_pos = _newest_member(assign, p["n_out"], torch.arange(n, device=hidden.device).expand(B, -1))  # (B, n_out)
        full = hidden.new_zeros(B, n, hidden.shape[-1])
        full.scatter_(1, slot_pos[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
        if self.hf:
            if isinstance(output, tuple):
                return (full, *output[1:])
            output.last_hidden_state = full
            return output
        return full if self.batch_first else full.transpose(0, 1)


def _newest_member(assign: torch.Tensor, n_out: int, values: torch.Tensor) -> torch.Tensor:
    """(B, n_out): for each output slot, `values` at its newest (right-most) member position."""
    B, n = assign.shape
    pos = torch.arange(n, device=assign.device).expand(B, -1)
    newest = torch.full((B, n_out), -1, dtype=torch.long, device=assign.device)
    newest.scatter_reduce_(1, assign.clamp(min=0), torch.where(assign >= 0, pos, -1), reduce="amax")
    return values.gather(1, newest.clamp(min=0))


def _token_uids(ids: torch.Tensor) -> torch.Tensor:
    """Unique ids for the positions of one forward: (step, index of the token within its step)."""
    n = ids.shape[0]
    order = torch.argsort(ids * (n + 1) + torch.arange(n), stable=True)
    within = torch.zeros(n, dtype=torch.long)
    sorted_ids = ids[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    start = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    within[order] = torch.arange(n) - start
    return ids * 64 + within


def _is_hf(module: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(module).__mro__)


def _batch_first(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            return m.batch_first
    return True
