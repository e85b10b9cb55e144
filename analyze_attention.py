"""Turn an attention capture into figures, metrics and a history-compression recommendation.

    python analyze_attention.py --capture runs/attention/capture.pt --out figs/attention_analysis

Writes into `--out`:
    attention_analysis_comprehensive.png   six panels: attention over time, recent vs distant,
                                           context growth, relative-position profile, compression
                                           potential, attention per past episode and on rewards
    attention_heatmap_step{N}.png          full query x key attention at up to `num_samples` steps
    layer_head_analysis.png                entropy, max attention and recent share per layer x head
    compression_recommendations.txt       the numbers, the detected pattern and the recommended
                                           strategy with the values to use, all from the capture
    attention_metrics.json                 the same for scripts; its "recommendation" object feeds
                                           the compression code
    analysis_config.json                   the resolved configuration

Configuration precedence, lowest first: ANALYSIS_CONFIG below < the `analysis` section of a YAML file
given with `--config` < command-line flags. The capture is read and checked before anything is
written, and results are staged in a temporary folder, so bad input leaves no partial output.
Other scripts call `analyze(capture_dict, out_dir, config)` or `main([...])`; both return the paths
and numbers.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from adlens import metrics as M  # noqa: E402
from adlens import plots as P  # noqa: E402
from adlens.io import OutputManifest, stamp, staged_output  # noqa: E402
from adlens.capture_file import check_capture, load_capture, n_tasks, pool_tasks, task_view  # noqa: E402
from adlens.config import COMMON_BOUNDS, add_config_flags, check_keys, check_out, check_values, load_yaml, make_parser, resolve, run_cli, section  # noqa: E402
from adlens.errors import ConfigError, UserError  # noqa: E402

ANALYSIS_CONFIG = {
    "capture": "runs/attention/capture.pt",  # capture file written by evaluate_with_attention.py
    "out": "figs/attention_analysis",  # output folder
    "num_samples": 5,  # full-matrix heatmaps to draw (at most the capture's full_steps)
    # Newest positions counted as "recent" (the query included). 5 follows the guide; one Darkroom
    # episode is 20 steps, so the share on the last episode is reported as well.
    "recent_window": 5,
    "recency_threshold": 0.7,  # strong recency: share on the last recent_window positions >= this
    "sparse_threshold": 0.3,  # sparse: 80% of attention within at most this fraction of the context
    "sink_positions": 4,  # first context positions counted as attention sinks
    "sink_threshold": 0.2,  # sinks matter when they hold at least this share of attention
    "coverage": 0.9,  # attention a recommended window or top-k budget should retain
    "ratio_margin": 0.2,  # extra positions on top of those needed (0.2 = 20% more)
    "smooth": 0,  # moving-average window (steps) for time series; 0 = one episode (horizon)
    "dpi": 100,  # PNG resolution; the overview is 21 x 14 inches
    "view_task": -1,  # task shown in the top panel and the heatmaps (-1 = the capture's representative task)
}
SEMANTICS = (
    "as in adlens/compression.py, compression_ratio is the fraction of the model's context kept: a budget of "
    "round(compression_ratio * max_context) tokens, enforced every compression_interval steps once the "
    "context holds more; the newest keep_recent tokens are kept as they are"
)


BOUNDS = {
    "num_samples": (0, 100), "recent_window": (1, 100_000), "recency_threshold": (1e-6, 1.0), "sparse_threshold": (1e-6, 1.0),
    "sink_positions": (1, 100_000), "sink_threshold": (1e-6, 1.0), "coverage": (1e-6, 1.0), "ratio_margin": (0.0, 10.0),
    "smooth": (0, 100_000), "dpi": COMMON_BOUNDS["dpi"], "view_task": (-1, None),
}  # fmt: skip


def check_config(cfg: dict, context: int | None = None) -> dict:
    """Reject unknown keys and out-of-range values, naming the offender; with the capture's
    `context`, also windows and sink counts longer than the context."""
    check_keys(cfg, ANALYSIS_CONFIG, "analysis config")
    check_values(cfg, BOUNDS)
    for key in ("recent_window", "sink_positions"):
        if context is not None and int(cfg[key]) > context:
            raise ConfigError(f"{key} must be at most the capture's context ({context}), got {cfg[key]}")
    return cfg


def _env_name(meta: dict) -> str:
    env = meta.get("env", "?")
    return str(env.get("name", "?")) if isinstance(env, dict) else str(env)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _json_metrics(s: dict, layer_names: list[str]) -> dict:
    plain = {k: v for k, v in s.items() if not k.endswith(("_lh", "_per_step")) and k != "context_len"}
    plain["layer_names"] = layer_names
    plain["per_head"] = {k.removesuffix("_lh"): np.round(s[k], 6).tolist() for k in s if k.endswith("_lh")}
    return plain


def _pattern_tests(s: dict, cfg: dict) -> list[str]:
    def check(value: float, op: str, threshold: float) -> str:
        ok = value >= threshold if op == ">=" else value <= threshold
        return f"{_pct(value)} {op} {_pct(threshold)}? {'yes' if ok else 'no'}"

    rw, n_sink = cfg["recent_window"], cfg["sink_positions"]
    sink_recent = s["sink_share"] + s["recent_share"]
    return [
        (
            f"1. sinks + recency : first {n_sink} positions {check(s['sink_share'], '>=', cfg['sink_threshold'])}; "
            f"with the last {rw} {check(sink_recent, '>=', cfg['recency_threshold'])} -> sink_window"
        ),
        f"2. strong recency  : last {rw} positions {check(s['recent_share'], '>=', cfg['recency_threshold'])} -> fixed_window",
        (f"3. sparse          : context fraction holding 80% {check(s['fraction_for_80'], '<=', cfg['sparse_threshold'])} -> topk"),
        "4. otherwise uniform -> pooling",
    ]


def _metric_rows(s: dict, cfg: dict, across: dict | None = None) -> list[tuple[str, str]]:
    cov = _pct(cfg["coverage"])
    sd = (across or {}).get("std", {})

    def pm(key: str, pct: bool = True) -> str:
        v = sd.get(key)
        return "" if v is None else (f" +- {_pct(v)}" if pct else f" +- {v:.1f}")

    rows = [
        ("average sequence length", f"{s['mean_context_len']:.1f} tokens (largest {s['max_context_len']})"),
        (
            "positions holding 80% of attention",
            f"{s['positions_for_80']:.1f}{pm('positions_for_80', False)} ({_pct(s['fraction_for_80'])} of context)",
        ),
        (
            "positions holding 90% of attention",
            f"{s['positions_for_90']:.1f}{pm('positions_for_90', False)} ({_pct(s['fraction_for_90'])} of context)",
        ),
        (f"attention on the last {cfg['recent_window']} positions", _pct(s["recent_share"]) + pm("recent_share")),
        (f"attention on the last episode ({s['horizon']} positions)", _pct(s["last_episode_share"]) + pm("last_episode_share")),
        (f"attention on the first {cfg['sink_positions']} positions", f"{_pct(s['sink_share'])} (sinks)"),
        ("mean entropy per head", f"{s['entropy_nats']:.3f} nats ({s['entropy_normalised']:.2f} of uniform)"),
        ("mean largest weight per head", f"{s['max_attention']:.3f}"),
        ("longest contexts", f"{s['long_context_len']:.1f} tokens, {s['n_long_context_steps']} steps"),
        ("  positions holding 90% there", f"{s['positions_for_90_long']:.1f} ({_pct(s['fraction_for_90_long'])})"),
        (f"  newest window holding {cov} there", f"{s['window_for_coverage']} positions ({_pct(s['window_share'])})"),
        (
            f"  sinks + newest window holding {cov}",
            f"{cfg['sink_positions']} + {s['window_with_sinks_for_coverage']} ({_pct(s['window_with_sinks_share'])})",
        ),
    ]
    if s["reward_context_share"] is None:
        rows.append(("rewarding transitions", "none in any context"))
    else:
        shares = f"{_pct(s['reward_context_share'])} of context, {_pct(s['reward_attention_share'])}{pm('reward_attention_share')} of attention"
        rows.append(("rewarding transitions", f"{shares} ({s['reward_enrichment']:.1f}x their share)"))
    for kind in ("key", "door"):  # Dark Key-to-Door: the two kinds of reward, and the episodes they are drawn from
        if s.get(f"{kind}_context_share") is not None:
            back = ", ".join(f"{-i}: {_pct(v)}" for i, v in enumerate(s[f"{kind}_episode_share"] or []) if v is not None)
            rows.append((f"  {kind} events", f"{_pct(s[f'{kind}_context_share'])} of context, {_pct(s[f'{kind}_attention_share'])} of attention"))
            rows.append((f"  attention on {kind} events per episode", back))
    episodes = ", ".join(f"{-i}: {_pct(v)}" for i, v in enumerate(s["episode_share"]) if v is not None)
    rows.append(("attention per episode (0 = current)", episodes))
    return rows


def _derivation_lines(s: dict, rec: dict, der: dict, cfg: dict) -> list[str]:
    T, B, n_sink, cov = der["max_context"], der["budget_tokens"], cfg["sink_positions"], _pct(cfg["coverage"])
    scaled = f"{_pct(s['fraction_for_90_long'])} of the longest contexts holds 90%, x max_context {T}"
    needed_why = {
        "sink_window": f"{n_sink} sinks + the newest {s['window_with_sinks_for_coverage']}, together holding {cov}",
        "fixed_window": f"the newest window holding {cov} of attention at the longest contexts",
        "topk": scaled,
        "pooling": scaled,
    }[rec["strategy"]]
    keep_why = {
        "sink_window": f"budget {B} - n_sink {n_sink}, the recent part of the sink window",
        "fixed_window": "that window, kept as it is; older tokens are merged into the rest of the budget",
        "topk": "min(recent_window, budget): the newest tokens have no attention history yet (H2O)",
        "pooling": "min(recent_window, budget), kept as they are; older tokens are pooled",
    }[rec["strategy"]]
    needed = f"{der['positions_needed']:.1f}"
    lines = [
        "How these values follow from the numbers above:",
        f"  positions needed     : {needed} ({needed_why})",
        f"  token budget         : ceil((1 + {cfg['ratio_margin']}) x {needed}), at most {T} = {der['budget_wanted']}",
        f"  compression_ratio    : {der['budget_wanted']} / max_context {T}, rounded up to 0.01 = {rec['compression_ratio']}",
        f"                         (a budget of round({rec['compression_ratio']} x {T}) = {B} tokens)",
        f"  compression_interval : the budget clipped to [1, episode length {s['horizon']}] = {rec['compression_interval']}",
        "                         (the context stays under about twice the budget, compressed at least once an episode)",
        f"  keep_recent          : {rec['keep_recent']} ({keep_why})",
        textwrap.fill(f"{SEMANTICS}.", 100, initial_indent="  meaning              : ", subsequent_indent=" " * 25),
    ]
    if rec["strategy"] == "pooling":
        lines.append("  window_size          : left unset, so older tokens are pooled in windows as large as needed")
        if rec["compression_ratio"] >= 0.9:
            lines.append(
                "  note: 90% of attention needs nearly the whole context, so compression will likely cost return;"
                " check that the model is trained, or try another checkpoint."
            )
    if s["sink_share"] >= cfg["sink_threshold"] and rec["strategy"] != "sink_window":
        lines.append(
            f"  note: the first {n_sink} positions hold {_pct(s['sink_share'])} of attention; keep them"
            " (sink_window, StreamingLLM arXiv 2309.17453, or a top-k that scores them high)."
        )
    return lines


def _report(s: dict, rec: dict, der: dict, cfg: dict, meta: dict, layer_names: list[str], across: dict | None = None) -> str:
    rows = _metric_rows(s, cfg, across)
    width = max(len(k) for k, _ in rows)
    lines = [
        "Attention analysis and history-compression recommendation",
        "==========================================================",
        f"Capture: env {_env_name(meta)}, {len(meta.get('tasks') or [meta.get('task')])} task(s), {s['n_steps']} evaluation steps each,",
        f"{s['n_layer']} layers x {s['n_head']} heads, model maximum context {s['max_context']} tokens, "
        + f"episode length {s['horizon']}.",
        f"Averages are over the {s['n_informative_steps']} steps whose context holds more than "
        + f"{cfg['recent_window'] + cfg['sink_positions']} tokens (recent_window + sink_positions),",
        "using the newest token's attention averaged over layers and heads (what a compression shared by",
        "all heads sees). Values are means over tasks (+- their standard deviation across tasks); budgets",
        "are sized on every task's longest contexts together, where they are enforced.",
        "",
        "Metrics",
        "-------",
        *[f"{k:<{width}} : {v}" for k, v in rows],
        "",
        "Per layer (heads averaged)",
    ]
    for li, name in enumerate(layer_names):
        recent, ent = float(s["recent_share_lh"][li].mean()), float(s["entropy_lh"][li].mean())
        mx = float(s["max_attention_lh"][li].mean())
        lines.append(f"  {name:<20} recent share {_pct(recent)}, entropy {ent:.3f} nats, max weight {mx:.3f}")
    lines += ["", "Pattern", "-------", "Tests, first match wins:"]
    lines += ["  " + t for t in _pattern_tests(s, cfg)]
    lines += [f"Detected pattern: {rec['pattern']}", "", "Recommendation", "--------------"]
    lines += [f"{k:<20} = {v}" for k, v in rec.items()]
    lines += ["", *_derivation_lines(s, rec, der, cfg)]
    lines += [
        "",
        "Expected speedup (estimate)",
        "---------------------------",
        f"Estimated attention-cost speedup: {rec['estimated_speedup']:.2f}x = mean uncompressed context length "
        + f"{s['mean_context_len']:.1f} / mean compressed length {der['mean_compressed_len']:.1f}.",
        f"The compressed lengths replay this capture's {s['n_steps']} steps under the schedule above; with a",
        "key/value cache the attention cost of a step grows with the tokens in context. Embeddings, MLPs and",
        "the environment do not shrink, so the wall-clock gain is smaller: compression_template.py measures",
        "it, together with the change in return.",
    ]
    return "\n".join(lines) + "\n"


def _heatmap_indices(n_full: int, num_samples: int) -> list[int]:
    if n_full == 0 or num_samples == 0:
        return []
    return sorted({round(i) for i in np.linspace(0, n_full - 1, min(num_samples, n_full))})


def analyze(capture: dict, out_dir: str | Path, config: dict | None = None, manifest: OutputManifest | None = None) -> dict:
    """Compute every metric of `capture`, draw the figures and write all outputs into `out_dir`.

    capture  : a capture dict (format v1, see `adlens/capture_file.py`)
    config   : keys of ANALYSIS_CONFIG to override (unknown keys are errors)
    manifest : lists the files written (the one-click's `adlens.io.OutputManifest`)
    Returns {"paths": {name: Path}, "metrics": dict, "recommendation": dict, "pattern": str}.
    """
    config = config or {}
    capture = check_capture(capture)  # a dict from a caller is checked like a file
    context = int(capture["query_attn"].shape[-1])
    cfg = check_config({**ANALYSIS_CONFIG, "capture": None, **config, "out": str(out_dir)}, context)  # None: in memory
    N = n_tasks(capture)
    view = int(capture.get("full_task", 0)) if int(cfg["view_task"]) < 0 else int(cfg["view_task"])
    if not 0 <= view < N:
        raise UserError(f"view_task must be in [0, {N - 1}] (the capture holds {N} tasks), got {cfg['view_task']}")
    meta = dict(capture["meta"])
    rw, n_sink = int(cfg["recent_window"]), int(cfg["sink_positions"])
    cov = float(cfg["coverage"])
    per_task = [M.summarize(task_view(capture, i), rw, n_sink, cov) for i in range(N)]
    # budgets and figures use every task's steps together; the reported numbers are means over tasks
    s = M.summarize(pool_tasks(capture), rw, n_sink, cov) if N > 1 else per_task[0]
    across = M.across_tasks(per_task)
    L = s["n_layer"]
    module_names = list(meta.get("layer_names") or [])[:L]
    layer_names = [f"layer {i}" for i in range(L)]  # figures and text; the module names stay in attention_metrics.json
    out = M.recommend(s, cfg)
    rec, der = out["recommendation"], out["derivation"]

    # Arrays for the figures: every task's steps pooled, the top panel from one task.
    pooled = pool_tasks(capture)
    n = s["context_len"]
    rows = M.normalise_rows(pooled["query_attn"], n)  # (N*S, L, H, T)
    layer_rows = rows.mean(2)  # (N*S, L, T)
    mean_rows = M.normalise_rows(rows.mean((1, 2)), n)  # (N*S, T)
    fractions, curves = M.cumulative_attention_curve(mean_rows, n)
    ctx_step = M.to_numpy(pooled["ctx_step"])
    n_back = math.ceil(s["max_context"] / max(s["horizon"], 1)) + 1
    ep_layers = M.episode_attention(layer_rows, n, ctx_step, pooled["episode"], n_back)  # (N*S, L, E)
    r_attn, r_ctx = M.reward_attention(layer_rows, n, ctx_step, pooled["reward"])
    S = capture["query_attn"].shape[1]
    task_recent = np.stack([t["recent_share_per_step"] for t in per_task])  # (N, S)
    one = task_view(capture, view)
    view_rows = M.normalise_rows(M.normalise_rows(one["query_attn"], one["context_len"]).mean((1, 2)), one["context_len"])  # (S, T)
    view_tokens = {"episode": M.to_numpy(one["episode"]), "reward": M.to_numpy(one["reward"]), "ctx_step": M.to_numpy(one["ctx_step"])}
    smooth = int(cfg["smooth"]) or s["horizon"]
    dpi = int(cfg["dpi"])

    metrics_doc = stamp("ad-attention-metrics", {
        "capture": {k: meta.get(k) for k in ("checkpoint", "env", "task", "seed", "max_context", "horizon", "n_layer", "n_head")},
        "metrics": _json_metrics(across["mean"] | {k: v for k, v in s.items() if k not in across["mean"]}, module_names or layer_names),
        "tasks": {"n": N, "tasks": meta.get("tasks"), "view_task": view, "std": across["std"], "per_task": across["per_task"]},
        "pattern": {"name": rec["pattern"], "tests": _pattern_tests(s, cfg)},
        "recommendation": rec,
        "derivation": der,
        "recommendation_semantics": SEMANTICS,
        "config": cfg,
    })  # fmt: skip
    names = {
        "comprehensive": "attention_analysis_comprehensive.png",
        "layer_head": "layer_head_analysis.png",
        "recommendations": "compression_recommendations.txt",
        "metrics": "attention_metrics.json",
        "config": "analysis_config.json",
    }
    full_steps = [int(x) for x in M.to_numpy(capture["full_steps"]).reshape(-1)]
    full_task = int(capture.get("full_task", 0))
    episode, timestep = M.to_numpy(capture["episode"][full_task]), M.to_numpy(capture["timestep"][full_task])
    full_name = json.dumps(meta.get("tasks", [meta.get("task")])[full_task])
    heatmaps = {}
    for k in _heatmap_indices(min(len(full_steps), len(capture["full_attn"])), int(cfg["num_samples"])):
        heatmaps[k] = f"attention_heatmap_step{full_steps[k]}.png"

    title = (
        f"Attention analysis of {N} task(s) x {S} steps ({_env_name(meta)}): pattern {rec['pattern']} (attention-only suggestion: "
        f"{rec['strategy']} at compression_ratio {rec['compression_ratio']}; the measured verdict is in recommendation.json)"
    )
    view_name = json.dumps(meta.get("tasks", [meta.get("task")])[view])
    ctx_all = M.to_numpy(capture["ctx_step"][full_task])  # (S, T)
    out_dir = Path(out_dir)
    with staged_output(out_dir, manifest) as stage:
        fig = P.comprehensive_figure(
            view_rows,
            M.to_numpy(one["context_len"]),
            M.right_align(layer_rows, n),
            fractions,
            curves,
            ep_layers,
            r_attn,
            r_ctx,
            layer_names=layer_names,
            max_context=s["max_context"],
            recent_window=rw,
            smooth=smooth,
            recency_threshold=float(cfg["recency_threshold"]),
            positions_80=s["positions_for_80"],
            positions_90=s["positions_for_90"],
            fraction_80=s["fraction_for_80"],
            fraction_90=s["fraction_for_90"],
            compressed_len=out["compressed_len"][:S],
            title=title,
            task_recent=task_recent if N > 1 else None,
            top_title=f"Query attention over time, task {view} {view_name}, steps 0-{S - 1} (mean over layers and heads)",
            tokens=view_tokens,
            horizon=s["horizon"],
            events={k: (s[f"{k}_context_share"], s[f"{k}_attention_share"]) for k in ("key", "door") if f"{k}_context_share" in s} or None,
        )
        P.save_figure(fig, stage / names["comprehensive"], dpi)
        for k, fname in heatmaps.items():
            step = full_steps[k]
            fa = M.to_numpy(capture["full_attn"][k])  # (L, H, n, n)
            ep, ts, n_tok = int(episode[step]), int(timestep[step]), fa.shape[-1]
            held = ctx_all[step, :n_tok]  # the rollout step of each token in this context
            t = (f"Task {full_task} {full_name}: attention at step {step} (episode {ep}, t = {ts}), "
                 f"{n_tok} tokens from steps {int(held[0])}-{int(held[-1])}")  # fmt: skip
            marks = {"episode": episode[held], "reward": M.to_numpy(capture["reward"][full_task])[held]}
            P.save_figure(P.plot_step_attention(fa, layer_names, t, tokens=marks), stage / fname, dpi)
        lh_title = f"Per layer and head: {N} task(s) x {S} steps, means over their {s['n_informative_steps']} informative steps"
        fig = P.plot_layer_head(s["entropy_lh"], s["max_attention_lh"], s["recent_share_lh"], layer_names, rw, lh_title)
        P.save_figure(fig, stage / names["layer_head"], dpi)
        (stage / names["recommendations"]).write_text(_report(across["mean"] | {k: v for k, v in s.items() if k not in across["mean"]}, rec, der, cfg, meta, layer_names, across))
        (stage / names["metrics"]).write_text(json.dumps(metrics_doc, indent=2, default=str))
        (stage / names["config"]).write_text(json.dumps(cfg, indent=2))

    paths = {k: out_dir / v for k, v in names.items()}
    paths["heatmaps"] = [out_dir / f for f in heatmaps.values()]
    return {"paths": paths, "metrics": metrics_doc["metrics"], "recommendation": rec, "pattern": rec["pattern"], "summary": s}


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--config", help="YAML file whose 'analysis' section overrides ANALYSIS_CONFIG")
    add_config_flags(parser, ANALYSIS_CONFIG)
    args = parser.parse_args(argv)
    ycfg = load_yaml(args.config) if args.config else {}
    cfg = check_config(resolve(ANALYSIS_CONFIG, args, section(ycfg, "analysis", ANALYSIS_CONFIG) if ycfg else None,
                               BOUNDS, where=args.config or "config"))  # fmt: skip
    check_out(cfg["out"])
    capture = load_capture(cfg["capture"])  # checked before anything is written
    result = analyze(capture, cfg["out"], cfg)
    rec = result["recommendation"]
    print(
        f"{rec['pattern']}; attention-only suggestion: {rec['strategy']} with compression_ratio {rec['compression_ratio']}, "
        f"keep_recent {rec['keep_recent']}, every {rec['compression_interval']} steps "
        f"(estimated speedup {rec['estimated_speedup']:.2f}x); results in {cfg['out']}"
    )
    return result


if __name__ == "__main__":
    run_cli(main)
