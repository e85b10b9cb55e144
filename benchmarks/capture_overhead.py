"""Wall time of the same in-context rollout with and without attention capture, side by side.

    python benchmarks/capture_overhead.py --eval-timesteps 500 --repeats 3

Both runs use the same model, task and seed (hence the same actions); the capture run records
the query row of every layer and head at every step (what evaluate_with_attention.py stores,
full matrices off). Prints both times and their ratio; the target is a ratio of at most 1.5.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.record import record_rollout  # noqa: E402
from adlens.config import run_cli  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from env import get_spec, make_vec_env  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.rollout import run_episodes  # noqa: E402


@torch.no_grad()  # for the run only: a caller's autograd mode is restored on return
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model.pt (default: the shipped model)")
    p.add_argument("--eval-timesteps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each; the minimum is reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.eval_timesteps < 1 or args.repeats < 1:
        raise UserError("--eval-timesteps and --repeats must be >= 1")
    model, meta = load_model(args.checkpoint)
    spec = get_spec(meta["env"])
    tasks = spec.tasks_for("test")
    n_ep = math.ceil(args.eval_timesteps / spec.horizon)

    def plain():
        venv = make_vec_env(spec, tasks, "batched")
        run_episodes(model, venv, spec, n_ep, seed=args.seed)

    def captured():
        record_rollout(model, spec, tasks, n_ep * spec.horizon, seed=args.seed, num_full=0)

    times = {"plain": [], "capture": []}
    plain()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("capture", captured)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_plain, t_cap = min(times["plain"]), min(times["capture"])
    ratio = t_cap / t_plain
    print(f"{n_ep * spec.horizon} steps, context up to {model.cfg.max_context}, {torch.get_num_threads()} threads")
    print(f"without capture {t_plain:.2f} s, with capture {t_cap:.2f} s: ratio {ratio:.2f}x (target <= 1.5x)")
    return {"plain_s": t_plain, "capture_s": t_cap, "ratio": ratio}


if __name__ == "__main__":
    run_cli(main)
