"""Attention across training: snapshots written by train.py (schedule, format, resume) and the
progression command over a folder of them, on a 3x3 Darkroom (config/tiny.yaml).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_progression.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import collect
import evaluate
import train
import training_progression
from adlens.capture_file import task_view
from adlens.errors import UserError
from adlens.metrics import summarize
from adlens.progression import ATTENTION_KEYS, attention_point, capture_numbers, emergence_step, return_point
from env import get_spec
from model.checkpoint import load_model
from model.data import HistoryData
from conftest import refused
from model.record import record_rollout
from model.snapshots import check_same_model, read_snapshots, snapshot_schedule

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    collect.main(["--config", str(TINY), "--out", str(out), "--n-streams", "4", "--timesteps", "96", "--workers", "1"])
    return out


def _train(data: Path, out: Path, *extra: str) -> Path:
    return train.main(["--config", str(TINY), "--data", str(data), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def snapshot_run(tiny_data, tmp_path_factory):
    """A tiny training run of 6 steps with snapshots at steps 1, 3 and 6."""
    out = tmp_path_factory.mktemp("run")
    _train(tiny_data, out, "--steps", "6", "--snapshot-steps", "1", "3", "--save-every", "6")
    return out


# ---- schedule ------------------------------------------------------------------------------------
def test_schedule_is_the_union_of_every_list_and_geometric():
    assert snapshot_schedule(10) == []
    assert snapshot_schedule(10, every=4) == [4, 8, 10]  # the last step always joins
    assert snapshot_schedule(10, at=[3, 3, 20]) == [3, 10]  # beyond the run: dropped
    geo = snapshot_schedule(3000, geometric=12, first=25)
    assert geo[0] == 25 and geo[-1] == 3000 and len(geo) == 12
    ratios = [b / a for a, b in zip(geo, geo[1:])]
    assert max(ratios) / min(ratios) < 1.05  # evenly spaced on a log scale
    assert snapshot_schedule(3000, every=1000, at=[7], geometric=3, first=30) == [7, 30, 300, 1000, 2000, 3000]
    assert snapshot_schedule(5, geometric=10, first=1) == [1, 2, 3, 4, 5]  # duplicates after rounding count once


@pytest.mark.parametrize("kw", [{"every": -1}, {"geometric": -2}, {"first": 0}, {"at": [0]}])
def test_schedule_rejects_bad_values(kw):
    with pytest.raises(UserError):
        snapshot_schedule(10, **kw)


# ---- snapshots written by train.py ---------------------------------------------------------------
def test_train_writes_loadable_snapshots_at_the_scheduled_steps(snapshot_run):
    snaps = read_snapshots(snapshot_run / "snapshots")
    assert [s for s, _ in snaps] == [1, 3, 6]
    assert not list((snapshot_run / "snapshots").glob("*.tmp"))
    final = torch.load(snapshot_run / "model.pt", weights_only=True)
    for step, path in snaps:
        ckpt = torch.load(path, weights_only=True)
        assert set(ckpt) == {"model", "config", "step"} and ckpt["step"] == step
        assert ckpt["config"] == final["config"]
        model, _ = load_model(path)
        assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in final["model"].values())
    last = torch.load(snaps[-1][1], weights_only=True)["model"]
    first = torch.load(snaps[0][1], weights_only=True)["model"]
    assert all(torch.equal(last[k], final["model"][k]) for k in final["model"])  # step 6 = the final model
    assert not all(torch.equal(first[k], last[k]) for k in last)  # the weights moved between snapshots
    assert check_same_model(snaps)["model"] == final["config"]["model"]


def test_resumed_run_keeps_earlier_snapshots_and_continues_the_schedule(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = ["--steps", "6", "--snapshot-every", "2", "--save-every", "3"]
    real_sample = HistoryData.sample
    n_calls = []

    def crash_at_step_5(self, rng, n):  # call 1 draws tiny.yaml's one validation batch, then one per step
        n_calls.append(1)
        if len(n_calls) == 1 + 5:
            raise RuntimeError("simulated crash")
        return real_sample(self, rng, n)

    monkeypatch.setattr(HistoryData, "sample", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tiny_data, out, *flags)
    monkeypatch.setattr(HistoryData, "sample", real_sample)
    snaps = read_snapshots(out / "snapshots")
    assert [s for s, _ in snaps] == [2, 4]  # steps 1-4 done; train_state saved at step 3
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3
    before = {s: (p.read_bytes(), p.stat().st_mtime_ns) for s, p in snaps}

    _train(tiny_data, out, *flags, "--resume")
    snaps = read_snapshots(out / "snapshots")
    assert [s for s, _ in snaps] == [2, 4, 6]
    assert (snaps[0][1].read_bytes(), snaps[0][1].stat().st_mtime_ns) == before[2]  # kept as it was
    # step 4 comes again after the resume from step 3 (rewritten, same step), step 6 is new
    assert [torch.load(p, weights_only=True)["step"] for _, p in snaps] == [2, 4, 6]
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-3:] == [4, 5, 6]


@pytest.mark.parametrize("flags, match", [(["--snapshot-steps", "0"], "snapshot-steps must be >= 1"),
                                          (["--snapshot-steps", "ten"], "snapshot-steps must be a number"), (["--snapshot-every", "-5"], "snapshot-every must be >= 0")])  # fmt: skip
def test_bad_snapshot_flags_are_user_errors_before_any_work(tiny_data, tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        _train(tiny_data, out, *flags)
    assert not out.exists()


# ---- pure progression numbers --------------------------------------------------------------------
def test_emergence_step_finds_half_of_the_rise_or_fall():
    steps = [10, 100, 1000, 3000]
    assert emergence_step(steps, [0.0, 0.2, 0.6, 1.0]) == 1000
    assert emergence_step(steps, [0.0, 0.2, 0.6, 1.0], fraction=0.2) == 100
    assert emergence_step(steps, [1.0, 0.9, 0.4, 0.3]) == 1000  # a fall: half of the largest fall
    assert emergence_step(steps, [None, 0.0, 1.0, 1.0]) == 1000  # undefined early points are skipped
    assert emergence_step(steps, [0.5, 0.5, 0.5, 0.5 + 1e-9]) is None  # flat up to rounding
    assert emergence_step([10], [1.0]) is None


def test_return_point_means_and_standard_errors():
    r = np.zeros((2, 3, 4))
    r[0, :, 0], r[1, :, 0] = 0.2, 0.4  # episode 1: task means 0.2 and 0.4
    r[:, :, 2:] = 1.0
    p = return_point(r, late_episodes=2)
    assert p["episode_1"] == pytest.approx(0.3) and p["episode_1_se"] == pytest.approx(0.1)
    assert p["late"] == 1.0 and p["late_se"] == 0.0 and p["late_episodes"] == 2
    assert p["curve"] == pytest.approx([0.3, 0.0, 1.0, 1.0])


def test_attention_point_averages_defined_values_only():
    base = dict.fromkeys(ATTENTION_KEYS, 0.5) | {"entropy_normalised_per_layer": [0.2, 0.4], "reward_enrichment_per_layer": [2.0, None]}
    none_reward = base | {k: None for k in ("reward_enrichment", "reward_attention_share", "reward_context_share")}
    none_reward |= {"reward_enrichment_per_layer": [None, None]}
    p = attention_point([base | {"reward_enrichment": 3.0}, none_reward])
    assert p["n_captures"] == 2 and p["n_captures_with_reward"] == 1
    assert p["reward_enrichment"] == 3.0 and p["recent_share"] == 0.5
    assert p["reward_enrichment_per_layer"] == [2.0, None] and p["entropy_normalised_per_layer"] == pytest.approx([0.2, 0.4])


def _current_episode_share_by_hand(cap: dict, min_len: int) -> float:
    n, steps, episode = cap["context_len"].numpy(), cap["ctx_step"].numpy(), cap["episode"].numpy()
    q = cap["query_attn"].double().numpy()  # (S, L, H, T)
    shares = []
    for s in range(len(n)):
        eps = episode[steps[s, : n[s]]]
        if n[s] <= min_len or not (eps < episode[s]).any():
            continue
        rows = q[s, :, :, : n[s]] / q[s, :, :, : n[s]].sum(-1, keepdims=True)
        row = rows.mean((0, 1))
        shares.append(row[eps == episode[s]].sum() / row.sum())
    return float(np.mean(shares))


def test_episode_numbers_match_a_recomputation_by_hand(make_capture):
    cap = make_capture(S=60, T=24, horizon=5, taus=[[1.0, 4.0], [2.0, 8.0]], sink=0.1)
    num = capture_numbers(cap, recent_window=5, sink_positions=4)
    assert num["current_episode_share"] == pytest.approx(_current_episode_share_by_hand(cap, 9), abs=1e-6)
    assert num["earlier_episodes_share"] == pytest.approx(1 - num["current_episode_share"])
    assert 0 < num["previous_episode_share"] < num["earlier_episodes_share"] + 1e-12
    assert 0 < num["current_episode_context_share"] < 1
    # uniform attention over the context attends to the current episode exactly as much as it fills it
    uniform = dict(cap)
    ok = torch.arange(cap["query_attn"].shape[-1])[None, :] < cap["context_len"][:, None]
    uniform["query_attn"] = (ok[:, None, None, :].float() / cap["context_len"][:, None, None, None]).expand_as(cap["query_attn"]).half()
    u = capture_numbers(uniform)
    assert u["current_episode_share"] == pytest.approx(u["current_episode_context_share"], abs=2e-3)
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in u["entropy_normalised_per_layer"])


# ---- the progression command on three snapshots --------------------------------------------------
@pytest.fixture(scope="module")
def progression(snapshot_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("prog") / "analysis"
    doc = training_progression.main([
        "--snapshots", str(snapshot_run), "--out", str(out), "--episodes", "3", "--late-episodes", "2",
        "--seed", "100", "--num-seeds", "2", "--capture-tasks", "1", "--capture-seeds", "1",
        "--reference", str(snapshot_run / "model.pt"),
    ])  # fmt: skip
    return out, doc


def test_progression_writes_every_artifact(progression, snapshot_run):
    out, doc = progression
    assert {p.name for p in out.iterdir()} == {"training_progression.json", "training_progression.png", "progression_config.json", "points"}
    assert sorted(p.name for p in (out / "points").iterdir()) == ["step_000001.json", "step_000003.json", "step_000006.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert json.loads((out / "training_progression.json").read_text()) == json.loads(json.dumps(doc))
    assert (doc["schema"], doc["schema_version"]) == ("ad-training-progression", 1)
    assert (out / "training_progression.png").read_bytes()[:4] == b"\x89PNG"
    assert [p["step"] for p in doc["snapshots"]] == [1, 3, 6]
    meta = doc["meta"]
    assert meta["seeds"] == [100, 101] and meta["capture_seeds"] == [100] and meta["n_capture_tasks"] == 1
    assert meta["capture_timesteps"] == 24 and meta["n_layer"] == 2  # twice the tiny context (12), in whole 6-step episodes
    for p in doc["snapshots"]:
        a, r = p["attention"], p["returns"]
        assert set(ATTENTION_KEYS) <= set(a) and a["n_captures"] == 1
        for key in ("current_episode_share", "previous_episode_share", "recent_share", "last_episode_share", "fraction_for_90"):
            assert 0 <= a[key] <= 1 + 1e-9, key
        assert all(0 <= v <= 1 + 1e-9 for v in a["entropy_normalised_per_layer"]) and len(a["entropy_normalised_per_layer"]) == 2
        assert 1 <= a["positions_for_90"] <= 12
        assert len(r["curve"]) == 3 and r["late"] == pytest.approx(np.mean(r["curve"][-2:]))
    assert set(doc["emergence"]) == {"return_episode_1", "return_late"} | set(ATTENTION_KEYS)


def test_progression_numbers_are_the_evaluation_and_capture_of_each_snapshot(progression, snapshot_run):
    _, doc = progression
    spec = get_spec(doc["meta"]["env"])
    tasks = spec.tasks_for("test")
    for p in (doc["snapshots"][0], doc["snapshots"][-1]):
        model, _ = load_model(p["path"])
        results = evaluate.evaluate(model, spec, tasks, 3, [100, 101], progress=False)
        assert p["returns"]["curve"] == pytest.approx(results["normalized_return_per_episode"])
        cap = record_rollout(model, spec, tasks[:1], 24, seed=100, num_full=0, progress=False)
        s = summarize(task_view(cap, 0))
        for key in ("recent_share", "last_episode_share", "positions_for_90", "entropy_normalised", "reward_enrichment"):
            assert p["attention"][key] == pytest.approx(s[key]), key
        assert p["attention"]["current_episode_share"] == pytest.approx(_current_episode_share_by_hand(task_view(cap, 0), 9), abs=1e-6)
    # the reference is the final model: same weights, same seeds, same numbers as the last snapshot
    ref, last = doc["references"][0], doc["snapshots"][-1]
    assert ref["returns"] == last["returns"] and ref["attention"] == last["attention"]


def test_progression_reuses_points_of_unchanged_snapshots_only(progression, snapshot_run, tmp_path, monkeypatch):
    out, doc = progression
    run = tmp_path / "run"
    shutil.copytree(snapshot_run / "snapshots", run / "snapshots")
    args = ["--snapshots", str(run), "--episodes", "3", "--late-episodes", "2", "--seed", "100", "--num-seeds", "2",
            "--capture-tasks", "1", "--capture-seeds", "1"]  # fmt: skip
    first = training_progression.main([*args, "--out", str(tmp_path / "a")])
    assert first["meta"]["n_reused"] == 0
    assert [p["returns"] for p in first["snapshots"]] == [p["returns"] for p in doc["snapshots"]]  # same seeds, same numbers
    real, calls = training_progression.snapshot_point, []
    monkeypatch.setattr(training_progression, "snapshot_point", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = training_progression.main([*args, "--out", str(tmp_path / "a")])
    assert calls == [] and again["meta"]["n_reused"] == 3 and again["snapshots"] == first["snapshots"]
    snap = run / "snapshots" / "step_000003.pt"
    snap.write_bytes(snap.read_bytes())  # a rewritten snapshot (e.g. by a resumed run) is computed again
    assert training_progression.main([*args, "--out", str(tmp_path / "a")])["meta"]["n_reused"] == 2 and len(calls) == 1
    training_progression.main([*args, "--out", str(tmp_path / "a"), "--episodes", "4"])  # other settings: all again
    assert len(calls) == 1 + 3


def test_progression_fanned_out_over_worker_processes_gives_the_same_numbers(progression, snapshot_run, tmp_path):
    """--workers 2: one job per snapshot (and reference) in a process pool, the driver writing each
    point; same seeds, same numbers as computed here in turn."""
    _, doc = progression
    fanned = training_progression.main([
        "--snapshots", str(snapshot_run), "--out", str(tmp_path / "w"), "--episodes", "3", "--late-episodes", "2",
        "--seed", "100", "--num-seeds", "2", "--capture-tasks", "1", "--capture-seeds", "1",
        "--reference", str(snapshot_run / "model.pt"), "--workers", "2",
    ])  # fmt: skip
    for mine, theirs in zip(fanned["snapshots"] + fanned["references"], doc["snapshots"] + doc["references"]):
        assert mine["returns"] == theirs["returns"]  # the same episodes
        for key, value in theirs["attention"].items():  # the same weights, up to float rounding in another process
            assert mine["attention"][key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if value is not None else None), key
    assert fanned["meta"]["workers"] == 2 and len(list((tmp_path / "w" / "points").iterdir())) == 3


# ---- bad input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_folders(snapshot_run, tiny_data, tmp_path_factory):
    """Snapshot folders a user could point at by mistake: empty, of two runs, with a damaged file."""
    tmp = tmp_path_factory.mktemp("bad")
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no snapshots here")
    other = tmp / "other_run"
    _train(tiny_data, other, "--steps", "2", "--n-layer", "1", "--snapshot-steps", "2")
    mixed = tmp / "mixed"
    mixed.mkdir()
    for name in ("step_000001.pt", "step_000006.pt"):
        shutil.copy(snapshot_run / "snapshots" / name, mixed / name)
    shutil.copy(other / "snapshots" / "step_000002.pt", mixed / "step_000002.pt")
    corrupt = tmp / "corrupt"
    shutil.copytree(snapshot_run / "snapshots", corrupt)
    (corrupt / "step_000003.pt").write_bytes(b"not a checkpoint\n" * 20)
    return {"empty": empty, "mixed": mixed, "corrupt": corrupt, "missing": tmp / "nowhere", "run": snapshot_run}


@pytest.mark.parametrize(
    "folder, extra, match",
    [
        ("empty", [], "no snapshots"),
        ("missing", [], "not found"),
        ("mixed", [], "different model configs"),
        ("corrupt", [], "cannot read"),
        ("run", ["--episodes", "0"], "--episodes"),
        ("run", ["--episodes", "3", "--late-episodes", "5"], "--late-episodes"),
        ("run", ["--capture-tasks", "9"], "--capture-tasks"),
        ("run", ["--reference", "nowhere.pt"], "not found"),
    ],
)
def test_bad_progression_input_is_a_user_error_before_any_work(bad_folders, tmp_path, monkeypatch, folder, extra, match):
    calls = []
    monkeypatch.setattr(training_progression, "snapshot_point", lambda *a, **k: calls.append(1))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as err:
        training_progression.main(["--snapshots", str(bad_folders[folder]), "--out", str(out), *extra])
    assert "\n" not in str(err.value) and not calls and not out.exists()


def test_mixed_snapshots_exit_2_naming_the_offending_file(bad_folders, tmp_path, capsys):
    line = refused(capsys, training_progression.main, ["--snapshots", str(bad_folders["mixed"])], tmp_path / "out")
    assert "different model configs" in line and "step_000002.pt" in line and "n_layer" in line
