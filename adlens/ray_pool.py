"""Fan independent jobs out over local processes or a Ray cluster; results come back to the caller.

    >>> from adlens.ray_pool import fan_out
    >>> for done in fan_out(work, [(0,), (1,), (2,)], backend="ray", address="auto"):
    ...     save(done.idx, done.result)          # the driver writes; done.worker says who ran it

One call, two backends:
    local  `workers` processes on this machine (concurrent.futures).
    ray    one Ray task per job, its resources declared (`cpus`, a `gpus` fraction). `address`:
           "local" starts a private Ray instance of `workers` CPUs and stops it at the end;
           "auto" joins the running cluster (RAY_ADDRESS or `ray start --head` on this machine);
           "HOST:PORT" joins that cluster's head. An address nothing answers on is a `UserError`
           before any work starts.
A job that raises, or whose worker dies, is run again up to `max_retries` times; jobs that still
fail are reported together (`JobsFailed`) once every other job has finished. Ctrl-C cancels the
jobs in flight, stops the workers and a Ray instance this call started, and re-raises; iterate
under `contextlib.closing(fan_out(...))` so that an exception in the caller's loop does the same at
once. Local workers ignore Ctrl-C (the caller stops them) and exit by themselves when the caller
dies, `kill -9` included.

Timing: `exclusive=True` reserves a whole node's CPUs for each job (the largest node's, so one job
per node), for jobs that time a baseline and a variant back to back on the same worker; a speedup
is never a ratio of times measured on different workers. Without it jobs pack as densely as the
resources allow, and their timings are shared-load (`Done.shared_load`). Every result records the
worker that produced it (`Done.worker`: backend, host, pid, and the Ray node's id and address).

Job functions must be importable by name (defined at the top level of a module or a script);
Ray workers on this machine see the caller's `sys.path`, workers on other machines get the code's
folder shipped as the job's working directory (large data folders excluded).
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adlens.errors import ConfigError, UserError

BACKENDS = ("local", "ray")
SHIP_EXCLUDES = [".git/", "data/", "runs/", "figs/", "**/__pycache__/", "*.npz", "*.tmp"]  # never uploaded to a remote cluster
CONNECT_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies
ORPHAN_POLL_S = 0.5


class JobsFailed(UserError):
    """Some jobs failed after every retry; the others finished and were handed back."""


@dataclass
class Done:
    """One finished job: its index in the job list, what it returned, and who ran it."""

    idx: int
    result: Any
    worker: dict = field(default_factory=dict)  # backend, host, pid; node_id, node_ip (ray); attempts (local)
    shared_load: bool = True  # other jobs may have run beside it on the same node


def _worker_info(backend: str) -> dict:
    info = {"backend": backend, "host": socket.gethostname(), "pid": os.getpid()}
    if backend == "ray":
        import ray

        info["node_id"] = ray.get_runtime_context().get_node_id()
        info["node_ip"] = ray.util.get_node_ip_address()
    return info


def _fn_ref(fn: Callable) -> tuple[str, str, str]:
    """(module name, qualified name, folder the module's top package lives in) of a top-level function."""
    module = fn.__module__
    if "<locals>" in fn.__qualname__ or "<lambda>" in fn.__qualname__:
        raise ValueError(f"job function {fn.__qualname__} must be defined at the top level of a module")
    mod = sys.modules[module]
    if module == "__main__":  # a script: its workers import it under its file name
        path = Path(mod.__file__).resolve()
        return path.stem, fn.__qualname__, str(path.parent)
    top = sys.modules[module.split(".")[0]]
    top_file = Path(top.__file__).resolve()
    root = top_file.parent.parent if top_file.name == "__init__.py" else top_file.parent
    return module, fn.__qualname__, str(root)


def _call(ref: tuple[str, str, str], paths: list[str], args: tuple, backend: str):
    """Runs in a worker: import the job function by name, call it, say who ran it."""
    for p in reversed([ref[2], *paths]):
        if p not in sys.path and os.path.isdir(p):
            sys.path.insert(0, p)
    fn = importlib.import_module(ref[0])
    for part in ref[1].split("."):
        fn = getattr(fn, part)
    return fn(*args), _worker_info(backend)


def _local_call(fn: Callable, args: tuple):
    return fn(*args), _worker_info("local")


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os._exit(1)


def _local_worker_init(caller: int) -> None:
    """Runs first in every local worker. Ctrl-C, which a terminal sends to every process of the
    group, is left to the caller, which stops the workers. A worker never outlives its parent: on
    Linux the kernel kills it when the parent dies (prctl PR_SET_PDEATHSIG), elsewhere a thread sees
    that it was handed to another parent and exits within `ORPHAN_POLL_S`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent != caller and not _pid_alive(caller):  # the caller died before this ran
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_address(address: str) -> None:
    """Raise `UserError` unless `address` is "local", "auto" or a HOST:PORT that accepts a connection."""
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address in ("local", "auto"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address must be local, auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head` or fix --ray-address") from None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs Ray: pip install -r requirements-ray.txt") from None
    return ray


def start_ray(address: str, num_cpus: int, code_dir: str | None = None) -> bool:
    """Connect to Ray (or start a private local instance); returns whether this call started it.
    A session that is already connected is reused as it is."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    check_address(address)
    quiet = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, **quiet)  # not RAY_ADDRESS's cluster
    else:
        runtime_env = {"working_dir": code_dir, "excludes": SHIP_EXCLUDES} if code_dir else None
        try:
            ray.init(address=address, runtime_env=runtime_env, **quiet)
        except ConnectionError as e:
            hint = "" if os.environ.get("RAY_AUTH_MODE") else " (a cluster with token authentication needs RAY_AUTH_MODE=token here too)"
            raise UserError(f"cannot join a Ray cluster at {address!r}: {str(e).splitlines()[0]}{hint}") from None
    return True


