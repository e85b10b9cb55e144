"""In-context rollout that never leaves the model's device: environments, tokens, the cached step,
sampling and returns are all tensors, so a step issues no host round trip and, on CUDA, a whole
episode of steps can be captured once in a CUDA graph and replayed.

    >>> env = TorchGridEnv(spec, spec.tasks_for("test") * 128, device="cuda")
    >>> out = run_on_device(model, env, n_episodes=50, seed=0, graph=True)
    >>> out["returns"].shape          # (B, n_episodes), as `run_episodes`

It computes the policy of `run_episodes(..., engine="kv")` without compression (tested: the same
logits at every step within 1e-5, before and after the window slides, and the same returns). The step
is the static-shape one: keys and values of all `max_context` slots, a validity mask, the slot to
write and the rotary position taken from tensors that the step itself advances, so shapes and
addresses never change from one step to the next. What it does not do: compression, attention
capture, and environments whose episodes end at different times (every grid episode lasts `horizon`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from adlens.errors import ConfigError
from model.ad import ADTransformer, Tokens
from model.cache import qkv_rotation
from model.rope import rope_cos_sin


def draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One action per row of probs (B, A): `torch.multinomial(probs, 1, generator=gen)[:, 0]`, drawn the
    way multinomial draws one sample (an exponential race: argmax of probs / Exp(1) noise) but without
    its host-side check of the probabilities, which waits for the device and cannot be captured in a
    CUDA graph. The same actions from the same generator (tested). The host loop (`run_episodes`)
    draws with it too: on a CPU it is about 4x cheaper than `torch.multinomial` (10 vs 36 us at 8
    environments), whose checks cost more than the draw."""
    return (probs / torch.empty_like(probs).exponential_(1, generator=gen)).argmax(-1)


class SlotCache:
    """The part of `KVCache` that `Block.step` uses, for a cache written at a slot held in a tensor:
    keys/values `kv (L, 2, B, H, C, Dh)`, an additive validity mask `valid (1, 1, 1, C)` and `slot (1,)`."""

    def __init__(self, n_layer, batch, n_head, capacity, head_size, device, dtype):
        self.kv = torch.zeros(n_layer, 2, batch, n_head, capacity, head_size, device=device, dtype=dtype)
        self.valid = torch.full((1, 1, 1, capacity), float("-inf"), device=device, dtype=dtype)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def write_kv(self, layer: int, kv: torch.Tensor):
        """kv (B, 2, H, 1, Dh) written at `slot`; returns all keys, values and the mask."""
        self.kv[layer].index_copy_(3, self.slot, kv.transpose(0, 1))
        return self.kv[layer, 0], self.kv[layer, 1], self.valid

    def note_query(self, layer: int, q: torch.Tensor) -> None:  # no scores: nothing is compressed
        pass


