"""Plot functions for attention analysis: each takes precomputed arrays (from `adlens.metrics`),
draws on an optional `ax`, and returns the Figure. Nothing here shows a window or picks a backend;
scripts select Agg and save with `save_figure`.

    python analyze_attention.py --capture runs/attention/capture.pt --out figs/attention_analysis

Every figure uses the same colour per layer (`layer_colors`), so layer 0 is the same colour everywhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.transforms import Bbox
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke

from adlens.io import atomic_path
from adlens.metrics import moving_average, recent_share

LAYER_CMAP = "tab10"
# Attention weights span several orders of magnitude; colour scales are logarithmic from this floor.
LOG_FLOOR = 1e-4


def layer_colors(n_layer: int) -> list:
    """One fixed colour per layer index, shared by all figures."""
    cmap = plt.get_cmap(LAYER_CMAP if n_layer <= 10 else "viridis")
    return [cmap(i % 10) if n_layer <= 10 else cmap(i / max(n_layer - 1, 1)) for i in range(n_layer)]


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save as PNG under a unique temporary name in the same folder, rename into place, close the
    figure. A reader never sees half a PNG, two writers never share a temporary name, and a failed
    save leaves no temporary file behind."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def _ax(ax, figsize=(8, 5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _log_norm(values) -> LogNorm:
    v = np.asarray(values, dtype=np.float64)
    pos = v[np.isfinite(v) & (v > 0)]
    vmax = float(pos.max()) if len(pos) else 1.0
    vmin = max(LOG_FLOOR, float(np.percentile(pos, 1))) if len(pos) else LOG_FLOOR
    return LogNorm(vmin=min(vmin, vmax / 10), vmax=vmax)


# Marks shared by the heatmaps: episode starts as thin white lines, rewarded tokens in green.
EPISODE_LINE = {"color": "white", "lw": 0.6, "alpha": 0.5}
REWARD_COLOR = "lime"


def _mark_keys(ax, episode, reward, rows: bool = False) -> None:
    """On a heatmap whose x axis is the key position (one column per context token): a white line
    where a new episode starts and a green triangle under each rewarded token; with `rows`, the y
    axis is the query position too and gets the same lines. episode, reward: (n,) per token."""
    starts = np.flatnonzero(np.diff(np.asarray(episode)) > 0) + 1
    for x in starts:
        ax.axvline(x - 0.5, **EPISODE_LINE)
        if rows:
            ax.axhline(x - 0.5, **EPISODE_LINE)
    rewarded = np.flatnonzero(np.asarray(reward, dtype=np.float64) > 0)
    if len(rewarded):  # an empty unclipped line would upset the constrained layout
        ax.plot(rewarded, np.zeros(len(rewarded)), transform=ax.get_xaxis_transform(), ls="", marker="^", ms=6,
                color=REWARD_COLOR, markeredgecolor="black", mew=0.4, clip_on=False, zorder=5)  # fmt: skip


def _band(x: np.ndarray, axis: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis), np.nanpercentile(x, 25, axis), np.nanpercentile(x, 75, axis)


# ---- the six panels ----------------------------------------------------------------------------
def plot_attention_over_time(mean_rows, context_len, ax=None, tokens: dict | None = None) -> Figure:
    """Panel 1. mean_rows (S, T): query attention averaged over layers and heads; context_len (S,).
    tokens: optional {"episode" (S,), "reward" (S,), "ctx_step" (S, T)} to mark episode starts, the
    context positions that hold a rewarded token, and the first reward."""
    fig, ax = _ax(ax, (14, 4))
    a = np.asarray(mean_rows, dtype=np.float64)
    n = np.asarray(context_len)
    valid = np.arange(a.shape[1])[None, :] < n[:, None]
    shown = np.ma.masked_where(~valid, np.clip(a, LOG_FLOOR / 10, None))
    T_shown = max(int(n.max()), 1)
    im = ax.imshow(
        shown[:, :T_shown].T,
        aspect="auto",
        origin="lower",
        cmap="magma",
        norm=_log_norm(a[valid]),
        extent=(-0.5, a.shape[0] - 0.5, -0.5, T_shown - 0.5),
        interpolation="nearest",
    )
    ax.plot(np.arange(len(n)), n - 1, color="cyan", lw=0.8, label="query position (newest token)")
    if tokens is not None:
        episode, reward = np.asarray(tokens["episode"]), np.asarray(tokens["reward"], dtype=np.float64)
        steps = np.asarray(tokens["ctx_step"])
        for x in np.flatnonzero(np.diff(episode) > 0) + 1:
            ax.axvline(x - 0.5, **EPISODE_LINE)
        held = valid[:, : steps.shape[1]] & (steps >= 0)
        rewarded = held & (reward[np.clip(steps, 0, len(reward) - 1)] > 0)
        ys, xs = np.nonzero(rewarded.T)
        if len(xs):
            ax.scatter(xs, ys, s=1.5, color=REWARD_COLOR, marker="s", linewidths=0, alpha=0.6, label="rewarded token in context")
            first = int(np.flatnonzero(reward > 0)[0])
            ax.axvline(first - 0.5, color=REWARD_COLOR, ls="--", lw=1.2, label=f"first reward (step {first})")
        ax.plot([], [], **EPISODE_LINE | {"alpha": 1}, label="episode start")
    ax.set(
        xlabel="evaluation step",
        ylabel="context position (0 = oldest token held)",
        title="Query attention over time (mean over layers and heads)",
    )
    ax.legend(loc="upper left", fontsize=8, markerscale=4, facecolor="black", framealpha=0.6, labelcolor="white")
    fig.colorbar(im, ax=ax, label="attention weight (log colour scale)", pad=0.01)
    return fig


def plot_recent_vs_distant(recent, recent_window: int, smooth: int, threshold: float | None = None, ax=None) -> Figure:
    """Panel 2. recent (S,) or (N, S) for N tasks: share on the newest `recent_window` positions per
    step. With tasks, each task's moving average is drawn faint and their mean bold."""
    fig, ax = _ax(ax)
    recent = np.asarray(recent, dtype=np.float64)
    x = np.arange(recent.shape[-1])
    tasks = f"; thin: {recent.shape[0]} tasks, bold: mean" if recent.ndim == 2 else ""
    if recent.ndim == 2:
        for r in recent:
            ax.plot(x, moving_average(r, smooth), color="tab:blue", alpha=0.25, lw=0.8)
            ax.plot(x, moving_average(1 - r, smooth), color="tab:orange", alpha=0.25, lw=0.8)
        recent = recent.mean(0)
    else:
        ax.plot(x, recent, color="tab:blue", alpha=0.2, lw=0.7)
    ax.plot(x, moving_average(recent, smooth), color="tab:blue", lw=2, label=f"last {recent_window} positions")
    ax.plot(x, moving_average(1 - recent, smooth), color="tab:orange", lw=2, label="older positions")
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"recency threshold {threshold:.0%}")
    ax.set(
        xlabel="evaluation step",
        ylabel="share of attention",
        ylim=(-0.02, 1.02),
        title=f"Recent vs distant attention\n(moving average over {smooth} steps{tasks})",
    )
    ax.legend(fontsize=8)
    return fig


