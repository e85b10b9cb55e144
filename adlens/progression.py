"""Attention across training: the numbers of one training snapshot, from its captures and its
in-context returns, and when each of them emerges. Pure: arrays and dicts in, numbers out.

    >>> point = attention_point([capture_numbers(load_capture(p)) for p in paths])  # one snapshot
    >>> emergence_step([10, 100, 1000], [0.0, 0.2, 1.0])             # first step at half the rise
    1000

The script behind it: `python training_progression.py --snapshots runs/progression/darkroom_ad`.
Every metric is the one `analyze_attention.py` reports (`adlens.metrics.summarize`), averaged over
the snapshot's captures (tasks x seeds); see `ATTENTION_KEYS`.
"""

from __future__ import annotations

import warnings

import numpy as np

from adlens.metrics import episode_attention, informative_steps, normalise_rows, reward_attention, summarize, to_numpy, valid_mask

# name in the progression -> what it is (all from adlens.metrics.summarize unless said otherwise)
ATTENTION_KEYS = {
    "reward_enrichment": "attention on rewarding transitions / their share of the context (1 = no preference)",
    "reward_attention_share": "share of attention on rewarding transitions (captures that hold any)",
    "reward_context_share": "rewarding transitions' share of the context (same captures)",
    "current_episode_share": "attention on the current episode's tokens (steps whose context also holds earlier episodes)",
    "current_episode_context_share": "the current episode's share of the context (same steps; uniform attention's value)",
    "previous_episode_share": "attention on the episode before the current one (same steps)",
    "earlier_episodes_share": "attention on all earlier episodes = 1 - current_episode_share",
    "recent_share": "attention on the newest `recent_window` tokens",
    "last_episode_share": "attention on the newest `horizon` tokens",
    "positions_for_90": "fewest context positions holding 90% of the attention",
    "fraction_for_90": "the same as a fraction of the context",
    "entropy_normalised": "attention entropy / log(context length), mean over layers and heads",
}


def _nanmean(x) -> float | None:
    x = np.asarray([np.nan if v is None else v for v in x], dtype=np.float64)
    if not np.isfinite(x).any():
        return None
    return float(np.nanmean(x))


def layer_reward_enrichment(cap: dict, min_len: int) -> list[float | None]:
    """Per layer: attention on rewarding transitions over their share of the context, at the
    informative steps (context longer than `min_len`) whose context holds any. None for a layer when
    no such step exists."""
    n = np.asarray(to_numpy(cap["context_len"]), dtype=np.int64)
    rows = normalise_rows(cap["query_attn"], n)  # (S, L, H, T)
    share, ctx = reward_attention(rows.mean(2), n, to_numpy(cap["ctx_step"]), cap["reward"])  # (S, L), (S,)
    use = informative_steps(n, min_len) & (ctx > 0)
    if not use.any():
        return [None] * rows.shape[1]
    return [float(v) for v in share[use].mean(0) / ctx[use].mean()]


def episode_numbers(cap: dict, min_len: int) -> dict:
    """Attention on the current episode vs earlier ones, averaged over the informative steps
    (context longer than `min_len`) whose context holds an earlier episode; the attention is the
    query rows averaged over layers and heads. None when no step qualifies."""
    n = np.asarray(to_numpy(cap["context_len"]), dtype=np.int64)
    rows = normalise_rows(normalise_rows(cap["query_attn"], n).mean(axis=(1, 2)), n)  # (S, T)
    steps, episode = to_numpy(cap["ctx_step"]), to_numpy(cap["episode"])
    ep = episode_attention(rows, n, steps, episode, 1)  # (S, 2): current, previous
    uniform = valid_mask(n, rows.shape[-1]) / np.maximum(n, 1)[:, None]
    ctx = episode_attention(uniform, n, steps, episode, 0)[:, 0]  # (S,) current episode's share of the context
    use = informative_steps(n, min_len) & np.isfinite(ep[:, 1])
    if not use.any():
        return dict.fromkeys(("current_episode_share", "current_episode_context_share", "previous_episode_share", "earlier_episodes_share"))
    current = float(ep[use, 0].mean())
    return {
        "current_episode_share": current,
        "current_episode_context_share": float(ctx[use].mean()),
        "previous_episode_share": float(ep[use, 1].mean()),
        "earlier_episodes_share": 1.0 - current,
    }


