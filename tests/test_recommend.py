"""The measured recommendation (adlens/recommend.py) and the analysis of captures with several tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import analyze_attention
from adlens import metrics as M
from adlens.capture_file import PER_STEP, load_capture, save_capture, task_view
from adlens.recommend import break_even_context, candidates, choose, fit_step_cost, recommendation_doc, verdict_lines
from conftest import build_capture


def _row(strategy, ratio, speedup, loss, shortens=True, se=0.01):
    return {"strategy": strategy, "ratio": ratio, "interval": 20, "engine": "kv", "params": {}, "speedup": speedup,
            "speedup_pair_min": speedup * 0.9, "speedup_pair_max": speedup * 1.1, "performance_loss": loss,
            "performance_loss_stderr": se, "shortens_context": shortens, "seeds": [0, 1], "episodes": 10}  # fmt: skip


def test_choose_picks_the_fastest_within_the_loss_bound():
    rows = [_row("topk", 0.3, 1.8, 0.04), _row("pooling", 0.1, 2.5, 0.08), _row("fixed_window", 0.5, 1.3, -0.01),
            _row("sink_window", 1.0, 3.0, 0.0, shortens=False)]  # fmt: skip
    assert choose(rows)["strategy"] == "topk"  # pooling loses too much; the last one is not compression at all
    assert choose(rows, max_loss=0.1)["strategy"] == "pooling"


def test_choose_says_none_when_nothing_pays():
    rows = [_row("topk", 0.3, 0.9, 0.0), _row("pooling", 0.1, 1.5, 0.2), _row("fixed_window", 0.5, 1.0, 0.0)]
    assert choose(rows) is None
    doc = recommendation_doc(None, rows, {"strategy": "pooling"}, [0, 1], _row("pooling", 0.1, 4.0, 0.01) | {"engine": "rerun"},
                             {"a_ms": 1.0, "b_ms_per_token": 0.002, "overhead_ms": 0.3, "ratio": 0.1, "batch": 8, "context": 240,
                              "break_even_context": 166.7})  # fmt: skip
    assert doc["strategy"] == "none" and doc["measured_speedup"] is None and (doc["schema"], doc["schema_version"]) == ("ad-compression-recommendation", 1)
    text = "\n".join(verdict_lines(doc))
    assert "Recommended: none" in text and "best candidate 1.50x" in text and "4.00x" in text and "167 tokens" in text


def test_recommendation_doc_carries_the_measured_row():
    best = _row("topk", 0.3, 1.8, 0.04)
    doc = recommendation_doc(best, [best], {"strategy": "topk"}, [5, 6], None)
    assert (doc["strategy"], doc["ratio"], doc["measured_speedup"], doc["measured_performance_loss"], doc["loss_stderr"]) == (
        "topk", 0.3, 1.8, 0.04, 0.01)  # fmt: skip
    assert "Recommended: topk" in "\n".join(verdict_lines(doc))


def test_candidates_start_with_the_attention_pick_and_all_shorten_the_context():
    s = {"max_context": 240, "window_for_coverage": 60, "window_with_sinks_for_coverage": 50, "fraction_for_90_long": 0.5,
         "fraction_for_80": 0.3}  # fmt: skip
    rec = {"strategy": "pooling", "compression_ratio": 0.6, "compression_interval": 20, "keep_recent": 5}
    cands = candidates(s, rec)
    assert cands[0] == rec
    assert [(c["strategy"], c["compression_ratio"]) for c in cands[1:]] == [("pooling", 0.5), ("pooling", 0.3), ("sink_window", 0.23)]
    assert len({(c["strategy"], c["compression_ratio"]) for c in cands}) == len(cands)
    assert all(c["compression_ratio"] < 1 and c["keep_recent"] >= 1 for c in cands)
    full = candidates({**s, "fraction_for_90_long": 1.0, "fraction_for_80": 1.0, "window_with_sinks_for_coverage": 240}, {**rec, "compression_ratio": 1.0})
    assert full == []  # nothing that would shorten the context


def test_step_cost_fit_and_break_even():
    n = np.arange(1, 241)
    a, b = fit_step_cost(n, 0.001 + 2e-6 * n)
    assert a == pytest.approx(0.001) and b == pytest.approx(2e-6)
    assert break_even_context(a, b, 0.0002, 0.5) == pytest.approx(200.0)
    assert break_even_context(a, 0.0, 0.0002, 0.5) is None
    assert break_even_context(a, b, -0.00005, 0.5) is None  # an overhead within the noise gives no break-even


def test_verdict_does_not_claim_a_break_even_from_an_overhead_within_noise():
    rows = [_row("sink_window", 0.8, 0.99, 0.0)]
    est = {"a_ms": 1.4, "b_ms_per_token": 0.005, "overhead_ms": -0.057, "ratio": 0.8, "batch": 8, "context": 240, "break_even_context": None}
    text = "\n".join(verdict_lines(recommendation_doc(None, rows, {"strategy": "sink_window"}, [0], None, est)))
    assert "within this run's timing noise (-0.057 ms per step)" in text and "tokens of context" not in text


def _two_task_capture():
    slow, fast = build_capture(taus=[[1.0, 1.0], [1.0, 1.0]], seed=0), build_capture(taus=[[20.0, 20.0], [20.0, 20.0]], seed=1)
    cap = {k: v for k, v in slow.items() if k not in PER_STEP}
    for k in PER_STEP:
        cap[k] = torch.stack([torch.as_tensor(slow[k]), torch.as_tensor(fast[k])])
    cap["returns"] = torch.stack([torch.as_tensor(slow["returns"]), torch.as_tensor(fast["returns"])])
    cap["meta"] = dict(slow["meta"], tasks=[{"goal": [2, 2]}, {"goal": [0, 2]}])
    cap["full_task"] = 0
    return cap, slow, fast


def test_analysis_reports_each_task_and_their_mean(tmp_path):
    cap, slow, fast = _two_task_capture()
    path = save_capture(cap, tmp_path / "cap.pt")
    back = load_capture(path)
    assert back["query_attn"].shape[:2] == (2, 60)
    for i, one in enumerate((slow, fast)):  # per-task alignment survives the round trip
        view = task_view(back, i)
        assert torch.equal(view["ctx_step"], torch.as_tensor(one["ctx_step"])) and torch.equal(view["reward"], torch.as_tensor(one["reward"]))
    analyze_attention.analyze(back, tmp_path / "out", {"dpi": 30, "num_samples": 1})
    doc = json.loads((tmp_path / "out" / "attention_metrics.json").read_text())
    want = [M.summarize(one, 5, 4)["recent_share"] for one in (slow, fast)]
    got = doc["tasks"]["per_task"]["recent_share"]
    assert got == pytest.approx(want) and want[0] > want[1] + 0.2  # a sharply recent task and a diffuse one
    assert doc["metrics"]["recent_share"] == pytest.approx(np.mean(want))
    assert doc["tasks"]["std"]["recent_share"] == pytest.approx(np.std(want))
    assert doc["tasks"]["n"] == 2 and doc["tasks"]["view_task"] == 0
    text = (tmp_path / "out" / "compression_recommendations.txt").read_text()
    assert "2 task(s)" in text and "+-" in text


def test_view_task_out_of_range_is_a_user_error(tmp_path):
    from adlens.errors import UserError

    cap, *_ = _two_task_capture()
    with pytest.raises(UserError, match="view_task must be in"):
        analyze_attention.analyze(cap, tmp_path / "out", {"view_task": 5})
    assert not (tmp_path / "out").exists()
