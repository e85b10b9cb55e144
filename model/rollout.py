"""In-context rollout: the AD model acts in B environments at once, its context growing by one
token per step, optionally compressed. Two engines compute the same policy:

    kv     one new token per step through a key/value cache (the project's default)
    rerun  the whole context re-run through the transformer every step (how AD is often evaluated,
           and what a model with learned absolute positions must do)

    >>> out = run_episodes(model, venv, spec, n_episodes=50, engine="kv", seed=0)
    >>> out["returns"].shape          # (B, n_episodes)

Both engines see exactly the same tokens. Until the context holds `max_context` tokens they give the
same action probabilities (test); after that, `kv` keeps the cached keys/values of older tokens as
they were computed when those tokens arrived (a streaming window, as in Transformer-XL and
StreamingLLM), while `rerun` recomputes them from the window alone. With compression both keep the
same tokens for the same plan: streaming strategies (sink_window) evict at every step in both.
Strategies that read what each token is (`needs_meta`: its reward, episode and step) get it from
both engines alike: the KV cache carries it per slot, the re-run engine beside its token history.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from adlens.capture import capture_attention
from adlens.compression import Compression, HistoryMeta, merge_meta, merge_rows
from adlens.errors import ConfigError
from model.ad import ADTransformer, Tokens
from model.device_rollout import draw

ENGINES = ("kv", "rerun")


class EpisodeCounter:
    """Meta of each new token from the tokens themselves: the reward it carries, its step within the
    episode (its timestep) and its episode (counted per environment: a new one at every timestep 0)."""

    def __init__(self, batch: int, device=None):
        self.episode = torch.full((batch,), -1, dtype=torch.long, device=device)

    def __call__(self, tok: Tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = tok.timesteps[:, -1]
        self.episode += ((step == 0) | (self.episode < 0)).long()
        return tok.prev_rewards[:, -1].float(), self.episode.clone(), step


def _plan(comp: Compression, n: int, context: int, batch: int, scores=None, meta: HistoryMeta | None = None):
    """The strategy's plan, built on the CPU; meta only for strategies that read it."""
    extra = {"meta": HistoryMeta(*(m.cpu() for m in meta))} if comp.needs_meta else {}
    return comp.plan(n, context, scores=scores, batch=batch, **extra)


def score_queries(comp: Compression) -> int:
    """How many of the newest queries before each compaction a scoring strategy counts (0 = all of them
    since the last compaction; below the interval the others are never scored, which is cheaper)."""
    k = getattr(comp, "score_queries", 0) if comp.needs_scores else 0
    return k if k < comp.interval else 0


