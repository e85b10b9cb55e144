"""The runnable Python examples of ATTENTION_ANALYSIS_README.md, executed so that they cannot rot.

    OMP_NUM_THREADS=1 python -m pytest tests/test_guide_examples.py -q

A ```python block that directly follows an `<!-- test -->` comment is runnable. Each one runs in a
fresh namespace with the repository root as working directory and on sys.path, compiled with the
guide's line numbers so a failure points at the guide. Shell commands in the guide are checked by
tests/test_oneclick.py.
"""

from __future__ import annotations

import re
import sys
import tempfile
import types
from pathlib import Path

import pytest

from adlens.compression import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "ATTENTION_ANALYSIS_README.md"
RUNNABLE = re.compile(r"<!-- test -->[ \t]*\n```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def runnable_blocks() -> list[tuple[int, str]]:
    """(first line of the code in the guide, code) of every runnable block."""
    text = GUIDE.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in RUNNABLE.finditer(text)]


def test_key_examples_are_marked_runnable():
    blocks = [code for _, code in runnable_blocks()]
    assert any("nn.TransformerEncoder(" in c and "capture_attention(" in c for c in blocks), "TransformerEncoder capture"
    assert any("STRATEGIES[" in c and "make_compression(" in c and ".plan(" in c for c in blocks), "add-a-strategy"
    assert "<!-- adapter -->" in GUIDE.read_text(), "own model: the adapter example (run by tests/test_adapter.py)"


def test_every_test_marker_precedes_a_python_block():
    markers = re.findall(r"^<!-- test -->[ \t]*$", GUIDE.read_text(), flags=re.MULTILINE)
    assert len(markers) == len(runnable_blocks())


@pytest.mark.parametrize("line, code", runnable_blocks(), ids=[f"line{n}" for n, _ in runnable_blocks()])
def test_guide_example_runs(line, code, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    # the examples' temporary folders land in pytest's tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # a fresh module per example: dataclasses and pickling look classes up in sys.modules
    module = types.ModuleType(f"guide_example_line{line}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    registry = dict(STRATEGIES)
    try:
        # pad with newlines so tracebacks give the line number in the guide; no inherited __future__ flags
        code_obj = compile("\n" * (line - 1) + code, str(GUIDE), "exec", dont_inherit=True)
        exec(code_obj, module.__dict__)  # noqa: S102 -- running the guide's own examples is the point
    finally:
        leaked = set(STRATEGIES) - set(registry)
        STRATEGIES.clear()
        STRATEGIES.update(registry)
    assert not leaked, f"the example at line {line} left {sorted(leaked)} in STRATEGIES"