def plot_context_growth(context_len, max_context: int, compressed_len=None, ax=None) -> Figure:
    """Panel 3. context_len (S,) tokens per step; optional compressed_len (S,) under a recommendation."""
    fig, ax = _ax(ax)
    n = np.asarray(context_len)
    ax.plot(np.arange(len(n)), n, color="black", lw=2, label="context length (captured)")
    ax.axhline(max_context, color="tab:red", ls="--", lw=1, label=f"model maximum ({max_context})")
    if compressed_len is not None:
        c = np.asarray(compressed_len)
        ax.plot(np.arange(len(c)), c, color="tab:green", lw=1.2, label="with recommended compression (estimate)")
    ax.set(
        xlabel="evaluation step",
        ylabel="tokens in context",
        ylim=(0, max_context * 1.08),
        title="Sequence length growth",
    )
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_relative_position(aligned, layer_names, ax=None, horizon: int | None = None) -> Figure:
    """Panel 4. aligned (S, L, R): attention by relative position per layer (heads averaged), NaN
    where absent. Draws the mean over steps and the 25-75% band; with `horizon` (steps per episode),
    dotted lines at whole episodes back, where a token is the same moment of an earlier episode."""
    fig, ax = _ax(ax)
    a = np.asarray(aligned, dtype=np.float64)
    colors = layer_colors(a.shape[1])
    reach = np.nonzero(np.isfinite(a).any((0, 1)))[0]
    R = int(reach[-1]) + 1 if len(reach) else a.shape[2]
    x = -np.arange(R)
    for li in range(a.shape[1]):
        mean, lo, hi = _band(a[:, li, :R])
        ax.plot(x, np.clip(mean, LOG_FLOOR / 10, None), color=colors[li], lw=1.5, label=f"{layer_names[li]} mean")
        ax.fill_between(x, np.clip(lo, LOG_FLOOR / 10, None), np.clip(hi, LOG_FLOOR / 10, None), color=colors[li], alpha=0.2)
    if horizon:
        for k in range(1, (R - 1) // horizon + 1):
            ax.axvline(-k * horizon, color="grey", ls=":", lw=0.8, label="whole episodes back" if k == 1 else None)
    ax.set_yscale("log")
    ax.set(
        xlabel="relative position (0 = current query, -N = N steps ago)",
        ylabel="attention weight (log scale)",
        title="Attention by relative position (band: 25-75% of steps)",
    )
    ax.legend(fontsize=8)
    return fig


def plot_compression_curve(
    fractions, curves, positions_80: float, positions_90: float, fraction_80: float, fraction_90: float, ax=None
) -> Figure:
    """Panel 5. curves (S, P): attention kept vs fraction of the context kept (heaviest first).
    positions_*/fraction_*: mean over steps of the positions (and their share of the context) holding
    80% / 90% of attention, marked by the dotted lines."""
    fig, ax = _ax(ax)
    mean, lo, hi = _band(np.asarray(curves, dtype=np.float64))
    ax.plot(fractions * 100, mean, color="black", lw=2, label="mean over steps")
    ax.fill_between(fractions * 100, lo, hi, color="grey", alpha=0.3, label="25-75% of steps")
    for mass, n_pos, frac, color in (
        (0.8, positions_80, fraction_80, "tab:orange"),
        (0.9, positions_90, fraction_90, "tab:red"),
    ):
        ax.axhline(mass, color=color, ls="--", lw=1)
        ax.axvline(frac * 100, color=color, ls=":", lw=1.2)
        ax.annotate(
            f"{mass:.0%} of attention: {n_pos:.1f} positions\n({frac:.1%} of the context, mean over steps)",
            (frac * 100, mass),
            xytext=(8, -30),
            textcoords="offset points",
            color=color,
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
        )
    ax.set(
        xlabel="% of context kept (positions sorted by attention)",
        ylabel="cumulative attention",
        xlim=(0, 100),
        ylim=(0, 1.02),
        title="Compression potential",
    )
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_episode_attention(episode_share, layer_names, ax=None) -> Figure:
    """Panel 6a. episode_share (S, L, E): attention per relative episode (0 = current), NaN if absent."""
    fig, ax = _ax(ax)
    e = np.asarray(episode_share, dtype=np.float64)
    mean, _, _ = _band(e)  # (L, E)
    keep = np.nonzero(np.isfinite(mean).any(0))[0]
    E = int(keep[-1]) + 1 if len(keep) else 1
    colors = layer_colors(e.shape[1])
    width = 0.8 / e.shape[1]
    for li in range(e.shape[1]):
        ax.bar(
            -np.arange(E) + (li - (e.shape[1] - 1) / 2) * width,
            np.nan_to_num(mean[li, :E]),
            width,
            color=colors[li],
            label=layer_names[li],
        )
    ax.set_xticks(-np.arange(E))
    ax.set(
        xlabel="relative episode (0 = current, -1 = previous)",
        ylabel="mean share of attention",
        title="Attention per past episode",
    )
    ax.legend(fontsize=8)
    return fig


def plot_reward_attention(attn_share, context_share, layer_names, ax=None, events: dict | None = None) -> Figure:
    """Panel 6b. attn_share (S, L) on rewarding tokens vs context_share (S,) of rewarding tokens.
    events: optional {name: (context share, attention share)} means of kinds of reward (Key-to-Door's
    key and door), drawn as large labelled markers."""
    fig, ax = _ax(ax)
    a, c = np.asarray(attn_share, dtype=np.float64), np.asarray(context_share, dtype=np.float64)
    has = c > 0
    if not has.any():
        ax.text(0.5, 0.5, "no rewarding transitions in any context", ha="center", va="center", transform=ax.transAxes)
    colors = layer_colors(a.shape[1])
    for li in range(a.shape[1]):
        if has.any():
            ax.scatter(
                c[has] * 100,
                a[has, li] * 100,
                s=8,
                alpha=0.5,
                color=colors[li],
                label=f"{layer_names[li]} (mean {a[has, li].mean():.0%} vs {c[has].mean():.0%})",
            )
    for (name, (ctx, att)), marker in zip((events or {}).items(), "Ds"):
        if ctx is not None and att is not None:
            ax.scatter([ctx * 100], [att * 100], s=120, marker=marker, color="black", zorder=5,
                       label=f"{name} events, all layers (mean {att:.0%} vs {ctx:.0%})")  # fmt: skip
    ax.plot([0, 100], [0, 100], color="grey", ls="--", lw=1, label="attention = share of context")
    top = max(5.0, float(np.nanmax(a[has]) * 100 * 1.05) if has.any() else 5.0)
    ax.set(
        xlabel="rewarding transitions, % of context",
        ylabel="attention on them, %",
        xlim=(0, max(5.0, float(c.max()) * 105)),
        ylim=(0, min(top, 102)),
        title="Attention on rewarding transitions",
    )
    ax.legend(fontsize=8, loc="upper left")
    return fig


def comprehensive_figure(
    mean_rows,
    context_len,
    layer_aligned,
    fractions,
    curves,
    episode_share,
    reward_attn,
    reward_context,
    *,
    layer_names,
    max_context: int,
    recent_window: int,
    smooth: int,
    recency_threshold: float,
    positions_80: float,
    positions_90: float,
    fraction_80: float,
    fraction_90: float,
    compressed_len=None,
    title: str = "",
    task_recent=None,
    top_title: str | None = None,
    tokens: dict | None = None,
    horizon: int | None = None,
    events: dict | None = None,
) -> Figure:
    """The six-panel overview (21 x 14 inches: 2100 x 1400 px at 100 dpi). Arrays as in the panel functions;
    `recent_window` positions make the recent share of panel 2."""
    fig = plt.figure(figsize=(21, 14), layout="constrained")
    gs = fig.add_gridspec(3, 3, height_ratios=[1.1, 1, 1])
    top = fig.add_subplot(gs[0, :])
    plot_attention_over_time(mean_rows, context_len, ax=top, tokens=tokens)
    if top_title:
        top.set_title(top_title)
    recent = recent_share(mean_rows, context_len, recent_window) if task_recent is None else np.asarray(task_recent)
    plot_recent_vs_distant(recent, recent_window, smooth, recency_threshold, ax=fig.add_subplot(gs[1, 0]))
    plot_context_growth(context_len, max_context, compressed_len, ax=fig.add_subplot(gs[1, 1]))
    plot_relative_position(layer_aligned, layer_names, ax=fig.add_subplot(gs[1, 2]), horizon=horizon)
    plot_compression_curve(fractions, curves, positions_80, positions_90, fraction_80, fraction_90, ax=fig.add_subplot(gs[2, 0]))
    plot_episode_attention(episode_share, layer_names, ax=fig.add_subplot(gs[2, 1]))
    plot_reward_attention(reward_attn, reward_context, layer_names, ax=fig.add_subplot(gs[2, 2]), events=events)
    if title:
        fig.suptitle(title, fontsize=14)
    return fig


# ---- detail figures ----------------------------------------------------------------------------
def plot_step_attention(full_attn, layer_names, title: str = "", tokens: dict | None = None) -> Figure:
    """Full causal attention at one step. full_attn (L, H, n, n). Top row: query x key per layer
    (heads averaged); bottom row: the last query row of every head (H x n). tokens: optional
    {"episode" (n,), "reward" (n,)} of the context's tokens, to mark episode starts and rewarded tokens."""
    a = np.asarray(full_attn, dtype=np.float64)
    L, H, n, _ = a.shape
    colors = layer_colors(L)
    fig, axes = plt.subplots(2, L, figsize=(max(7 * L, 8), 9), squeeze=False, height_ratios=[4, 1], layout="constrained")
    norm = _log_norm(a[:, :, np.tril(np.ones((n, n), bool))])
    upper = np.triu(np.ones((n, n), bool), 1)
    for li in range(L):
        m = np.ma.masked_where(upper, np.clip(a[li].mean(0), LOG_FLOOR / 10, None))
        im = axes[0, li].imshow(m, cmap="magma", norm=norm, interpolation="nearest")
        axes[0, li].set_title(f"{layer_names[li]} (heads averaged)", color=colors[li], fontweight="bold")
        axes[0, li].set(xlabel="key position", ylabel="query position")
        axes[1, li].imshow(
            np.clip(a[li, :, -1, :], LOG_FLOOR / 10, None),
            cmap="magma",
            norm=norm,
            aspect="auto",
            interpolation="nearest",
        )
        axes[1, li].set_yticks(range(H), [f"head {h}" for h in range(H)])
        axes[1, li].set(xlabel="key position", title="last query row per head")
        if tokens is not None:
            _mark_keys(axes[0, li], tokens["episode"], tokens["reward"], rows=True)
            _mark_keys(axes[1, li], tokens["episode"], tokens["reward"])
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight (log colour scale)")
    if tokens is not None:
        n_rewarded = int((np.asarray(tokens["reward"], dtype=np.float64) > 0).sum())
        handles = [
            Line2D([], [], color="grey", lw=1, label="episode start (white line)"),
            Line2D([], [], ls="", marker="^", color=REWARD_COLOR, mec="black", label=f"rewarded token ({n_rewarded} in context)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def _annotated(ax, values, title: str, label: str, fmt: str, cmap: str):
    v = np.asarray(values, dtype=np.float64)
    im = ax.imshow(v, cmap=cmap, aspect="auto")
    mid = (np.nanmax(v) + np.nanmin(v)) / 2
    for (li, h), x in np.ndenumerate(v):
        ax.text(h, li, format(x, fmt), ha="center", va="center", color="white" if x < mid else "black", fontsize=9)
    ax.set_xticks(range(v.shape[1]), [str(h) for h in range(v.shape[1])])
    ax.set(xlabel="head", title=title)
    ax.figure.colorbar(im, ax=ax, label=label)


def plot_layer_head(entropy, max_attn, recent, layer_names, recent_window: int, title: str = "") -> Figure:
    """Per layer x head: entropy (L, H) in nats, mean max attention (L, H), recent share (L, H)."""
    ent, mx, rec = (np.asarray(x, dtype=np.float64) for x in (entropy, max_attn, recent))
    L, H = ent.shape
    colors = layer_colors(L)
    fig, axes = plt.subplots(1, 3, figsize=(max(18, 3 * H + 12), max(5, 0.9 * L + 3)), layout="constrained")
    _annotated(axes[0], ent, "Entropy (higher = spread out)", "entropy (nats)", ".2f", "viridis")
    _annotated(axes[1], mx, "Max attention (higher = focused)", "mean largest weight", ".2f", "viridis")
    for ax in axes[:2]:
        ax.set_yticks(range(L), layer_names)
        for tick, c in zip(ax.get_yticklabels(), colors, strict=True):
            tick.set_color(c)
    width = 0.8 / L
    for li in range(L):
        axes[2].bar(np.arange(H) + (li - (L - 1) / 2) * width, rec[li], width, color=colors[li], label=layer_names[li])
    axes[2].set_xticks(range(H), [str(h) for h in range(H)])
    axes[2].set(
        xlabel="head",
        ylabel=f"share on last {recent_window} positions",
        ylim=(0, 1),
        title="Recent-attention share per head",
    )
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# Grid markers: (marker, fill colour, size). The agent is a hollow ring drawn under the others, so a
# goal or start in the agent's cell stays visible inside the ring.
GRID_MARKS = {
    "goal": ("*", "red", 380),
    "key": ("P", "orange", 220),
    "door": ("s", "magenta", 200),
    "start": ("X", "black", 140),
}
AGENT_MARK = ("o", "white", 900)


def plot_grid_attention(weight, visited, marks: dict | None = None, ax=None, title: str = "") -> Figure:
    """Attention projected onto grid cells, on a log colour scale. weight, visited (G, G); marks:
    name -> (row, col) drawn on top (e.g. "goal", "agent", "key", "door", "start")."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(8, 7.5), layout="constrained")
    fig = ax.figure
    visited = np.asarray(visited, bool)
    w = np.asarray(weight, dtype=np.float64)
    shown = np.ma.masked_where(~visited, np.clip(w, LOG_FLOOR / 10, None))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(shown, cmap=cmap, norm=_log_norm(w[visited]), interpolation="nearest")
    handles = []
    for name, (r, c) in (marks or {}).items():
        if name == "agent":
            marker, color, size = AGENT_MARK
            ax.scatter([c], [r], marker=marker, facecolors="none", edgecolors=color, linewidths=2.5, s=size, zorder=3,
                       path_effects=[withStroke(linewidth=4.5, foreground="black")])  # fmt: skip
            handles.append(Line2D([], [], ls="", marker=marker, ms=13, mfc="none", mec=color, mew=2.5, label=name,
                                  path_effects=[withStroke(linewidth=4.5, foreground="black")]))  # fmt: skip
        else:
            marker, color, size = GRID_MARKS.get(name, ("D", "black", 120))
            ax.scatter([c], [r], marker=marker, c=color, s=size, edgecolors="black", zorder=4)
            handles.append(Line2D([], [], ls="", marker=marker, ms=size**0.5, mfc=color, mec="black", label=name))
    G = w.shape[0]
    ax.set_xticks(range(G))
    ax.set_yticks(range(G))
    ax.set(xlabel="column", ylabel="row", title=title or "Query attention per grid cell")
    if marks and own:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(marks), fontsize=9)
    elif marks:
        ax.legend(handles=handles, fontsize=8)
    fig.colorbar(im, ax=ax, label="attention summed per cell (log colour scale; grey: not in context)")
    return fig


def plot_head_profiles(aligned, layer_names, tokens: dict | None = None, title: str = "") -> Figure:
    """Per head, query attention by relative position over steps. aligned (S, L, H, R), NaN where
    absent. tokens: optional {"episode" (S,), "reward" (S,)} of the steps, to mark episode starts
    and the first reward. One colour bar for all panels, a title and a caption line under them."""
    a = np.asarray(aligned, dtype=np.float64)
    S, L, H, R = a.shape
    reach = np.nonzero(np.isfinite(a).any((0, 1, 2)))[0]
    R = int(reach[-1]) + 1 if len(reach) else R
    colors = layer_colors(L)
    fig, axes = plt.subplots(L, H, figsize=(max(4.5 * H, 8), max(3 * L, 4)), squeeze=False, sharex=True, sharey=True, layout="constrained")
    norm = _log_norm(a[..., :R])
    starts, first = [], None
    if tokens is not None:
        starts = np.flatnonzero(np.diff(np.asarray(tokens["episode"])) > 0) + 1
        rewarded = np.flatnonzero(np.asarray(tokens["reward"], dtype=np.float64) > 0)
        first = int(rewarded[0]) if len(rewarded) else None
    for li in range(L):
        for h in range(H):
            ax = axes[li, h]
            m = np.ma.masked_invalid(np.clip(a[:, li, h, :R].T, LOG_FLOOR / 10, None))
            im = ax.imshow(m, aspect="auto", cmap="magma", norm=norm, interpolation="nearest",
                           extent=(-0.5, S - 0.5, -R + 0.5, 0.5), origin="upper")  # fmt: skip
            for x in starts:
                ax.axvline(x - 0.5, **EPISODE_LINE | {"lw": 0.4, "alpha": 0.3})
            if first is not None:
                ax.axvline(first - 0.5, color=REWARD_COLOR, ls="--", lw=1)
            ax.set_title(f"{layer_names[li]}, head {h}", color=colors[li], fontweight="bold")
            if li == L - 1:
                ax.set_xlabel("evaluation step")
            if h == 0:
                ax.set_ylabel("relative position")
    fig.colorbar(im, ax=axes, shrink=min(1.0, 2.5 / L), aspect=25, label="attention weight (log colour scale)")
    if title:
        fig.suptitle(title, fontsize=13)
    marks = " White lines: episode starts; green dashed: the first reward." if tokens is not None else ""
    caption = ("Each panel: one head's attention from the newest token (the query) over its context, per step; "
               "y: tokens back from the query (0 = the query, at the top)." + marks)  # fmt: skip
    fig.supxlabel(caption, fontsize=9)
    return fig


# ---- compression trade-off (compression_template.py --sweep) ----------------------------------
def place_labels(ax, xy, texts, fontsize: int = 8) -> list:
    """Label each point (data coordinates) beside it without overlaps: each label takes the first
    of eight positions around its point, then the same further out, whose box overlaps no marker and
    no label placed before (in display space, so call this once the axes' limits and the figure's
    layout are final). Returns the Text objects."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
    r = fontsize * 0.5 * fig.dpi / 72  # about one marker radius, in pixels
    taken = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in pts]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    ring = [(5, 4), (5, -12), (-5, 4), (-5, -12), (8, -4), (-8, -4), (0, 8), (0, -16)]
    offsets = [(dx * k, dy * k) for k in (1, 2, 3) for dx, dy in ring]
    placed = []
    for (x, y), text in zip(xy, texts):
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            ha="left" if dx > 0 else "right" if dx < 0 else "center")  # fmt: skip
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in taken):
                break
            if (dx, dy) != offsets[-1]:
                t.remove()  # the last position stays even if crowded: a label is never dropped
        taken.append(box)
        placed.append(t)
    return placed