class KVEngine:
    """Incremental rollout over a key/value cache; compression acts on the cache.

    Uncompressed (or ratio 1.0): a `KVCache` of `max_context` slots, a sliding window once full.
    Streaming strategies (sink_window): a `StreamingCache` of `budget` slots, never compacted.
    Other strategies: a static-shape `KVCache` of `budget + interval` slots (the most the compressed
    context holds), compacted by the strategy's plan when due; scores, if the strategy needs them,
    are summed from the step's own attention weights (`eager_scores`, on a CPU) or computed lazily at
    compaction from stored queries (elsewhere, or `eager_scores=False`). `static=False` attends over
    the valid prefix instead (slower where the batch is large: a prefix is not contiguous and the
    fused kernel copies it).
    """

    def __init__(self, model: ADTransformer, batch: int, compression: Compression | None = None, static: bool = True,
                 eager_scores: bool | None = None):  # fmt: skip
        self.model, self.T = model, model.cfg.max_context
        budget = compression.budget(self.T) if compression is not None else self.T
        self.comp = compression if budget < self.T else None  # a budget of the whole context never compresses
        self._score_last = 0
        if self.comp is None:
            self.cache = model.new_cache(batch)
        elif self.comp.streaming:
            self.cache = model.new_cache(batch, capacity=budget, n_sink=getattr(self.comp, "n_sink", 0), static=static)
        else:
            capacity = min(self.T, budget + self.comp.interval)
            self._score_last = score_queries(self.comp)
            self.cache = model.new_cache(batch, capacity=capacity, track_scores=self.comp.needs_scores, static=static,
                                         score_window=self._score_last or self.comp.interval, track_meta=self.comp.needs_meta,
                                         eager_scores=eager_scores)  # fmt: skip
        self._count = EpisodeCounter(batch, next(model.parameters()).device) if self.comp is not None and self.comp.needs_meta else None
        self._since = 0

    def __len__(self) -> int:
        return len(self.cache)

    def step(self, tok: Tokens) -> torch.Tensor:
        if self.comp is not None and self._score_last:  # only the last queries of each interval count
            self.cache.note_queries = self._since % self.comp.interval >= self.comp.interval - self._score_last
        logits = self.model.step(tok, self.cache)  # (B, A)
        if self._count is not None:
            self.cache.set_meta(*self._count(tok))
        self._since += 1
        comp = self.comp
        if comp is not None and not comp.streaming and comp.due(self._since, len(self.cache), self.T):
            n = len(self.cache)
            scores = self.cache.ordered_scores()  # plans are small: built on the CPU, applied on the cache's device
            scores = scores.cpu() if scores is not None else None
            assign, weight, n_out = _plan(comp, n, self.T, self.cache.k.shape[1], scores, self.cache.ordered_meta())
            self.cache.apply_plan(assign.to(self.cache.k.device), weight.to(self.cache.k.device), n_out)
            self._since = 0
        return logits


class RerunEngine:
    """Re-runs the whole context each step; compression acts on the history of input embeddings
    (and, for strategies that read it, on the meta of each history token beside it)."""

    def __init__(self, model: ADTransformer, batch: int, compression: Compression | None = None):
        self.model, self.comp, self.T = model, compression, model.cfg.max_context
        p = next(model.parameters())
        self.x = torch.zeros(batch, self.T, model.cfg.d_model, device=p.device, dtype=p.dtype)  # (B, T, D)
        self.meta: HistoryMeta | None = None  # (B, T) each, aligned with x
        self._count = None
        if compression is not None and compression.needs_meta:
            self._count = EpisodeCounter(batch, p.device)
            zeros = [torch.zeros(batch, self.T, dtype=dtype, device=p.device) for dtype in (torch.float32, torch.long, torch.long)]
            self.meta = HistoryMeta(*zeros)
        self.n = 0
        self._since = 0

    def __len__(self) -> int:
        return self.n

    @torch.no_grad()
    def step(self, tok: Tokens) -> torch.Tensor:
        new = self.model.embed(tok)  # (B, 1, D)
        if self.n == self.T:  # slide: drop the oldest
            self.x = torch.roll(self.x, -1, dims=1)
            if self.meta is not None:
                self.meta = HistoryMeta(*(torch.roll(m, -1, dims=1) for m in self.meta))
            self.n -= 1
        self.x[:, self.n] = new[:, 0]
        if self.meta is not None:
            for m, value in zip(self.meta, self._count(tok)):
                m[:, self.n] = value
        self.n += 1
        self._since += 1
        if self.comp is not None and self.comp.streaming and self.comp.due(self._since, self.n, self.T):
            # a rolling window (as the KV engine's ring buffer): evict before the step, never attend over more than the budget
            assign, weight, n_out = self.comp.plan(self.n, self.T, batch=self.x.shape[0])
            self.x[:, :n_out] = merge_rows(self.x[:, : self.n], assign.to(self.x.device), weight.to(self.x.device), n_out)
            self.n = n_out
        due = self.comp is not None and not self.comp.streaming and self.comp.due(self._since, self.n, self.T)
        if due and self.comp.needs_scores:
            with capture_attention(self.model) as rec:
                logits = self.model.forward_embeddings(self.x[:, : self.n])[:, -1]
            # H2O-style scores: attention received from the queries since the last compression
            attn = rec.stacked()[:, :, :, -min(self._since, score_queries(self.comp) or self._since) :]  # (L, B, H, q, n)
            scores = attn.sum(3).mean((0, 2)).cpu()  # (B, n); plans are built on the CPU
        else:
            logits = self.model.forward_embeddings(self.x[:, : self.n])[:, -1]
            scores = None
        if due:
            assign, weight, n_out = _plan(self.comp, self.n, self.T, self.x.shape[0], scores, self._meta_now())
            assign = assign.to(self.x.device)
            self.x[:, :n_out] = merge_rows(self.x[:, : self.n], assign, weight.to(self.x.device), n_out)
            if self.meta is not None:
                for m, merged in zip(self.meta, merge_meta(self._meta_now(), assign, n_out)):
                    m[:, :n_out] = merged
            self.n = n_out
            self._since = 0
        return logits

    def _meta_now(self) -> HistoryMeta | None:
        return HistoryMeta(*(m[:, : self.n] for m in self.meta)) if self.meta is not None else None


