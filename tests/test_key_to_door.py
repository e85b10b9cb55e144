"""Dark Key-to-Door: dynamics and optimal return, the source learner's key flag, the seeded subset of
training pairs, symmetry augmentation onto pairs that are not held out, exploration histories from
an empty room, and the tiny pipeline (collect -> train -> evaluate) with its key and door parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_capture

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


# ---- the analysis: key and door events -----------------------------------------------------------
def test_key_door_events_count_each_episodes_rewards_in_order():
    from adlens.metrics import key_door_events

    episode = np.repeat(np.arange(4), 5)  # 4 episodes of 5 steps: 0-4, 5-9, 10-14, 15-19
    reward = np.zeros(20)
    reward[[2, 5, 8, 15, 18, 19]] = 1
    # the project's tokens carry r_{t-1}: token 5 holds the reward of step 4, episode 0's door, and
    # token 15 that of step 14, episode 2's key; episode 3 then finds key and door (18, 19)
    assert key_door_events(reward, episode)[[2, 5, 8, 15, 18, 19]].tolist() == [1, 2, 1, 1, 1, 2]
    assert (key_door_events(reward, episode) > 0).sum() == 6
    # transition tokens (r_t) count in their own episode
    reward[19] = 0
    assert key_door_events(reward, episode, "r_t")[[2, 5, 8, 15, 18]].tolist() == [1, 1, 2, 1, 2]


def _door_looking_capture(S: int = 60, horizon: int = 10, T: int = 40) -> dict:
    """A synthetic Key-to-Door capture whose newest token attends only to the latest door event in its
    context (uniformly when there is none). Episode 1 finds key and door, episode 3 the key only."""
    cap = build_capture(S=S, T=T, horizon=horizon, L=1, H=1)
    cap["meta"] = dict(cap["meta"], env={"name": "key_to_door", "size": 3, "horizon": horizon}, task={"key": [0, 0], "door": [2, 2]})
    reward = np.zeros(S)
    reward[[13, 17, 34]] = 1  # episode 1: key then door; episode 3: the key only
    cap["reward"] = torch.tensor(reward, dtype=torch.float32)
    steps, n = cap["ctx_step"].numpy(), cap["context_len"].numpy()
    attn = np.zeros((S, 1, 1, T))
    for s in range(S):
        doors = [p for p in range(n[s]) if steps[s, p] == 17]
        if doors:
            attn[s, 0, 0, doors[-1]] = 1.0
        else:
            attn[s, 0, 0, : n[s]] = 1.0 / n[s]
    cap["query_attn"] = torch.tensor(attn, dtype=torch.float16)
    return cap


def test_summary_splits_the_attention_between_key_and_door_and_finds_the_door_episode():
    from adlens.metrics import summarize

    s = summarize(_door_looking_capture())
    assert s["door_attention_share"] == pytest.approx(1.0, abs=1e-3)  # every step with the door in context looks at it
    assert s["key_attention_share"] < 0.01 < s["key_context_share"]  # the keys draw only the uniform rows before the door
    assert s["door_context_share"] == pytest.approx(np.mean([1 / min(k + 1, 40) for k in range(17, 57)]), rel=1e-3)
    # the door (step 17, episode 1) draws all the attention from 0, 1, ... episodes later: the share of
    # steps with the door in context (steps 17-56) that are e episodes after it, among those whose
    # context reaches e episodes back (e = 3: steps 30-56; e = 4: steps 41-56)
    assert s["door_episode_share"] == pytest.approx([3 / 40, 10 / 40, 10 / 37, 10 / 27, 7 / 16], abs=1e-3)
    darkroom = _door_looking_capture()
    darkroom["meta"] = dict(darkroom["meta"], env={"name": "darkroom", "size": 3, "horizon": 10})
    assert "door_attention_share" not in summarize(darkroom)  # other families are not split


def test_analyze_writes_the_key_door_split_to_the_metrics_and_the_report(tmp_path):
    import analyze_attention

    result = analyze_attention.analyze(_door_looking_capture(), tmp_path / "out", {"num_samples": 1, "dpi": 30})
    doc = json.loads(result["paths"]["metrics"].read_text())["metrics"]
    assert doc["door_attention_share"] == pytest.approx(1.0, abs=1e-3) and len(doc["door_episode_share"]) >= 4
    text = result["paths"]["recommendations"].read_text()
    assert "door events" in text and "attention on door events per episode" in text


def test_the_results_harness_reads_the_key_and_door_parts(tmp_path):
    from benchmarks import regenerate as R

    returns = np.array([[0.0, 1.0, 2.0] + [2.0] * 47, [1.0, 1.0, 1.0] + [2.0] * 47])  # (seeds, episodes) of one pair
    parts = evaluate.key_door_parts(EnvSpec(name="key_to_door"), returns)
    src = evaluate.key_door_parts(EnvSpec(name="key_to_door"), np.ones((4, 20)), prefix="source_")
    doc = {"episodes": 50, "seeds": [100, 101], "return_per_episode": returns.mean(0).tolist(),
           "normalized_return_per_episode": (returns.mean(0) / 2).tolist(), "source_normalized_return_per_episode": [0.5] * 20,
           "per_task": [{"task": {"key": [0, 0], "door": [1, 1]}, "optimal_return": 2.0, "returns": returns.mean(0).tolist(),
                         "returns_per_seed": returns.tolist()}], **parts, **src}  # fmt: skip
    n = R.key_to_door_numbers(doc)
    assert n["first_episode"] == 0.25 and n["last_10"] == pytest.approx(np.mean(returns[:, -10:]) / 2)
    assert n["parts"]["key_first_episode"] == 0.5 and n["parts"]["door_first_episode"] == 0.0
    assert n["parts"]["door_last_10"] == pytest.approx(np.mean(np.maximum(returns[:, -10:] - 1, 0)))
    assert n["parts"]["source_key_last_10"] == 1.0 and n["parts"]["source_door_last_10"] == 0.0
    assert n["source"] == {"first_episode": 0.5, "last_10": 0.5, "episodes": 20}
    table = R.table_key_to_door({"key_to_door_evaluation": {"numbers": n}})
    assert "| 0.50 / 1.00 |" in table and "source PPO, its own 20 episodes" in table