def plot_compression_tradeoff(rows: list[dict]) -> Figure:
    """Speedup against loss of return, one line per strategy, each point labelled with its ratio.
    rows: `compression_results.json`'s rows. Error bars: loss +- its standard error over seeds
    (`performance_loss_stderr`), speedup from the smallest to the largest per-seed ratio."""
    fig, ax = plt.subplots(figsize=(9, 6.5))
    loss = np.array([r["performance_loss"] * 100 for r in rows])
    loss_se = np.array([(r.get("performance_loss_stderr") or 0.0) * 100 for r in rows])
    lo, hi = min((loss - loss_se).min(), -1.0), max((loss + loss_se).max(), 10.0)
    top = max([r.get("speedup_pair_max", r["speedup"]) for r in rows] + [2.5]) * 1.1
    ax.fill_between([lo - 1, 5], 2, top, color="tab:green", alpha=0.12, label="> 2x faster, < 5% loss")
    points, labels = [], []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: -r["ratio"])
        x = np.array([r["performance_loss"] * 100 for r in rs])
        y = np.array([r["speedup"] for r in rs])
        xerr = np.array([(r.get("performance_loss_stderr") or 0.0) * 100 for r in rs])
        yerr = np.array([[r["speedup"] - r.get("speedup_pair_min", r["speedup"]) for r in rs],
                         [r.get("speedup_pair_max", r["speedup"]) - r["speedup"] for r in rs]])  # fmt: skip
        ax.errorbar(x, y, xerr=xerr, yerr=np.clip(yerr, 0, None), fmt="o-", ms=5, capsize=2, elinewidth=0.8, label=strategy)
        points += list(zip(x, y))
        labels += [f"{r['ratio']:g}" for r in rs]
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set(xlim=(lo - 1, hi + 1), ylim=(0, top), xlabel="performance loss (% of uncompressed return)", ylabel="speedup (x, whole rollout)")
    seeds = list(rows[0]["seeds"])
    contiguous = len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    shown = f"{seeds[0]}-{seeds[-1]}" if contiguous else ", ".join(map(str, seeds))
    bars = "bars: loss +- standard error, speedup range over seeds" if len(seeds) > 1 else "one seed, so no error bars"
    title = f"Compression trade-off, {rows[0]['engine']} engine: mean over {len(seeds)} seed(s) ({shown})\nlabels: ratio kept; {bars}"
    ax.set_title(title, fontsize=11)
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax, points, labels)
    return fig


