"""End-to-end tests of the scripts: collect -> train -> evaluate on a 3x3 Darkroom (config/tiny.yaml),
checkpoints, the YAML config loader, bad input (exit code 2) and a 2-process torchrun training step.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_pipeline.py

The scripts' `main([...])` run in-process into `tmp_path`; bad-input runs and torchrun run as
subprocesses, because exit codes and stderr are what they are about.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import collect
import evaluate
import train
from adlens.config import load_yaml, section
from adlens.errors import UserError
from env import MOVES, get_spec
from env.tasks import ENV_KEYS
from model.ad import ADConfig, ADTransformer
from model.checkpoint import load_model, read_checkpoint
from model.data import HistoryData
from conftest import refused

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
TINY = CONFIG_DIR / "tiny.yaml"
TINY_ENV = {"name": "darkroom", "size": 3, "horizon": 6, "n_holdout": 2, "split_seed": 0}
N_STREAMS, N_EPISODES = 4, 4
EVAL_KEYS = {
    "tasks", "episodes", "seed", "seeds", "greedy", "engine", "return_per_episode", "normalized_return_per_episode",
    "per_task", "env_steps_per_second", "time_s", "mean_context_length", "checkpoint",
}  # fmt: skip


def _subprocess_env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1"}


def _evaluate(argv: list[str]) -> tuple[dict, bool]:
    """evaluate.main in-process; returns (results, whether it left autograd globally disabled)."""
    with torch.enable_grad():  # restores the grad mode on exit whatever main does to it
        results = evaluate.main(argv)
        leaked = not torch.is_grad_enabled()
    return results, leaked


# ---- module-scoped tiny run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec():
    return get_spec(TINY_ENV)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    results = collect.main(["--config", str(TINY), "--out", str(out), "--n-streams", str(N_STREAMS),
                            "--timesteps", str(N_STREAMS * N_EPISODES * 6), "--workers", "1"])  # fmt: skip
    return out, results


@pytest.fixture(scope="module")
def trained(collected, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    path = train.main(["--config", str(TINY), "--data", str(collected[0]), "--out", str(out), "--steps", "3"])
    return Path(path)


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    results, leaked = _evaluate(["--checkpoint", str(trained), "--episodes", "2", "--greedy", "--device", "cpu", "--out", str(out)])
    return out, results, leaked


# ---- collect -------------------------------------------------------------------------------------
def test_collect_writes_one_consistent_history_per_task(collected, spec):
    out, results = collected
    tasks = spec.tasks()
    assert sorted(p.name for p in out.glob("task_*.npz")) == [f"task_{i:04d}.npz" for i in range(9)]
    assert not list(out.glob("*.tmp"))
    assert sorted(r["task_idx"] for r in results) == list(range(9))
    meta = json.loads((out / "collect_config.json").read_text())
    assert meta["env"] == TINY_ENV and meta["collect"]["n_streams"] == N_STREAMS
    H, N = spec.horizon, N_EPISODES * spec.horizon
    for i, task in enumerate(tasks):
        with np.load(out / f"task_{i:04d}.npz") as d:
            assert json.loads(str(d["task"])) == task and int(d["horizon"]) == H
            s, a, r, s2, done = (d[k] for k in ("states", "actions", "rewards", "next_states", "dones"))
        assert s.shape == s2.shape == (N_STREAMS, N, 2)
        assert a.shape == r.shape == done.shape == (N_STREAMS, N)
        assert r.dtype == np.float32 and done.dtype == bool
        assert ((a >= 0) & (a < 5)).all()
        # every transition obeys the environment: a move clipped to the grid, reward 1 on the goal
        moved = np.clip(s.astype(np.int64) + MOVES[a.astype(np.int64)], 0, spec.size - 1)
        np.testing.assert_array_equal(s2, moved)
        np.testing.assert_array_equal(r, (s2 == np.array(task["goal"])).all(-1).astype(np.float32))
        # episodes are whole: a done every `horizon` steps, the next one starts in the centre
        np.testing.assert_array_equal(done, np.tile(np.arange(N) % H == H - 1, (N_STREAMS, 1)))
        assert (s[:, ::H] == spec.size // 2).all()
        np.testing.assert_array_equal(s[:, 1:][~done[:, :-1]], s2[:, :-1][~done[:, :-1]])


def test_collect_resumes_with_the_missing_tasks(collected, tmp_path, capsys):
    out = tmp_path / "data"
    shutil.copytree(collected[0], out)
    (out / "task_0003.npz").unlink()
    before = (out / "task_0005.npz").stat().st_mtime_ns
    results = collect.main(["--config", str(TINY), "--out", str(out)])
    assert [r["task_idx"] for r in results] == [3]
    assert (out / "task_0003.npz").is_file() and (out / "task_0005.npz").stat().st_mtime_ns == before
    assert collect.main(["--config", str(TINY), "--out", str(out)]) == []
    assert "9 of 9 tasks already collected" in capsys.readouterr().out


def test_collect_rejects_bad_numbers(tmp_path):
    with pytest.raises(UserError, match="timesteps"):
        collect.main(["--config", str(TINY), "--out", str(tmp_path / "d"), "--timesteps", "10"])
    with pytest.raises(UserError, match="n-streams"):
        collect.main(["--config", str(TINY), "--out", str(tmp_path / "d"), "--n-streams", "0"])
    with pytest.raises(UserError, match="tasks"):
        collect.main(["--config", str(TINY), "--out", str(tmp_path / "d"), "--tasks", "some"])
    with pytest.raises(UserError, match="novelty-bonus"):
        collect.main(["--config", str(TINY), "--out", str(tmp_path / "d"), "--novelty-bonus", "-1"])
    with pytest.raises(UserError, match="needs env darkroom"):
        collect.main(["--config", str(TINY), "--env", "key_to_door", "--out", str(tmp_path / "d"), "--tasks", "none"])
    assert not (tmp_path / "d").exists()


def test_novelty_bonus_pays_new_cells_and_keeps_the_env_reward(spec):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from env import make_env

    vec = collect._novelty_bonus_wrapper()(DummyVecEnv([make_env(spec, goal=[0, 1]) for _ in range(2)]), 0.5, spec)
    vec.reset()
    vec.step_async(np.array([0, 0]))  # both streams move up from the centre (1, 1) onto the goal
    obs, rewards, _, infos = vec.step_wait()
    assert (obs == [0, 1]).all() and [i["env_reward"] for i in infos] == [1.0, 1.0]
    np.testing.assert_allclose(rewards, 1 + 0.5 / np.sqrt(2))  # the cell has now been entered twice
    vec.step_async(np.array([4, 1]))  # one stays on the goal, one goes back to the centre
    _, rewards, _, infos = vec.step_wait()
    assert [i["env_reward"] for i in infos] == [1.0, 0.0]
    np.testing.assert_allclose(rewards, [1 + 0.5 / np.sqrt(3), 0.5])


def test_goal_free_histories_join_the_training_windows_only(collected, spec, tmp_path):
    out = tmp_path / "free"
    steps = ["--n-streams", str(N_STREAMS), "--timesteps", str(N_STREAMS * N_EPISODES * 6), "--workers", "1"]
    collect.main(["--config", str(TINY), "--out", str(out), "--tasks", "none", "--goal-free-learners", "2", "--novelty-bonus", "0.5"] + steps)
    assert sorted(p.name for p in out.glob("task_*.npz")) == ["task_0000.npz", "task_0001.npz"]
    for f in out.glob("task_*.npz"):
        with np.load(f) as d:
            assert json.loads(str(d["task"])) is None and d["states"].shape == (N_STREAMS, N_EPISODES * 6, 2)
            assert not d["rewards"].any()  # the stored rewards are the room's: there is no goal to reward
    train_tasks, held_tasks = spec.split()
    alone = HistoryData.from_dir(collected[0], spec, train_tasks, 12, (1,), augment="dihedral")
    both = HistoryData.from_dir([collected[0], out], spec, train_tasks, 12, (1,), augment="dihedral")
    assert both.n_streams == alone.n_streams + 2 * N_STREAMS
    np.testing.assert_array_equal(both.states[: alone.n_streams], alone.states)
    assert both.symmetries[2][alone.n_streams :].all()  # no goal to keep off the held-out cells
    val = HistoryData.from_dir([collected[0], out], spec, held_tasks, 12, (1,), goal_free=False)
    assert val.n_streams == len(held_tasks) * N_STREAMS
    with pytest.raises(UserError, match="goal-free"):
        HistoryData.from_dir(out, spec, held_tasks, 12, goal_free=False)


# ---- train and checkpoints -----------------------------------------------------------------------
def test_train_writes_every_artifact(trained, collected, spec):
    out = trained.parent
    assert trained == out / "model.pt"
    assert {p.name for p in out.iterdir()} >= {"model.pt", "train_state.pt", "metrics.jsonl", "train_config.json"}
    assert not list(out.glob("*.tmp"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 for r in rows)
    assert "val_loss" not in rows[0] and all("val_loss" in r and "val_acc" in r for r in rows[1:])  # eval_every 2 + last
    meta = json.loads((out / "train_config.json").read_text())
    assert meta["env"] == TINY_ENV
    assert meta["model"]["max_context"] == 12 and meta["model"]["n_states"] == 9
    assert meta["train"]["world_size"] == 1 and meta["train"]["episode_strides"] == [1, 2]
    state = read_checkpoint(out / "train_state.pt")
    assert state["step"] == 3 and {"optimizer", "scheduler"} <= set(state)


def test_load_model_restores_the_trained_network(trained, spec):
    model, meta = load_model(trained)
    ckpt = torch.load(trained, weights_only=True)
    assert isinstance(model, ADTransformer) and not model.training
    assert ckpt["step"] == 3 and meta == ckpt["config"]
    assert meta["env"] == TINY_ENV and get_spec(meta["env"]) == spec
    cfg = model.cfg
    assert (cfg.n_states, cfg.n_actions, cfg.horizon, cfg.max_context) == (9, 5, 6, 12)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout) == (2, 2, 16, 0.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_load_model_uses_weights_only(trained, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(trained)
    assert calls == [True]


def test_bad_checkpoints_raise_user_errors(trained, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(UserError, match="cannot read"):
        load_model(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained.read_bytes()[:2000])
    with pytest.raises(UserError, match="cannot read"):
        load_model(truncated)
    # an object that is not plain data: weights_only refuses to unpickle it
    ckpt = torch.load(trained, weights_only=True)
    code = tmp_path / "object.pt"
    torch.save({"model": ckpt["model"], "config": argparse.Namespace(**ckpt["config"])}, code)
    with pytest.raises(UserError, match="cannot read"):
        load_model(code)
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({"weights": ckpt["model"]}, wrong_keys)
    with pytest.raises(UserError, match="not an AD checkpoint"):
        load_model(wrong_keys)
    misfit = tmp_path / "misfit.pt"
    torch.save({"model": ckpt["model"], "config": ckpt["config"] | {"model": ckpt["config"]["model"] | {"n_layer": 3}}}, misfit)
    with pytest.raises(UserError, match="does not fit"):
        load_model(misfit)


def test_checkpoints_without_attn_dropout_load_and_new_ones_record_it(trained, collected, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    old = tmp_path / "old.pt"  # written before the key existed
    torch.save(ckpt | {"config": ckpt["config"] | {"model": {k: v for k, v in ckpt["config"]["model"].items() if k != "attn_dropout"}}}, old)
    assert load_model(old)[0].cfg.attn_dropout is None
    bad = tmp_path / "bad.pt"
    torch.save(ckpt | {"config": ckpt["config"] | {"model": ckpt["config"]["model"] | {"attn_dropout": "x"}}}, bad)
    with pytest.raises(UserError, match="attn_dropout"):
        load_model(bad)
    path = train.main(["--config", str(TINY), "--data", str(collected[0]), "--out", str(tmp_path / "fused"), "--steps", "1",
                       "--dropout", "0.1", "--attn-dropout", "0"])  # fmt: skip
    model, cfg = load_model(path)
    assert cfg["model"]["attn_dropout"] == 0.0 and cfg["model"]["dropout"] == 0.1
    assert model.blocks[0].attn.dropout == 0.0


def test_train_resumes_from_its_state(trained, collected, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(trained.parent, out)
    train.main(["--config", str(TINY), "--data", str(collected[0]), "--out", str(out), "--steps", "4", "--resume"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 4


def test_train_starts_from_another_models_weights(trained, collected, tmp_path, capsys):
    """--init: the weights of a checkpoint at another context start the run (a learning rate of ~0 keeps
    them); another network or another task split is refused before anything is written."""
    base = ["--config", str(TINY), "--data", str(collected[0]), "--steps", "1", "--lr", "1e-9", "--context", "18", "--episode-strides", "1"]
    path = train.main(base + ["--out", str(tmp_path / "init"), "--init", str(trained)])
    start, _ = load_model(trained)
    tuned, cfg = load_model(path)
    assert cfg["model"]["max_context"] == 18 and cfg["train"]["init"] == str(trained)
    for (name, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    fresh, _ = load_model(train.main(base + ["--out", str(tmp_path / "fresh")]))
    assert not torch.allclose(start.head.weight, fresh.head.weight, atol=1e-3)
    capsys.readouterr()
    line = refused(capsys, train.main, base + ["--init", str(trained), "--d-model", "8"], tmp_path / "wide")
    assert "another network: d_model 16 (now 8)" in line
    other = tmp_path / "other.yaml"
    other.write_text(f"include: {TINY}\nenv:\n  split_seed: 1\n")
    line = refused(capsys, train.main, ["--config", str(other), *base[2:], "--init", str(trained)], tmp_path / "split")
    assert "another environment or task split: split_seed 0 (now 1)" in line


def test_train_rejects_a_context_the_histories_cannot_fill(collected, tmp_path):
    with pytest.raises(UserError, match="too short"):
        train.main(["--config", str(TINY), "--data", str(collected[0]), "--out", str(tmp_path / "c"), "--context", "25"])
    with pytest.raises(UserError, match="missing learning history"):
        train.main(["--config", str(TINY), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_histories_of_another_horizon_are_rejected(collected):
    spec20 = get_spec(TINY_ENV | {"horizon": 20})
    with pytest.raises(UserError, match="horizon"):
        HistoryData.from_dir(collected[0], spec20, spec20.tasks(), 12)


def test_a_damaged_history_is_a_user_error(collected, spec, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(collected[0], out)
    f = out / "task_0000.npz"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(UserError, match="corrupt"):
        HistoryData.from_dir(out, spec, spec.tasks(), 12)


def test_windows_of_drawn_lengths_are_stream_prefixes_padded_and_masked(collected, spec):
    """min_context: each window's length is drawn from [min_context, context]; its steps are consecutive
    steps of a stream (a stride drawn among those that fit), the padding carries no loss, and a causal
    model's logits on the window are those of the window alone. Without it, windows are as before."""
    train_tasks = spec.split()[0]
    full = HistoryData.from_dir(collected[0], spec, train_tasks, 24, (1,))  # 4 episodes of 6: one window per stream
    mixed = HistoryData.from_dir(collected[0], spec, train_tasks, 24, (1, 2, 4), min_context=6)
    same = HistoryData.from_dir(collected[0], spec, train_tasks, 24, (1,), min_context=24)
    a, b = full.sample(np.random.default_rng(3), 16), same.sample(np.random.default_rng(3), 16)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    tok, target = mixed.sample(np.random.default_rng(0), 256)
    length = (target >= 0).sum(1)
    assert length.min() >= 6 and length.max() == 24 and len(set(length.tolist())) > 10
    assert all((target[i, : length[i]] >= 0).all() for i in range(256))  # a prefix, the padding masked
    H = spec.horizon
    for i in range(256):
        n, t = int(length[i]), tok.timesteps[i].numpy()
        assert (np.diff(t[:n]) % H == 1).all()  # consecutive steps of kept episodes
        assert torch.equal(tok.prev_actions[i, 1:n], target[i, : n - 1])  # each token carries the action before it
    rc = lambda s: np.stack(np.divmod(s, spec.size), -1)  # noqa: E731
    inner = (tok.timesteps[:, 1:] > 0).numpy() & (np.arange(23) < length[:, None].numpy() - 1)
    moved = np.clip(rc(tok.states[:, :-1].numpy()) + MOVES[target[:, :-1].clamp(min=0).numpy()], 0, spec.size - 1)
    assert (moved == rc(tok.states[:, 1:].numpy()))[inner].all()  # the actions move between the states
    model = ADTransformer(ADConfig(n_states=spec.n_states, n_actions=spec.n_actions, horizon=H, max_context=24, dropout=0.0)).eval()
    with torch.no_grad():
        logits = model(tok)
        i = int(length.argmin())
        alone = model(type(tok)(*(f[i : i + 1, : length[i]] for f in tok)))
    assert torch.allclose(logits[i : i + 1, : length[i]], alone, atol=1e-5)
    with pytest.raises(UserError, match="min_context must be in"):
        HistoryData.from_dir(collected[0], spec, train_tasks, 24, (1,), min_context=25)
    with pytest.raises(UserError, match="windows of 12 to 24 transitions"):
        HistoryData.from_dir(collected[0], spec, train_tasks, 24, (1, 4), min_context=12)


