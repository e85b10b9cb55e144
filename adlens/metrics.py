"""Pure attention metrics for an AD attention capture: arrays in, numbers and arrays out, no plotting.

    >>> from adlens.capture_file import load_capture
    >>> from adlens.metrics import summarize
    >>> summarize(load_capture("runs/attention/capture.pt"))["recent_share"]   # the script behind it:
    $ python analyze_attention.py --capture runs/attention/capture.pt

Conventions (see `adlens/capture_file.py` for the capture format):
    S  rollout steps   L  layers   H  heads   T  maximum context length   R  relative offsets (<= T)
    `attn (S, ..., T)`: the query token's attention at each step, positions in temporal order, the
    query itself at position `context_len[s] - 1`, zeros beyond it. "Relative position" j >= 0 means
    the token j steps before the query (j = 0 is the query itself, shown as -j in plots).

Summary numbers are averaged over the *informative* steps: those whose context is longer than
`recent_window + sink_positions`. On shorter contexts the recent window and the first positions
overlap or cover everything, which would make every model look "recent" and "sink-heavy".
Sizes a compression budget must cover (recent windows, top-k fractions) are read off the *long*
steps, whose context is at least 90% of the longest captured one, because that is where a budget
is enforced.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from adlens.errors import ConfigError

# Steps whose context is at least this fraction of the longest captured one count as "long".
LONG_CONTEXT = 0.9
# Tolerance when comparing cumulative attention against a target mass (rows are stored in float16).
_MASS_TOL = 1e-6


def to_numpy(x) -> np.ndarray:
    """A tensor or array as numpy; floating tensors become float64 (float16 captures are upcast before summing)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.numpy().astype(np.float64) if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def valid_mask(context_len, T: int) -> np.ndarray:
    """(S,) context lengths -> (S, T) bool, True where a context position holds a token."""
    return np.arange(T)[None, :] < np.asarray(context_len)[:, None]


def normalise_rows(attn, context_len) -> np.ndarray:
    """Zero positions beyond the context and rescale each row to sum to 1.

    attn : (S, ..., T) attention rows; context_len : (S,). Returns float64 (S, ..., T).
    """
    a = to_numpy(attn).astype(np.float64)
    mask = valid_mask(to_numpy(context_len), a.shape[-1])
    a = np.where(mask.reshape(mask.shape[:1] + (1,) * (a.ndim - 2) + mask.shape[1:]), a, 0.0)
    total = a.sum(-1, keepdims=True)
    return np.divide(a, total, out=np.zeros_like(a), where=total > 0)


def right_align(attn, context_len, fill: float = np.nan) -> np.ndarray:
    """Reindex rows by relative position: out[s, ..., j] = attention on the token j steps before the query.

    attn : (S, ..., T); context_len : (S,). Returns (S, ..., T) with `fill` where j >= context_len[s].
    """
    a = to_numpy(attn)
    S, T = a.shape[0], a.shape[-1]
    n = np.asarray(to_numpy(context_len), dtype=np.int64)
    idx = n[:, None] - 1 - np.arange(T)[None, :]  # (S, T) absolute position of relative offset j
    ok = idx >= 0
    flat = a.reshape(S, -1, T)
    out = np.take_along_axis(flat, np.clip(idx, 0, T - 1)[:, None, :].repeat(flat.shape[1], 1), axis=-1)
    out = np.where(ok[:, None, :], out, fill)
    return out.reshape(a.shape)


def informative_steps(context_len, min_len: int) -> np.ndarray:
    """(S,) bool: steps whose context is longer than `min_len`; all steps if none is."""
    n = np.asarray(to_numpy(context_len))
    keep = n > min_len
    return keep if keep.any() else np.ones_like(keep, dtype=bool)


# ---- per-row metrics ---------------------------------------------------------------------------
def recent_share(attn, context_len, window: int) -> np.ndarray:
    """Share of attention on the newest `window` positions (the query included).

    attn : (S, ..., T) normalised rows. Returns (S, ...).
    """
    aligned = right_align(attn, context_len, fill=0.0)
    return aligned[..., :window].sum(-1)


def recent_share_curve(attn, context_len) -> np.ndarray:
    """share[s, ..., k-1] = attention on the newest k positions, for k = 1..T. Returns (S, ..., T)."""
    return np.cumsum(right_align(attn, context_len, fill=0.0), axis=-1)


