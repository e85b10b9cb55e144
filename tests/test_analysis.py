"""Attention metrics on hand-made attention with known answers, and the analysis scripts end to end
on a small synthetic capture (figures, metrics JSON, recommendation text, bad input).

    python -m pytest tests/test_analysis.py -q
"""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest
import torch
from conftest import build_capture

import analyze_attention
import visualize_attention
from adlens import metrics as M
from adlens.capture_file import CAPTURE_VERSION, save_capture
from adlens.config import run_cli

REC_KEYS = {"strategy", "compression_ratio", "compression_interval", "keep_recent", "pattern", "estimated_speedup"}


def _rows(*weights, T=None):
    """Rows (S, T) from lists of weights (each its own context length) and their context lengths."""
    T = T or max(len(w) for w in weights)
    a = np.zeros((len(weights), T))
    for i, w in enumerate(weights):
        a[i, : len(w)] = w
    return a, np.array([len(w) for w in weights])


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# ---- metrics on hand-made attention ------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 10, 23])
def test_uniform(n):
    a, ln = _rows(np.full(n, 1 / n), T=24)
    assert M.positions_for_mass(a, ln, 0.8)[0] == math.ceil(0.8 * n)
    assert M.positions_for_mass(a, ln, 0.9)[0] == math.ceil(0.9 * n)
    assert M.attention_entropy(a)[0] == pytest.approx(math.log(n))
    assert M.normalised_entropy(a, ln)[0] == pytest.approx(1.0 if n > 1 else 0.0)
    assert M.recent_share(a, ln, 5)[0] == pytest.approx(min(5, n) / n)
    assert M.max_attention(a)[0] == pytest.approx(1 / n)


def test_one_hot_on_newest():
    w = np.zeros(12)
    w[-1] = 1.0
    a, ln = _rows(w, T=20)
    assert M.recent_share(a, ln, 5)[0] == 1.0
    assert M.recent_share(a, ln, 1)[0] == 1.0
    assert M.positions_for_mass(a, ln, 0.9)[0] == 1
    assert M.attention_entropy(a)[0] == 0.0
    assert M.sink_share(a, 4)[0] == 0.0
    assert M.right_align(a, ln)[0, 0] == 1.0  # relative position 0 is the query


def test_sparse_few_positions():
    w = np.zeros(20)
    w[[2, 9, 15]] = [0.5, 0.3, 0.2]
    a, ln = _rows(w)
    assert M.positions_for_mass(a, ln, 0.5)[0] == 1
    assert M.positions_for_mass(a, ln, 0.8)[0] == 2
    assert M.positions_for_mass(a, ln, 0.9)[0] == 3
    assert M.sorted_cumulative(a)[0, :3] == pytest.approx([0.5, 0.8, 1.0])
    fr, curves = M.cumulative_attention_curve(a, ln, n_points=21)
    assert curves[0, 0] == 0 and curves[0, -1] == pytest.approx(1.0)
    assert M.fraction_at_mass(fr, curves[0], 0.8) == pytest.approx(0.1)  # 2 of 20 positions
    assert M.recent_share(a, ln, 5)[0] == pytest.approx(0.2)  # position 15 is 4 steps back


def test_heavy_sink():
    w = np.full(30, 0.3 / 26)
    w[:4] = [0.55, 0.05, 0.05, 0.05]
    a, _ = _rows(w)
    assert M.sink_share(a, 4)[0] == pytest.approx(0.7)
    assert M.sink_share(a, 1)[0] == pytest.approx(0.55)
    assert M.max_attention(a)[0] == pytest.approx(0.55)


def test_rows_are_renormalised_and_masked():
    a = np.array([[0.2, 0.2, 9.0], [0.5, 0.25, 0.25]])
    out = M.normalise_rows(a, np.array([2, 3]))
    assert out.sum(-1) == pytest.approx([1, 1])
    assert out[0, 2] == 0
    al = M.right_align(out, np.array([2, 3]))
    assert np.isnan(al[0, 2]) and al[1, 2] == 0.5


