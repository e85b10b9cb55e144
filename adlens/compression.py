"""History compression strategies: which cached tokens to keep, drop or merge.

    >>> comp = make_compression("topk", ratio=0.3, interval=20)
    >>> assign, weight, n_out = comp.plan(n=240, context=240, scores=scores)   # scores (B, 240)

A strategy looks at the `n` cached tokens in temporal order (oldest first) and returns a merge plan:
`assign (B, n)` sends each token to an output slot in `[0, n_out)` or drops it (-1), and
`weight (B, n)` weighs it inside its slot. The rollout applies the plan to the key/value cache
(`KVCache.apply_plan`) or to the token history (re-run engine), so every later step really computes
over the shorter context. Output slots keep temporal order and the newest token is always kept.

`ratio` is the fraction of the model's context kept (1.0 = no compression); the budget is
`round(ratio * context)` tokens, enforced every `interval` steps. Between compressions the context
grows again by up to `interval` tokens. Strategies marked `streaming` (sink_window) evict at every
step instead, so their context never exceeds the budget and `interval` does not apply.

Adding a strategy: one dataclass below (fields = validated hyper-parameters, a `plan` method or,
for a pure selection, a `keep_mask` method) and one line in `STRATEGIES`.
Prior art: StreamingLLM (sink + window, arXiv 2309.17453), H2O (accumulated attention, 2306.14048).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from adlens.errors import ConfigError


@dataclass
class Compression:
    """Base class. ratio: fraction of the context kept, in (0, 1]; interval: steps between compressions."""

    ratio: float = 0.5
    interval: int = 20
    needs_scores: ClassVar[bool] = False  # True: plan() needs accumulated attention scores
    # True: a pure recent-keeping eviction (the first n_sink tokens + the newest ones), applied at every
    # step as a rolling cache (StreamingLLM); `interval` is not used
    streaming: ClassVar[bool] = False

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"compression_ratio must be in (0, 1], got {self.ratio}")
        if self.interval < 1:
            raise ConfigError(f"compression_interval must be >= 1, got {self.interval}")

    def budget(self, context: int) -> int:
        return max(1, round(self.ratio * context))

    def check(self, context: int) -> None:
        """Validate the strategy's fields against the model's context; raises ValueError."""

    def due(self, steps_since: int, n: int, context: int) -> bool:
        return steps_since >= self.interval and n > self.budget(context)

    def keep_mask(self, n: int, budget: int, scores: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, n) bool, exactly `budget` True per row, the newest (last) always True."""
        raise NotImplementedError

    def plan(self, n: int, context: int, scores: torch.Tensor | None = None, batch: int | None = None):
        """Merge plan for n cached tokens: (assign (B, n) long, weight (B, n) float, n_out)."""
        batch = scores.shape[0] if scores is not None else (batch or 1)
        budget = self.budget(context)
        if n <= budget:
            return identity_plan(n, batch)
        keep = self.keep_mask(n, budget, scores, batch)
        return selection_plan(keep)


def merge_rows(x: torch.Tensor, assign: torch.Tensor, weight: torch.Tensor, n_out: int) -> torch.Tensor:
    """Apply a merge plan to (B, n, D) rows -> (B, n_out, D) weighted means."""
    B, n, D = x.shape
    w = torch.where(assign >= 0, weight, torch.zeros_like(weight)).to(x.dtype)  # (B, n)
    tgt = assign.clamp(min=0)
    num = torch.zeros(B, n_out, D, dtype=x.dtype, device=x.device).scatter_add_(1, tgt[..., None].expand(B, n, D), x * w[..., None])
    den = torch.zeros(B, n_out, dtype=x.dtype, device=x.device).scatter_add_(1, tgt, w)
    return num / den[..., None]


def identity_plan(n: int, batch: int):
    """Every token kept as it is."""
    return torch.arange(n).expand(batch, n).clone(), torch.ones(batch, n), n


def selection_plan(keep: torch.Tensor):
    """A plan that keeps the True positions of `keep (B, n)` (same count per row) and drops the rest."""
    n_out = int(keep[0].sum())
    assign = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(keep, -1, dtype=torch.long))
    return assign, keep.float(), n_out


def _recent_mask(n: int, n_recent: int, batch: int, device=None) -> torch.Tensor:
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    if n_recent > 0:
        mask[:, n - n_recent :] = True
    return mask


def _groups(n_old: int, n_slots: int) -> torch.Tensor:
    """Split positions 0..n_old-1 into n_slots contiguous, near-equal groups -> group id per position."""
    return torch.arange(n_old) * n_slots // n_old


@dataclass
class NoCompression(Compression):
    """The baseline: the full context, never compressed."""

    ratio: float = 1.0

    def due(self, steps_since: int, n: int, context: int) -> bool:
        return False

    def plan(self, n, context, scores=None, batch=None):
        batch = scores.shape[0] if scores is not None else (batch or 1)
        return identity_plan(n, batch)


