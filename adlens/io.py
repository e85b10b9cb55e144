"""Writing results safely: `atomic_path` and `write_json_atomic` replace one file, `staged_output`
publishes a folder of results, so that a failure part-way leaves nothing half-written, and `stamp`
names the layout of every JSON result the tools write. Temporary names are unique (two processes
writing the same folder never share one) and short (a valid output name never makes a temporary
name too long): `.NAME.XXXXXXXX.tmp`, NAME cut to `TMP_NAME_CHARS`.

    write_json_atomic(out / "eval_results.json", stamp("ad-eval-results", results))

Reading a file the user named: `load_torch_file` (torch.load that cannot run code, one-line errors).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adlens.errors import UserError

# Every JSON result the tools write: schema name -> version of its layout. A reader checks the name
# and accepts the versions it knows; a change of layout (a key renamed, removed or re-meant) bumps
# the version. Files written before the stamp carried "version" (and "format" for attention metrics)
# or nothing.
SCHEMAS = {
    "ad-eval-results": 1,  # evaluate.py: eval_results.json
    "ad-capture-returns": 1,  # evaluate_with_attention.py: returns.json
    "ad-attention-metrics": 1,  # analyze_attention.py: attention_metrics.json
    "ad-compression-results": 2,  # compression_template.py, run_attention_analysis.py: compression_results.json
    "ad-compression-recommendation": 1,  # run_attention_analysis.py: recommendation.json
    "ad-training-progression": 1,  # training_progression.py: training_progression.json
    "ad-benchmark-inference-speed": 1,  # benchmarks/inference_speed.py --out
    "ad-benchmark-compile-step": 1,  # benchmarks/compile_step.py --out
    "ad-benchmark-train-step": 1,  # benchmarks/train_step.py --out
    "ad-benchmark-compaction-cost": 1,  # benchmarks/compaction_cost.py --out
    "ad-benchmark-step-attention": 1,  # benchmarks/step_attention.py --out
    "ad-benchmark-step-commits": 1,  # benchmarks/step_commits.py --out
    "ad-benchmark-device-rollout": 1,  # benchmarks/device_rollout.py --out
    "adlens-output-manifest": 1,  # the one-click and the analysis scripts: OUT/manifest.json
    "adlens-results": 1,  # benchmarks/regenerate.py: results/NAME.json, the numbers the docs' tables show
}


def stamp(schema: str, doc: dict) -> dict:
    """`doc` with `"schema"` and `"schema_version"` first (replacing any it had), for a JSON result."""
    body = {k: v for k, v in doc.items() if k not in ("schema", "schema_version")}
    return {"schema": schema, "schema_version": SCHEMAS[schema], **body}


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
def staged_output(out_dir: str | Path, manifest: OutputManifest | None = None):
    """Yield a temporary folder beside `out_dir`; on success move each file into `out_dir`
    (one atomic rename per file, replacing older results of the same name), always remove the
    temporary folder. On an exception nothing is moved. With a `manifest`, the files are listed in
    it before the first one moves."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_dir.name), suffix=".tmp", dir=out_dir.parent))
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        files = sorted(stage.iterdir())
        if manifest is not None:
            manifest.add(f.name for f in files)
        for f in files:
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "adlens-output-manifest"


def _listed_name(name) -> bool:
    """A name a manifest may list: a plain file directly in the output folder, never a path."""
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST_NAME) and "/" not in name and "\\" not in name


class OutputManifest:
    """The files one run wrote into its output folder, kept in OUT/manifest.json.

        >>> manifest = OutputManifest("figs/attention_analysis", "run_attention_analysis.py")
        >>> manifest.start()                        # removes the previous run's files, nothing else
        >>> with staged_output(out, manifest) as stage: ...
        >>> manifest.finish()

    `start` removes exactly the files the previous manifest lists (so a folder shared with other
    files, `--out .` included, is safe) and writes this run's manifest, status "running". Files are
    listed before they are written, so a run killed at any moment leaves a manifest that covers
    everything it wrote, and the next run removes it all: the folder never holds a mix of two runs'
    outputs. `finish` sets status "complete".
    """

    def __init__(self, out_dir: str | Path, producer: str):
        self.out_dir, self.producer = Path(out_dir), producer
        self.path = self.out_dir / MANIFEST_NAME
        self.files: list[str] = []

    def previous(self) -> list[str]:
        """The names the manifest already in the folder lists ([] if there is none)."""
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA or not isinstance(doc.get("files"), list):
            raise UserError(f"{self.path} exists and is not this toolkit's output manifest; choose another output folder or remove it")
        return [n for n in doc["files"] if _listed_name(n)]

    def start(self) -> list[str]:
        """Remove the previous run's files (regular files only) and list this run as running; returns the removed names."""
        removed = []
        for name in self.previous():
            path = self.out_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(name)
        self._write("running")
        return removed

    def add(self, names) -> None:
        """List `names` (plain file names in the folder) as this run's, before they are written."""
        new = [n for n in names if n not in self.files]
        bad = [n for n in new if not _listed_name(n)]
        if bad:
            raise ValueError(f"a manifest lists plain file names in its folder, got {bad}")
        if new:
            self.files += new
            self._write("running")

    def finish(self) -> None:
        self._write("complete")

    def _write(self, status: str) -> None:
        write_json_atomic(self.path, stamp(MANIFEST_SCHEMA, {"producer": self.producer, "status": status, "files": self.files}))


def finish_result(schema: str, result: dict, out: str | Path | None) -> dict:
    """A benchmark's result `stamp`ed with where it came from (`provenance`), written to `out` if given."""
    result = stamp(schema, result | {"provenance": provenance()})
    if out:
        write_json_atomic(out, result)
    return result


def load_torch_file(path: Path, what: str, if_missing: str):
    """`torch.load(path, weights_only=True)` on the CPU (it cannot run code). A missing, empty or
    unreadable file is a one-line `UserError` naming `what` ("checkpoint", "capture file"); a missing
    one also says `if_missing` (how to make it)."""
    import torch

    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({if_missing})")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        why = "it holds objects other than tensors and plain data" if "weights_only" in str(e) else str(e).splitlines()[0][:160]
        raise UserError(f"cannot read {what} {path}: {why}") from None


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write `obj` as JSON through a uniquely named temporary file in the same folder, then rename:
    a reader never sees half a file, and two writers never share a temporary name."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
    return path


def _cpu_model() -> dict:
    """What kind of CPU (Linux: /proc/cpuinfo and sysfs; empty elsewhere): the same step differs 4x in
    speed between two x86_64 machines with 2 cores, so speed results record which one they ran on."""
    out = {}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        for key, name in (("model name", "cpu_model"), ("cpu family", "cpu_family"), ("model", "cpu_model_number")):
            if key in fields:
                out[name] = fields[key]
        for index, name in (("index2", "l2_cache"), ("index3", "l3_cache")):
            size = Path(f"/sys/devices/system/cpu/cpu0/cache/{index}/size")
            if size.exists():
                out[name] = size.read_text().strip()
    except (OSError, ValueError):
        pass
    return out


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
            **_cpu_model(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
