"""Writing results safely: `atomic_path` and `write_json_atomic` replace one file, `staged_output`
publishes a folder of results, so that a failure part-way leaves nothing half-written. Temporary
names are unique (two processes writing the same folder never share one) and short (a valid output
name never makes a temporary name too long): `.NAME.XXXXXXXX.tmp`, NAME cut to `TMP_NAME_CHARS`."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adlens.errors import UserError

TMP_NAME_CHARS = 40  # of the output's name kept in its temporary name (a file name may have 255 bytes)


def _tmp_prefix(name: str) -> str:
    return f".{name[:TMP_NAME_CHARS]}."


def _default_mode() -> int:
    """The permissions a plain `open(path, "w")` would give (mkstemp makes files readable by the owner only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a uniquely named temporary file beside `path` to write; on success rename it to `path`
    (a reader never sees half a file), on an exception remove it.

        >>> with atomic_path("out/model.pt") as tmp:
        ...     torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _default_mode())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path, names) -> list[Path]:
    """Remove the temporary files that writes of `names` (file names or glob patterns) into `folder`
    left behind when a process was killed; returns what was removed. Call it only while no other
    process writes those names there (e.g. under `lock_folder`)."""
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f"{_tmp_prefix(name)}????????.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


@contextmanager
def lock_folder(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for one writer at a time; a second
    process asking for it gets a `UserError` at once. The lock dies with its process, kill -9 included."""
    import fcntl  # POSIX only, like the rest of the process handling

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another {what} is writing to {folder}; wait for it to finish or choose another output folder") from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def staged_output(out_dir: str | Path):
    """Yield a temporary folder beside `out_dir`; on success move each file into `out_dir`
    (one atomic rename per file, replacing older results of the same name), always remove the
    temporary folder. On an exception nothing is moved."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_dir.name), suffix=".tmp", dir=out_dir.parent))
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        for f in sorted(stage.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write `obj` as JSON through a uniquely named temporary file in the same folder, then rename:
    a reader never sees half a file, and two writers never share a temporary name."""
    import json

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
    return path


def provenance() -> dict:
    """Where a result came from: commit, UTC date, machine (CPU, core count, accelerator) and versions."""
    import torch

    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