def capture_numbers(cap: dict, recent_window: int = 5, sink_positions: int = 4) -> dict:
    """The progression's attention numbers for one capture (see ATTENTION_KEYS), plus per-layer lists
    `entropy_normalised_per_layer` and `reward_enrichment_per_layer`."""
    s = summarize(cap, recent_window=recent_window, sink_positions=sink_positions)
    return {
        "reward_enrichment": s["reward_enrichment"],
        "reward_attention_share": s["reward_attention_share"],
        "reward_context_share": s["reward_context_share"],
        **episode_numbers(cap, recent_window + sink_positions),
        "recent_share": s["recent_share"],
        "last_episode_share": s["last_episode_share"],
        "positions_for_90": s["positions_for_90"],
        "fraction_for_90": s["fraction_for_90"],
        "entropy_normalised": s["entropy_normalised"],
        "entropy_normalised_per_layer": [float(v) for v in np.asarray(s["entropy_normalised_lh"]).mean(1)],
        "reward_enrichment_per_layer": layer_reward_enrichment(cap, recent_window + sink_positions),
    }


def attention_point(numbers: list[dict]) -> dict:
    """Average `capture_numbers` over a snapshot's captures. A metric undefined in some captures
    (reward metrics where the rollout never reached a reward) is averaged over the others;
    `n_captures_with_reward` says over how many."""
    if not numbers:
        raise ValueError("attention_point needs at least one capture")
    out: dict = {"n_captures": len(numbers)}
    out["n_captures_with_reward"] = sum(x["reward_enrichment"] is not None for x in numbers)
    for key in ATTENTION_KEYS:
        out[key] = _nanmean([x[key] for x in numbers])
    for key in ("entropy_normalised_per_layer", "reward_enrichment_per_layer"):
        out[key] = [_nanmean(col) for col in zip(*[x[key] for x in numbers])]
    return out


def return_point(normalized_returns, late_episodes: int) -> dict:
    """In-context return of one snapshot from normalised returns (n_seeds, n_tasks, n_episodes).

    Returns episode 1 and the mean of the last `late_episodes` episodes (task means per seed, then
    their mean and standard error over seeds), and the per-episode curve.
    """
    r = np.asarray(normalized_returns, dtype=np.float64)
    if r.ndim != 3 or r.shape[2] < 1:
        raise ValueError(f"normalized_returns must be (n_seeds, n_tasks, n_episodes), got shape {r.shape}")
    late = min(max(int(late_episodes), 1), r.shape[2])
    first = r[:, :, 0].mean(1)  # (n_seeds,)
    last = r[:, :, -late:].mean((1, 2))

    def se(x):
        return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None

    return {
        "episode_1": float(first.mean()),
        "episode_1_se": se(first),
        "late": float(last.mean()),
        "late_se": se(last),
        "late_episodes": late,
        "curve": r.mean((0, 1)).tolist(),
    }


def emergence_step(steps, values, fraction: float = 0.5, rel_tol: float = 1e-3) -> int | None:
    """First step at which `values` has covered `fraction` of its rise (or fall) from the first
    snapshot to its extreme over the run. None when it has fewer than two values or its largest
    change is at most `rel_tol` of its largest magnitude.

    The direction is that of the largest change from the first value, so a metric that falls
    (e.g. entropy) emerges when it has fallen by `fraction` of its largest fall.
    """
    s = np.asarray(steps)
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    ok = np.isfinite(v)
    if ok.sum() < 2:
        return None
    s, v = s[ok], v[ok]
    delta = v - v[0]
    peak = delta[np.argmax(np.abs(delta))]
    if abs(peak) <= rel_tol * max(np.abs(v).max(), 1e-12):  # flat up to rounding: nothing emerges
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hit = np.nonzero(delta / peak >= fraction)[0]
    return int(s[hit[0]])


def emergence(points: list[dict], fraction: float = 0.5) -> dict:
    """`emergence_step` of the returns (episode 1, late) and of every attention metric over a list
    of snapshot records {"step", "returns", "attention"} sorted by step."""
    steps = [p["step"] for p in points]
    out = {f"return_{k}": emergence_step(steps, [p["returns"][k] for p in points], fraction) for k in ("episode_1", "late")}
    for key in ATTENTION_KEYS:
        out[key] = emergence_step(steps, [p["attention"][key] for p in points], fraction)
    return out