def test_episode_and_reward_views():
    # 6 steps, horizon 3: episodes [0 0 0 1 1 1]; query at step 5 sees steps 1..5
    ctx = np.array([[1, 2, 3, 4, 5]])
    a = np.array([[0.1, 0.2, 0.3, 0.1, 0.3]])
    episode = np.array([0, 0, 0, 1, 1, 1])
    ep = M.episode_attention(np.repeat(a, 6, 0), np.full(6, 5), np.repeat(ctx, 6, 0), episode, n_back=2)
    assert ep[5] == pytest.approx([0.7, 0.3, np.nan], nan_ok=True)
    reward = np.array([0, 0, 1, 0, 0, 1.0])
    share, frac = M.reward_attention(a, np.array([5]), ctx, reward)
    assert share[0] == pytest.approx(0.2 + 0.3) and frac[0] == pytest.approx(2 / 5)


def test_grid_projection_sums_per_state():
    state = np.array([0, 4, 4, 8])
    w, visited = M.grid_attention(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 2, 3]), state, 9)
    assert w[4] == pytest.approx(0.5) and w[8] == pytest.approx(0.4) and w.sum() == pytest.approx(1)
    assert visited.tolist() == [True, False, False, False, True, False, False, False, True]


def test_simulated_compression_schedule():
    from adlens.compression import make_compression

    full = M.simulate_compressed_lengths(30, make_compression("none"), max_context=10)
    assert full.tolist() == [min(s + 1, 10) for s in range(30)]
    comp = M.simulate_compressed_lengths(20, make_compression("fixed_window", ratio=0.4, interval=3, keep_recent=4), max_context=10)
    assert comp.max() <= 4 + 3 and comp[:5].tolist() == [1, 2, 3, 4, 5]
    assert comp[5] == 5  # cut to 4 after step 4, then one new token
    rolling = M.simulate_compressed_lengths(20, make_compression("sink_window", ratio=0.4, n_sink=1), max_context=10)
    assert rolling.tolist() == [1, 2, 3, 4] + [5] * 16  # a rolling window: the budget plus the newest token, every step


def test_moving_average():
    assert M.moving_average([1, 2, 3, np.nan, 5], 2).tolist() == pytest.approx([1, 1.5, 2.5, 3, 5])


# ---- recommendation ----------------------------------------------------------------------------
def _recommend(**kw):
    cap = build_capture(**kw)
    cfg = dict(analyze_attention.ANALYSIS_CONFIG)
    s = M.summarize(cap, cfg["recent_window"], cfg["sink_positions"], cfg["coverage"])
    return s, M.recommend(s, cfg)["recommendation"]


@pytest.mark.parametrize(
    "kw, pattern, strategy",
    [
        ({"taus": 1.0}, "strong_recency", "fixed_window"),
        ({"taus": 1.0, "sink": 0.4}, "sink_plus_recency", "sink_window"),
        ({"taus": 1e6}, "uniform", "pooling"),
    ],
)
def test_recommendation_follows_pattern(kw, pattern, strategy):
    _, rec = _recommend(**kw)
    assert rec["pattern"] == pattern and rec["strategy"] == strategy
    assert set(rec) - {"n_sink", "window_size"} == REC_KEYS
    assert 0 < rec["compression_ratio"] <= 1 and rec["compression_interval"] >= 1 and rec["keep_recent"] >= 1
    if strategy == "sink_window":
        assert rec["n_sink"] == 4
    if strategy == "pooling":  # uniform attention: 90% needs ~90% of the context, no room to compress
        assert rec["compression_ratio"] == 1.0 and rec["estimated_speedup"] == pytest.approx(1.0)