def make_engine(name: str, model: ADTransformer, batch: int, compression: Compression | None = None, **options):
    """`options` go to the engine (KVEngine: static)."""
    if name == "kv":
        return KVEngine(model, batch, compression, **options)
    if name == "rerun":
        return RerunEngine(model, batch, compression, **options)
    raise ConfigError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")


@torch.inference_mode()  # not no_grad: no version counters or autograd checks on any tensor (~10% per step)
def run_episodes(
    model: ADTransformer,
    venv,
    spec,
    n_episodes: int,
    engine: str = "kv",
    compression: Compression | None = None,
    greedy: bool = False,
    seed: int = 0,
    on_step: Callable | None = None,
    progress: bool = False,
) -> dict:
    """Roll the model out in-context for `n_episodes` episodes in every environment of `venv`.

    venv     : a stable-baselines3-style VecEnv (reset() -> obs (B, 2); step(a) -> obs, r, done, info)
               whose episodes all last `spec.horizon` steps
    on_step  : called as on_step(t, tok, actions, rewards, engine) after every step
    Returns returns (B, n_episodes), time_s, env_steps_per_second, mean_context_length.
    """
    if n_episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {n_episodes}")
    model.eval()
    device = next(model.parameters()).device
    B, H = venv.num_envs, spec.horizon
    eng = make_engine(engine, model, B, compression)
    gen = torch.Generator(device=device).manual_seed(seed)
    returns = np.zeros((B, n_episodes))
    prev_a = torch.full((B, 1), model.cfg.n_actions, dtype=torch.long, device=device)
    prev_r = torch.zeros(B, 1, device=device)
    ctx_total = 0
    obs = venv.reset()
    n_steps = n_episodes * H
    t0 = time.perf_counter()
    for t in tqdm(range(n_steps), desc=f"rollout[{engine}]", disable=not progress, leave=False):
        states = torch.as_tensor(spec.state_index(obs), device=device).view(B, 1)
        tok = Tokens(states, prev_a, prev_r, torch.full((B, 1), t % H, dtype=torch.long, device=device))
        logits = eng.step(tok)  # (B, A)
        ctx_total += len(eng)
        if greedy:
            actions = logits.argmax(-1)
        else:
            actions = draw(logits.softmax(-1), gen)  # = torch.multinomial(.., 1, generator=gen)[:, 0], ~4x cheaper
        obs, rewards, _dones, _infos = venv.step(actions.cpu().numpy())
        returns[:, t // H] += rewards
        if on_step is not None:
            on_step(t, tok, actions, rewards, eng)
        prev_a = actions.view(B, 1)
        prev_r = torch.as_tensor(rewards, dtype=torch.float32, device=device).view(B, 1)
    elapsed = time.perf_counter() - t0
    return {
        "returns": returns,
        "time_s": elapsed,
        "env_steps_per_second": B * n_steps / elapsed,
        "mean_context_length": ctx_total / n_steps,
    }
