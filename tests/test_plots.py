"""The figures carry what a reader needs without the guide: titles naming task and steps, layer
labels, episode and reward marks, one colour bar, error bars, labels that do not overlap, grid
markers that stay visible; and `save_figure` never leaves a temporary file behind.

    python -m pytest tests/test_plots.py -q
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import build_capture  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

import analyze_attention  # noqa: E402
import visualize_attention  # noqa: E402
from adlens import plots as P  # noqa: E402
from adlens.capture_file import save_capture  # noqa: E402


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


@pytest.fixture
def drawn(monkeypatch):
    """Record every figure a script saves: file name -> (suptitle, axes titles, figure)."""
    seen = {}
    save = P.save_figure

    def record(fig, path, dpi=100):
        seen[path.name] = (fig.get_suptitle(), _titles(fig), fig)
        return save(fig, path, dpi=30)

    monkeypatch.setattr(P, "save_figure", record)
    return seen


def test_analysis_figures_name_task_steps_and_layers(drawn, tmp_path):
    cap = build_capture(S=30, T=12, horizon=5, seed=4)  # rewards at steps 13, 14; layer_names are module paths
    analyze_attention.analyze(cap, tmp_path / "out", {"num_samples": 3})
    sup, titles, _ = drawn["attention_analysis_comprehensive.png"]
    assert "1 task(s) x 30 steps" in sup
    assert any('task 0 {"goal": [2, 2]}, steps 0-29' in t for t in titles)
    heatmaps = sorted(k for k in drawn if k.startswith("attention_heatmap_step"))
    assert heatmaps == ["attention_heatmap_step15.png", "attention_heatmap_step29.png", "attention_heatmap_step5.png"]
    sup, titles, fig = drawn["attention_heatmap_step15.png"]
    assert sup.startswith('Task 0 {"goal": [2, 2]}: attention at step 15') and "12 tokens from steps 4-15" in sup
    assert "layer 0 (heads averaged)" in titles and not any("blocks." in t for t in titles)
    # steps 4-15 hold episode starts at steps 5, 10, 15: context positions 1, 6, 11
    top = fig.axes[0]
    vertical = [line.get_xdata() for line in top.lines if line.get_marker() != "^"]
    assert sorted(round(x[0] + 0.5) for x in vertical if x[0] == x[1]) == [1, 6, 11]
    rewarded = [int(x) for line in top.lines if line.get_marker() == "^" for x in line.get_xdata()]
    expected = [i for i, s in enumerate(range(4, 16)) if cap["reward"][s] > 0]
    assert expected and rewarded == expected
    sup, titles, _ = drawn["layer_head_analysis.png"]
    assert "1 task(s) x 30 steps" in sup


def test_head_profiles_have_a_title_one_colour_bar_and_a_caption(drawn, tmp_path):
    cap_path = save_capture(build_capture(S=30, T=12), tmp_path / "capture.pt")
    visualize_attention.main(["--capture", str(cap_path), "--out", str(tmp_path / "v"), "--step", "20"])
    sup, titles, fig = drawn["head_attention_over_time.png"]
    assert 'task {"goal": [2, 2]}, steps 0-29' in sup
    assert titles[:4] == ["layer 0, head 0", "layer 0, head 1", "layer 1, head 0", "layer 1, head 1"]
    colour_bars = [ax for ax in fig.axes if "log colour scale" in ax.get_ylabel()]
    assert len(colour_bars) == 1
    assert "episode starts" in fig.get_supxlabel()
    sup, titles, _ = drawn["grid_attention_step20.png"]
    assert 'task {"goal": [2, 2]}' in titles[0] and "step 20" in titles[0]


def test_grid_markers_stay_visible_on_a_log_scale():
    weight = np.array([[0.5, 1e-3, 0.0], [0.2, 0.05, 0.01], [0.0, 0.2, 0.04]])
    visited = weight > 0
    marks = {"goal": (1, 1), "start": (1, 1), "agent": (1, 1)}  # all three in one cell
    fig = P.plot_grid_attention(weight, visited, marks)
    ax = fig.axes[0]
    assert isinstance(ax.images[0].norm, LogNorm)
    hollow = [c for c in ax.collections if not c.get_facecolors().size or c.get_facecolors()[0][3] == 0]
    filled = [c for c in ax.collections if c not in hollow]
    assert len(hollow) == 1 and len(filled) == 2  # the agent is a ring, goal and start are filled
    assert all(hollow[0].get_zorder() < c.get_zorder() for c in filled)  # drawn under them
    assert {t.get_text() for t in fig.legends[0].get_texts()} == set(marks)
    plt.close(fig)


def _rows(points):
    return [
        {"strategy": s, "ratio": r, "speedup": sp, "speedup_pair_min": sp - 0.3, "speedup_pair_max": sp + 0.5,
         "performance_loss": loss, "performance_loss_stderr": 0.02, "engine": "rerun", "seeds": [0, 1, 2]}
        for s, r, sp, loss in points
    ]  # fmt: skip


def test_tradeoff_has_error_bars_and_labels_that_do_not_overlap():
    # four strategies on top of each other, the worst case for labels
    points = [(s, r, 1.0 / r, 0.01) for s in ("fixed_window", "topk", "pooling", "sink_window") for r in (0.5, 0.3)]
    fig = P.plot_compression_tradeoff(_rows(points))
    ax = fig.axes[0]
    assert len(ax.containers) == 4  # one errorbar container per strategy
    bars = ax.containers[0]
    assert bars.has_xerr and bars.has_yerr
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text() in ("0.5", "0.3")]
    assert len(labels) == len(points)
    boxes = [t.get_window_extent(renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    assert not any(b.overlaps(ax.get_legend().get_window_extent(renderer)) for b in boxes)
    assert "standard error" in ax.get_title()
    plt.close(fig)


def test_save_figure_leaves_no_temporary_file(tmp_path):
    fig, _ = plt.subplots()
    path = P.save_figure(fig, tmp_path / "a.png", dpi=20)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["a.png"]
    fig, _ = plt.subplots()

    def broken(target, **kwargs):  # writes part of the file, then fails
        if hasattr(target, "write"):
            target.write(b"\x89PNG partial")
        else:
            Path(target).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        P.save_figure(fig, tmp_path / "b.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
