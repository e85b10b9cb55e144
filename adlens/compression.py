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

RL-aware strategies (`needs_meta`: reward_anchor, episode_pool, reward_recent) also get `meta`, a
`HistoryMeta` of what each cached token is in the learning history: the reward it carries (received
on arriving in its state, as the attention analysis counts rewarding tokens), its episode and its
step within that episode, each (B, n) in the same temporal order as the tokens. The engines keep it
aligned with the cache through every compaction (`merge_meta`): a merged slot carries the largest
reward of its members and the episode and step of its newest member. A strategy that needs it
refuses to plan without it (one line) rather than fall back silently.

Adding a strategy: one dataclass below (fields = validated hyper-parameters, a `plan` method or,
for a pure selection, a `keep_mask` method) and one line in `STRATEGIES`.
Prior art: StreamingLLM (sink + window, arXiv 2309.17453), H2O (accumulated attention, 2306.14048).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple

import torch

from adlens.errors import ConfigError


class HistoryMeta(NamedTuple):
    """What each cached token is in the learning history, (B, n) each, temporal order."""

    reward: torch.Tensor  # float, the reward the token carries (received on arriving in its state)
    episode: torch.Tensor  # long, episode index within the rollout (0 = the first)
    step: torch.Tensor  # long, step within its episode (0 = the episode's first token)


_STEP_SPAN = 1 << 32  # episode * _STEP_SPAN + step orders tokens by (episode, step)


def merge_meta(meta: HistoryMeta, assign: torch.Tensor, n_out: int) -> HistoryMeta:
    """Meta of the output slots of a merge plan: the largest reward of each slot's members, and the
    episode and step of its newest member (as `src_step` for the key/value cache)."""
    B, n = assign.shape
    keep = assign >= 0
    tgt = assign.clamp(min=0)
    reward = torch.full((B, n_out), float("-inf"), dtype=meta.reward.dtype, device=assign.device)
    reward.scatter_reduce_(1, tgt, torch.where(keep, meta.reward, float("-inf")), "amax")
    key = meta.episode * _STEP_SPAN + meta.step
    newest = torch.full((B, n_out), -1, dtype=torch.long, device=assign.device)
    newest.scatter_reduce_(1, tgt, torch.where(keep, key, -1), "amax")
    return HistoryMeta(reward, newest.div(_STEP_SPAN, rounding_mode="floor"), newest % _STEP_SPAN)


@dataclass
class Compression:
    """Base class. ratio: fraction of the context kept, in (0, 1]; interval: steps between compressions."""

    ratio: float = 0.5
    interval: int = 20
    needs_scores: ClassVar[bool] = False  # True: plan() needs accumulated attention scores
    # True: a pure recent-keeping eviction (the first n_sink tokens + the newest ones), applied at every
    # step as a rolling cache (StreamingLLM); `interval` is not used
    streaming: ClassVar[bool] = False
    needs_meta: ClassVar[bool] = False  # True: plan() needs `meta` (rewards and episodes per token)

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

    def plan(self, n: int, context: int, scores: torch.Tensor | None = None, batch: int | None = None,
             meta: HistoryMeta | None = None):  # fmt: skip
        """Merge plan for n cached tokens: (assign (B, n) long, weight (B, n) float, n_out).
        `meta` is passed only to strategies that set `needs_meta`."""
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


def _check_score_queries(comp) -> None:
    """score_queries (strategies that read attention scores): how many of the newest queries before
    each compaction the scores count; 0 = all since the last one (H2O). Fewer is cheaper: only those
    queries' attention rows are ever computed (SnapKV's observation window; 1 is TOVA's last query)."""
    if comp.score_queries < 0:
        raise ConfigError(f"score_queries must be >= 0 (0 = every query), got {comp.score_queries}")


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
    score_queries: int = 0
    needs_scores: ClassVar[bool] = True

    def check(self, context: int) -> None:
        super().check(context)
        _check_score_queries(self)
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
    score_queries: int = 0
    needs_scores: ClassVar[bool] = True

    def check(self, context: int) -> None:
        if not 1 <= self.keep_recent <= context:
            raise ConfigError(f"keep_recent must be in [1, {context}] (the model's context), got {self.keep_recent}")
        _check_score_queries(self)

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


# ---- RL-aware strategies: they read what each token is (`meta`) -------------------------------------
def _need_meta(name: str, meta: HistoryMeta | None, n: int) -> HistoryMeta:
    if meta is None:
        raise ConfigError(
            f"{name} needs each token's reward and episode; the kv and rerun engines pass them, a history without them cannot use it"
        )
    if meta.reward.shape[-1] != n:
        raise ValueError(f"meta covers {meta.reward.shape[-1]} tokens, the plan {n}")
    return meta


