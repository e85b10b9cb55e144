"""In-context rollout throughput: (a) re-running the whole window every step, (b) the KV-cached
incremental rollout, (c) (b) with compression; same weights, same seeds, measured side by side.

    python benchmarks/inference_speed.py                          # 8 and 256 envs, contexts 240 and 1000
    python benchmarks/inference_speed.py --envs 1024 4096 --device cuda

For each (context, number of environments) the context is first filled (untimed) to its full
length, then `--steps` rollout steps are timed: model, action sampling and environment step.
Reports ms per rollout step, environment steps per second and the ratios to (a). The shipped model is
used where its context allows; longer contexts use a model of the same size with random weights
(speed does not depend on the weights). Also checks that (a) and (b) pick the same greedy actions
while the context is within the model's window.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adlens.config import run_cli  # noqa: E402
from env import get_spec  # noqa: E402
from env.batched import BatchedGridEnv  # noqa: E402
from env import make_vec_env  # noqa: E402
from model.ad import ADConfig, ADTransformer, Tokens  # noqa: E402
from model.checkpoint import load_model, resolve_device  # noqa: E402
from adlens.compression import make_compression  # noqa: E402
from model.rollout import make_engine, run_episodes  # noqa: E402


def prefill(eng, model, B, n, device, gen):
    """Fill an engine's context with n random tokens (untimed)."""
    cfg = model.cfg
    tok = Tokens(
        torch.randint(0, cfg.n_states, (B, n), generator=gen).to(device),
        torch.randint(0, cfg.n_actions, (B, n), generator=gen).to(device),
        torch.randint(0, 2, (B, n), generator=gen).float().to(device),
        (torch.arange(n) % cfg.horizon).expand(B, n).to(device),
    )
    if hasattr(eng, "cache"):
        for t in range(n):
            eng.step(Tokens(*[f[:, t : t + 1] for f in tok]))
    else:  # rerun: the context is just the embedding buffer
        eng.x[:, :n] = model.embed(tok)
        eng.n = n


@torch.inference_mode()
def time_rollout(model, spec, tasks, engine, comp, B, steps, device, vec_env, seed=0) -> float:
    """Seconds for `steps` rollout steps with a full context (the same loop as model.rollout)."""
    venv = make_vec_env(spec, (tasks * (B // len(tasks) + 1))[:B], vec_env)  # B envs cycling over the tasks
    gen = torch.Generator().manual_seed(seed)
    eng = make_engine(engine, model, B, comp)
    prefill(eng, model, B, model.cfg.max_context, device, gen)
    obs = venv.reset()
    prev_a = torch.zeros(B, 1, dtype=torch.long, device=device)
    prev_r = torch.zeros(B, 1, device=device)
    dgen = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in range(steps):
        states = torch.as_tensor(spec.state_index(obs), device=device).view(B, 1)
        logits = eng.step(Tokens(states, prev_a, prev_r, torch.full((B, 1), t % spec.horizon, dtype=torch.long, device=device)))
        actions = torch.multinomial(logits.softmax(-1), 1, generator=dgen)[:, 0]
        obs, rewards, _, _ = venv.step(actions.cpu().numpy())
        prev_a = actions.view(B, 1)
        prev_r = torch.as_tensor(rewards, dtype=torch.float32, device=device).view(B, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    venv.close()
    return time.perf_counter() - t0


def greedy_agreement(model, spec, tasks, n_episodes) -> tuple[float, float]:
    """Share of identical greedy actions of (a) and (b): within the window, and after it slides."""
    acts = {}
    for engine in ("rerun", "kv"):
        rec = []
        venv = BatchedGridEnv(spec, tasks)
        run_episodes(
            model, venv, spec, n_episodes, engine=engine, greedy=True, on_step=lambda t, tok, a, r, e, rec=rec: rec.append(a.cpu().numpy())
        )
        acts[engine] = np.stack(rec)  # (steps, B)
    same = acts["rerun"] == acts["kv"]
    T = model.cfg.max_context
    return float(same[:T].mean()), float(same[T:].mean()) if len(same) > T else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model.pt (default: the shipped model)")
    p.add_argument("--contexts", type=int, nargs="+", default=[240, 1000])
    p.add_argument("--envs", type=int, nargs="+", default=[8, 256])
    p.add_argument("--steps", type=int, default=40, help="timed rollout steps per measurement")
    p.add_argument("--strategy", default="fixed_window", help="compression for (c)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--interval", type=int, default=20)
    p.add_argument("--keep-recent", type=int, default=20)
    p.add_argument("--vec-env", default="batched", choices=["batched", "dummy"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    base, meta = load_model(args.checkpoint, device)
    spec = get_spec(meta["env"])
    tasks = spec.tasks_for("test")
    torch.set_grad_enabled(False)
    rows = []
    hw = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )
    print(f"{datetime.date.today()}  device {device} ({hw}), torch {torch.__version__}, env {args.vec_env}, {args.steps} timed steps")
    print(f"{'context':>8}{'envs':>6}{'engine':>22}{'ms/step':>10}{'env steps/s':>13}{'vs (a)':>9}")
    for T in args.contexts:
        if T <= base.cfg.max_context:
            model = base
        else:
            torch.manual_seed(0)
            model = ADTransformer(ADConfig(**(base.cfg.to_dict() | {"max_context": T}))).to(device).eval()
        comp = make_compression(args.strategy, context=T, ratio=args.ratio, interval=args.interval,
                                **({"keep_recent": args.keep_recent} if args.strategy in ("fixed_window", "topk", "pooling") else {}))  # fmt: skip
        for B in args.envs:
            times = {}
            for label, engine, c in (
                ("(a) rerun", "rerun", None),
                ("(b) kv", "kv", None),
                (f"(c) kv+{args.strategy} {args.ratio}", "kv", comp),
            ):
                time_rollout(model, spec, tasks, engine, c, B, 3, device, args.vec_env)  # warm-up
                times[label] = time_rollout(model, spec, tasks, engine, c, B, args.steps, device, args.vec_env)
            ref = times["(a) rerun"]
            for label, sec in times.items():
                row = {"context": T, "envs": B, "engine": label, "ms_per_step": 1000 * sec / args.steps,
                       "env_steps_per_s": B * args.steps / sec, "speedup_vs_rerun": ref / sec}  # fmt: skip
                rows.append(row)
                print(f"{T:>8}{B:>6}{label:>22}{row['ms_per_step']:>10.2f}{row['env_steps_per_s']:>13.0f}{row['speedup_vs_rerun']:>8.1f}x")
    n_ep = 2 * base.cfg.max_context // spec.horizon
    within, after = greedy_agreement(base, spec, tasks, n_ep)
    print(f"greedy actions (a) vs (b): {100 * within:.1f}% identical within the window, {100 * after:.1f}% after it slides")
    result = {"date": str(datetime.date.today()), "device": str(device), "hardware": hw, "rows": rows,
              "greedy_agreement_within_window": within, "greedy_agreement_after_slide": after}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run_cli(main)
