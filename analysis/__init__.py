"""Attention analysis for AD models: the capture file format, pure metrics and plot functions.

    python analyze_attention.py --capture runs/attention/capture.pt --out figs/attention_analysis

`capture_file` reads and writes captures, `metrics` turns them into numbers (no plotting), `plots`
turns those numbers into figures. `staged_output` lets a script publish a folder of results so that
a failure part-way leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from analysis.capture_file import load_capture, save_capture

__all__ = ["load_capture", "save_capture", "staged_output"]


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
