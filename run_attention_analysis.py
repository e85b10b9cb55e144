"""One click: capture attention during in-context evaluation, analyse it, check the recommended compression.

    python run_attention_analysis.py                      # shipped model -> figs/attention_analysis/
    python run_attention_analysis.py --full --seed 1      # longer capture, 3-seed compression check
    python run_attention_analysis.py --checkpoint checkpoints/my_ad/model.pt --skip-compression
    python run_attention_analysis.py --adapter path/to/my_adapter.py   # your own AD model (adlens/adapter.py)

Stages (each also runs alone):
  1. evaluate_with_attention.py   rollout on a held-out task with hooks -> runs/attention/capture.pt
  2. analyze_attention.py         figures, metrics and the recommendation -> OUT/
  3. compression_template.py      the recommended strategy against no compression, same seeds,
                                  measured speedup and loss of return -> OUT/compression_results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import analyze_attention
import compression_template
import evaluate_with_attention
from adlens.capture_file import save_capture
from adlens.config import add_config_flags, none_or, resolve, run_cli
from adlens.errors import UserError

PIPELINE_CONFIG = {
    "checkpoint": "default",  # model.pt to analyse; "default" = the shipped Darkroom model
    "adapter": "none",  # or your own model: path to an adapter file (see adlens/adapter.py); excludes --checkpoint
    "out": "figs/attention_analysis",  # figures, metrics, recommendation, compression results
    "capture_out": "runs/attention",  # where the capture file goes
    "task": 0,  # held-out task index for the capture
    "seed": 0,
    "device": "auto",
    "skip_compression": False,  # stop after the analysis
    "eval_timesteps": 0,  # capture length in steps (0 = the mode's)
    "check_episodes": 0,  # episodes per task in the compression check (0 = the mode's)
    "check_seeds": 0,  # seeds in the compression check (0 = the mode's)
    "threads": 0,  # torch CPU threads for the timed compression check (0 = half the cores, at least 1)
}
MODES = {
    # eval_timesteps 0 = min(horizon * 10, 500)
    "quick": {"eval_timesteps": 0, "episodes": 30, "seeds": 1},
    "full": {"eval_timesteps": 500, "episodes": 50, "seeds": 3},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, PIPELINE_CONFIG, {"skip_compression": "capture and analyse only", "adapter": "adapter file for your own AD model"})
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="short capture, 1-seed compression check (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="500-step capture, 3-seed, 50-episode check")
    args = parser.parse_args(argv)
    cfg = resolve(PIPELINE_CONFIG, args)
    cfg["adapter"] = none_or(cfg["adapter"], str)
    if cfg["adapter"] and args.checkpoint is not None:
        raise UserError("--checkpoint and --adapter are mutually exclusive: analyse the project's model or yours")
    for key in ("eval_timesteps", "check_episodes", "check_seeds", "threads"):
        if cfg[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    m = dict(MODES[args.mode or "quick"])
    m.update({k: cfg[c] for k, c in (("eval_timesteps", "eval_timesteps"), ("episodes", "check_episodes"), ("seeds", "check_seeds")) if cfg[c]})
    if cfg["adapter"]:
        from adlens.adapter import load_adapter

        load_adapter(cfg["adapter"])  # fail fast, before any output
    else:
        from model.checkpoint import read_checkpoint

        read_checkpoint(cfg["checkpoint"])
    t_start = time.time()

    print("[1/3] capturing attention during in-context evaluation ...", flush=True)
    cap_cfg = dict(evaluate_with_attention.EVAL_CONFIG, checkpoint=cfg["checkpoint"], adapter=cfg["adapter"] or "none", task=cfg["task"], seed=cfg["seed"],
                   device=cfg["device"], eval_timesteps=m["eval_timesteps"], out=cfg["capture_out"])  # fmt: skip
    cap, summary = evaluate_with_attention.capture(cap_cfg)
    cap_path = save_capture(cap, Path(cfg["capture_out"]) / "capture.pt")
    r = summary["returns"]
    opt = f" (optimal {summary['optimal_return']:.0f})" if summary["optimal_return"] is not None else ""
    print(f"      task {json.dumps(summary['task'])}: episode 1 return {r[0]:.1f}, last episode {r[-1]:.1f}{opt}; "
          f"{len(cap['context_len'])} steps -> {cap_path}")  # fmt: skip

    print("[2/3] analysing attention ...", flush=True)
    res = analyze_attention.analyze(cap, cfg["out"], dict(analyze_attention.ANALYSIS_CONFIG, capture=str(cap_path), out=cfg["out"]))
    met, rec = res["metrics"], res["recommendation"]

    comp = None
    if not cfg["skip_compression"]:
        print(f"[3/3] measuring the recommended compression ({rec['strategy']}, ratio {rec['compression_ratio']}) ...", flush=True)
        model_arg = ["--adapter", cfg["adapter"]] if cfg["adapter"] else ["--checkpoint", str(cfg["checkpoint"])]
        argv_c = [*model_arg, "--threads", str(cfg["threads"]), "--strategy", rec["strategy"], "--ratio", str(rec["compression_ratio"]),
                  "--interval", str(rec["compression_interval"]), "--keep-recent", str(rec["keep_recent"]),
                  "--episodes", str(m["episodes"]), "--seeds", *[str(cfg["seed"] + i) for i in range(m["seeds"])],
                  "--out", cfg["out"], "--device", "cpu" if cfg["device"] == "auto" else cfg["device"]]  # fmt: skip
        if "n_sink" in rec:
            argv_c += ["--n-sink", str(rec["n_sink"])]
        comp = compression_template.main(argv_c)["rows"][0]

    out = Path(cfg["out"])
    print(f"\nDone in {time.time() - t_start:.0f} s. Outputs in {out}/:")
    for name in (
        "attention_analysis_comprehensive.png",
        "compression_recommendations.txt",
        "layer_head_analysis.png",
        "attention_metrics.json",
    ):
        print(f"  {name}")
    print(f"  attention_heatmap_step*.png ({len(res['paths']['heatmaps'])} files)")
    print(f"Attention: 80% on {met['positions_for_80']:.0f} positions ({100 * met['fraction_for_80']:.0f}% of the context), "
          f"90% on {met['positions_for_90']:.0f} ({100 * met['fraction_for_90']:.0f}%); mean context {met['mean_context_len']:.0f} tokens; "
          f"pattern: {res['pattern']}")  # fmt: skip
    print(f"Recommended: {rec['strategy']}, compression_ratio {rec['compression_ratio']}, interval {rec['compression_interval']}, "
          f"keep_recent {rec['keep_recent']} (estimated attention speedup {rec['estimated_speedup']:.2f}x)")  # fmt: skip
    if comp:
        print(f"Measured ({comp['engine']} engine, {comp['episodes']} episodes x {len(comp['seeds'])} seed(s), {comp['n_tasks']} held-out tasks): "
              f"speedup {comp['speedup']:.2f}x, performance loss {100 * comp['performance_loss']:.1f}% "
              f"(return {comp['return_full']:.2f} -> {comp['return_compressed']:.2f})")  # fmt: skip
    return {"capture": cap_path, "analysis": res, "compression": comp}


if __name__ == "__main__":
    run_cli(main)