def sink_share(attn, n_sink: int) -> np.ndarray:
    """Share of attention on the first `n_sink` context positions (the oldest tokens held; the
    'attention sinks' of StreamingLLM, arXiv 2309.17453). attn (S, ..., T) -> (S, ...)."""
    return to_numpy(attn)[..., :n_sink].sum(-1)


def attention_entropy(attn) -> np.ndarray:
    """Shannon entropy in nats of each row: (..., T) -> (...). 0 = all weight on one position."""
    a = to_numpy(attn)
    logs = np.log(np.where(a > 0, a, 1.0))
    return -(a * logs).sum(-1)


def normalised_entropy(attn, context_len) -> np.ndarray:
    """Entropy divided by log(context length): 1 = uniform over the context. (S, ..., T) -> (S, ...);
    rows with a single position give 0."""
    ent = attention_entropy(attn)
    n = np.asarray(to_numpy(context_len), dtype=np.float64).reshape((-1,) + (1,) * (ent.ndim - 1))
    log_n = np.log(np.maximum(n, 1.0))
    return np.divide(ent, log_n, out=np.zeros_like(ent), where=log_n > 0)


def max_attention(attn) -> np.ndarray:
    """Largest weight of each row: (..., T) -> (...)."""
    return to_numpy(attn).max(-1)


def sorted_cumulative(attn) -> np.ndarray:
    """Cumulative attention over positions sorted by weight, largest first: (..., T) -> (..., T)."""
    a = to_numpy(attn)
    return np.cumsum(-np.sort(-a, axis=-1), axis=-1)


def positions_for_mass(attn, context_len, mass: float) -> np.ndarray:
    """Fewest positions whose attention adds up to `mass` (keeping the heaviest first).

    attn : (S, ..., T) normalised rows; context_len : (S,). Returns int (S, ...).
    Uniform attention over n positions gives ceil(mass * n); one-hot gives 1.
    """
    if not 0 < mass <= 1:
        raise ConfigError(f"mass must be in (0, 1], got {mass}")
    cum = sorted_cumulative(attn)
    count = (cum < mass - _MASS_TOL).sum(-1) + 1
    n = np.asarray(to_numpy(context_len)).reshape((-1,) + (1,) * (count.ndim - 1))
    return np.minimum(count, np.maximum(n, 1))


