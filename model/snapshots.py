"""Training snapshots: which steps keep a copy of the weights, and reading a folder of them back.

    >>> snapshot_schedule(3000, every=1000, geometric=4, first=25)
    [25, 123, 608, 1000, 2000, 3000]
    >>> snaps = read_snapshots("runs/progression/darkroom_ad/snapshots")   # [(step, path), ...]

`train.py` writes `OUT/snapshots/step_XXXXXX.pt` at the scheduled steps, in the format of
`OUT/model.pt` (weights, resolved config, step), so `model.checkpoint.load_model` loads any of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from adlens.errors import UserError
from model.checkpoint import read_checkpoint

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_RE = re.compile(r"^step_(\d{6,})\.pt$")


def snapshot_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def snapshot_schedule(steps: int, every: int = 0, at=(), geometric: int = 0, first: int = 25) -> list[int]:
    """The sorted training steps (1..steps) at which to keep a snapshot.

    Union of: every `every`-th step (0 = none), the steps listed in `at` (those beyond `steps` are
    dropped), and `geometric` steps spaced evenly on a log scale from `first` to `steps` (rounded;
    steps that round to the same integer count once). The last step is in the schedule whenever any
    snapshot is asked for.
    """
    if steps < 1 or every < 0 or geometric < 0 or first < 1:
        raise UserError(f"snapshot schedule needs steps >= 1, every >= 0, geometric >= 0, first >= 1; "
                        f"got steps={steps}, every={every}, geometric={geometric}, first={first}")  # fmt: skip
    bad = [s for s in at if int(s) < 1]
    if bad:
        raise UserError(f"--snapshot-steps must be >= 1, got {bad}")
    out = {int(s) for s in at if int(s) <= steps}
    if every:
        out |= set(range(every, steps + 1, every))
    if geometric:
        lo = min(first, steps)
        out |= {int(round(x)) for x in np.geomspace(lo, steps, geometric)} if geometric > 1 else {steps}
    if out:
        out.add(steps)
    return sorted(out)


def read_snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_XXXXXX.pt` in `folder`, by step; a UserError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"snapshot folder not found: {folder} (train with --snapshot-every/--snapshot-geometric)")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SNAPSHOT_RE.match(p.name)))
    if not found:
        raise UserError(f"no snapshots (step_XXXXXX.pt) in {folder}; train with --snapshot-every or --snapshot-geometric")
    return found


def check_same_model(snapshots: list[tuple[int, Path]]) -> dict:
    """Read every snapshot's config; they must describe one model on one environment.

    Returns the first snapshot's config. Every snapshot is checked whole (`read_checkpoint`: config,
    weights against it, env against the model) before any is evaluated. Raises UserError naming the
    first snapshot that differs, or one that is damaged or whose step does not match its file name.
    """
    ref = ref_path = None
    for step, path in snapshots:
        ckpt = read_checkpoint(path)
        cfg = ckpt["config"]
        if int(ckpt.get("step", step)) != step:
            raise UserError(f"{path} holds step {ckpt.get('step')}, not the step its name says ({step})")
        key = {"model": cfg["model"], "env": cfg["env"]}
        if ref is None:
            ref, ref_path = key, path
        elif key != ref:
            what = "model" if key["model"] != ref["model"] else "environment"
            diff = sorted(k for k in set(key[what]) | set(ref[what]) if key[what].get(k) != ref[what].get(k))
            raise UserError(f"snapshots of different {what} configs in one folder: {path.name} differs from "
                            f"{ref_path.name} in {diff}; keep one training run per folder")  # fmt: skip
    return {"model": ref["model"], "env": ref["env"]}
