"""In-context evaluation that also records where the model looks (forward hooks on every attention layer).

    python evaluate_with_attention.py                              # default model, first held-out task
    python evaluate_with_attention.py --task 3 --eval-timesteps 400 --out runs/attention
    python evaluate_with_attention.py --adapter path/to/my_adapter.py   # your own model (adlens/adapter.py)

Writes OUT/capture.pt (format: adlens/capture_file.py; load with adlens.capture_file.load_capture or
torch.load(..., weights_only=True)), OUT/returns.json and OUT/capture_config.json.
Analyse it with `python analyze_attention.py --capture OUT/capture.pt`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


from adlens.capture_file import default_eval_timesteps, save_capture
from adlens.config import add_config_flags, none_or, resolve, run_cli
from adlens.errors import UserError

EVAL_CONFIG = {
    "checkpoint": "default",  # path to model.pt; "default" = the shipped Darkroom model
    "adapter": "none",  # or your own model: path to an adapter file (see adlens/adapter.py); excludes --checkpoint
    "tasks": "test",  # task set the --task index refers to: test (held-out) | train
    "task": 0,  # index into that task set
    "eval_timesteps": 0,  # steps to record, rounded up to whole episodes; 0 = min(horizon * 10, 500)
    "seed": 0,  # sampling seed
    "greedy": False,
    "num_full": 5,  # steps that also get the full (q x k) matrices, spread over the run
    "device": "auto",
    "out": "runs/attention",
}
HELP = {
    "eval_timesteps": "rollout steps to record (0 = min(horizon*10, 500))",
    "num_full": "steps with full matrices",
    "adapter": "adapter file for your own AD model (mutually exclusive with --checkpoint)",
}


def capture(cfg: dict) -> tuple[dict, dict]:
    """Validate cfg, run the recorded rollout; returns (capture dict, returns summary). Writes nothing."""
    if cfg["eval_timesteps"] < 0:
        raise UserError(f"eval_timesteps must be >= 1 (or 0 for the default), got {cfg['eval_timesteps']}")
    if cfg["num_full"] < 0:
        raise UserError(f"--num-full must be >= 0, got {cfg['num_full']}")
    if cfg["tasks"] not in ("test", "train"):
        raise UserError(f"--tasks must be test or train, got {cfg['tasks']!r}")
    adapter_path = none_or(cfg.get("adapter"), str)
    if adapter_path:  # the user's model: nothing of the project's model/ or env/ is imported
        from adlens.adapter import load_adapter, record_capture

        adapter = load_adapter(adapter_path)
        model = adapter.load_model(cfg["device"] if cfg["device"] != "auto" else "cpu")
        tasks = adapter.tasks(cfg["tasks"])
        horizon, optimal = adapter.horizon, adapter.optimal_return
        run = lambda task, steps: record_capture(adapter, model, task, steps, seed=cfg["seed"], num_full=cfg["num_full"])
    else:
        from env import get_spec
        from model.checkpoint import load_model, resolve_device
        from model.record import record_rollout

        model, meta = load_model(cfg["checkpoint"], resolve_device(cfg["device"]))
        spec = get_spec(meta["env"])
        tasks = spec.tasks_for(cfg["tasks"])
        horizon, optimal = spec.horizon, spec.optimal_return
        run = lambda task, steps: record_rollout(model, spec, task, steps, seed=cfg["seed"], greedy=cfg["greedy"], num_full=cfg["num_full"])
    if not 0 <= cfg["task"] < len(tasks):
        raise UserError(f"--task must be in [0, {len(tasks) - 1}] for the {len(tasks)} {cfg['tasks']} tasks, got {cfg['task']}")
    task = tasks[cfg["task"]]
    cap = run(task, cfg["eval_timesteps"] or default_eval_timesteps(horizon))
    if not adapter_path:
        cap["meta"]["checkpoint"] = str(cfg["checkpoint"])
    summary = {"task": task, "optimal_return": optimal(task), "returns": cap["returns"].tolist(), "seed": cfg["seed"]}
    return cap, summary


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, EVAL_CONFIG, HELP)
    args = parser.parse_args(argv)
    cfg = resolve(EVAL_CONFIG, args)
    if none_or(cfg["adapter"], str) and args.checkpoint is not None:
        raise UserError("--checkpoint and --adapter are mutually exclusive: analyse the project's model or yours")
    if args.eval_timesteps is not None and args.eval_timesteps < 1:
        raise UserError(f"--eval-timesteps must be >= 1, got {args.eval_timesteps}")
    cap, summary = capture(cfg)
    out = Path(cfg["out"])
    path = save_capture(cap, out / "capture.pt")
    for name, obj in (("returns.json", summary), ("capture_config.json", cfg)):
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, out / name)
    r = summary["returns"]
    opt = summary["optimal_return"]
    print(f"task {json.dumps(summary['task'])}: returns per episode {[round(x, 1) for x in r]}" + (f" (optimal {opt:.0f})" if opt is not None else ""))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {cap['query_attn'].shape[0]} steps)")
    return path


if __name__ == "__main__":
    run_cli(main)
