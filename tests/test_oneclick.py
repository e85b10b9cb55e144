"""The one-click pipeline on a tiny model, and the documentation's commands against the scripts' flags."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_attention_analysis
from env import get_spec
from model import ADConfig, ADTransformer
from model.checkpoint import save_atomic

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "ATTENTION_ANALYSIS_README.md"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2})
    model = ADTransformer(
        ADConfig(n_states=9, n_actions=5, horizon=5, max_context=30, n_layer=2, n_head=2, d_model=16, dropout=0.0, grid_size=3)
    )
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_atomic(
        {"model": model.state_dict(), "config": {"model": model.cfg.to_dict(), "env": spec.to_dict(), "train": {}}, "step": 0}, path
    )
    return path


def test_one_click_pipeline_writes_every_output(tiny_checkpoint, tmp_path, capsys):
    out, cap = tmp_path / "figs", tmp_path / "cap"
    res = run_attention_analysis.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--capture-out", str(cap), "--device", "cpu",
                                       "--check-episodes", "12", "--check-seeds", "2", "--threads", "1"])  # fmt: skip
    saved = torch.load(cap / "capture.pt", weights_only=True)
    assert saved["version"] == 2 and saved["query_attn"].shape[0] == 2  # both held-out tasks of the tiny split, together
    assert saved["query_attn"].shape[1] == 60  # twice the context (30), in whole episodes
    for name in ("attention_analysis_comprehensive.png", "compression_recommendations.txt", "layer_head_analysis.png",
                 "attention_metrics.json", "compression_results.json", "analysis_config.json", "recommendation.json"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list(out.glob("attention_heatmap_step*.png"))) >= 1
    doc = json.loads((out / "recommendation.json").read_text())
    assert doc["schema"] == "ad-compression-recommendation" and doc["seeds"] == [0, 1] and doc["candidates"]
    for row in doc["candidates"]:  # every candidate measured against no compression, paired per seed
        assert row["engine"] == "kv" and len(row["time_full_s"]) == len(row["time_compressed_s"]) == 2 and row["ratio"] < 1
    if doc["strategy"] == "none":
        assert all(r["speedup"] <= 1.0 or r["performance_loss"] > 0.05 or not r["shortens_context"] for r in doc["candidates"])
        assert doc["rerun_best"]["engine"] == "rerun"
    else:
        assert doc["measured_speedup"] > 1.0 and doc["measured_performance_loss"] <= 0.05
    assert doc["attention_only_suggestion"]["strategy"] in ("fixed_window", "topk", "pooling", "sink_window")
    text = (out / "compression_recommendations.txt").read_text()
    assert text.rstrip().splitlines()[-1].startswith(("Recommended:", "What would pay", "Estimate from"))
    assert "Measured verdict" in text
    metrics = json.loads((out / "attention_metrics.json").read_text())
    assert metrics["tasks"]["n"] == 2 and len(metrics["tasks"]["per_task"]["recent_share"]) == 2
    assert res["recommendation"] == doc
    printed = capsys.readouterr().out
    assert "Recommended:" in printed and str(out) in printed


def test_one_click_skip_compression_and_bad_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "figs"
    run_attention_analysis.main(
        ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--capture-out", str(tmp_path / "c"), "--skip-compression", "--task", "1"]
    )
    assert torch.load(tmp_path / "c" / "capture.pt", weights_only=True)["query_attn"].shape[0] == 1  # --task: one task
    assert (out / "attention_metrics.json").is_file() and not (out / "compression_results.json").exists()
    _rerun_removes_stale_outputs_and_nothing_else(tiny_checkpoint, out, tmp_path / "c")
    r = subprocess.run([sys.executable, str(ROOT / "run_attention_analysis.py"), "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and not (tmp_path / "x").exists()


def _rerun_removes_stale_outputs_and_nothing_else(checkpoint, out, cap):
    """A rerun into the same folder replaces the previous run's files (those its manifest.json
    lists, here with one an interrupted run left), keeps a file it did not write, and never leaves
    outputs of two runs side by side."""
    first = json.loads((out / "manifest.json").read_text())
    assert first["schema"] == "adlens-output-manifest" and first["status"] == "complete"
    assert sorted(first["files"]) == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    (out / "attention_heatmap_step99999.png").write_bytes(b"stale")
    first["files"].append("attention_heatmap_step99999.png")
    (out / "manifest.json").write_text(json.dumps(first | {"status": "running"}))
    (out / "my_notes.txt").write_text("not the toolkit's")
    run_attention_analysis.main(["--checkpoint", str(checkpoint), "--out", str(out), "--capture-out", str(cap), "--skip-compression",
                                 "--eval-timesteps", "10"])  # fmt: skip
    second = json.loads((out / "manifest.json").read_text())
    assert second["status"] == "complete" and "attention_heatmap_step99999.png" not in second["files"]
    assert (out / "my_notes.txt").read_text() == "not the toolkit's"
    assert sorted(p.name for p in out.iterdir()) == sorted(second["files"] + ["manifest.json", "my_notes.txt"])


def _doc_commands():
    """Every `python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...` line in the docs' code blocks."""
    cmds = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for lang, block in re.findall(r"^```(\w*)[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#")[0].strip()
                m = re.search(r"(?:python|torchrun[^.]*?)\s+((?:[\w/]+)\.py)(.*)", line)
                if m and not line.startswith("pip"):
                    # "path/to/toolkit/X.py": a toolkit script run from the user's own codebase
                    cmds.append((doc, m.group(1).removeprefix("path/to/toolkit/"), shlex.split(m.group(2))))
    return cmds


def test_docs_exist_and_have_commands():
    cmds = _doc_commands()
    scripts = {c[1] for c in cmds}
    for s in ("run_attention_analysis.py", "collect.py", "train.py", "evaluate.py", "compression_template.py", "analyze_attention.py"):
        assert s in scripts, f"{s} is not shown in the docs"


_HELP: dict = {}


@pytest.mark.parametrize("doc, script, args", _doc_commands() if all((ROOT / d).exists() for d in DOCS) else [])
def test_doc_command_flags_exist(doc, script, args):
    """Each documented command names a script that exists and only flags that script accepts."""
    path = ROOT / script
    assert path.is_file(), f"{doc}: {script} does not exist"
    if script not in _HELP:
        r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        _HELP[script] = r.stdout
    for a in args:
        if a.startswith("--"):
            flag = a.split("=")[0]
            assert re.search(rf"{re.escape(flag)}\b", _HELP[script]), f"{doc}: {script} has no flag {flag}"
