"""In-context evaluation that also records where the model looks (forward hooks on every attention layer).

    python evaluate_with_attention.py                              # default model, its held-out tasks in one batch
    python evaluate_with_attention.py --task 3 --eval-timesteps 400 --out runs/attention   # one task
    python evaluate_with_attention.py --adapter path/to/my_adapter.py   # your own model (adlens/adapter.py)

Writes OUT/capture.pt (format: adlens/capture_file.py; load with adlens.capture_file.load_capture or
torch.load(..., weights_only=True)), OUT/returns.json and OUT/capture_config.json.
Analyse it with `python analyze_attention.py --capture OUT/capture.pt`.
"""

from __future__ import annotations

from pathlib import Path


from adlens.capture_file import default_capture_steps, save_capture
from adlens.config import COMMON_BOUNDS, add_config_flags, check_memory, check_out, check_values, make_parser, none_or, resolve, run_cli
from adlens.device import resolve_device
from adlens.errors import UserError
from adlens.io import stamp, write_json_atomic

EVAL_CONFIG = {
    "checkpoint": "default",  # path to model.pt; "default" = the shipped Darkroom model
    "adapter": "none",  # or your own model: path to an adapter file (see adlens/adapter.py); excludes --checkpoint
    "tasks": "test",  # task set the --task index refers to: test (held-out) | train
    "task": -1,  # index into that task set; -1 = the first tasks_limit tasks, rolled out together
    "tasks_limit": 8,  # at most this many tasks when task is -1
    "full_task": -1,  # which captured task keeps full (q x k) matrices; -1 = the one with the median return
    "eval_timesteps": 0,  # steps to record, rounded up to whole episodes; 0 = twice the model's context (it fills, then slides)
    "seed": 0,  # sampling seed
    "greedy": False,  # argmax actions instead of sampling
    "num_full": 5,  # steps that also get the full (q x k) matrices, spread over the run
    "device": "auto",
    "out": "runs/attention",
}


BOUNDS = {"tasks": {"test", "train"}, "task": (-1, None), "full_task": (-1, None), "eval_timesteps": (0, 10**7),
          "num_full": (0, 1000), "device": {"auto", "cpu", "cuda"}}  # fmt: skip


def capture_bytes(n_tasks: int, steps: int, model, context: int, num_full: int) -> int:
    """Memory of a capture by estimate: the newest token's attention row per step, layer and head
    (float32), plus `num_full` full context x context matrices."""
    from adlens.capture import attention_modules

    mods = attention_modules(model)
    heads = max((getattr(m, "num_heads", None) or getattr(m, "n_head", None) or getattr(getattr(m, "config", None), "num_attention_heads", 1) or 1
                 for _, m in mods), default=1)  # fmt: skip
    return 4 * len(mods) * heads * (n_tasks * steps * context + num_full * context * context)


def capture(cfg: dict) -> tuple[dict, dict]:
    """Validate cfg, run the recorded rollout; returns (capture dict, returns summary). Writes nothing."""
    check_values(cfg, {**COMMON_BOUNDS, **BOUNDS})
    device = resolve_device(cfg["device"])  # cuda without CUDA is refused here, for both kinds of model
    adapter_path = none_or(cfg.get("adapter"), str)
    if adapter_path:  # the user's model: nothing of the project's model/ or env/ is imported
        from adlens.adapter import load_adapter, record_capture

        adapter = load_adapter(adapter_path)
        model = adapter.load_model("cpu" if cfg["device"] == "auto" else cfg["device"])  # the user's rollout decides its device
        tasks = adapter.tasks(cfg["tasks"])
        horizon, optimal, context = adapter.horizon, adapter.optimal_return, adapter.max_context
        run = lambda chosen, steps, full: record_capture(adapter, model, chosen, steps, seed=cfg["seed"], num_full=cfg["num_full"], full_task=full)
    else:
        from env import get_spec
        from model.checkpoint import load_model
        from model.record import record_rollout

        model, meta = load_model(cfg["checkpoint"], device)
        spec = get_spec(meta["env"])
        tasks = spec.tasks_for(cfg["tasks"])
        horizon, optimal, context = spec.horizon, spec.optimal_return, model.cfg.max_context
        run = lambda chosen, steps, full: record_rollout(model, spec, chosen, steps, seed=cfg["seed"], greedy=cfg["greedy"],
                                                         num_full=cfg["num_full"], full_task=full)  # fmt: skip
    if not -1 <= cfg["task"] < len(tasks):
        raise UserError(f"--task must be in [0, {len(tasks) - 1}] for the {len(tasks)} {cfg['tasks']} tasks (or -1 for several), got {cfg['task']}")
    chosen = tasks[: cfg["tasks_limit"]] if cfg["task"] < 0 else [tasks[cfg["task"]]]
    if not -1 <= cfg["full_task"] < len(chosen):
        raise UserError(f"--full-task must be in [0, {len(chosen) - 1}] for the {len(chosen)} captured tasks (or -1), got {cfg['full_task']}")
    steps = cfg["eval_timesteps"] or default_capture_steps(context, horizon)
    check_memory(capture_bytes(len(chosen), steps, model, context, cfg["num_full"]),
                 f"a capture of {len(chosen)} task(s) x {steps} steps", "lower --eval-timesteps, --tasks-limit or --num-full")  # fmt: skip
    cap = run(chosen, steps, None if cfg["full_task"] < 0 else cfg["full_task"])
    if not adapter_path:
        cap["meta"]["checkpoint"] = str(cfg["checkpoint"])
    returns = cap["returns"]  # (N, E)
    summary = {
        "tasks": chosen,
        "optimal_returns": [optimal(t) for t in chosen],
        "returns": returns.tolist(),
        "mean_returns": returns.mean(0).tolist(),
        "seed": cfg["seed"],
    }
    return cap, summary



def main(argv=None) -> Path:
    parser = make_parser(__doc__)
    add_config_flags(parser, EVAL_CONFIG)
    args = parser.parse_args(argv)
    cfg = resolve(EVAL_CONFIG, args, bounds=BOUNDS)
    if none_or(cfg["adapter"], str) and args.checkpoint is not None:
        raise UserError("--checkpoint and --adapter are mutually exclusive: analyse the project's model or yours")
    if args.eval_timesteps is not None and args.eval_timesteps < 1:
        raise UserError(f"--eval-timesteps must be >= 1, got {args.eval_timesteps}")
    out = check_out(cfg["out"])
    cap, summary = capture(cfg)
    path = save_capture(cap, out / "capture.pt")
    for name, obj in (("returns.json", stamp("ad-capture-returns", summary)), ("capture_config.json", cfg)):
        write_json_atomic(out / name, obj)
    r = summary["mean_returns"]
    print(f"{len(summary['tasks'])} task(s): mean return per episode {[round(x, 1) for x in r]}")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {cap['query_attn'].shape[0]} task(s) x {cap['query_attn'].shape[1]} steps)")
    return path


if __name__ == "__main__":
    run_cli(main)
