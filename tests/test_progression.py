"""Attention across training: snapshots written by train.py (schedule, format, resume) and the
progression command over a folder of them, on a 3x3 Darkroom (config/tiny.yaml).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_progression.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import collect
import train
from adlens.errors import UserError
from model.checkpoint import load_model
from model.data import HistoryData
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


def test_bad_snapshot_flags_exit_2(tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", str(TINY), "--data", str(tiny_data), "--out", str(out), "--snapshot-steps", "0"],
        cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "snapshot" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
