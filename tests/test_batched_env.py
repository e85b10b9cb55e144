"""The batched grid env steps exactly like stable-baselines3's DummyVecEnv over the gymnasium envs."""

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from env import get_spec, make_env
from env.batched import BatchedGridEnv


@pytest.mark.parametrize("name", ["darkroom", "darkroom_permuted", "key_to_door"])
def test_identical_trajectories(name):
    spec = get_spec({"name": name})
    tasks = spec.tasks()[:: max(1, len(spec.tasks()) // 7)][:7]
    batched, dummy = BatchedGridEnv(spec, tasks), DummyVecEnv([make_env(spec, **t) for t in tasks])
    np.testing.assert_array_equal(batched.reset(), dummy.reset())
    rng = np.random.default_rng(0)
    for _ in range(spec.horizon * 3):
        actions = rng.integers(0, 5, len(tasks))
        ob, rb, db, ib = batched.step(actions)
        od, rd, dd, id_ = dummy.step(actions)
        np.testing.assert_array_equal(ob, od)
        np.testing.assert_array_equal(rb, rd)
        np.testing.assert_array_equal(db, dd)
        for a, b in zip(ib, id_):
            if "terminal_observation" in b:
                np.testing.assert_array_equal(a["terminal_observation"], b["terminal_observation"])


def test_rollout_returns_match_dummy_vec_env():
    import torch

    from model import ADConfig, ADTransformer
    from model.rollout import run_episodes

    torch.manual_seed(0)
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2})
    model = ADTransformer(ADConfig(n_states=9, horizon=5, max_context=20, n_layer=1, n_head=2, d_model=16, dropout=0.0, grid_size=3)).eval()
    tasks = spec.tasks()
    a = run_episodes(model, BatchedGridEnv(spec, tasks), spec, 6, seed=4)["returns"]
    b = run_episodes(model, DummyVecEnv([make_env(spec, **t) for t in tasks]), spec, 6, seed=4)["returns"]
    np.testing.assert_array_equal(a, b)