def test_sparse_attention_gets_topk_with_measured_ratio():
    cap = build_capture(S=60, T=24)
    n = cap["context_len"].numpy()
    q = np.zeros(cap["query_attn"].shape)
    for s in range(len(n)):  # weight on every 8th position counted from the oldest, none recent
        idx = np.arange(0, n[s], 8)
        q[s, :, :, idx] = 1 / len(idx)
    cap["query_attn"] = torch.tensor(q, dtype=torch.float16)
    cfg = dict(analyze_attention.ANALYSIS_CONFIG)
    s = M.summarize(cap, 5, 4, 0.9)
    rec = M.recommend(s, cfg)["recommendation"]
    assert rec["pattern"] == "sparse" and rec["strategy"] == "topk"
    # 3 positions of 24 hold all attention: budget ceil(1.2 * 3) = 4 tokens -> ratio 4/24 rounded up
    assert s["positions_for_90_long"] == pytest.approx(3.0)
    assert rec["compression_ratio"] == pytest.approx(0.17)
    assert rec["estimated_speedup"] > 1


def test_recommendation_builds_a_compression_strategy():
    from adlens.compression import STRATEGIES, make_compression

    for kw in ({"taus": 1.0}, {"taus": 1.0, "sink": 0.4}, {"taus": 3.0}, {"taus": 1e6}):
        _, rec = _recommend(**kw)
        assert rec["strategy"] in STRATEGIES
        params = {
            "ratio": rec["compression_ratio"],
            "interval": rec["compression_interval"],
            "keep_recent": rec["keep_recent"],
            "n_sink": rec.get("n_sink"),
            "window_size": rec.get("window_size"),
        }
        valid = {f for f in STRATEGIES[rec["strategy"]].__dataclass_fields__}
        make_compression(rec["strategy"], context=24, **{k: v for k, v in params.items() if k in valid})


# ---- scripts end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    cap_path = save_capture(build_capture(taus=[[1.0, 3.0], [2.0, 8.0]], sink=0.05), root / "capture.pt")
    out = root / "out"
    result = analyze_attention.main(["--capture", str(cap_path), "--out", str(out), "--num-samples", "2"])
    return cap_path, out, result


def test_every_output_is_written(analysed):
    _, out, result = analysed
    expected = {
        "attention_analysis_comprehensive.png",
        "layer_head_analysis.png",
        "compression_recommendations.txt",
        "attention_metrics.json",
        "analysis_config.json",
        "attention_heatmap_step10.png",
        "attention_heatmap_step59.png",
    }
    assert {p.name for p in out.iterdir()} == expected  # 2 of the 3 full matrices, nothing stray
    assert all(p.exists() for k, p in result["paths"].items() if k != "heatmaps")
    assert [p.name for p in result["paths"]["heatmaps"]] == [
        "attention_heatmap_step10.png",
        "attention_heatmap_step59.png",
    ]
    w, h = _png_size(out / "attention_analysis_comprehensive.png")
    assert w >= 1600 and h >= 1200
    assert not list(out.parent.glob(".*tmp"))  # staging folder removed
    cfg = json.loads((out / "analysis_config.json").read_text())
    assert cfg["num_samples"] == 2 and set(cfg) == set(analyze_attention.ANALYSIS_CONFIG)


def test_metrics_json_and_text_agree(analysed):
    _, out, result = analysed
    doc = json.loads((out / "attention_metrics.json").read_text())
    assert (doc["schema"], doc["schema_version"]) == ("ad-attention-metrics", 1)
    rec = doc["recommendation"]
    assert set(rec) - {"n_sink", "window_size"} == REC_KEYS and rec == result["recommendation"]
    text = (out / "compression_recommendations.txt").read_text()
    listed = dict(re.findall(r"^(\w+)\s+= (\S+)$", text, flags=re.MULTILINE))
    assert set(listed) == set(rec)
    for key, value in rec.items():
        assert listed[key] == str(value)
    m = doc["metrics"]
    assert f"{m['positions_for_80']:.1f} ({100 * m['fraction_for_80']:.1f}% of context)" in text
    assert "attention on the last 5 positions" in text and f"{100 * m['recent_share']:.1f}%" in text
    assert f"{m['mean_context_len']:.1f} tokens" in text
    assert len(m["per_head"]["entropy"]) == 2 and len(m["per_head"]["entropy"][0]) == 2


