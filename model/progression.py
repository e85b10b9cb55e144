"""One training snapshot's point on the progression: its in-context return on held-out tasks and
the attention of recorded rollouts, each with the KV-cached engine of `model/rollout.py`.

    >>> point = snapshot_point(model, spec, tasks, capture_tasks, episodes=25, seeds=[100, 101, 102],
    ...                        capture_seeds=[100], capture_timesteps=200)

Every snapshot gets the same tasks and seeds, so the points differ by the weights only (and by the
rollouts those weights produce). The numbers are `adlens.progression`'s.
"""

from __future__ import annotations

import time

import numpy as np

from adlens.errors import UserError
from adlens.progression import attention_point, capture_numbers, return_point
from env import make_vec_env
from adlens.capture_file import task_view
from model.record import record_rollout
from model.rollout import run_episodes


def normalized_returns(model, spec, tasks: list[dict], episodes: int, seeds: list[int], vec_env: str = "batched") -> np.ndarray:
    """Sampled in-context rollouts of every task from an empty context, one run per seed.
    Returns (n_seeds, n_tasks, episodes) returns divided by each task's optimal return."""
    opt = np.array([spec.optimal_return(t) for t in tasks], dtype=np.float64)
    if (opt <= 0).any():
        raise UserError("a task's optimal return is 0 (horizon too short to reach it): returns cannot be normalised")
    venv = make_vec_env(spec, tasks, vec_env)
    try:
        runs = [run_episodes(model, venv, spec, episodes, engine="kv", seed=s)["returns"] for s in seeds]
    finally:
        venv.close()
    return np.stack(runs) / opt[None, :, None]


def snapshot_point(
    model,
    spec,
    tasks: list[dict],
    capture_tasks: list[dict],
    episodes: int,
    seeds: list[int],
    capture_seeds: list[int],
    capture_timesteps: int,
    late_episodes: int = 10,
    recent_window: int = 5,
    sink_positions: int = 4,
) -> dict:
    """Returns {"returns": return_point, "attention": attention_point, "time_s": {...}}."""
    t0 = time.perf_counter()
    returns = return_point(normalized_returns(model, spec, tasks, episodes, seeds), late_episodes)
    t1 = time.perf_counter()
    numbers = []
    for seed in capture_seeds:
        for task in capture_tasks:
            cap = record_rollout(model, spec, [task], capture_timesteps, seed=seed, num_full=0, progress=False)
            numbers.append(capture_numbers(task_view(cap, 0), recent_window, sink_positions))
    t2 = time.perf_counter()
    return {
        "returns": returns,
        "attention": attention_point(numbers),
        "time_s": {"evaluation": round(t1 - t0, 2), "capture": round(t2 - t1, 2)},
    }
