"""The results harness, benchmarks/regenerate.py: the docs' marked tables are what the committed
results files render (a number edited by hand, or a results file changed without --render, fails
here), every registry command is accepted by its script, and extraction works on small outputs."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from adlens.errors import UserError
from benchmarks import regenerate as R
from conftest import script_help

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("doc", R.DOCS)
def test_marked_tables_match_results(doc):
    text = (ROOT / doc).read_text()
    assert "<!-- results:" in text, f"{doc} has no generated table"
    assert R.render_text(text) == text, f"{doc}: a marked table differs from results/; run `python benchmarks/regenerate.py --render`"


def test_every_table_is_shown_and_every_table_input_is_registered():
    shown = "".join((ROOT / d).read_text() for d in R.DOCS)
    for name, (needs, _) in R.TABLES.items():
        assert f"<!-- results:{name} -->" in shown, f"table {name} appears in no doc"
        assert set(needs) <= set(R.REGISTRY), f"table {name} reads an unregistered result"


def test_results_files_match_the_registry():
    """Each committed results file was written by its registry entry as it stands (same command and seeds)."""
    for path in sorted((ROOT / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        entry = R.REGISTRY.get(path.stem)
        assert entry is not None, f"{path.name} has no registry entry"
        assert doc["schema"] == R.SCHEMA and doc["name"] == entry.name
        assert (doc["command"], doc["seeds"]) == (entry.shell(doc["threads"]), list(entry.seeds)), f"{path.name}: regenerate it"


def test_registry_commands_pass_their_scripts_argparse():
    by_script = {}
    for e in R.REGISTRY.values():
        by_script.setdefault((ROOT / e.cwd / e.script).resolve(), []).append(e)
    for script, entries in by_script.items():
        text = script_help(script)
        for e in entries:
            for flag in (a for a in e.command(threads=1) if a.startswith("--")):
                assert f"{flag} " in text or f"{flag}\n" in text or f"{flag}," in text, f"{e.name}: {script} has no {flag}"


def _tiny_eval(path: Path) -> dict:
    """An eval_results.json of 2 goals x 2 seeds x 50 episodes; goal 1 with seed 1 never finds the goal."""
    ramp = np.minimum(np.arange(50) / 10, 1.0)  # normalised return per episode, 0 -> 1
    per_task = []
    for g, optimal in enumerate((10.0, 20.0)):
        runs = np.stack([optimal * ramp, optimal * ramp * (g == 0)])  # (seeds, episodes)
        per_task.append(
            {"task": {"goal": [g, g]}, "optimal_return": optimal, "returns": runs.mean(0).tolist(), "returns_per_seed": runs.tolist()}
        )
    norm = np.mean([np.asarray(t["returns"]) / t["optimal_return"] for t in per_task], 0)
    doc = {"schema": "ad-eval-results", "schema_version": 1, "episodes": 50, "seeds": [0, 1], "per_task": per_task,
           "normalized_return_per_episode": norm.tolist(), "return_per_episode": np.mean([t["returns"] for t in per_task], 0).tolist()}  # fmt: skip
    path.write_text(json.dumps(doc))
    return doc


def test_entry_from_output_writes_stamped_numbers(tmp_path):
    out = tmp_path / "eval_results.json"
    _tiny_eval(out)
    entry = R.Result(
        "tiny",
        "a tiny evaluation",
        "evaluate.py",
        ("--num-seeds", "2"),
        (0, 1),
        (str(out),),
        R.eval_numbers,
        minutes=0.1,
        takes_threads=False,
    )
    path = R.run_entry(entry, threads=None, from_output=True, note="synthetic", results_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert (doc["schema"], doc["name"], doc["seeds"], doc["ran_now"], doc["note"]) == ("adlens-results", "tiny", [0, 1], False, "synthetic")
    assert doc["command"] == "python evaluate.py --num-seeds 2" and doc["provenance"]["torch"]
    machine = doc["provenance"]["machine"]
    assert machine["cores"] >= 1 and machine["torch_cpu_capability"]
    if Path("/proc/cpuinfo").exists():  # which CPU: speed results differ 4x between two 2-core x86_64 machines
        assert machine["cpu_model"] and R._machine(doc).startswith(machine["cpu_model"])
    assert R._machine({"provenance": {"machine": {"cpu": "x86_64", "cores": 2}}}) == ""  # an older results file
    n = doc["numbers"]
    assert (n["runs_finding_goal"], n["runs"]) == (3, 4)
    assert n["first_episode"] == 0.0 and n["last_10"] == pytest.approx(0.75)  # goal 1 scores half: one of its seeds never finds it
    assert n["weakest_goal_31_50"] == pytest.approx(0.5)
    # per-seed means over the goals: 1.0 and 0.5, so a standard error of 0.25; one run earns nothing late
    assert n["se_31_50"] == pytest.approx(0.25) and n["runs_missing_goal_31_50"] == 1

    wrong = R.Result("tiny", "", "evaluate.py", (), (5, 6), (str(out),), R.eval_numbers, minutes=0.1)
    with pytest.raises(UserError, match="seeds"):
        R.run_entry(wrong, threads=None, from_output=True, note="", results_dir=tmp_path)


def test_render_follows_the_results_files(tmp_path):
    for f in (ROOT / "results").glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    doc = json.loads((tmp_path / "compression_headline.json").read_text())
    changed = copy.deepcopy(doc)
    changed["numbers"]["rows"][0]["speedup"] = 9.87654
    (tmp_path / "compression_headline.json").write_text(json.dumps(changed))
    text = (ROOT / "EXPERIMENTS.md").read_text()
    new = R.render_text(text, tmp_path)
    assert new != text and "| 9.88x (" in new
    assert R.render_text(new, tmp_path) == new  # rendering twice changes nothing

    (tmp_path / "compression_headline.json").unlink()
    with pytest.raises(UserError, match="does not exist"):
        R.render_text(text, tmp_path)
    with pytest.raises(UserError, match="unknown results table"):
        R.render_text("<!-- results:nope -->\n| a |\n<!-- /results -->\n", tmp_path)


def test_cli_refuses_an_unknown_result():
    with pytest.raises(UserError, match="unknown result"):
        R.main(["--only", "no_such_result"])


def test_progression_claim_reads_the_snapshots():
    def snap(step, enrichment, late):
        return {"step": step, "reward_enrichment": enrichment, "late": late, "late_se": 0.01}

    numbers = {"seeds": [100, 101, 102], "references": [{"name": "shipped model", "late": 0.9, "late_se": 0.02}],
               "snapshots": [snap(10, 1.0, 0.01), snap(20, 2.5, 0.05), snap(30, 3.0, 0.3), snap(40, 1.5, 0.8)]}  # fmt: skip
    text = R._progression_claim({"training_progression": {"numbers": numbers}})
    assert "twice their share of the attention at step 20" in text and "(0.30 at step 30, 0.80 at step 40)" in text
    assert "0.800 ± 0.010 (shipped model: 0.900 ± 0.020), seeds 100-102" in text
    numbers["snapshots"] = [snap(10, 1.0, 0.01)]
    assert "never draw twice" in R._progression_claim({"training_progression": {"numbers": numbers}})
