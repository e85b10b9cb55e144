"""Files checked against each other, before any work: checkpoints, captures and learning histories
corrupted field by field, and `--device cuda` without CUDA, through the scripts' `main` in-process.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_file_checks.py

Every bad case must end as `adlens.config.run_cli` ends a user error: exit code 2, one line on stderr
that starts with "error:", and no output folder. Which field is corrupted, and how, is drawn by
hypothesis (a few examples per test; the corruptions are small, the scripts stop before any rollout).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analyze_attention
import collect
import compression_template
import evaluate
import evaluate_with_attention
import run_attention_analysis
import train
import training_progression
import visualize_attention
from adlens.capture_file import REQUIRED, load_capture, save_capture, upgrade
from adlens.config import run_cli
from conftest import build_capture
from env import get_spec
from model.ad import ADConfig, ADTransformer
from model.checkpoint import OPTIONAL_MODEL_KEYS, read_checkpoint, save_atomic

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "config" / "tiny.yaml"
TINY_ENV = {"name": "darkroom", "size": 3, "horizon": 6, "n_holdout": 2, "split_seed": 0}
SPEC = get_spec(TINY_ENV)
N_STREAMS, N_EPISODES = 2, 4
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def refused(main, argv: list[str], *outs: Path) -> str:
    """Run `main(argv)` as the command line does; assert exit 2, one 'error:' line, no output. Returns the line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    lines = err.getvalue().strip().splitlines()
    assert e.value.code == 2, err.getvalue()
    assert len(lines) == 1 and lines[0].startswith("error:"), err.getvalue()
    for out in outs:
        assert not out.exists(), f"{out} was created"
    return lines[0]


