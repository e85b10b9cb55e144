"""Interrupts and kills, as subprocesses (signals and exit codes are what these are about): Ctrl-C
stops collect.py at once, workers never outlive a killed parent, train.py resumes cleanly after a
kill -9 at any moment, and two train.py runs into one folder never break each other.

    python -m pytest -q tests/test_interrupts.py

Linux only: processes are found through /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from adlens.errors import UserError
from env import get_spec

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds processes through /proc")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "config" / "tiny.yaml"
TINY_ENV = {"name": "darkroom", "size": 3, "horizon": 6, "n_holdout": 2, "split_seed": 0}
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # SIGABRT: dump threads


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has finished)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _wait_until(cond, timeout: float, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()


def _default_sigint() -> None:
    """In the child: Ctrl-C handled as in a terminal, also when the tests run as a background job
    (which ignores SIGINT, and a Python started so ignores it too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip


def _start_collect(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """collect.py with 2 workers on 9 tasks that each take far longer than the test; returns it
    once both workers run."""
    proc = _start(["collect.py", "--config", str(TINY), "--out", str(out), "--workers", "2", "--timesteps", "24000"])
    workers = _wait_until(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 60)
    assert workers, proc.stderr.read() if proc.poll() is not None else "no workers started"
    return proc, workers


def _cleanup(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def test_ctrl_c_stops_collect_within_seconds(tmp_path):
    proc, workers = _start_collect(tmp_path / "data")
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # where it hangs, for the failure message
            pytest.fail("collect.py still runs 10 s after Ctrl-C; its threads:\n" + proc.communicate(timeout=10)[1][-5000:])
        assert proc.returncode == 130, err[-2000:]
        assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
        assert _wait_until(lambda: not _alive(workers), 5), f"workers {_alive(workers)} still run"
    finally:
        _cleanup(proc, workers)


def test_workers_exit_when_collect_is_killed(tmp_path):
    proc, workers = _start_collect(tmp_path / "data")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_until(lambda: not _alive(workers), 5), f"workers {_alive(workers)} outlived their parent"
    finally:
        _cleanup(proc, workers)


ORPHAN_SCRIPT = """
import sys, time
sys.platform = "other"  # no PR_SET_PDEATHSIG: the portable watcher alone
from adlens.ray_pool import fan_out
for done in fan_out(time.sleep, [(60,), (60,)], workers=2, progress=False):
    pass
"""


def test_workers_exit_when_their_parent_dies_without_prctl(tmp_path):
    proc = _start(["-c", ORPHAN_SCRIPT])
    workers = _wait_until(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 30)
    try:
        assert workers
        time.sleep(1.0)  # the workers' initializer has run
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_until(lambda: not _alive(workers), 5), f"workers {_alive(workers)} outlived their parent"
    finally:
        _cleanup(proc, workers or [])


# ---- train.py ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def histories(tmp_path_factory) -> Path:
    """Random-walk histories in collect.py's format for every tiny task (training reads them; what
    they teach does not matter here), made in milliseconds instead of PPO's seconds."""
    out = tmp_path_factory.mktemp("histories")
    spec = get_spec(TINY_ENV)
    rng = np.random.default_rng(0)
    for i, task in enumerate(spec.tasks()):
        n, steps = 4, 4 * spec.horizon
        cells = rng.integers(0, spec.size, (n, steps + 1, 2))
        np.savez_compressed(out / f"task_{i:04d}.npz", task=json.dumps(task), horizon=spec.horizon,
                            states=cells[:, :-1].astype(np.int8), next_states=cells[:, 1:].astype(np.int8),
                            actions=rng.integers(0, 5, (n, steps)).astype(np.int8),
                            rewards=(rng.random((n, steps)) < 0.1).astype(np.float32),
                            dones=np.tile(np.arange(steps) % spec.horizon == spec.horizon - 1, (n, 1)))  # fmt: skip
    return out


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", "--config", str(TINY), "--data", str(data), "--out", str(out), "--threads", "1", *extra]


def test_train_resumes_consistently_after_kill_9(histories, tmp_path):
    """Killed while it checkpoints every step: --resume continues from one consistent state, every
    step is logged exactly once, and no temporary file is left."""
    out = tmp_path / "run"
    proc = _start(_train_argv(histories, out, "--steps", "100000", "--save-every", "1", "--eval-every", "1000"))
    try:
        assert _wait_until(lambda: (out / "train_state.pt").exists(), 60), proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        _cleanup(proc, [])
    state = torch.load(out / "train_state.pt", weights_only=True)
    saved = state["step"]
    (tmp_path / "mixed").mkdir()
    torch.save(state | {"step": saved + 1}, tmp_path / "mixed" / "train_state.pt")  # weights and optimizer of different steps
    with pytest.raises(UserError, match="inconsistent"):
        train.read_train_state(tmp_path / "mixed")
    with open(out / "metrics.jsonl", "a") as log:  # what a killed run may leave: rows past its state, a cut line
        log.write(json.dumps({"step": saved + 1, "loss": 1.0}) + "\n" + '{"step": ')
    (out / ".model.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    train.main(_train_argv(histories, out, "--steps", str(saved + 3), "--resume")[1:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, saved + 4))
    assert torch.load(out / "model.pt", weights_only=True)["step"] == saved + 3
    assert not [p.name for p in out.rglob("*.tmp")]


def test_two_trainings_into_one_folder_never_break_each_other(histories, tmp_path):
    out = tmp_path / "shared"
    procs = [_start(_train_argv(histories, out, "--steps", "100", "--save-every", "1", "--eval-every", "1000")) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes and set(codes) <= {0, 2}, [r[1][-2000:] for r in results]
    for p, (_, err) in zip(procs, results):
        if p.returncode == 2:
            assert err.strip().splitlines()[-1].startswith("error: another train.py run is writing to") and "Traceback" not in err
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 100
    assert not list(out.rglob("*.tmp"))