def first_reach(meta: HistoryMeta) -> torch.Tensor:
    """(B, n) bool: the first rewarded token of each episode in the history (the step the reward was
    first reached). A token at step 0 carries the previous episode's last reward, so it never counts."""
    rewarded = (meta.reward > 0) & (meta.step >= 1)
    count = rewarded.long().cumsum(1)  # rewarded tokens up to and including each position
    start = torch.ones_like(rewarded)
    start[:, 1:] = meta.episode[:, 1:] != meta.episode[:, :-1]
    before = torch.where(start, count - rewarded.long(), torch.zeros_like(count)).cummax(1).values  # count before its episode
    return rewarded & (count - before == 1)


def _leading(anchor: torch.Tensor, episode: torch.Tensor, lead: int) -> torch.Tensor:
    """(B, n) bool: the `lead` tokens before each anchor, within the anchor's episode."""
    out = torch.zeros_like(anchor)
    for d in range(1, lead + 1):
        out[:, :-d] |= anchor[:, d:] & (episode[:, :-d] == episode[:, d:])
    return out & ~anchor


def _batch(scores, batch, meta) -> int:
    if scores is not None:
        return scores.shape[0]
    if batch:
        return batch
    return meta.reward.shape[0] if meta is not None else 1


def _by_priority(priority: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, n) keep mask of the `budget` highest-priority tokens of every row (the same count in each)."""
    keep = torch.zeros_like(priority, dtype=torch.bool)
    return keep.scatter_(1, priority.topk(budget, dim=1).indices, True)


def _check_common(comp, context: int) -> None:
    if not 1 <= comp.keep_recent <= context:
        raise ConfigError(f"keep_recent must be in [1, {context}] (the model's context), got {comp.keep_recent}")


@dataclass
class RewardAnchor(Compression):
    """Keep the steps where a reward was first reached in each episode (of the newest `n_anchor`
    such episodes), and the `lead` steps that led there, plus `n_sink` first tokens and the newest
    `keep_recent`; fill the rest of the budget by accumulated attention (H2O). When anchors do not
    all fit, the newest are kept. Every row keeps exactly the budget: rows with fewer anchors keep
    more by attention.

    Why: in Darkroom the reward is paid on every step spent on the goal, so once the model exploits
    most tokens carry a reward; the first one of an episode (and how the agent got there) says where
    the goal is, which a recent window loses once that episode scrolls out."""

    keep_recent: int = 20  # defaults: the configuration measured in EXPERIMENTS.md (tuned on seeds 0-9)
    n_sink: int = 0
    lead: int = 0
    n_anchor: int = 4
    score_queries: int = 0
    needs_scores: ClassVar[bool] = True
    needs_meta: ClassVar[bool] = True

    def check(self, context: int) -> None:
        _check_common(self, context)
        _check_score_queries(self)
        if not 0 <= self.n_sink <= context:
            raise ConfigError(f"n_sink must be in [0, {context}] (the model's context), got {self.n_sink}")
        if self.lead < 0:
            raise ConfigError(f"lead must be >= 0, got {self.lead}")
        if not 0 <= self.n_anchor <= context:
            raise ConfigError(f"n_anchor must be in [0, {context}] (the model's context), got {self.n_anchor}")

    def plan(self, n, context, scores=None, batch=None, meta=None):
        batch = _batch(scores, batch, meta)
        budget = self.budget(context)
        if n <= budget:
            return identity_plan(n, batch)
        meta = _need_meta("reward_anchor", meta, n)
        if scores is None:
            raise ConfigError("reward_anchor needs attention scores")
        age = torch.arange(n, dtype=torch.float64) / n  # in [0, 1): newer is larger
        s = scores.double().clamp(min=0)
        fill = 0.999 * s / (s.amax(1, keepdim=True) + 1e-30)  # attention, in [0, 1)
        anchor = first_reach(meta)
        anchor &= anchor.flip(1).long().cumsum(1).flip(1) <= self.n_anchor  # the newest n_anchor
        priority = torch.where(anchor, 2.0 + age, torch.where(_leading(anchor, meta.episode, self.lead), 1.0 + age, fill))
        priority[:, : self.n_sink] = 3.0
        priority[:, n - min(self.keep_recent, budget) :] = 4.0
        return selection_plan(_by_priority(priority, budget))


@dataclass
class EpisodePool(Compression):
    """Each finished episode shrinks to `per_episode` slots: the step its reward was first reached
    (if it was) and the rest averaged in contiguous groups; the current episode and the newest
    `keep_recent` tokens are kept as they are. The oldest slots go first when the budget is full
    (within an episode, its pooled rest before its first rewarded step); rows (environments) keep
    one length, so a row with more slots drops its oldest extra ones.

    Why: the current and previous episodes draw most of the attention, and of an older episode the
    model needs little more than whether and where it found the reward."""

    per_episode: int = 2
    keep_recent: int = 0  # 16 in the configuration measured in EXPERIMENTS.md
    needs_meta: ClassVar[bool] = True

    def check(self, context: int) -> None:
        if not 1 <= self.per_episode <= context:
            raise ConfigError(f"per_episode must be in [1, {context}] (the model's context), got {self.per_episode}")
        if not 0 <= self.keep_recent <= context:
            raise ConfigError(f"keep_recent must be in [0, {context}] (the model's context), got {self.keep_recent}")

    def _row_slots(self, episode: list[int], anchor: list[bool], budget: int) -> list[list[int]]:
        """Output slots of one row (lists of member positions), at most `budget`, in temporal order of
        their newest member."""
        n = len(episode)
        recent = min(n - self.keep_recent, next(i for i in range(n) if episode[i] == episode[-1]))  # kept as they are from here
        slots, start = [], 0  # (kept as is, episode, is anchor, newest member, members): the drop order
        while start < recent:
            end = start
            while end < recent and episode[end] == episode[start]:
                end += 1
            idx = list(range(start, end))
            if len(idx) <= self.per_episode:  # already small
                slots += [(False, episode[start], True, i, [i]) for i in idx]
            else:
                keep = [i for i in idx if anchor[i]][: self.per_episode]
                rest = [i for i in idx if not anchor[i]]
                k = self.per_episode - len(keep)
                groups = [rest[g * len(rest) // k : (g + 1) * len(rest) // k] for g in range(k)] if k else []
                slots += [(False, episode[start], True, a, [a]) for a in keep]
                slots += [(False, episode[start], False, max(g), g) for g in groups if g]
            start = end
        slots += [(True, episode[i], True, i, [i]) for i in range(recent, n)]
        kept = sorted(slots, key=lambda s: s[:4])[max(0, len(slots) - budget) :]
        return [s[4] for s in sorted(kept, key=lambda s: s[3])]

    def plan(self, n, context, scores=None, batch=None, meta=None):
        batch = _batch(scores, batch, meta)
        budget = self.budget(context)
        if n <= budget:
            return identity_plan(n, batch)
        meta = _need_meta("episode_pool", meta, n)
        anchor = first_reach(meta).tolist()
        rows = [self._row_slots(ep, an, budget) for ep, an in zip(meta.episode.tolist(), anchor)]
        n_out = min(len(r) for r in rows)  # rows keep one length: a row with more slots drops its oldest
        assign = torch.full((batch, n), -1, dtype=torch.long)
        for b, slots in enumerate(rows):
            for j, members in enumerate(slots[len(slots) - n_out :]):
                assign[b, members] = j
        return assign, torch.ones(batch, n), n_out


@dataclass
class RewardRecent(Compression):
    """The newest `keep_recent` tokens and the newest `n_reward` rewarded tokens older than those; the
    rest of the budget goes to the newest of the others. No attention scores, so the KV engine keeps
    its fused kernel.

    Why: in the attention figures rewarded tokens are 15% of the context and draw half the newest
    token's attention, and the rest goes mostly to recent steps: keep exactly those two."""

    keep_recent: int = 16  # defaults: the configuration measured in EXPERIMENTS.md (tuned on seeds 0-9)
    n_reward: int = 8
    needs_meta: ClassVar[bool] = True

    def check(self, context: int) -> None:
        _check_common(self, context)
        if not 0 <= self.n_reward <= context:
            raise ConfigError(f"n_reward must be in [0, {context}] (the model's context), got {self.n_reward}")

    def plan(self, n, context, scores=None, batch=None, meta=None):
        batch = _batch(scores, batch, meta)
        budget = self.budget(context)
        if n <= budget:
            return identity_plan(n, batch)
        meta = _need_meta("reward_recent", meta, n)
        age = torch.arange(n, dtype=torch.float64) / n
        n_recent = min(self.keep_recent, budget)
        rewarded = (meta.reward > 0) & (meta.step >= 1)
        rewarded[:, n - n_recent :] = False  # kept anyway
        newest_first = rewarded.flip(1).long().cumsum(1).flip(1)  # 1 = the newest rewarded token
        priority = torch.where(rewarded & (newest_first <= self.n_reward), 2.0 + age, age).expand(batch, n).clone()
        priority[:, n - n_recent :] = 4.0
        return selection_plan(_by_priority(priority, budget))


STRATEGIES: dict[str, type[Compression]] = {
    "none": NoCompression,
    "fixed_window": FixedWindow,
    "topk": TopK,
    "pooling": Pooling,
    "sink_window": SinkWindow,
    "reward_anchor": RewardAnchor,
    "episode_pool": EpisodePool,
    "reward_recent": RewardRecent,
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