@pytest.fixture(autouse=True)
def no_rollouts(monkeypatch):
    """A refused command must stop before any rollout or training step: these fail the test if reached."""

    def reached(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(evaluate, "evaluate", reached)
    monkeypatch.setattr(compression_template, "measure", reached)
    monkeypatch.setattr(evaluate_with_attention, "default_capture_steps", reached)
    monkeypatch.setattr(collect, "fan_out", reached)
    monkeypatch.setattr(training_progression, "snapshot_point", reached)


# ---- files ---------------------------------------------------------------------------------------
def _checkpoint_dict(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = ADConfig(n_states=9, n_actions=5, horizon=6, max_context=12, n_layer=2, n_head=2, d_model=16, dropout=0.0, grid_size=3)
    model = ADTransformer(cfg)
    return {"model": model.state_dict(), "config": {"model": cfg.to_dict(), "env": dict(TINY_ENV), "train": {}}, "step": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_atomic(_checkpoint_dict(), path)
    return path


def _history(task: dict | None, rng: np.random.Generator) -> dict:
    steps = N_EPISODES * SPEC.horizon
    states = rng.integers(0, SPEC.size, (N_STREAMS, steps, 2))
    return {
        "task": json.dumps(task),
        "horizon": SPEC.horizon,
        "states": states.astype(np.int8),
        "actions": rng.integers(0, SPEC.n_actions, (N_STREAMS, steps)).astype(np.int8),
        "rewards": (rng.random((N_STREAMS, steps)) < 0.2).astype(np.float32),
        "next_states": states.astype(np.int8),
        "dones": np.zeros((N_STREAMS, steps), dtype=bool),
    }


def _write_histories(folder: Path, arrays: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "collect_config.json").write_text(json.dumps({"env": SPEC.to_dict(), "collect": {"tasks": "all", "n_streams": N_STREAMS}}))
    for i, a in enumerate(arrays):
        np.savez_compressed(folder / f"task_{i:04d}.npz", **a)
    return folder


@pytest.fixture(scope="module")
def histories(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A collect.py folder of every task of the tiny env (synthetic random walks), and its arrays."""
    rng = np.random.default_rng(0)
    arrays = [_history(t, rng) for t in SPEC.tasks()]
    return _write_histories(tmp_path_factory.mktemp("data"), arrays), arrays


@pytest.fixture(scope="module")
def capture_path(tmp_path_factory) -> Path:
    return save_capture(build_capture(S=30, T=12, horizon=6), tmp_path_factory.mktemp("cap") / "capture.pt")


def test_the_untouched_files_pass(checkpoint, histories, capture_path):
    read_checkpoint(checkpoint)
    read_checkpoint("default")  # the shipped model
    assert load_capture(capture_path)["query_attn"].shape[:2] == (1, 30)
    assert load_capture(ROOT / "tests" / "data" / "capture_v1_tiny.pt")["query_attn"].shape[:2] == (1, 20)  # version 1 still loads
    from model.data import HistoryData

    data = HistoryData.from_dir(histories[0], SPEC, SPEC.tasks(), 12, (1, 2))
    assert data.n_streams == N_STREAMS * len(SPEC.tasks())


# ---- checkpoints ---------------------------------------------------------------------------------
def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _corrupt_checkpoint(ckpt: dict, kind: str, pick: int) -> dict:
    model_cfg, env, weights = dict(ckpt["config"]["model"]), dict(ckpt["config"]["env"]), dict(ckpt["model"])
    required = sorted(set(model_cfg) - OPTIONAL_MODEL_KEYS)  # an optional field may be absent (older checkpoints)
    mkey = required[pick % len(required)]
    ekey = sorted(env)[pick % len(env)]
    wkey = sorted(weights)[pick % len(weights)]
    if kind == "drop top-level key":
        return _drop(ckpt, ["model", "config"][pick % 2])
    if kind == "drop model field":
        model_cfg.pop(mkey)
    elif kind == "drop env field":
        env.pop(ekey)
    elif kind == "drop weight":
        weights.pop(wkey)
    elif kind == "model field of wrong type":
        model_cfg[mkey] = ["four", None, True, [1]][pick % 4]
    elif kind == "env field of wrong type":
        env[ekey] = [None, 2.5, [1]][pick % 3]
    elif kind == "non-finite model field":
        model_cfg[["dropout", "rope_base"][pick % 2]] = [math.nan, math.inf][pick % 2]
    elif kind == "model field out of range":
        key, value = [("n_layer", 0), ("n_head", 3), ("dropout", 1.5), ("max_context", -1), ("grid_size", 4)][pick % 5]
        model_cfg[key] = value
    elif kind == "model does not fit its env":
        key, value = [("horizon", 7), ("n_states", 16), ("n_actions", 4)][pick % 3]
        model_cfg[key] = value
    elif kind == "env does not fit its model":
        key, value = [("size", 4), ("horizon", 20), ("name", "cave"), ("n_holdout", 0)][pick % 4]
        env[key] = value
    elif kind == "weight of wrong shape":
        weights[wkey] = torch.zeros(*weights[wkey].shape, 2)
    elif kind == "non-finite weight":
        w = weights[wkey].clone().float()
        w.view(-1)[0] = [math.nan, math.inf, -math.inf][pick % 3]
        weights[wkey] = w
    elif kind == "bad step":
        return ckpt | {"step": [-1, "3", 2.5][pick % 3]}
    return ckpt | {"model": weights, "config": ckpt["config"] | {"model": model_cfg, "env": env}}


CHECKPOINT_FAULTS = [
    "drop top-level key", "drop model field", "drop env field", "drop weight", "model field of wrong type",
    "env field of wrong type", "non-finite model field", "model field out of range", "model does not fit its env",
    "env does not fit its model", "weight of wrong shape", "non-finite weight", "bad step",
]  # fmt: skip


def _checkpoint_commands(ckpt: Path, out: Path) -> dict:
    return {
        "evaluate": (evaluate.main, ["--checkpoint", str(ckpt), "--episodes", "1", "--device", "cpu", "--out", str(out)]),
        "evaluate_with_attention": (evaluate_with_attention.main, ["--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out)]),
        "compression_template": (
            compression_template.main,
            ["--checkpoint", str(ckpt), "--episodes", "1", "--seeds", "0", "--threads", "1", "--out", str(out)],
        ),  # fmt: skip
        "run_attention_analysis": (
            run_attention_analysis.main,
            ["--checkpoint", str(ckpt), "--device", "cpu", "--threads", "1", "--out", str(out), "--capture-out", str(out / "cap")],
        ),  # fmt: skip
    }


@FEW
@given(kind=st.sampled_from(CHECKPOINT_FAULTS), pick=st.integers(0, 50), script=st.sampled_from(list(_checkpoint_commands(Path(), Path()))))
def test_a_corrupt_checkpoint_is_refused_before_any_output(kind, pick, script):
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "model.pt"
        torch.save(_corrupt_checkpoint(_checkpoint_dict(), kind, pick), bad)
        main, argv = _checkpoint_commands(bad, Path(tmp) / "out")[script]
        line = refused(main, argv, Path(tmp) / "out")
        assert str(bad) in line


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "not a dict", "a pickled object"])
def test_an_unreadable_checkpoint_is_refused(checkpoint, tmp_path, how):
    bad = tmp_path / "model.pt"
    data = checkpoint.read_bytes()
    if how == "not a dict":
        torch.save([1, 2, 3], bad)
    elif how == "a pickled object":  # weights_only refuses to build it
        torch.save({"model": {}, "config": argparse.Namespace(model={})}, bad)
    else:
        bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x80\x02junk" * 50}[how])
    out = tmp_path / "out"
    assert str(bad) in refused(evaluate.main, ["--checkpoint", str(bad), "--device", "cpu", "--out", str(out)], out)


def test_snapshots_are_checked_whole_before_the_first_is_evaluated(tmp_path):
    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    for step in (1, 2, 3):
        ckpt = _checkpoint_dict(seed=step) | {"step": step}
        if step == 3:
            ckpt = _corrupt_checkpoint(ckpt, "non-finite weight", 5)
        torch.save(ckpt, snaps / f"step_{step:06d}.pt")
    line = refused(
        training_progression.main, ["--snapshots", str(snaps), "--device", "cpu", "--out", str(tmp_path / "out")], tmp_path / "out"
    )
    assert "step_000003.pt" in line and "NaN" in line


# ---- resuming a training run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(histories, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.main(["--config", str(TINY), "--data", str(histories[0]), "--out", str(out), "--steps", "2", "--save-every", "2"])
    return out


def _listing(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.parametrize(
    "change, flags, match",
    [
        ("none", ["--d-model", "32"], "d_model=32 (saved 16) contradict"),
        ("none", ["--size", "4"], "size=4 (saved 3) contradict"),
        ("drop optimizer", [], "lacks ['optimizer']"),
        ("nan weight", [], "NaN"),
        ("no state", [], "nothing to resume"),
    ],
)
def test_resume_refuses_a_saved_run_that_does_not_fit(trained, histories, tmp_path, change, flags, match):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    if change == "drop optimizer":
        torch.save(_drop(state, "optimizer"), out / "train_state.pt")
    elif change == "nan weight":
        torch.save(_corrupt_checkpoint(state, "non-finite weight", 0), out / "train_state.pt")
    elif change == "no state":
        (out / "train_state.pt").unlink()
    before = _listing(out)
    line = refused(train.main, ["--config", str(TINY), "--data", str(histories[0]), "--out", str(out), "--steps", "4", "--resume", *flags])
    assert match in line and _listing(out) == before  # nothing written, nothing touched


# ---- captures ------------------------------------------------------------------------------------
def _corrupt_capture(cap: dict, kind: str, pick: int) -> dict:
    cap = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cap.items()}
    cap["meta"] = dict(cap["meta"])
    S, L, H, T = cap["query_attn"].shape
    s = pick % S
    if kind == "drop field":
        return _drop(cap, REQUIRED[pick % len(REQUIRED)])
    if kind == "meta horizon":
        cap["meta"]["horizon"] = [0, -6, "six", None, 2.5][pick % 5]
    elif kind == "meta disagrees with the shapes":
        key = ["n_layer", "n_head", "max_context"][pick % 3]
        cap["meta"][key] += 1
    elif kind == "meta grid_size":
        cap["meta"]["grid_size"] = [0, None, "3"][pick % 3]
    elif kind == "attention not a weight":
        cap["query_attn"][s, pick % L, pick % H, 0] = [math.nan, math.inf, 2.0, -0.5][pick % 4]
    elif kind == "full matrix not a weight":
        k = pick % len(cap["full_attn"])
        cap["full_attn"] = list(cap["full_attn"])
        cap["full_attn"][k] = cap["full_attn"][k].clone()
        cap["full_attn"][k][0, 0, -1, 0] = [math.nan, 1.5, -1.0][pick % 3]
    elif kind == "full matrix of wrong shape":
        cap["full_attn"] = list(cap["full_attn"])
        cap["full_attn"][pick % len(cap["full_attn"])] = torch.zeros(L, H, 3, 3)
    elif kind == "per-step field of wrong length":
        key = ["context_len", "ctx_step", "state", "action", "reward", "episode", "timestep"][pick % 7]
        cap[key] = cap[key][:-1]
    elif kind == "per-step field of wrong dtype":
        key = ["context_len", "ctx_step", "state", "episode", "timestep"][pick % 5]
        cap[key] = cap[key].float()
    elif kind == "context length out of range":
        cap["context_len"][s] = [0, T + 1, -3][pick % 3]
    elif kind == "context step out of range":
        cap["ctx_step"][s, 0] = [S + 5, s + 1, -7][pick % 3]
    elif kind == "state out of range":
        cap["state"][s] = [9, 100, -2][pick % 3]
    elif kind == "timestep out of range":
        cap["timestep"][s] = [6, -1][pick % 2]
    elif kind == "non-finite reward":
        cap["reward"][s] = [math.nan, math.inf][pick % 2]
    elif kind == "non-finite return":
        cap["returns"][pick % len(cap["returns"])] = math.nan
    elif kind == "full step out of range":
        cap["full_steps"][pick % len(cap["full_steps"])] = [S, -1][pick % 2]
    elif kind == "full task out of range":  # a version-2 field: version 1 has one task
        return upgrade(cap) | {"full_task": [1, -1, "0"][pick % 3]}
    return cap


CAPTURE_FAULTS = [
    "drop field", "meta horizon", "meta disagrees with the shapes", "meta grid_size", "attention not a weight",
    "full matrix not a weight", "full matrix of wrong shape", "per-step field of wrong length", "per-step field of wrong dtype",
    "context length out of range", "context step out of range", "state out of range", "timestep out of range",
    "non-finite reward", "non-finite return", "full step out of range", "full task out of range",
]  # fmt: skip


def _capture_commands(path: Path, out: Path) -> dict:
    return {
        "analyze_attention": (analyze_attention.main, ["--capture", str(path), "--dpi", "30", "--out", str(out)]),
        "visualize_attention": (visualize_attention.main, ["--capture", str(path), "--dpi", "30", "--out", str(out)]),
    }


@FEW
@given(kind=st.sampled_from(CAPTURE_FAULTS), pick=st.integers(0, 50), script=st.sampled_from(["analyze_attention", "visualize_attention"]))
def test_a_corrupt_capture_is_refused_before_any_output(kind, pick, script):
    cap = _corrupt_capture(build_capture(S=30, T=12, horizon=6), kind, pick)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "capture.pt"
        torch.save({"format": "ad-attention-capture", "version": 1, **cap}, path)  # as written: no repair on the way
        main, argv = _capture_commands(path, Path(tmp) / "out")[script]
        assert str(path) in refused(main, argv, Path(tmp) / "out")


def test_horizon_0_is_refused_not_turned_into_interval_0(tmp_path):
    cap = build_capture(S=30, T=12, horizon=6)
    cap["meta"]["horizon"] = 0
    path = save_capture(cap, tmp_path / "capture.pt")
    assert "horizon" in refused(analyze_attention.main, ["--capture", str(path), "--out", str(tmp_path / "out")], tmp_path / "out")


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_an_unreadable_capture_is_refused(capture_path, tmp_path, how):
    data = capture_path.read_bytes()
    bad = tmp_path / "capture.pt"
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "garbage": b"PK\x03\x04 not a zip" * 20}[how])
    refused(analyze_attention.main, ["--capture", str(bad), "--out", str(tmp_path / "out")], tmp_path / "out")


# ---- learning histories --------------------------------------------------------------------------
def _corrupt_history(a: dict, kind: str, pick: int) -> dict:
    a = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in a.items()}
    i, j = pick % N_STREAMS, pick % (N_EPISODES * SPEC.horizon)
    if kind == "drop key":
        return _drop(a, ["task", "horizon", "states", "actions", "rewards"][pick % 5])
    if kind == "state out of range":
        a["states"][i, j, pick % 2] = [SPEC.size, 100, -1][pick % 3]
    elif kind == "action out of range":
        a["actions"][i, j] = [SPEC.n_actions, 50, -1][pick % 3]
    elif kind == "non-finite reward":
        a["rewards"][i, j] = [np.nan, np.inf, -np.inf][pick % 3]
    elif kind == "lengths differ":
        key = ["actions", "rewards"][pick % 2]
        a[key] = a[key][:, :-1] if pick % 4 < 2 else a[key][:-1]
    elif kind == "states of wrong shape":
        a["states"] = a["states"][..., 0]
    elif kind == "wrong horizon":
        a["horizon"] = [0, SPEC.horizon + 1][pick % 2]
    elif kind == "wrong task":
        a["task"] = json.dumps({"goal": [9, 9]})
    elif kind == "float actions":
        a["actions"] = a["actions"].astype(np.float32) + 0.5
    return a


HISTORY_FAULTS = ["drop key", "state out of range", "action out of range", "non-finite reward", "lengths differ", "states of wrong shape",
                  "wrong horizon", "wrong task", "float actions"]  # fmt: skip


@FEW
@given(kind=st.sampled_from(HISTORY_FAULTS), pick=st.integers(0, 50), script=st.sampled_from(["train", "evaluate"]))
def test_a_corrupt_history_is_refused_before_any_work(histories, checkpoint, kind, pick, script):
    _, arrays = histories
    held = [SPEC.tasks().index(t) for t in SPEC.tasks_for("test")]  # evaluate --source-data reads the held-out tasks
    which = held[pick % len(held)] if script == "evaluate" else pick % len(arrays)
    bad = list(arrays)
    bad[which] = _corrupt_history(arrays[which], kind, pick)
    with tempfile.TemporaryDirectory() as tmp:
        data = _write_histories(Path(tmp) / "data", bad)
        out = Path(tmp) / "out"
        if script == "train":
            line = refused(train.main, ["--config", str(TINY), "--data", str(data), "--out", str(out)], out)
        else:
            line = refused(
                evaluate.main, ["--checkpoint", str(checkpoint), "--device", "cpu", "--source-data", str(data), "--out", str(out)], out
            )
        assert f"task_{which:04d}.npz" in line


def test_missing_source_data_is_found_before_the_rollouts(checkpoint, tmp_path):
    out = tmp_path / "out"
    line = refused(
        evaluate.main, ["--checkpoint", str(checkpoint), "--device", "cpu", "--source-data", str(tmp_path / "none"), "--out", str(out)], out
    )
    assert "missing learning history" in line


def test_histories_of_another_env_are_refused(histories, tmp_path):
    folder = tmp_path / "data"
    _write_histories(folder, histories[1])
    (folder / "collect_config.json").write_text(json.dumps({"env": SPEC.to_dict() | {"size": 5}, "collect": {"tasks": "all"}}))
    out = tmp_path / "out"
    assert "size 5" in refused(train.main, ["--config", str(TINY), "--data", str(folder), "--out", str(out)], out)
    # collect.py refuses to resume that folder with the tiny env: its files would count as collected
    assert "size 5" in refused(collect.main, ["--config", str(TINY), "--out", str(folder)])


# ---- --device cuda without CUDA ------------------------------------------------------------------
@pytest.mark.parametrize(
    "script",
    ["evaluate", "evaluate_with_attention", "compression_template", "run_attention_analysis", "training_progression", "train", "collect"],
)
def test_device_cuda_without_cuda_is_an_error(script, checkpoint, histories, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    out = tmp_path / "out"
    ckpt = ["--checkpoint", str(checkpoint)]
    argv = {
        "evaluate": (evaluate.main, ckpt),
        "evaluate_with_attention": (evaluate_with_attention.main, ckpt),
        "compression_template": (compression_template.main, ckpt),
        "run_attention_analysis": (run_attention_analysis.main, ckpt + ["--capture-out", str(out / "cap")]),
        "training_progression": (training_progression.main, ["--snapshots", str(tmp_path)]),
        "train": (train.main, ["--config", str(TINY), "--data", str(histories[0])]),
        "collect": (collect.main, ["--config", str(TINY), "--workers", "1"]),
    }
    main, args = argv[script]
    assert "CUDA" in refused(main, [*args, "--device", "cuda", "--out", str(out)], out)