def test_analyze_accepts_an_in_memory_capture(tmp_path):
    result = analyze_attention.analyze(build_capture(S=30, T=12), tmp_path / "mem", {"num_samples": 1, "dpi": 30})
    assert result["paths"]["metrics"].exists() and len(result["paths"]["heatmaps"]) == 1
    with pytest.raises(Exception, match="unknown key"):
        analyze_attention.analyze(build_capture(S=30, T=12), tmp_path / "bad", {"no_such_key": 1})
    assert not (tmp_path / "bad").exists()


def _bad_capture(kind: str, path):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"\x00\x01not a torch file" * 10)
    elif kind == "wrong_version":
        torch.save({"format": "ad-attention-capture", "version": CAPTURE_VERSION + 1}, path)
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "wrong_version"])
@pytest.mark.parametrize("script", [analyze_attention, visualize_attention])
def test_bad_capture_exits_2_and_writes_nothing(kind, script, tmp_path, capsys):
    path = _bad_capture(kind, tmp_path / "capture.pt")
    out = tmp_path / "figs" / "out"
    with pytest.raises(SystemExit) as e:
        run_cli(script.main, ["--capture", str(path), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "figs").exists()


# ---- visualize_attention -----------------------------------------------------------------------
def test_visualize_outputs_and_bertviz_export(analysed, tmp_path):
    cap_path, _, _ = analysed
    paths = visualize_attention.main(["--capture", str(cap_path), "--out", str(tmp_path), "--step", "30", "--layer", "1"])
    assert {p.name for p in tmp_path.iterdir()} == {
        "grid_attention_step30_layer1.png",
        "head_attention_over_time.png",
        "bertviz_step30.pt",
        "visualize_config.json",
    }
    assert set(paths) == {"grid", "heads", "bertviz", "config"}
    doc = torch.load(tmp_path / "bertviz_step30.pt", weights_only=True)
    assert len(doc["attention"]) == 2 and doc["attention"][0].shape == (1, 2, 24, 24)
    assert torch.allclose(doc["attention"][1].sum(-1), torch.ones(1, 2, 24))
    assert len(doc["tokens"]) == 24 and re.fullmatch(r"s\(\d,\d\) a[UDLRS-] r[01]", doc["tokens"][-1])


def test_to_bertviz_and_grid_view():
    cap = build_capture()
    attn = visualize_attention.to_bertviz(cap, 0)  # full_steps[0] = step 10, 11 tokens
    assert len(attn) == 2 and attn[0].shape == (1, 2, 11, 11)
    assert torch.triu(attn[0][0, 0], 1).abs().max() == 0  # causal
    labels = visualize_attention.token_labels(cap, 0)
    assert labels[0].startswith("s(1,1) a-")  # step 0: the start cell, no previous action
    weight, visited = visualize_attention.grid_view(cap, 59)
    assert weight.shape == (3, 3) and weight.sum() == pytest.approx(1, abs=1e-3)
    assert (weight[~visited] == 0).all()
    assert visualize_attention.grid_marks(cap, 59)["goal"] == (2, 2)


def test_visualize_without_full_matrix_and_bad_index(analysed, tmp_path, capsys):
    cap_path, _, _ = analysed
    paths = visualize_attention.main(["--capture", str(cap_path), "--out", str(tmp_path / "a"), "--step", "20"])
    assert "bertviz" not in paths and "no full attention matrix" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_cli(visualize_attention.main, ["--capture", str(cap_path), "--out", str(tmp_path / "b"), "--head", "7"])
    assert e.value.code == 2 and not (tmp_path / "b").exists()