# ---- attention across training (training_progression.py) --------------------------------------
def plot_progression(progression: dict) -> Figure:
    """Six panels against training step (log scale), from `training_progression.json`'s dict:
    in-context return, reward enrichment, attention per episode, recency, positions for 90%,
    normalised entropy per layer."""
    pts = progression["snapshots"]
    steps = np.array([p["step"] for p in pts], dtype=np.float64)
    meta = progression["meta"]
    n_layer = int(meta["n_layer"])
    colors = layer_colors(n_layer)

    def col(key, src="attention"):
        return np.array([np.nan if p[src][key] is None else p[src][key] for p in pts], dtype=np.float64)

    def per_layer(key):
        return np.array([[np.nan if v is None else v for v in p["attention"][key]] for p in pts], dtype=np.float64)

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0, 0]
    for key, label, c in (
        ("episode_1", "episode 1", "tab:gray"),
        ("late", f"last {pts[0]['returns']['late_episodes']} episodes", "tab:green"),
    ):
        se = np.array([np.nan if p["returns"][f"{key}_se"] is None else p["returns"][f"{key}_se"] for p in pts])
        ax.errorbar(steps, col(key, "returns"), yerr=np.nan_to_num(se), marker="o", ms=4, capsize=2, color=c, label=label)
    for ref in progression.get("references", []):
        ax.axhline(ref["returns"]["late"], color="tab:green", ls="--", lw=1, label=f"{ref['name']}: last episodes")
        ax.axhline(ref["returns"]["episode_1"], color="tab:gray", ls="--", lw=1, label=f"{ref['name']}: episode 1")
    ax.set(ylabel="return / optimal return", title=f"In-context return, held-out tasks ({len(meta['seeds'])} seeds)")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax = axes[0, 1]
    ax.plot(steps, col("reward_enrichment"), marker="o", ms=4, color="black", label="all layers")
    for li in range(n_layer):
        ax.plot(steps, per_layer("reward_enrichment_per_layer")[:, li], marker=".", color=colors[li], lw=1, label=meta["layer_names"][li])
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="= share of context")
    ax.set(ylabel="attention share / context share", title="Attention on rewarding transitions")
    ax = axes[0, 2]
    ax.plot(steps, col("current_episode_share"), marker="o", ms=4, color="tab:blue", label="current episode")
    ax.plot(steps, col("current_episode_context_share"), ls="--", color="tab:blue", lw=1, label="current episode's share of context")
    ax.plot(steps, col("previous_episode_share"), marker="o", ms=4, color="tab:orange", label="previous episode")
    ax.set(ylabel="share of attention", title="Current vs earlier episodes", ylim=(0, 1))
    ax = axes[1, 0]
    rw, hz = meta["recent_window"], meta["horizon"]
    ax.plot(steps, col("recent_share"), marker="o", ms=4, color="tab:purple", label=f"newest {rw} tokens")
    ax.plot(steps, col("last_episode_share"), marker="o", ms=4, color="tab:cyan", label=f"newest {hz} tokens (one episode)")
    ax.set(ylabel="share of attention", title="Recency", ylim=(0, 1))
    ax = axes[1, 1]
    ax.plot(steps, col("positions_for_90"), marker="o", ms=4, color="tab:brown", label="positions")
    ax.set(ylabel="context positions", title="Positions holding 90% of attention")
    ax2 = ax.twinx()
    ax2.plot(steps, col("fraction_for_90") * 100, ls=":", color="tab:brown", label="% of context")
    ax2.set_ylabel("% of context (dotted)")
    ax = axes[1, 2]
    ent = per_layer("entropy_normalised_per_layer")
    for li in range(n_layer):
        ax.plot(steps, ent[:, li], marker="o", ms=4, color=colors[li], label=meta["layer_names"][li])
    ax.set(ylabel="entropy / log(context length)", title="Attention entropy per layer", ylim=(0, 1.02))
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Attention across training: {meta['env_name']}, {meta['n_snapshots']} snapshots, "
                 f"captures on {meta['n_capture_tasks']} held-out tasks x {len(meta['capture_seeds'])} seed(s)")  # fmt: skip
    fig.tight_layout()
    return fig
