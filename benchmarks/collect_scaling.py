"""Collection wall time, local processes vs a local Ray instance, 1 and 2 workers, measured side by side.

    python benchmarks/collect_scaling.py --goals 4 --timesteps 10000 --rounds 3 --seed 100

Each round runs `collect.py` four times as a fresh process into an empty folder, in the order
local x1, ray x1, local x2, ray x2 (the next round starts where this one ended, so the order
alternates across rounds), on the first `--goals` Darkroom goals, PPO seed `--seed + round`. A run's
time is its whole wall time, Ray's start and stop included, as a user sees it. Every PPO task pins
torch to one thread. Prints each round's times and, over the rounds, the speedups as ratios of
summed times with the spread of the per-round ratios (mean +- standard error), and the seconds per
task and worker of each variant (for estimating a larger collection). Appends every run to --log;
a rerun skips the runs already there for the same settings (resumable) and reports over all of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adlens.config import run_cli  # noqa: E402

VARIANTS = [("local", 1), ("ray", 1), ("local", 2), ("ray", 2)]


def run_once(backend: str, workers: int, args, seed: int, out: Path) -> float:
    cmd = [sys.executable, "collect.py", "--env", args.env, "--size", str(args.size), "--first-tasks", str(args.goals),
           "--timesteps", str(args.timesteps), "--n-streams", str(args.n_streams), "--seed", str(seed),
           "--backend", backend, "--workers", str(workers), "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    if len(list(out.glob("task_*.npz"))) != args.goals:
        raise RuntimeError(f"{out} holds the wrong number of histories")
    return dt


def ratio_stats(base: np.ndarray, variant: np.ndarray) -> str:
    per_round = base / variant
    se = per_round.std(ddof=1) / np.sqrt(len(per_round)) if len(per_round) > 1 else float("nan")
    return f"{base.sum() / variant.sum():.2f}x (per round {per_round.mean():.2f} +- {se:.2f} SE, n={len(per_round)})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="darkroom")
    parser.add_argument("--size", type=int, default=9)
    parser.add_argument("--goals", type=int, default=4, help="the first N tasks of the env")
    parser.add_argument("--timesteps", type=int, default=10_000, help="PPO timesteps per task")
    parser.add_argument("--n-streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=100, help="round r uses PPO seed seed + r")
    parser.add_argument("--log", default="runs/collect_scaling.jsonl")
    args = parser.parse_args(argv)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {args.goals} {args.env} tasks x "
          f"{args.timesteps} timesteps x {args.n_streams} streams; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    same = {"env": args.env, "goals": args.goals, "timesteps": args.timesteps, "n_streams": args.n_streams}
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    rows = [row for row in rows if all(row[k] == v for k, v in same.items())]
    order = list(VARIANTS)
    for r in range(args.rounds):
        seed = args.seed + r
        for backend, workers in order:
            if any(row["seed"] == seed and row["backend"] == backend and row["workers"] == workers for row in rows):
                continue
            out = Path(tempfile.mkdtemp(prefix="collect_scaling_"))
            try:
                dt = run_once(backend, workers, args, seed, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            row = same | {"round": r, "seed": seed, "backend": backend, "workers": workers, "seconds": dt, "load": os.getloadavg()[0]}
            rows.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"round {r} seed {seed}: {backend} x{workers}: {dt:.1f} s (load average {row['load']:.1f})", flush=True)
        order.reverse()  # ABCD DCBA ...
    seeds = sorted({row["seed"] for row in rows if sum(row2["seed"] == row["seed"] for row2 in rows) == len(VARIANTS)})  # complete rounds
    t = {(b, w): np.array([next(x["seconds"] for x in rows if (x["seed"], x["backend"], x["workers"]) == (s, b, w)) for s in seeds])
         for b, w in VARIANTS}  # fmt: skip
    print(f"{len(seeds)} complete rounds, seeds {seeds}")
    print(f"ray, 1 -> 2 workers:   {ratio_stats(t['ray', 1], t['ray', 2])}")
    print(f"local, 1 -> 2 workers: {ratio_stats(t['local', 1], t['local', 2])}")
    print(f"local x1 / ray x1 (Ray's overhead on one worker): {ratio_stats(t['local', 1], t['ray', 1])}")
    print(f"local x2 / ray x2: {ratio_stats(t['local', 2], t['ray', 2])}")
    for (backend, workers), x in t.items():
        print(f"{backend} x{workers}: mean {x.mean():.1f} s, {x.mean() * workers / args.goals:.1f} worker-seconds per task")
    return {f"{b}x{w}": x.tolist() for (b, w), x in t.items()}


if __name__ == "__main__":
    run_cli(main)
