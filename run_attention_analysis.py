"""One click: capture attention during in-context evaluation, analyse it, measure what compression pays.

    python run_attention_analysis.py                      # shipped model -> figs/attention_analysis/
    python run_attention_analysis.py --full --seed 1      # 10-seed, 50-episode measurement
    python run_attention_analysis.py --checkpoint checkpoints/my_ad/model.pt --skip-compression
    python run_attention_analysis.py --adapter path/to/my_adapter.py   # your own AD model (adlens/adapter.py)

Stages (the first two also run alone):
  1. evaluate_with_attention.py   the held-out tasks (up to 8) in one batched rollout with hooks, twice
                                  the model's context long -> runs/attention/capture.pt
  2. analyze_attention.py         figures, metrics and the attention-only suggestion -> OUT/
  3. measured recommendation      a few candidates derived from the attention, each measured against no
                                  compression (same tasks and seeds, runs alternated, threads pinned);
                                  the fastest that is faster at all and within 5% loss is recommended,
                                  or "none" -> OUT/recommendation.json, OUT/compression_results.json

OUT/manifest.json lists the files a run wrote into OUT. A new run into the same OUT first removes
exactly those files (nothing else: `--out .` or a folder shared with other files is safe), so an
interrupted run never leaves a mix of two runs' outputs. One run at a time writes into an OUT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import analyze_attention
import evaluate_with_attention
from adlens.capture_file import save_capture
from adlens.config import add_config_flags, check_out, make_parser, none_or, resolve, run_cli
from adlens.device import resolve_device
from adlens.errors import UserError
from adlens.io import OutputManifest, lock_folder, provenance, stamp, staged_output
from adlens.recommend import break_even_context, candidates, choose, fit_step_cost, recommendation_doc, verdict_lines

PIPELINE_CONFIG = {
    "checkpoint": "default",  # model.pt to analyse; "default" = the shipped Darkroom model
    "adapter": "none",  # or your own model: path to an adapter file (see adlens/adapter.py); excludes --checkpoint
    "out": "figs/attention_analysis",  # figures, metrics, recommendation, compression results
    "capture_out": "runs/attention",  # where the capture file goes
    "task": -1,  # held-out task index for the capture; -1 = the first tasks_limit tasks together
    "tasks_limit": 8,  # at most this many tasks in the capture and the measurement
    "seed": 0,
    "device": "auto",
    "skip_compression": False,  # stop after the analysis
    "eval_timesteps": 0,  # capture length in steps (0 = the mode's)
    "check_episodes": 0,  # episodes per task in the compression check (0 = the mode's)
    "check_seeds": 0,  # seeds in the compression check (0 = the mode's)
    "threads": 0,  # torch CPU threads for the timed compression check (0 = half the cores, at least 1)
}
MODES = {
    # eval_timesteps 0 = twice the model's context; rerun_*: the re-run engine's check of the best candidate
    "quick": {"eval_timesteps": 0, "episodes": 25, "seeds": 4, "rerun_episodes": 15, "rerun_seeds": 1},
    "full": {"eval_timesteps": 0, "episodes": 50, "seeds": 10, "rerun_episodes": 50, "rerun_seeds": 3},
}


BOUNDS = {"task": (-1, None), "eval_timesteps": (0, 10**7), "check_episodes": (0, 10_000), "check_seeds": (0, 1000),
          "device": {"auto", "cpu", "cuda"}}  # fmt: skip


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    add_config_flags(parser, PIPELINE_CONFIG)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="4 seeds x 25 episodes per candidate (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="10 seeds x 50 episodes per candidate")
    args = parser.parse_args(argv)
    cfg = resolve(PIPELINE_CONFIG, args, bounds=BOUNDS)
    cfg["adapter"] = none_or(cfg["adapter"], str)
    if cfg["adapter"] and args.checkpoint is not None:
        raise UserError("--checkpoint and --adapter are mutually exclusive: analyse the project's model or yours")
    check_out(cfg["out"])
    check_out(cfg["capture_out"], "--capture-out")
    m = dict(MODES[args.mode or "quick"])
    m.update({k: cfg[c] for k, c in (("eval_timesteps", "eval_timesteps"), ("episodes", "check_episodes"), ("seeds", "check_seeds")) if cfg[c]})
    resolve_device(cfg["device"])  # fail fast: cuda without CUDA
    if cfg["adapter"]:
        from adlens.adapter import load_adapter

        load_adapter(cfg["adapter"])  # fail fast, before any output
    else:
        from model.checkpoint import read_checkpoint

        read_checkpoint(cfg["checkpoint"])
    out = Path(cfg["out"])
    with lock_folder(out, "run_attention_analysis.py run"):
        manifest = OutputManifest(out, "run_attention_analysis.py")
        manifest.start()
        result = _run(cfg, m, manifest)
        manifest.finish()
    return result


def _run(cfg: dict, m: dict, manifest: OutputManifest) -> dict:
    t_start = time.time()

    print("[1/3] capturing attention during in-context evaluation ...", flush=True)
    cap_cfg = dict(evaluate_with_attention.EVAL_CONFIG, checkpoint=cfg["checkpoint"], adapter=cfg["adapter"] or "none", task=cfg["task"],
                   tasks_limit=cfg["tasks_limit"], seed=cfg["seed"], device=cfg["device"], eval_timesteps=m["eval_timesteps"],
                   out=cfg["capture_out"])  # fmt: skip
    cap, summary = evaluate_with_attention.capture(cap_cfg)
    cap_path = Path(cfg["capture_out"]) / "capture.pt"
    if cap_path.parent.resolve() == Path(cfg["out"]).resolve():
        manifest.add([cap_path.name])
    save_capture(cap, cap_path)
    r = summary["mean_returns"]
    print(f"      {len(summary['tasks'])} task(s): mean return {r[0]:.1f} in episode 1, {r[-1]:.1f} in episode {len(r)}; "
          f"{cap['query_attn'].shape[1]} steps each -> {cap_path} ({cap_path.stat().st_size / 1e6:.0f} MB)")  # fmt: skip

    print("[2/3] analysing attention ...", flush=True)
    res = analyze_attention.analyze(cap, cfg["out"], dict(analyze_attention.ANALYSIS_CONFIG, capture=str(cap_path), out=cfg["out"]), manifest)
    met, rec = res["metrics"], res["recommendation"]

    doc = None
    if not cfg["skip_compression"]:
        doc = measured_recommendation(cfg, m, res, summary, manifest)
    out = Path(cfg["out"])
    print(f"\nDone in {time.time() - t_start:.0f} s. Outputs in {out}/:")
    for name in ("attention_analysis_comprehensive.png", "compression_recommendations.txt", "recommendation.json",
                 "layer_head_analysis.png", "attention_metrics.json"):  # fmt: skip
        if (out / name).exists():
            print(f"  {name}")
    print(f"  attention_heatmap_step*.png ({len(res['paths']['heatmaps'])} files)")
    share = met.get("reward_attention_share")
    rewards = (f"rewarded transitions {100 * met['reward_context_share']:.0f}% of the context, {100 * share:.0f}% of the attention; "
               if share is not None else "no rewarded transition in any context; ")  # fmt: skip
    print(f"Attention ({len(summary['tasks'])} task(s)): {rewards}90% of it on {100 * met['fraction_for_90']:.0f}% of the context; pattern: {res['pattern']}")
    print(f"Attention-only suggestion: {rec['strategy']}, compression_ratio {rec['compression_ratio']} (a starting point, not a measurement)")
    if doc is not None:
        print("\n".join(verdict_lines(doc)[2:]))
    return {"capture": cap_path, "analysis": res, "recommendation": doc}


def _argv(cfg: dict, m: dict, cand: dict, engine: str, episodes: int, seeds: list[int], out: str) -> list[str]:
    model_arg = ["--adapter", cfg["adapter"]] if cfg["adapter"] else ["--checkpoint", str(cfg["checkpoint"]), "--engine", engine]
    argv = [*model_arg, "--threads", str(cfg["threads"]), "--strategy", cand["strategy"], "--ratio", str(cand["compression_ratio"]),
            "--interval", str(cand["compression_interval"]), "--keep-recent", str(cand["keep_recent"]), "--episodes", str(episodes),
            "--seeds", *map(str, seeds), "--out", out, "--device", "cpu" if cfg["device"] == "auto" else cfg["device"]]  # fmt: skip
    return argv + (["--n-sink", str(cand["n_sink"])] if "n_sink" in cand else [])


def measured_recommendation(cfg: dict, m: dict, res: dict, summary: dict, manifest: OutputManifest | None = None) -> dict:
    """Stage 3: measure the candidates against no compression; write recommendation.json and the verdict."""
    import compression_template as ct
    from adlens.config import pin_threads

    out = Path(cfg["out"])
    cands = candidates(res["summary"], res["recommendation"], int(analyze_attention.ANALYSIS_CONFIG["sink_positions"]))
    seeds = [cfg["seed"] + i for i in range(m["seeds"])]
    threads = pin_threads(cfg["threads"])
    engine = "adapter" if cfg["adapter"] else "kv"
    base_cfg = ct.resolve(ct.COMPRESSION_CONFIG, ct.parse_args(_argv(cfg, m, cands[0], "kv", m["episodes"], seeds, str(out))))
    base_cfg["adapter"] = cfg["adapter"]
    runner = ct.make_runner(base_cfg)
    runner.tasks = runner.tasks[: cfg["tasks_limit"]] if cfg["task"] < 0 else [runner.tasks[cfg["task"]]]
    if hasattr(runner, "venv"):
        runner.close()
        runner.reopen()
    try:
        t0 = time.perf_counter()
        runner.run(None, seeds[0])  # warm-up, and the time one rollout takes
        one = time.perf_counter() - t0
        print(f"[3/3] measuring {len(cands)} candidate(s) against no compression: {engine} engine, {len(runner.tasks)} task(s), "
              f"{m['episodes']} episodes, seeds {seeds}, {threads} thread(s); about {one * 2 * len(seeds) * len(cands):.0f} s", flush=True)  # fmt: skip
        rows = []
        for c in cands:
            comp = ct.build_compression(dict(base_cfg, compression_interval=c["compression_interval"], keep_recent=c["keep_recent"],
                                             n_sink=c.get("n_sink", base_cfg["n_sink"])), c["strategy"], c["compression_ratio"], runner.context)  # fmt: skip
            rows.append(ct.measure(runner, c["strategy"], comp, seeds))
            r = rows[-1]
            print(f"      {c['strategy']} ratio {c['compression_ratio']}: {r['speedup']:.2f}x, loss {100 * r['performance_loss']:.1f}%", flush=True)
        best = choose(rows)
        estimate = None
        if best is None and rows and hasattr(runner, "profile"):
            top = max(rows, key=lambda r: r["speedup"])
            comp = ct.build_compression(dict(base_cfg, **{k: top["params"][k] for k in ("keep_recent", "n_sink", "window_size") if k in top["params"]},
                                             compression_interval=top["interval"]), top["strategy"], top["ratio"], runner.context)  # fmt: skip
            estimate = step_cost_estimate(runner, comp, seeds[0], top["ratio"])
    finally:
        runner.close()
    rerun_best = None
    if best is None and rows and not cfg["adapter"]:  # what a model that re-runs its window would gain
        top = max(rows, key=lambda r: r["speedup"])
        cand = next(c for c in cands if (c["strategy"], c["compression_ratio"]) == (top["strategy"], top["ratio"]))
        rseeds = seeds[: m["rerun_seeds"]]
        print(f"      re-run engine check of {top['strategy']} ratio {top['ratio']} ({m['rerun_episodes']} episodes, seeds {rseeds}) ...", flush=True)
        rcfg = ct.resolve(ct.COMPRESSION_CONFIG, ct.parse_args(_argv(cfg, m, cand, "rerun", m["rerun_episodes"], rseeds, str(out))))
        rcfg["adapter"] = None
        rr = ct.make_runner(rcfg)
        rr.tasks = runner.tasks
        rr.reopen()
        try:
            comp = ct.build_compression(dict(rcfg, n_sink=cand.get("n_sink", rcfg["n_sink"])), cand["strategy"], cand["compression_ratio"], rr.context)
            rerun_best = ct.measure(rr, cand["strategy"], comp, rseeds)
        finally:
            rr.close()
    doc = recommendation_doc(best, rows, res["recommendation"], seeds, rerun_best, estimate) | {"provenance": provenance()}
    with staged_output(out, manifest) as stage:
        (stage / "recommendation.json").write_text(json.dumps(doc, indent=1))
        (stage / "compression_results.json").write_text(json.dumps(stamp("ad-compression-results", {"provenance": provenance(),
                                                                  "rows": rows + ([rerun_best] if rerun_best else []),
                                                                  "torch_threads": threads, "model_context": runner.context}), indent=1))  # fmt: skip
        text = (out / "compression_recommendations.txt").read_text()
        (stage / "compression_recommendations.txt").write_text(text + "\n" + "\n".join(verdict_lines(doc)) + "\n")
    return doc


def step_cost_estimate(runner, comp, seed: int, ratio: float) -> dict:
    """Per-step cost a + b * context from the uncompressed rollout, the compressed rollout's overhead
    above that line, and the context length at which compression at `ratio` would pay (an estimate)."""
    n_full, t_full = runner.profile(None, seed)
    n_comp, t_comp = runner.profile(comp, seed)
    a, b = fit_step_cost(n_full, t_full)
    overhead = float(np.mean(t_comp) - (a + b * np.mean(n_comp)))
    return {"a_ms": 1000 * a, "b_ms_per_token": 1000 * b, "overhead_ms": 1000 * overhead, "ratio": ratio, "batch": len(runner.tasks),
            "context": runner.context, "break_even_context": break_even_context(a, b, overhead, ratio)}  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
