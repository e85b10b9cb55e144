"""Dark Key-to-Door: dynamics and optimal return, the source learner's key flag, the seeded subset of
training pairs, symmetry augmentation onto pairs that are not held out, exploration histories from
an empty room, and the tiny pipeline (collect -> train -> evaluate) with its key and door parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import collect
import evaluate
import train
from adlens.errors import ConfigError, UserError
from env import EnvSpec, KeyToDoor, ObserveKey, get_spec
from env.batched import BatchedGridEnv
from env.darkroom import MOVES
from model.data import HistoryData

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "config" / "key_to_door_tiny.yaml"
UP, DOWN, LEFT, RIGHT, STAY = range(5)


def _path(src, dst) -> list[int]:
    """Actions of a shortest path from cell src to cell dst: rows first, then columns."""
    (r, c), (r2, c2) = src, dst
    return [DOWN if r2 > r else UP] * abs(r2 - r) + [RIGHT if c2 > c else LEFT] * abs(c2 - c)


def _keys(tasks) -> set:
    return {json.dumps(t) for t in tasks}


# ---- dynamics ------------------------------------------------------------------------------------
def test_the_shortest_path_earns_the_optimal_return_on_every_held_out_pair():
    spec = EnvSpec(name="key_to_door")
    for task in spec.tasks_for("test"):
        e = spec.make(**task)
        e.reset()
        plan = (_path(e.start, task["key"]) or [STAY]) + _path(task["key"], task["door"])
        total = sum(e.step(a)[1] for a in plan + [STAY] * (spec.horizon - len(plan)))
        assert total == spec.optimal_return(task) == 2.0, task


def test_the_door_pays_only_after_the_key_and_each_once_per_episode():
    e = KeyToDoor(key=(4, 6), door=(4, 3), size=9, horizon=50)
    e.reset()
    rewards = [e.step(a)[1] for a in [LEFT, RIGHT, RIGHT, RIGHT, LEFT, LEFT, LEFT, LEFT, RIGHT, LEFT]]
    assert rewards == [0, 0, 0, 1, 0, 0, 1, 0, 0, 0]  # door (4, 3) first: nothing; key, then door


def test_batched_key_to_door_matches_the_gym_env_across_episodes():
    spec = EnvSpec(name="key_to_door", size=5, horizon=8, n_holdout=4)
    tasks = spec.tasks()[::37]
    venv, envs = BatchedGridEnv(spec, tasks), [spec.make(**t) for t in tasks]
    venv.reset()
    for e in envs:
        e.reset()
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(3 * spec.horizon):
        actions = rng.integers(5, size=len(tasks))
        obs, rewards, dones, _ = venv.step(actions)
        for i, e in enumerate(envs):
            o, r, _, trunc, _ = e.step(actions[i])
            if trunc:
                o, _ = e.reset()
            assert (obs[i] == o).all() and rewards[i] == r and dones[i] == trunc
        total += rewards.sum()
    assert total > 0


def test_observe_key_adds_the_flag_and_nothing_else():
    e = ObserveKey(KeyToDoor(key=(4, 5), door=(4, 3), size=9, horizon=6))
    obs, _ = e.reset()
    assert obs.tolist() == [4, 4, 0] and e.observation_space.contains(obs)
    seen = [e.step(a)[0].tolist() for a in [RIGHT, LEFT, LEFT, LEFT]]
    assert seen == [[4, 5, 1], [4, 4, 1], [4, 3, 1], [4, 2, 1]]
    assert e.reset()[0].tolist() == [4, 4, 0]  # a new episode starts without the key


# ---- the subset of training pairs ----------------------------------------------------------------
def test_train_tasks_is_a_seeded_subset_that_leaves_the_held_out_pairs_alone():
    full_train, held = EnvSpec(name="key_to_door").split()
    small, held_small = EnvSpec(name="key_to_door", train_tasks=150).split()
    big, held_big = EnvSpec(name="key_to_door", train_tasks=400).split()
    assert held_small == held_big == held  # the held-out pairs do not depend on the subset
    assert len(small) == 150 and len(big) == 400 and len(full_train) == 6430
    assert _keys(small) < _keys(big) < _keys(full_train)  # a larger subset extends a smaller one
    assert not _keys(big) & _keys(held)
    assert EnvSpec(name="key_to_door", train_tasks=150).split() == (small, held)  # deterministic
    assert EnvSpec(name="key_to_door", train_tasks=150, split_seed=1).split()[0] != small
    assert len({t["key"][0] * 9 + t["key"][1] for t in small}) > 50  # spread over the grid, not the first keys
    assert "train_tasks" not in EnvSpec(name="key_to_door").to_dict()  # specs saved before it compare equal
    assert EnvSpec(name="key_to_door", train_tasks=3).to_dict()["train_tasks"] == 3
    with pytest.raises(ConfigError, match="train_tasks"):
        EnvSpec(name="key_to_door", train_tasks=6431)
    with pytest.raises(ConfigError, match="train_tasks"):
        EnvSpec(name="key_to_door", train_tasks=-1)


# ---- the tiny pipeline ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """collect (4 training pairs + 2 held out) -> 3 training steps -> 2 evaluation episodes."""
    root = tmp_path_factory.mktemp("k2d")
    data, ckpt, ev = root / "data", root / "ad", root / "eval"
    collected = collect.main(["--config", str(TINY), "--out", str(data)])
    model = train.main(["--config", str(TINY), "--data", str(data), "--out", str(ckpt)])
    results = evaluate.main(["--checkpoint", str(model), "--episodes", "2", "--device", "cpu", "--source-data", str(data), "--out", str(ev)])
    return data, collected, Path(model), results


def test_collect_covers_the_training_subset_and_the_held_out_pairs_with_position_only_states(tiny_run):
    data, collected, _, _ = tiny_run
    spec = get_spec({"name": "key_to_door", "size": 3, "horizon": 6, "n_holdout": 2, "train_tasks": 4})
    train_tasks, held = spec.split()
    assert _keys(r["task"] for r in collected) == _keys(train_tasks + held) and len(collected) == 6
    meta = json.loads((data / "collect_config.json").read_text())
    assert meta["collect"]["observe_key"] is True and meta["env"]["train_tasks"] == 4
    with np.load(next(data.glob("task_*.npz"))) as d:
        states, nxt, actions = d["states"], d["next_states"], d["actions"]
    assert states.shape[-1] == nxt.shape[-1] == 2  # the learner's key flag is not stored
    inner = np.ones(states.shape[1], dtype=bool)
    inner[spec.horizon - 1 :: spec.horizon] = False  # the last step of an episode is followed by a reset
    moved = np.clip(states + MOVES[actions], 0, spec.size - 1)
    assert (moved == nxt).all() and (nxt[:, inner] == states[:, 1:][:, inner[:-1]]).all()


def test_a_folder_collected_with_another_observe_key_is_refused(tiny_run, tmp_path):
    data = tiny_run[0]
    with pytest.raises(UserError, match="observe_key"):
        collect.main(["--config", str(TINY), "--out", str(data), "--no-observe-key"])
    with pytest.raises(UserError, match="needs env key_to_door"):
        collect.main(["--config", str(ROOT / "config" / "tiny.yaml"), "--out", str(tmp_path / "d"), "--observe-key"])
    assert not (tmp_path / "d").exists()


def test_evaluate_reports_the_key_and_door_parts_beside_the_source(tiny_run):
    _, _, model, results = tiny_run
    assert model.is_file()
    returns = np.array([pt["returns_per_seed"] for pt in results["per_task"]])  # (tasks, seeds, episodes)
    key, door = np.array(results["key_return_per_episode"]), np.array(results["door_return_per_episode"])
    np.testing.assert_allclose(key + door, results["return_per_episode"])
    np.testing.assert_allclose(key, np.minimum(returns, 1).mean((0, 1)))
    assert ((door <= key) & (key <= 1)).all()
    src_key, src_door = np.array(results["source_key_return_per_episode"]), np.array(results["source_door_return_per_episode"])
    assert len(src_key) == len(src_door) == 4 and (src_door <= src_key).all()
    assert src_key.max() > 0  # the source finds the key on the 3 x 3 grid


def test_key_door_parts_split_each_episode():
    spec = EnvSpec(name="key_to_door")
    parts = evaluate.key_door_parts(spec, np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 2.0]]))
    assert parts == {"key_return_per_episode": [0.5, 1.0, 1.0], "door_return_per_episode": [0.5, 0.0, 1.0]}
    assert evaluate.key_door_parts(EnvSpec(name="darkroom"), np.ones((2, 3))) == {}


# ---- augmentation and exploration histories ------------------------------------------------------
def test_dihedral_windows_reach_pairs_outside_the_subset_but_never_a_held_out_pair(tiny_run):
    data = tiny_run[0]
    spec = get_spec({"name": "key_to_door", "size": 3, "horizon": 6, "n_holdout": 2, "train_tasks": 4})
    train_tasks, held = spec.split()
    hist = HistoryData.from_dir(data, spec, train_tasks, 12, (1,), augment="dihedral")
    allowed = hist.symmetries[2]  # (streams, 8)
    assert allowed[:, 0].all() and allowed.sum(1).min() >= 6  # 2 held-out pairs can block at most 2 of 8 images
    from model.data import _map_task, grid_symmetries

    cell_maps = grid_symmetries(spec.size, MOVES)[2]
    per_task = {json.dumps(t): [json.dumps(_map_task(t, f)) for f in cell_maps] for t in train_tasks}
    images = {img for imgs in per_task.values() for img in imgs}
    assert images - _keys(train_tasks)  # windows of pairs that were never collected
    n_streams = len(hist.states) // len(train_tasks)  # files are read in task order
    for i, t in enumerate(train_tasks):
        assert allowed[i * n_streams].tolist() == [img not in _keys(held) for img in per_task[json.dumps(t)]]


def test_an_empty_darkroom_of_the_same_grid_serves_as_exploration_histories(tiny_run, tmp_path):
    data = tiny_run[0]
    spec = get_spec({"name": "key_to_door", "size": 3, "horizon": 6, "n_holdout": 2, "train_tasks": 4})
    room = tmp_path / "room.yaml"
    room.write_text(f"include: {ROOT / 'config' / 'tiny.yaml'}\nenv:\n  horizon: 6\n")
    explore = tmp_path / "explore"
    collect.main(["--config", str(room), "--out", str(explore), "--tasks", "none", "--goal-free-learners", "2", "--novelty-bonus", "0.3"])
    alone = HistoryData.from_dir(data, spec, spec.split()[0], 12)
    both = HistoryData.from_dir([data, explore], spec, spec.split()[0], 12)
    assert len(both.states) == len(alone.states) + 2 * 4 and both.rewards[len(alone.states) :].sum() == 0
    goal_room = tmp_path / "goals"
    collect.main(["--config", str(room), "--out", str(goal_room), "--first-tasks", "1"])
    with pytest.raises(UserError, match="collected for env name 'darkroom'"):
        HistoryData.from_dir([data, goal_room], spec, spec.split()[0], 12)
    other = tmp_path / "other.yaml"  # an empty room of another horizon: refused file by file
    other.write_text(f"include: {ROOT / 'config' / 'tiny.yaml'}\nenv:\n  horizon: 5\n")
    collect.main(["--config", str(other), "--out", str(tmp_path / "h5"), "--tasks", "none", "--goal-free-learners", "1"])
    with pytest.raises(UserError, match="horizon"):
        HistoryData.from_dir([data, tmp_path / "h5"], spec, spec.split()[0], 12)