def test_train_draws_window_lengths_with_min_context(collected, tmp_path):
    """Strides that only fit short windows are allowed with min_context, refused without it."""
    argv = ["--config", str(TINY), "--data", str(collected[0]), "--steps", "2", "--context", "24", "--episode-strides", "1", "2", "4"]
    with pytest.raises(UserError, match="too short for context 24"):
        train.main(argv + ["--out", str(tmp_path / "full")])
    _, cfg = load_model(train.main(argv + ["--min-context", "6", "--out", str(tmp_path / "mixed")]))
    assert cfg["train"]["min_context"] == 6 and cfg["model"]["max_context"] == 24


def test_dihedral_windows_are_histories_of_training_tasks_only(collected, spec):
    train_tasks, held_tasks = spec.split()
    data = HistoryData.from_dir(collected[0], spec, train_tasks, 12, (1,), augment="dihedral")
    assert data.symmetries[2][:, 0].all() and data.symmetries[2][:, 1:].any()
    tok, target = data.sample(np.random.default_rng(0), 512)
    rc = lambda s: np.stack(np.divmod(s, spec.size), -1)  # noqa: E731
    states, prev_r, t = tok.states.numpy(), tok.prev_rewards.numpy(), tok.timesteps.numpy()
    inner = t[:, 1:] > 0  # transitions inside an episode
    moved = np.clip(rc(states[:, :-1]) + MOVES[target[:, :-1].numpy()], 0, spec.size - 1)
    assert (moved == rc(states[:, 1:]))[inner].all()  # the mapped actions move between the mapped states
    goals = {tuple(task["goal"]) for task in train_tasks}
    rewarded = [{tuple(x) for x in rc(states[b, 1:][(prev_r[b, 1:] > 0) & inner[b]])} for b in range(len(states))]
    assert all(len(cells) <= 1 and cells <= goals for cells in rewarded)  # one goal per window, a training one
    assert len(set().union(*rewarded)) > 1
    assert not any(tuple(task["goal"]) in set().union(*rewarded) for task in held_tasks)
    with pytest.raises(UserError, match="augment"):
        HistoryData.from_dir(collected[0], spec, train_tasks, 12, (1,), augment="mirror")


