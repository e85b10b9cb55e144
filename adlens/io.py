"""Writing results safely: `staged_output` publishes a folder of results so that a failure part-way
leaves nothing half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path



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
