"""The one-click pipeline on a tiny model, and the documentation's commands against the scripts' flags."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import run_attention_analysis
from conftest import refused, save_tiny_checkpoint, script_help

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "ATTENTION_ANALYSIS_README.md", "EXPERIMENTS.md"]  # EXPERIMENTS.md: the commands behind the numbers


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Context 30 (not the shared 20) and the row + column grid embedding of the default model."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", max_context=30, grid_size=3)


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
    assert (doc["schema"], doc["schema_version"]) == ("ad-compression-recommendation", 1) and doc["seeds"] == [0, 1] and doc["candidates"]
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
    assert (metrics["schema"], metrics["schema_version"]) == ("ad-attention-metrics", 1)
    results = json.loads((out / "compression_results.json").read_text())
    assert (results["schema"], results["schema_version"]) == ("ad-compression-results", 2) and results["rows"]
    assert metrics["tasks"]["n"] == 2 and len(metrics["tasks"]["per_task"]["recent_share"]) == 2
    assert res["recommendation"] == doc
    printed = capsys.readouterr().out
    assert "Recommended:" in printed and str(out) in printed
    _rerun_removes_stale_outputs_and_nothing_else(tiny_checkpoint, out, cap)


def test_one_click_refuses_a_missing_checkpoint_before_any_output(capsys, tmp_path):
    line = refused(capsys, run_attention_analysis.main, ["--checkpoint", str(tmp_path / "none.pt")], tmp_path / "x")
    assert "checkpoint not found" in line


def _rerun_removes_stale_outputs_and_nothing_else(checkpoint, out, cap):
    """A rerun into the same folder (here with --skip-compression and --task) replaces the previous
    run's files (those its manifest.json lists, here with one an interrupted run left), keeps a file
    it did not write, and never leaves outputs of two runs side by side."""
    first = json.loads((out / "manifest.json").read_text())
    assert first["schema"] == "adlens-output-manifest" and first["status"] == "complete"
    assert sorted(first["files"]) == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    (out / "attention_heatmap_step99999.png").write_bytes(b"stale")
    first["files"].append("attention_heatmap_step99999.png")
    (out / "manifest.json").write_text(json.dumps(first | {"status": "running"}))
    (out / "my_notes.txt").write_text("not the toolkit's")
    run_attention_analysis.main(["--checkpoint", str(checkpoint), "--out", str(out), "--capture-out", str(cap), "--skip-compression",
                                 "--eval-timesteps", "10", "--task", "1"])  # fmt: skip
    assert torch.load(cap / "capture.pt", weights_only=True)["query_attn"].shape[0] == 1  # --task: one task
    assert not (out / "compression_results.json").exists()  # the first run's, not written by this one
    second = json.loads((out / "manifest.json").read_text())
    assert second["status"] == "complete" and "attention_heatmap_step99999.png" not in second["files"]
    assert (out / "my_notes.txt").read_text() == "not the toolkit's"
    assert sorted(p.name for p in out.iterdir()) == sorted(second["files"] + ["manifest.json", "my_notes.txt"])


def _doc_commands():
    """Every `python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...` in the docs: each line of their
    shell code blocks, and each inline `code span` of the prose (which may wrap onto a second line)."""
    command = re.compile(r"(?:python|torchrun[^.]*?)\s+((?:[\w/]+)\.py)(.*)")
    cmds = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        lines = []
        for lang, block in re.findall(r"^```(\w*)[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
            if lang in ("", "bash", "sh", "console"):
                lines += [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        lines += [span.replace("\n", " ") for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose)]
        for line in lines:
            m = command.search(line)
            if m and not line.startswith("pip") and m.group(1) != "SCRIPT.py":  # SCRIPT.py: a placeholder
                # "path/to/toolkit/X.py": a toolkit script run from the user's own codebase
                cmds.append((doc, m.group(1).removeprefix("path/to/toolkit/"), shlex.split(m.group(2))))
    return cmds


def test_docs_exist_and_have_commands():
    cmds = _doc_commands()
    scripts = {c[1] for c in cmds}
    for s in ("run_attention_analysis.py", "collect.py", "train.py", "evaluate.py", "compression_template.py", "analyze_attention.py"):
        assert s in scripts, f"{s} is not shown in the docs"


@pytest.mark.parametrize("doc, script, args", _doc_commands() if all((ROOT / d).exists() for d in DOCS) else [])
def test_doc_command_flags_exist(doc, script, args):
    """Each documented command names a script that exists and only flags that script accepts."""
    path = ROOT / script
    assert path.is_file(), f"{doc}: {script} does not exist"
    text = script_help(script)
    for a in args:
        if a.startswith("--"):
            flag = a.split("=")[0]
            assert re.search(rf"{re.escape(flag)}\b", text), f"{doc}: {script} has no flag {flag}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_doc_links_point_at_files_and_headings_that_exist(doc):
    """A link such as [x](EXPERIMENTS.md#rollout-speed) or [x](#7-files) names a file and a heading that exist."""
    text = (ROOT / doc).read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path = ROOT / (target or doc)
        assert path.exists(), f"{doc}: link to missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc}: no heading for #{anchor} in {path.name}"