# ---- evaluate ------------------------------------------------------------------------------------
def test_first_reward_after_learner_counts_streams_taught_by_their_siblings():
    # 4 streams, episodes of 2 steps: A rewarded in episode 0, B in 1 (after 1 of 4 streams), C in 2 (after 2 of 4), D never
    r = np.zeros((4, 6), dtype=np.float32)
    r[0, 1] = r[0, 3] = r[1, 2] = r[1, 5] = r[2, 4] = 1.0
    assert evaluate.first_reward_after_learner(r, 2) == (2, 3)
    assert evaluate.first_reward_after_learner(r, 2, share=0.3) == (1, 3)  # 1/4 is not above 0.3
    assert evaluate.first_reward_after_learner(np.zeros((3, 6)), 2) == (0, 0)


def _two_learner_histories(spec, path: Path) -> dict:
    """One task, two learners of 2 streams, 4 episodes: stream s is first rewarded in episode s (at each
    episode's first step from then on), and the state at every step is the cell (episode, stream)."""
    task = spec.tasks()[0]
    rewards = np.zeros((4, 4 * spec.horizon), dtype=np.float32)
    for stream, episode in enumerate([0, 1, 2, 3]):
        rewards[stream, episode * spec.horizon :] = np.tile(np.eye(spec.horizon, dtype=np.float32)[0], 4 - episode)
    episode, stream = np.meshgrid(np.arange(rewards.shape[1]) // spec.horizon, np.arange(4))
    states = np.stack([episode, stream], -1).astype(np.int8)
    np.savez(path / "task_0000.npz", task=json.dumps(task), horizon=spec.horizon, states=states, actions=np.zeros(rewards.shape, np.int8), rewards=rewards)
    return task


def test_source_stats_split_the_streams_by_learner(tmp_path):
    # within each learner the second stream follows a sibling that was rewarded before it (1 of 2 streams, above 0.2)
    spec = get_spec({**TINY_ENV, "size": 5})  # room for a cell per (episode, stream), the goal within reach
    task = _two_learner_histories(spec, tmp_path)
    _, pooled = evaluate.source_stats(tmp_path, spec, [task])
    (tmp_path / "collect_config.json").write_text(json.dumps({"collect": {"n_streams": 2}}))
    curve, by_learner = evaluate.source_stats(tmp_path, spec, [task])
    assert by_learner == 0.5  # streams 1 and 3
    assert pooled == 0.75  # as one learner, stream 2 would count too (2 of 4 streams rewarded before it)
    np.testing.assert_allclose(curve, np.array([1, 2, 3, 4]) / 4 / spec.optimal_return(task))


def test_sibling_taught_steps_are_masked_until_the_window_shows_a_reward(tmp_path):
    spec = get_spec({**TINY_ENV, "size": 9})  # room for a cell per (episode, stream)
    task = _two_learner_histories(spec, tmp_path)
    (tmp_path / "collect_config.json").write_text(json.dumps({"collect": {"n_streams": 2}}))
    # the learner of streams 0-1 has found the goal from episode 1 on, that of streams 2-3 from episode 3 on
    taught = np.array([[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=bool)
    masked = HistoryData.from_dir(tmp_path, spec, [task], 2 * spec.horizon, (1,), loss_mask="sibling_taught")
    plain = HistoryData.from_dir(tmp_path, spec, [task], 2 * spec.horizon, (1,))
    tok, target = masked.sample(np.random.default_rng(0), 256)
    tok_plain, target_plain = plain.sample(np.random.default_rng(0), 256)  # the same windows
    assert torch.equal(tok.states, tok_plain.states) and (target_plain >= 0).all()
    cell = tok.states.numpy()  # (episode, stream) as r * size + c
    unseen = np.maximum.accumulate(tok.prev_rewards.numpy(), axis=1) <= 0
    expected = unseen & taught[cell % spec.size, cell // spec.size]
    np.testing.assert_array_equal(target.numpy() == -100, expected)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(target[~expected], target_plain[~expected])
    with pytest.raises(UserError, match="unknown loss_mask"):
        HistoryData.from_dir(tmp_path, spec, [task], 2 * spec.horizon, (1,), loss_mask="all")


def test_evaluate_writes_results_and_curve(evaluated, spec):
    out, results, _ = evaluated
    assert {p.name for p in out.iterdir()} >= {"eval_results.json", "in_context_curve.png"}
    assert not list(out.glob("*.tmp*"))
    assert (out / "in_context_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert EVAL_KEYS <= set(saved) and (saved["schema"], saved["schema_version"]) == ("ad-eval-results", 1)
    held = spec.tasks_for("test")
    assert saved["tasks"] == held and len(held) == 2
    assert saved["episodes"] == 2 and saved["seeds"] == [0] and saved["greedy"] is True and saved["engine"] == "kv"
    assert len(saved["return_per_episode"]) == len(saved["normalized_return_per_episode"]) == 2
    norm = []
    for pt, task in zip(saved["per_task"], held):
        assert {"task", "optimal_return", "returns", "returns_per_seed"} <= set(pt)
        assert pt["task"] == task and pt["optimal_return"] == spec.optimal_return(task)
        assert len(pt["returns"]) == 2 and np.shape(pt["returns_per_seed"]) == (1, 2)
        assert all(0 <= r <= pt["optimal_return"] for r in pt["returns"])
        norm.append(np.array(pt["returns"]) / pt["optimal_return"])
    np.testing.assert_allclose(saved["normalized_return_per_episode"], np.mean(norm, 0))
    assert saved["mean_context_length"] == pytest.approx(6.5)  # 1..12 tokens, never more than max_context
    n_steps = len(held) * saved["episodes"] * spec.horizon  # one seed: every environment step of the run
    assert saved["env_steps_per_second"] == pytest.approx(n_steps / saved["time_s"])


def test_evaluate_engines_agree_within_max_context(evaluated, trained, tmp_path):
    # 2 episodes x 6 steps = 12 tokens = max_context: the kv and rerun engines must act identically
    _, kv, _ = evaluated
    rerun, _ = _evaluate(["--checkpoint", str(trained), "--episodes", "2", "--greedy", "--engine", "rerun",
                          "--num-seeds", "2", "--device", "cpu", "--out", str(tmp_path / "rerun")])  # fmt: skip
    assert rerun["engine"] == "rerun" and rerun["seeds"] == [0, 1]
    for a, b in zip(kv["per_task"], rerun["per_task"]):
        assert b["returns_per_seed"] == [a["returns"], a["returns"]]  # greedy: every seed acts the same


def test_evaluate_main_leaves_autograd_alone(evaluated):
    assert not evaluated[2]


# ---- bad input: exit code 2, one line, no traceback, nothing written -----------------------------
_BAD = {  # case -> (script, argv, what the one line must say); paths under the test's folder
    "missing_checkpoint": ("evaluate", ["--checkpoint", "{tmp}/missing.pt"], "not found"),
    "corrupt_checkpoint": ("evaluate", ["--checkpoint", "{tmp}/garbage.pt"], "cannot read"),
    "zero_episodes": ("evaluate", ["--checkpoint", "{trained}", "--episodes", "0"], "episodes"),
    "unknown_engine": ("evaluate", ["--checkpoint", "{trained}", "--engine", "warp"], "engine"),
    "collect_unknown_env": ("collect", ["--env", "cave"], "unknown environment 'cave'"),
    "train_missing_data": ("train", ["--config", str(TINY), "--data", "{tmp}/none"], "missing"),
    "train_unknown_augment": ("train", ["--config", str(TINY), "--data", "{data}", "--augment", "mirror"], "--augment must be one of dihedral, none"),
    "train_unknown_loss_mask": ("train", ["--config", str(TINY), "--data", "{data}", "--loss-mask", "all"], "--loss-mask must be one of none, sibling_taught"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_input_exits_2_with_one_line(case, trained, collected, tmp_path, capsys):
    """In-process through run_cli, as the command line runs it (tests/test_bad_input.py checks real processes)."""
    script, argv, match = _BAD[case]
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint\n" * 20)
    argv = [a.format(tmp=tmp_path, trained=trained, data=collected[0]) for a in argv]
    main = {"evaluate": evaluate.main, "collect": collect.main, "train": train.main}[script]
    assert match in refused(capsys, main, ["--device", "cpu"] * (script == "evaluate") + argv, tmp_path / "out")


# ---- configs -------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_include_merges_underneath(tmp_path):
    _write(tmp_path / "shared" / "a.yaml", "env: {name: darkroom, size: 9}\ntrain: {steps: 10, lr: 0.5}\nmodel: {n_layer: 3}\n")
    _write(tmp_path / "shared" / "b.yaml", "include: a.yaml\ntrain: {steps: 20, batch_size: 8}\n")
    _write(tmp_path / "extra.yaml", "model: {n_layer: 5, d_model: 32}\n")
    top = _write(tmp_path / "top.yaml", "include: [shared/b.yaml, extra.yaml]\nenv: {size: 5}\ntrain: {lr: 0.25}\n")
    cfg = load_yaml(top)
    assert cfg["env"] == {"name": "darkroom", "size": 5}
    assert cfg["train"] == {"steps": 20, "lr": 0.25, "batch_size": 8}  # sections merge key by key
    assert cfg["model"] == {"n_layer": 5, "d_model": 32}  # later includes win over earlier ones
    assert cfg["_source"] == str(top) and "include" not in cfg


def test_loader_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_yaml(tmp_path / "none.yaml")
    with pytest.raises(UserError, match="not found"):
        load_yaml(_write(tmp_path / "inc.yaml", "include: gone.yaml\n"))
    _write(tmp_path / "c1.yaml", "include: c2.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_yaml(_write(tmp_path / "c2.yaml", "include: c1.yaml\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(_write(tmp_path / "bad.yaml", "train: {steps: [1\n"))
    with pytest.raises(UserError, match="mapping"):
        load_yaml(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(UserError, match="mapping"):
        section(load_yaml(_write(tmp_path / "sec.yaml", "train: 3\n")), "train", train.TRAIN_CONFIG)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", f"include: {TINY}\ntrain: {{stepz: 5}}\n")
    with pytest.raises(UserError, match="stepz") as e:
        train.parse(["--config", str(bad)])
    assert str(bad) in str(e.value)
    env_bad = _write(tmp_path / "env_bad.yaml", "env: {name: darkroom, sise: 3}\n")
    for parse in (train.parse, collect.main):
        with pytest.raises(UserError, match="sise") as e:
            parse(["--config", str(env_bad), "--out", str(tmp_path / "o")])
        assert str(env_bad) in str(e.value)
    model_bad = _write(tmp_path / "model_bad.yaml", "model: {layers: 3}\n")
    with pytest.raises(UserError, match=r"layers.*model_bad\.yaml"):
        train.parse(["--config", str(model_bad)])
    collect_bad = _write(tmp_path / "collect_bad.yaml", "collect: {streams: 3}\n")
    with pytest.raises(UserError, match=r"streams.*collect_bad\.yaml"):
        collect.main(["--config", str(collect_bad)])
    assert not (tmp_path / "o").exists()


def test_flags_override_yaml_which_overrides_defaults():
    cfg = train.parse(["--config", str(TINY), "--steps", "7", "--context", "6"])
    assert (cfg["steps"], cfg["context"]) == (7, 6)  # flags
    assert (cfg["n_layer"], cfg["batch_size"], cfg["episode_strides"]) == (2, 4, [1, 2])  # tiny.yaml
    assert (cfg["lr"], cfg["grad_clip"]) == (0.001, 1.0)  # base.yaml (= the defaults)
    assert (cfg["env"], cfg["size"], cfg["env_extra"]) == ("darkroom", 3, {"horizon": 6, "n_holdout": 2, "split_seed": 0})


def test_base_yaml_equals_the_script_defaults():
    base = load_yaml(CONFIG_DIR / "base.yaml")
    assert set(base) <= {"collect", "model", "train", "_source"}
    for name in ("model", "train"):
        for key, value in base.get(name, {}).items():
            assert value == train.TRAIN_CONFIG[key] and type(value) is type(train.TRAIN_CONFIG[key]), (name, key)
    for key, value in base.get("collect", {}).items():
        assert value == collect.COLLECT_CONFIG[key] and type(value) is type(collect.COLLECT_CONFIG[key]), key
    assert train.parse(["--config", str(CONFIG_DIR / "base.yaml")]) == train.parse([])


def test_help_is_the_comment_beside_each_config_key():
    """A config key is described once, where it is declared: --help shows that comment."""
    import argparse

    from adlens.config import add_config_flags, key_comments

    parser = argparse.ArgumentParser()
    add_config_flags(parser, train.TRAIN_CONFIG)
    text = " ".join(parser.format_help().split())
    assert "--batch-size BATCH_SIZE windows per step (per process under torchrun) (default: 32)" in text
    comments = key_comments(collect.COLLECT_CONFIG)
    assert comments["n_streams"] == "parallel environments per PPO learner" and "seed" not in comments  # no comment, no help
    runtime = {"steps": 3}  # declared nowhere in a source file
    assert key_comments(runtime) == {}
    with_percent = argparse.ArgumentParser()
    add_config_flags(with_percent, {"share": 0.5}, {"share": "80% of it"})  # argparse's %-formatting is escaped
    assert "80% of it (default: 0.5)" in with_percent.format_help()


@pytest.mark.parametrize("name, family", [("darkroom", "darkroom"), ("darkroom_permuted", "darkroom_permuted"),
                                          ("key_to_door", "key_to_door"), ("tiny", "darkroom")])  # fmt: skip
def test_shipped_configs_are_valid(name, family):
    path = CONFIG_DIR / f"{name}.yaml"
    assert "\ninclude: base.yaml\n" in path.read_text()
    cfg = load_yaml(path)
    assert set(cfg) == {"env", "collect", "model", "train", "_source"}
    env_sec = section(cfg, "env", ENV_KEYS)
    spec = get_spec(env_sec)
    assert spec.name == family
    section(cfg, "collect", collect.COLLECT_CONFIG)
    tcfg = train.parse(["--config", str(path)])
    assert tcfg["env"] == family and get_spec({"name": tcfg["env"], "size": tcfg["size"], **tcfg["env_extra"]}) == spec
    # the histories the collect section asks for can fill the training context at every stride
    ccfg = collect.COLLECT_CONFIG | cfg["collect"]
    episodes = ccfg["timesteps"] // ccfg["n_streams"] // spec.horizon
    for k in tcfg["episode_strides"]:
        assert ((episodes - k) // k + 1) * spec.horizon >= tcfg["context"], (name, k)
    assert ccfg["out"] in tcfg["data"]


# ---- distributed training ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(collected, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "train.py", "--config", str(TINY), "--data", str(collected[0]), "--out", str(out), "--steps", "2",
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.pt").is_file()
    _, meta = load_model(out / "model.pt")
    assert meta["train"]["world_size"] == 2 and torch.load(out / "model.pt", weights_only=True)["step"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone logs
