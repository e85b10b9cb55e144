"""The Ray backend in local mode: collect.py and evaluate.py give the same outputs as the local
backend, resume, retry a job that fails once, reject a bad address (exit 2) and stop cleanly on Ctrl-C.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_ray.py

One Ray instance of 2 CPUs serves every in-process test (started once, stopped at the end); the
Ctrl-C and bad-address tests run the scripts as subprocesses, which start their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import collect  # noqa: E402
import evaluate  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.ray_pool import JobsFailed, fan_out  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "config" / "tiny.yaml"
TINY_COLLECT = ["--config", str(TINY), "--tasks", "test", "--workers", "2"]  # the 2 held-out goals of the 3x3 room


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module: scripts called in-process join it instead of starting their own."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


def flaky(marker_dir: str, idx: int, mode: str) -> int:
    """A job for the retry test: logs each attempt; `raise`/`exit` fail on the first attempt only
    (an exception; a worker that dies), `always` fails every time, `ok` never."""
    log = Path(marker_dir) / f"job{idx}.attempts"
    first = not log.exists()
    with open(log, "a") as f:
        f.write("x")
    if mode == "always" or (first and mode == "raise"):
        raise RuntimeError(f"job {idx} failed on purpose")
    if first and mode == "exit":
        os._exit(1)
    return idx * 10


def span(seconds: float) -> tuple[float, float]:
    """A job for the exclusive test: when it ran."""
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def _attempts(marker_dir: Path, idx: int) -> int:
    return len((marker_dir / f"job{idx}.attempts").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, int]:
    """pid -> parent pid of every process on this machine."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _descendants(pid: int) -> set[int]:
    ppid = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in ppid.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ray_collect_matches_local_byte_for_byte_and_resumes(ray_session, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    by_local = collect.main(TINY_COLLECT + ["--out", str(local)])
    by_ray = collect.main(TINY_COLLECT + ["--out", str(remote), "--backend", "ray"])
    names = sorted(p.name for p in local.glob("task_*.npz"))
    assert len(names) == 2 and names == sorted(p.name for p in remote.glob("task_*.npz"))
    for name in names:
        assert (local / name).read_bytes() == (remote / name).read_bytes()
    assert not list(remote.glob("*.tmp"))
    assert {r["worker"]["backend"] for r in by_ray} == {"ray"} and {r["worker"]["backend"] for r in by_local} == {"local"}
    assert all(r["worker"]["node_id"] for r in by_ray)
    assert json.loads((remote / "collect_config.json").read_text())["collect"]["backend"] == "ray"
    # a rerun collects only what is missing, and again the same bytes
    (remote / names[1]).unlink()
    kept = (remote / names[0]).stat().st_mtime_ns
    again = collect.main(TINY_COLLECT + ["--out", str(remote), "--backend", "ray"])
    assert [f"task_{r['task_idx']:04d}.npz" for r in again] == [names[1]]
    assert (remote / names[1]).read_bytes() == (local / names[1]).read_bytes()
    assert (remote / names[0]).stat().st_mtime_ns == kept
    assert collect.main(TINY_COLLECT + ["--out", str(remote), "--backend", "ray"]) == []


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_failed_job_is_retried_and_one_that_keeps_failing_is_reported(ray_session, tmp_path, backend):
    modes = ["ok", "raise", "always", "ok"] + (["exit"] if backend == "ray" else [])  # a dying worker breaks a local pool
    jobs = [(str(tmp_path), i, m) for i, m in enumerate(modes)]
    done = {}
    with pytest.raises(JobsFailed, match=r"1 of \d+ test jobs failed after 2 attempts: job 2: RuntimeError: job 2 failed on purpose"):
        for d in fan_out(flaky, jobs, backend=backend, workers=2, max_retries=1, desc="test", progress=False):
            done[d.idx] = d.result
    assert done == {i: i * 10 for i, m in enumerate(modes) if m != "always"}  # the others all finished
    assert [_attempts(tmp_path, i) for i in range(len(modes))] == [1 if m == "ok" else 2 for m in modes]


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_exclusive_jobs_hold_the_whole_node_one_at_a_time(ray_session, backend):
    done = list(fan_out(span, [(0.3,)] * 3, backend=backend, workers=2, exclusive=True, progress=False))
    spans = sorted(d.result for d in done)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once on the 2-CPU node
    assert not any(d.shared_load for d in done)
    packed = list(fan_out(span, [(0.0,)] * 2, backend=backend, workers=2, progress=False))
    assert all(d.shared_load for d in packed)


def test_ray_evaluation_seeds_match_one_after_another(ray_session, tmp_path):
    args = ["--episodes", "2", "--num-seeds", "2", "--device", "cpu"]
    here = evaluate.main(args + ["--out", str(tmp_path / "here")])
    fanned = evaluate.main(args + ["--out", str(tmp_path / "ray"), "--backend", "ray"])
    for a, b in zip(here["per_task"], fanned["per_task"]):
        np.testing.assert_array_equal(a["returns_per_seed"], b["returns_per_seed"])
    assert here["timing"] == "one seed at a time" and fanned["timing"].startswith("shared-load")
    assert [w["backend"] for w in fanned["workers_per_seed"]] == ["ray", "ray"]


def test_a_bad_ray_address_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="HOST:PORT"):
        collect.main(TINY_COLLECT + ["--out", str(tmp_path / "a"), "--backend", "ray", "--ray-address", "nowhere"])
    with pytest.raises(UserError, match="backend"):
        evaluate.main(["--backend", "spark", "--out", str(tmp_path / "a")])
    cmd = [sys.executable, "collect.py", *TINY_COLLECT, "--out", str(tmp_path / "d"), "--backend", "ray", "--ray-address", f"127.0.0.1:{_free_port()}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no Ray cluster answers at 127.0.0.1:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "a").exists()


def test_ctrl_c_cancels_the_ray_tasks_and_leaves_no_process_behind(tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, "collect.py", "--config", str(TINY), "--out", str(out), "--backend", "ray", "--workers", "2",
           "--timesteps", str(4 * 6 * 400)]  # fmt: skip  # 400 episodes per task: long enough to interrupt
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip  # a shell's background job ignores SIGINT
    try:
        deadline = time.time() + 120
        while not (out / "collect_config.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(4)  # the tasks are running
        started = _descendants(proc.pid)
        assert proc.poll() is None and started, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert not list(out.glob("*.tmp"))
    deadline = time.time() + 20
    while any(_alive(p) for p in started) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p for p in started if _alive(p)]


def test_ray_compression_sweep_matches_the_local_one(ray_session, tmp_path):
    import compression_template

    args = ["--sweep", "--sweep-strategies", "fixed_window", "sink_window", "--sweep-ratios", "0.1", "--interval", "5",
            "--keep-recent", "4", "--n-sink", "2", "--episodes", "2", "--seeds", "0", "1", "--threads", "1"]  # fmt: skip
    here = compression_template.main(args + ["--out", str(tmp_path / "here")])["rows"]
    fanned = compression_template.main(args + ["--out", str(tmp_path / "ray"), "--backend", "ray"])["rows"]
    assert [(r["strategy"], r["ratio"]) for r in fanned] == [(r["strategy"], r["ratio"]) for r in here]
    for a, b in zip(here, fanned):  # same returns; each configuration timed on one worker, baseline and variant paired
        assert (a["return_full"], a["return_compressed"]) == (b["return_full"], b["return_compressed"])
        assert b["worker"]["backend"] == "ray" and len(b["time_full_s"]) == 2
