"""Writing results: `staged_output` publishes a folder of results so that a failure part-way leaves
nothing half-written, `write_json_atomic` does the same for one file, and `stamp` names the layout of
every JSON result the tools write.

    write_json_atomic(out / "eval_results.json", stamp("ad-eval-results", results))
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

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
}


def stamp(schema: str, doc: dict) -> dict:
    """`doc` with `"schema"` and `"schema_version"` first (replacing any it had), for a JSON result."""
    body = {k: v for k, v in doc.items() if k not in ("schema", "schema_version")}
    return {"schema": schema, "schema_version": SCHEMAS[schema], **body}


@contextmanager
def staged_output(out_dir: str | Path):
    """Yield a temporary folder beside `out_dir`; on success move each file into `out_dir`
    (one atomic rename per file, replacing older results of the same name), always remove the
    temporary folder. On an exception nothing is moved."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