class DeviceRollout:
    """State of one rollout and its step (`step_`), which reads and advances only tensors."""

    def __init__(self, model: ADTransformer, env, n_episodes: int, greedy: bool = False, seed: int = 0):
        if n_episodes < 1:
            raise ConfigError(f"episodes must be >= 1, got {n_episodes}")
        p = next(model.parameters())
        if env.device != p.device:
            raise ConfigError(f"the environments are on {env.device} but the model is on {p.device}; put both on one device")
        cfg = model.cfg
        self.model, self.env, self.greedy, self.n_episodes = model, env, greedy, n_episodes
        B, dev, H = env.num_envs, p.device, env.spec.horizon
        self.B, self.H, self.T = B, H, cfg.max_context
        self.n_steps = n_episodes * H
        self.cache = SlotCache(cfg.n_layer, B, cfg.n_head, cfg.max_context, cfg.head_size, dev, p.dtype)
        model.resolve_step_params(refresh=True)  # as `new_cache` does
        self.rot = qkv_rotation(*rope_cos_sin(torch.arange(self.n_steps, device=dev), cfg.head_size, cfg.rope_base))  # every step's
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # rollout step = rotary position of the new token
        self.prev_a = torch.full((B, 1), cfg.n_actions, dtype=torch.long, device=dev)
        self.prev_r = torch.zeros(B, 1, device=dev)
        self.returns = torch.zeros(B, n_episodes, device=dev)
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        env.reset_()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes (the generator aside)."""
        c = self.cache
        return [c.kv, c.valid, c.slot, self.t, self.prev_a, self.prev_r, self.returns, *self.env.state_tensors()]

    def step_(self) -> torch.Tensor:
        """One step in every environment; returns the logits (B, A) it acted on."""
        model, B, c = self.model, self.B, self.cache
        tok = Tokens(self.env.state().view(B, 1), self.prev_a, self.prev_r, (self.t % self.H).expand(B, 1))
        x = model._embed_step(tok)  # (B, 1, D)
        c.slot.copy_(self.t % self.T)  # a sliding window once full: the oldest slot is overwritten
        c.valid.index_fill_(3, c.slot, 0.0)
        rot = self.rot.index_select(0, self.t)[0]  # (3, 1, 1, Dh/2) complex
        logits = model.step_rotated(x, rot, c)
        if self.greedy:
            actions = logits.argmax(-1)
        else:
            actions = draw(logits.softmax(-1), self.gen)
        rewards = self.env.step_(actions)
        self.returns.index_add_(1, self.t // self.H, rewards.view(B, 1))
        self.prev_a.copy_(actions.view(B, 1))
        self.prev_r.copy_(rewards.view(B, 1))
        self.t.add_(1)
        return logits

    def capture(self, steps: int) -> torch.cuda.CUDAGraph:
        """`steps` consecutive steps captured in one CUDA graph (CUDA only). Two warm-up steps run first
        on a side stream; the rollout's state is restored after them, so the rollout starts afresh."""
        saved = [t.clone() for t in self.state_tensors()]
        gen_state = self.gen.get_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step_()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self.state_tensors(), saved):
            t.copy_(s)
        self.gen.set_state(gen_state)
        graph = torch.cuda.CUDAGraph()
        if not self.greedy:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError(
                    f"torch {torch.__version__} cannot replay a seeded generator in a CUDA graph; sample greedily or update torch"
                )
            graph.register_generator_state(self.gen)  # replays draw fresh numbers from this generator
        with torch.cuda.graph(graph):
            for _ in range(steps):
                self.step_()
        return graph


@torch.inference_mode()
def run_on_device(
    model: ADTransformer, env, n_episodes: int, greedy: bool = False, seed: int = 0, graph: bool = False, progress: bool = False
) -> dict:
    """Roll the model out in-context for `n_episodes` episodes in every environment of `env` (a
    `TorchGridEnv` on the model's device). `graph` (CUDA only): capture one episode of steps in a CUDA
    graph and replay it; capture time is reported apart (`capture_s`) and not counted in `time_s`.
    Returns what `run_episodes` returns: returns (B, n_episodes), time_s, env_steps_per_second,
    mean_context_length."""
    model.eval()
    ro = DeviceRollout(model, env, n_episodes, greedy, seed)
    dev = ro.t.device
    if graph and dev.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device; the model is on {dev}")
    capture_s = 0.0
    if graph:
        t0 = time.perf_counter()
        g = ro.capture(ro.H)
        torch.cuda.synchronize(dev)
        capture_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = tqdm(total=ro.n_steps, desc="rollout[device]", disable=not progress, leave=False)
    if graph:
        for _ in range(n_episodes):
            g.replay()
            bar.update(ro.H)
    else:
        for _ in range(ro.n_steps):
            ro.step_()
            bar.update()
    bar.close()
    returns = ro.returns.double().cpu().numpy()  # waits for the device
    elapsed = time.perf_counter() - t0
    ctx = np.minimum(np.arange(1, ro.n_steps + 1), ro.T).mean()
    return {"returns": returns, "time_s": elapsed, "env_steps_per_second": ro.B * ro.n_steps / elapsed,
            "mean_context_length": float(ctx), "capture_s": capture_s}  # fmt: skip