@contextmanager
def backend_session(backend: str, address: str = "local", workers: int = 1, fn: Callable | None = None):
    """Hold one Ray connection across several `fan_out` calls (and fail on a bad address before any
    output is written); shut it down on exit, Ctrl-C included, if this call started it. The local
    backend needs no session: a no-op."""
    check_workers(backend, address, workers)
    started = backend == "ray" and start_ray(address, workers, _fn_ref(fn)[2] if fn else None)
    try:
        yield
    finally:
        if started:
            _import_ray().shutdown()


def check_workers(backend: str, address: str, workers: int) -> None:
    """Refuse a backend name no one can mean and, on this machine (local processes or a private Ray
    instance), more workers than 4x its cores; a cluster (`--ray-address auto|HOST:PORT`) sizes itself."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    cores = os.cpu_count() or 1
    if (backend == "local" or address == "local") and workers > 4 * cores:
        raise UserError(f"--workers {workers} on this machine is more than 4x its {cores} cores; "
                        "lower --workers, or use --backend ray --ray-address auto for a cluster")


def _largest_node_cpus(ray) -> float:
    return max(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"])


def fan_out(
    fn: Callable,
    jobs: Sequence[tuple],
    backend: str = "local",
    workers: int = 1,
    address: str = "local",
    cpus: float = 1.0,
    gpus: float = 0.0,
    exclusive: bool = False,
    max_retries: int = 2,
    desc: str = "jobs",
    progress: bool = True,
) -> Iterator[Done]:
    """Run fn(*job) for every job; yield a `Done` per job as each finishes (in completion order).

    backend     : local (a pool of `workers` processes) | ray
    address     : ray only; local | auto | HOST:PORT (see the module docstring)
    cpus, gpus  : ray only; resources each job holds (gpus may be a fraction, e.g. 0.25)
    exclusive   : each job holds a whole node's CPUs (timed jobs); locally, one job at a time
    max_retries : extra attempts for a job that raised or whose worker died
    Raises `JobsFailed` after the other jobs finished if any job failed every attempt.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if workers < 1 or max_retries < 0 or cpus <= 0 or gpus < 0:
        raise ConfigError(f"need workers >= 1, max_retries >= 0, cpus > 0, gpus >= 0; got {workers}, {max_retries}, {cpus}, {gpus}")
    if not jobs:
        return
    runner = _run_ray if backend == "ray" else _run_local
    failures: list[str] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress)
    try:
        yield from runner(fn, list(jobs), workers, address, cpus, gpus, exclusive, max_retries, bar, failures)
    finally:
        bar.close()
    if failures:
        shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
        raise JobsFailed(f"{len(failures)} of {len(jobs)} {desc} jobs failed after {max_retries + 1} attempts: {shown}")


def _describe(idx: int, err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err  # a RayTaskError wraps the job's own exception
    msg = str(cause).strip().splitlines()
    return f"job {idx}: {type(cause).__name__}: {msg[-1] if msg else ''}"


def _run_local(fn, jobs, workers, address, cpus, gpus, exclusive, max_retries, bar, failures) -> Iterator[Done]:
    n_workers = 1 if exclusive else workers
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=n_workers, initializer=_local_worker_init, initargs=(os.getpid(),))
    attempts = dict.fromkeys(range(len(jobs)), 1)
    pending = {}
    try:  # the workers start with the first submit: a Ctrl-C from then on must stop them
        for i, job in enumerate(jobs):
            pending[pool.submit(_local_call, fn, job)] = i
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                try:
                    result, info = fut.result()
                except Exception as e:  # the job raised: try again, or report it at the end
                    if attempts[i] <= max_retries and not isinstance(e, BrokenProcessPool):
                        attempts[i] += 1
                        pending[pool.submit(_local_call, fn, jobs[i])] = i
                    else:
                        failures.append(_describe(i, e))
                        bar.update()
                    continue
                bar.update()
                yield Done(i, result, info | {"attempts": attempts[i]}, shared_load=n_workers > 1)
    except BaseException:
        for fut in pending:
            fut.cancel()
        # a job in flight is not waited for; a worker that a Ctrl-C caught half registered (started, not yet
        # in the pool's table) is stopped too, or the interpreter would wait for it at exit
        ours = set((getattr(pool, "_processes", None) or {}).values()) | (set(multiprocessing.active_children()) - others)
        for proc in ours:
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(fn, jobs, workers, address, cpus, gpus, exclusive, max_retries, bar, failures) -> Iterator[Done]:
    ref = _fn_ref(fn)
    started = start_ray(address, workers, ref[2])
    ray = _import_ray()
    try:
        need_cpus = _largest_node_cpus(ray) if exclusive else cpus
        task = ray.remote(_call).options(num_cpus=need_cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=True)
        paths = [p for p in sys.path if p] if address == "local" else []
        pending = {task.remote(ref, paths, job, "ray"): i for i, job in enumerate(jobs)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # wakes up for Ctrl-C
                for obj in ready:
                    i = pending.pop(obj)
                    try:
                        result, info = ray.get(obj)
                    except Exception as e:  # every attempt failed (Ray retried it max_retries times)
                        failures.append(_describe(i, e))
                        bar.update()
                        continue
                    bar.update()
                    yield Done(i, result, info, shared_load=not exclusive)
        except BaseException:
            for obj in pending:
                ray.cancel(obj, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