def cumulative_attention_curve(attn, context_len, n_points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Attention kept when keeping the top fraction f of the context, f on a grid of `n_points`.

    attn : (S, T) normalised rows. Returns (fractions (P,), curves (S, P)); each curve is the sorted
    cumulative attention, linearly interpolated between whole positions.
    """
    a = to_numpy(attn)
    n = np.asarray(to_numpy(context_len), dtype=np.int64)
    cum = sorted_cumulative(a)  # (S, T)
    fractions = np.linspace(0.0, 1.0, n_points)
    curves = np.empty((a.shape[0], n_points))
    for s in range(a.shape[0]):
        k = max(int(n[s]), 1)
        curves[s] = np.interp(fractions * k, np.arange(k + 1), np.concatenate([[0.0], cum[s, :k]]))
    return fractions, curves


def fraction_at_mass(fractions, curve, mass: float) -> float:
    """First context fraction at which a (monotone) cumulative curve reaches `mass`."""
    curve = np.asarray(curve)
    hit = np.nonzero(curve >= mass - _MASS_TOL)[0]
    return float(fractions[hit[0]]) if len(hit) else 1.0


# ---- in-context RL views -----------------------------------------------------------------------
def episode_attention(attn, context_len, ctx_step, episode, n_back: int) -> np.ndarray:
    """Attention summed per past episode: out[s, ..., e] = share on episode (current - e).

    attn : (S, ..., T); ctx_step : (S, T) rollout step at each position (-1 = none);
    episode : (S,) episode index per step. Returns (S, ..., n_back + 1); NaN where episode
    current - e has no token in the context at step s.
    """
    a = to_numpy(attn)
    steps = np.asarray(to_numpy(ctx_step), dtype=np.int64)
    ep = np.asarray(to_numpy(episode), dtype=np.int64)
    mask = valid_mask(to_numpy(context_len), a.shape[-1]) & (steps >= 0)
    rel = ep[:, None] - ep[np.clip(steps, 0, len(ep) - 1)]  # (S, T) episodes back, 0 = current
    S, mid = a.shape[0], a.shape[1:-1]
    flat = a.reshape(S, -1, a.shape[-1])
    out = np.full((S, flat.shape[1], n_back + 1), np.nan)
    for e in range(n_back + 1):
        sel = mask & (rel == e)  # (S, T)
        present = sel.any(-1)
        sums = (flat * sel[:, None, :]).sum(-1)
        out[:, :, e] = np.where(present[:, None], sums, np.nan)
    return out.reshape((S,) + mid + (n_back + 1,))


def reward_attention(attn, context_len, ctx_step, reward) -> tuple[np.ndarray, np.ndarray]:
    """Attention on rewarding tokens vs how much of the context they are.

    A token is rewarding when the reward it carries (received on arriving in its state) is > 0.
    attn : (S, ..., T); ctx_step : (S, T); reward : (S,). Returns (attn_share (S, ...),
    context_share (S,)): attention summed over rewarding positions and their fraction of the context.
    """
    a = to_numpy(attn)
    steps = np.asarray(to_numpy(ctx_step), dtype=np.int64)
    r = to_numpy(reward).astype(np.float64)
    n = np.asarray(to_numpy(context_len))
    mask = valid_mask(n, a.shape[-1]) & (steps >= 0)
    rewarding = mask & (r[np.clip(steps, 0, len(r) - 1)] > 0)  # (S, T)
    shape = (a.shape[0],) + (1,) * (a.ndim - 2) + (a.shape[-1],)
    attn_share = (a * rewarding.reshape(shape)).sum(-1)
    context_share = rewarding.sum(-1) / np.maximum(n, 1)
    return attn_share, context_share


def key_door_events(reward, episode, reward_of_token: str = "r_t-1") -> np.ndarray:
    """Dark Key-to-Door: the kind of reward each step's token carries, (S,) int: 0 none, 1 the key
    (the first reward of its episode), 2 the door (the second; the door pays only after the key).

    reward, episode : (S,). With the project's tokens ("r_t-1") step s carries the reward earned on
    step s-1, so it is counted in the episode of step s-1 (a reward on an episode's last step sits on
    the next episode's first token); an adapter's "r_t" tokens count in their own episode.
    """
    r = np.asarray(to_numpy(reward), dtype=np.float64) > 0
    ep = np.asarray(to_numpy(episode), dtype=np.int64)
    if reward_of_token == "r_t-1" and len(ep):
        ep = np.concatenate([ep[:1], ep[:-1]])
    cum = np.cumsum(r)
    starts = np.concatenate([[True], ep[1:] != ep[:-1]])
    before = np.maximum.accumulate(np.where(starts, cum - r, 0))  # rewards before the episode began
    return np.where(r, np.minimum(cum - before, 2), 0)


def grid_attention(attn_row, ctx_step_row, state, n_states: int) -> tuple[np.ndarray, np.ndarray]:
    """Project one query's attention onto environment states.

    attn_row : (T,) one step's attention; ctx_step_row : (T,) rollout step per position (-1 = none);
    state : (S,) state id per step. Returns (weight (n_states,), visited (n_states,) bool): attention
    summed per state id and whether the state has any token in the context.
    """
    a = to_numpy(attn_row)
    steps = np.asarray(to_numpy(ctx_step_row), dtype=np.int64)
    ok = steps >= 0
    ids = np.asarray(to_numpy(state), dtype=np.int64)[steps[ok]]
    weight = np.bincount(ids, weights=a[ok], minlength=n_states)[:n_states]
    visited = np.bincount(ids, minlength=n_states)[:n_states] > 0
    return weight, visited


def moving_average(x, window: int) -> np.ndarray:
    """Trailing moving average ignoring NaNs, same length as `x` (S,)."""
    x = np.asarray(x, dtype=np.float64)
    window = max(int(window), 1)
    ok = ~np.isnan(x)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    cn = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(x) + 1) - window, 0)
    hi = np.arange(1, len(x) + 1)
    cnt = cn[hi] - cn[lo]
    return np.divide(cs[hi] - cs[lo], cnt, out=np.full(len(x), np.nan), where=cnt > 0)


# ---- compression planning ----------------------------------------------------------------------
def smallest_window(mean_curve, target: float) -> int:
    """Smallest k with mean_curve[k - 1] >= target (mean_curve[k-1] = share on the newest k)."""
    hit = np.nonzero(np.asarray(mean_curve) >= target - _MASS_TOL)[0]
    return int(hit[0]) + 1 if len(hit) else len(mean_curve)


def simulate_compressed_lengths(n_steps: int, comp, max_context: int) -> np.ndarray:
    """Context length each rollout step computes over under a compression strategy `comp` (an
    `adlens.compression.Compression`), by the strategy's own schedule (`due`) and `budget`.

    Mirrors the rollouts: one token per step (a sliding window of `max_context` once full); whenever
    the strategy is due, the context is cut to its budget. Returns (n_steps,) lengths; a strategy that
    is never due gives the uncompressed lengths min(s + 1, max_context).
    """
    out = np.empty(n_steps, dtype=np.int64)
    budget = comp.budget(max_context)
    n = since = 0
    for s in range(n_steps):
        n = min(n + 1, max_context)
        out[s] = n
        since += 1
        if comp.due(since, n, max_context):
            n, since = min(n, budget), 0
    return out


def _nanmean_list(x) -> list:
    """Column means ignoring NaN, as a list with None for all-NaN columns (trailing ones dropped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(np.asarray(x, dtype=np.float64), 0)
    out = [None if np.isnan(v) else float(v) for v in m]
    while out and out[-1] is None:
        out.pop()
    return out


def _ceil2(x: float) -> float:
    return math.ceil(round(x * 100, 6)) / 100


def recommend(summary: dict, cfg: dict) -> dict:
    """Pattern and compression recommendation from `summarize(...)` numbers.

    The values follow adlens/compression.py: `compression_ratio` is the fraction of the model's context
    (`max_context`) kept, i.e. a budget of round(ratio * max_context) tokens enforced every
    `compression_interval` steps. Rules, first match wins (thresholds from `cfg`):
      sink_plus_recency : sink_share >= sink_threshold and sink_share + recent_share >= recency_threshold
                          -> "sink_window": the first sink_positions plus the newest k tokens, k the
                          smallest window for which sinks + window hold `coverage` of attention
      strong_recency    : recent_share >= recency_threshold -> "fixed_window", keep_recent = the
                          smallest newest window holding `coverage`
      sparse            : fraction_for_80 <= sparse_threshold -> "topk"
      uniform           : otherwise -> "pooling"
    Positions needed: the window (plus sinks) for the window strategies; for topk and pooling the
    fraction of the context holding 90% at the longest captured contexts, times max_context (those
    budgets scale with the context). Budget = ceil((1 + ratio_margin) * needed); compression_ratio =
    budget / max_context rounded up to 0.01, at most 1; compression_interval = budget clipped to
    [1, horizon] (the context stays under about twice the budget and is compressed at least once per
    episode); estimated_speedup = mean uncompressed context length / mean length under that schedule
    (`simulate_compressed_lengths`), the attention cost of a cached step being linear in its context.
    """
    rw, n_sink = int(cfg["recent_window"]), int(cfg["sink_positions"])
    T = int(summary["max_context"])
    if summary["sink_share"] >= cfg["sink_threshold"] and summary["sink_share"] + summary["recent_share"] >= cfg["recency_threshold"]:
        pattern, strategy = "sink_plus_recency", "sink_window"
        needed = n_sink + summary["window_with_sinks_for_coverage"]
    elif summary["recent_share"] >= cfg["recency_threshold"]:
        pattern, strategy = "strong_recency", "fixed_window"
        needed = summary["window_for_coverage"]
    elif summary["fraction_for_80"] <= cfg["sparse_threshold"]:
        pattern, strategy = "sparse", "topk"
        needed = summary["fraction_for_90_long"] * T
    else:
        pattern, strategy = "uniform", "pooling"
        needed = summary["fraction_for_90_long"] * T
    wanted = min(T, max(1, math.ceil((1 + cfg["ratio_margin"]) * needed - 1e-9)))
    ratio = min(1.0, max(0.01, _ceil2(wanted / T)))
    budget = max(1, round(ratio * T))  # what adlens/compression.py will keep
    if strategy == "fixed_window":
        keep_recent = min(summary["window_for_coverage"], budget)
    elif strategy == "sink_window":
        keep_recent = budget - n_sink  # the recent part of a sink_window budget
    else:  # scorer/merging strategies still keep the newest tokens, which have no attention history yet (H2O)
        keep_recent = min(rw, budget)
    interval = int(min(budget, summary["horizon"]))
    S = len(summary["context_len"])
    from adlens.compression import STRATEGIES  # the strategy's own budget and schedule

    compressed = simulate_compressed_lengths(S, STRATEGIES[strategy](ratio=float(ratio), interval=interval), T)
    speedup = float(np.mean(summary["context_len"]) / np.mean(compressed))
    rec = {
        "strategy": strategy,
        "compression_ratio": float(ratio),
        "compression_interval": interval,
        "keep_recent": int(max(keep_recent, 1)),
        "pattern": pattern,
        "estimated_speedup": round(speedup, 2),
    }
    if strategy == "sink_window":
        rec["n_sink"] = n_sink
    derivation = {
        "positions_needed": float(needed),
        "budget_wanted": int(wanted),
        "budget_tokens": int(budget),
        "max_context": T,
        "mean_context_len": float(np.mean(summary["context_len"])),
        "mean_compressed_len": float(np.mean(compressed)),
    }
    return {"recommendation": rec, "derivation": derivation, "compressed_len": compressed}


def across_tasks(summaries: list[dict]) -> dict:
    """Scalar metrics of per-task summaries -> {"mean": {k: mean}, "std": {k: std}, "per_task": {k: [values]}}.
    Tasks where a metric is undefined (None, e.g. no reward in any context) are left out of its mean."""
    keys = [k for k, v in summaries[0].items() if isinstance(v, (int, float)) or v is None]
    keys = [k for k in keys if all(isinstance(s.get(k), (int, float, type(None))) for s in summaries)]
    out: dict = {"mean": {}, "std": {}, "per_task": {}}
    for k in keys:
        vals = [s[k] for s in summaries]
        out["per_task"][k] = vals
        got = np.array([v for v in vals if v is not None], dtype=np.float64)
        out["mean"][k] = float(got.mean()) if len(got) else None
        out["std"][k] = float(got.std()) if len(got) > 1 else None
    for k in ("n_steps", "n_layer", "n_head", "max_context", "horizon", "max_context_len", "window_for_coverage",
              "window_with_sinks_for_coverage", "n_long_context_steps", "n_informative_steps", "recent_window", "sink_positions"):  # fmt: skip
        if out["mean"].get(k) is not None:
            out["mean"][k] = int(round(out["mean"][k]))
    if out["mean"].get("reward_attention_share") is not None and out["mean"].get("reward_context_share"):
        out["mean"]["reward_enrichment"] = out["mean"]["reward_attention_share"] / out["mean"]["reward_context_share"]
    return out


# ---- everything at once ------------------------------------------------------------------------
def summarize(cap: dict, recent_window: int = 5, sink_positions: int = 4, coverage: float = 0.9) -> dict:
    """All summary metrics of a capture (see the module docstring for which steps are averaged).

    Uses the query rows averaged over layers and heads (what a compression shared by all heads sees)
    for the headline numbers, and per-head rows for entropy, max attention and the per-head table.
    Returns a dict of plain numbers and lists, plus arrays under keys ending in `_per_step`/`_lh`.
    """
    meta = cap["meta"]
    n = np.asarray(to_numpy(cap["context_len"]), dtype=np.int64)
    rows = normalise_rows(cap["query_attn"], n)  # (S, L, H, T)
    S, L, H, T = rows.shape
    mean_rows = normalise_rows(rows.mean(axis=(1, 2)), n)  # (S, T)
    info = informative_steps(n, recent_window + sink_positions)
    horizon = int(meta.get("horizon", recent_window))
    max_context = int(meta.get("max_context", T))

    recent = recent_share(mean_rows, n, recent_window)  # (S,)
    sinks = sink_share(mean_rows, sink_positions)
    n80 = positions_for_mass(mean_rows, n, 0.8)
    n90 = positions_for_mass(mean_rows, n, 0.9)
    # Budgets are enforced on the longest contexts, so windows and top-k sizes are read off those.
    long = info & (n >= LONG_CONTEXT * n.max())
    long = long if long.any() else info
    curve = recent_share_curve(mean_rows[long], n[long]).mean(0)  # (T,)
    non_sink = right_align(np.where(np.arange(T) < sink_positions, 0.0, mean_rows), n, fill=0.0)
    sink_curve = (sinks[long][:, None] + np.cumsum(non_sink[long], -1)).mean(0)

    ent = attention_entropy(rows)  # (S, L, H)
    ent_norm = normalised_entropy(rows, n)
    mx = max_attention(rows)
    recent_lh = recent_share(rows, n, recent_window)  # (S, L, H)

    steps = to_numpy(cap["ctx_step"])
    r_attn, r_ctx = reward_attention(rows.mean(2), n, steps, cap["reward"])  # (S, L), (S,)
    has_r = r_ctx > 0
    n_back = math.ceil(max_context / max(horizon, 1)) + 1
    ep = episode_attention(mean_rows, n, steps, cap["episode"], n_back)  # (S, E)

    def avg(x):
        return float(np.mean(x[info]))

    out = {
        "n_steps": S,
        "n_informative_steps": int(info.sum()),
        "n_layer": L,
        "n_head": H,
        "max_context": max_context,
        "horizon": horizon,
        "mean_context_len": float(n.mean()),
        "max_context_len": int(n.max()),
        "recent_window": recent_window,
        "recent_share": avg(recent),
        "last_episode_share": avg(recent_share(mean_rows, n, horizon)),
        "sink_positions": sink_positions,
        "sink_share": avg(sinks),
        "positions_for_80": avg(n80),
        "positions_for_90": avg(n90),
        "fraction_for_80": avg(n80 / np.maximum(n, 1)),
        "fraction_for_90": avg(n90 / np.maximum(n, 1)),
        "n_long_context_steps": int(long.sum()),
        "long_context_len": float(n[long].mean()),
        "positions_for_90_long": float(n90[long].mean()),
        "fraction_for_90_long": float((n90 / np.maximum(n, 1))[long].mean()),
        "coverage": coverage,
        "window_for_coverage": smallest_window(curve, coverage),
        "window_with_sinks_for_coverage": smallest_window(sink_curve, coverage),
        "window_share": float(curve[smallest_window(curve, coverage) - 1]),
        "window_with_sinks_share": float(sink_curve[smallest_window(sink_curve, coverage) - 1]),
        "entropy_nats": avg(ent.mean((1, 2))),
        "entropy_normalised": avg(ent_norm.mean((1, 2))),
        "max_attention": avg(mx.mean((1, 2))),
        "episode_share": _nanmean_list(ep[info]),
        "reward_attention_share": float(r_attn.mean(1)[has_r].mean()) if has_r.any() else None,
        "reward_context_share": float(r_ctx[has_r].mean()) if has_r.any() else None,
        "entropy_lh": ent[info].mean(0),
        "entropy_normalised_lh": ent_norm[info].mean(0),
        "max_attention_lh": mx[info].mean(0),
        "recent_share_lh": recent_lh[info].mean(0),
        "context_len": n,
        "recent_share_per_step": recent,
    }
    share, ctx = out["reward_attention_share"], out["reward_context_share"]
    out["reward_enrichment"] = share / ctx if share is not None and ctx else None
    env = meta.get("env")
    if isinstance(env, dict) and env.get("name") == "key_to_door":
        out.update(_key_door_summary(rows.mean(2), mean_rows, n, steps, cap, info, n_back))
    return out


def _key_door_summary(layer_rows, mean_rows, n, steps, cap: dict, info, n_back: int) -> dict:
    """summarize's Key-to-Door part: for the key and the door events (key_door_events), their share of
    the context and of the attention (as for all rewarding tokens), and the attention they draw from
    each episode back (0 = the current one): does the model look back to where it found the door?"""
    kind = key_door_events(cap["reward"], cap["episode"], cap["meta"].get("reward_of_token", "r_t-1"))
    out = {}
    for code, name in ((1, "key"), (2, "door")):
        event = (kind == code).astype(np.float64)
        a, c = reward_attention(layer_rows, n, steps, event)  # (S, L), (S,)
        has = c > 0
        out[f"{name}_attention_share"] = float(a.mean(1)[has].mean()) if has.any() else None
        out[f"{name}_context_share"] = float(c[has].mean()) if has.any() else None
        held = event[np.clip(steps, 0, len(event) - 1)] * (steps >= 0)  # (S, T) positions holding the event
        ep = episode_attention(mean_rows * held, n, steps, cap["episode"], n_back)  # (S, E)
        out[f"{name}_episode_share"] = _nanmean_list(ep[info & has]) if (info & has).any() else None
    return out