@dataclass
class _RecentPlusMerged(Compression):
    """Keep the last `keep_recent` tokens; merge the older ones into the rest of the budget."""

    keep_recent: int = 20

    def check(self, context: int) -> None:
        if not 1 <= self.keep_recent <= context:
            raise ConfigError(f"keep_recent must be in [1, {context}] (the model's context), got {self.keep_recent}")

    def _weights(self, scores: torch.Tensor | None, batch: int, n_old: int) -> torch.Tensor:
        return torch.ones(batch, n_old)

    def _old_groups(self, n_old: int, n_slots: int) -> torch.Tensor:
        return _groups(n_old, n_slots)

    def plan(self, n, context, scores=None, batch=None):
        batch = scores.shape[0] if scores is not None else (batch or 1)
        budget = self.budget(context)
        if n <= budget:
            return identity_plan(n, batch)
        n_recent = min(self.keep_recent, budget)
        n_slots, n_old = budget - n_recent, n - n_recent
        if n_slots == 0:
            return selection_plan(_recent_mask(n, n_recent, batch))
        group = self._old_groups(n_old, n_slots)  # (n_old,), -1 = dropped
        n_used = int(group.max()) + 1
        assign = torch.cat([group, n_used + torch.arange(n_recent)]).expand(batch, n).clone()
        weight = torch.cat([self._weights(scores, batch, n_old), torch.ones(batch, n_recent)], dim=1)
        return assign, weight, n_used + n_recent


@dataclass
class FixedWindow(_RecentPlusMerged):
    """Last `keep_recent` tokens as they are; older ones averaged in equal windows to fit the budget."""


@dataclass
class Pooling(_RecentPlusMerged):
    """Older tokens pooled in windows, each token weighted by the attention it received.

    window_size: tokens per pooled window; None = as large as needed to fit the budget. With a fixed
    size, the oldest windows that do not fit the budget are dropped.
    """

    keep_recent: int = 20
    window_size: int | None = None
    needs_scores: ClassVar[bool] = True

    def check(self, context: int) -> None:
        super().check(context)
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"window_size must be >= 1, got {self.window_size}")

    def _weights(self, scores, batch, n_old):
        if scores is None:
            raise ConfigError("pooling needs attention scores")
        return scores[:, :n_old].float().clamp(min=0) + 1e-6

    def _old_groups(self, n_old, n_slots):
        if self.window_size is None:
            return _groups(n_old, n_slots)
        # windows of window_size counted back from the newest old token; keep the newest n_slots windows
        back = (n_old - 1 - torch.arange(n_old)) // self.window_size  # 0 = newest window
        n_win = min(n_slots, int(back.max()) + 1)
        return torch.where(back < n_win, n_win - 1 - back, torch.full_like(back, -1))


@dataclass
class TopK(Compression):
    """H2O-style: keep the tokens with the most accumulated attention, plus the newest `keep_recent`."""

    keep_recent: int = 4
    needs_scores: ClassVar[bool] = True

    def check(self, context: int) -> None:
        if not 1 <= self.keep_recent <= context:
            raise ConfigError(f"keep_recent must be in [1, {context}] (the model's context), got {self.keep_recent}")

    def keep_mask(self, n, budget, scores, batch):
        if scores is None:
            raise ConfigError("topk needs attention scores")
        n_recent = min(self.keep_recent, budget)
        keep = _recent_mask(n, n_recent, scores.shape[0], scores.device)
        k = budget - n_recent
        if k > 0:
            top = scores[:, : n - n_recent].topk(k, dim=1).indices
            keep.scatter_(1, top, True)
        return keep


@dataclass
class SinkWindow(Compression):
    """StreamingLLM: the first `n_sink` tokens (attention sinks) plus the most recent ones.

    A rolling window: evicts at every step once the context exceeds the budget (the KV engine keeps
    it as sink slots + a ring buffer, with no compaction), so `interval` is not used."""

    n_sink: int = 4
    streaming: ClassVar[bool] = True

    def due(self, steps_since: int, n: int, context: int) -> bool:
        return n > self.budget(context)

    def check(self, context: int) -> None:
        if not 0 <= self.n_sink < self.budget(context):
            raise ConfigError(f"n_sink must be in [0, {self.budget(context) - 1}] (below the budget), got {self.n_sink}")

    def keep_mask(self, n, budget, scores, batch):
        keep = _recent_mask(n, budget - self.n_sink, batch)
        keep[:, : self.n_sink] = True
        return keep


STRATEGIES: dict[str, type[Compression]] = {
    "none": NoCompression,
    "fixed_window": FixedWindow,
    "topk": TopK,
    "pooling": Pooling,
    "sink_window": SinkWindow,
}


def make_compression(name: str, context: int | None = None, **params) -> Compression:
    """Build a strategy by registry name; unknown names or parameters are errors that list the valid ones.

    Parameters that the strategy does not have are ignored only when passed as None.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown compression strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    valid = {f.name for f in fields(cls)}
    params = {k: v for k, v in params.items() if v is not None or k in valid}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ConfigError(f"strategy {name!r} has no parameter(s) {unknown}; valid: {sorted(valid)}")
    comp = cls(**params)
    if context is not None:
        comp.check(context)
    return comp
