"""The shipped models: they load safely, and a short evaluation reproduces their recorded numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from env import get_spec
from evaluate import evaluate
from model.checkpoint import DEFAULT_CHECKPOINT, load_model

RESULTS = DEFAULT_CHECKPOINT.parent / "eval_results.json"
CTX1000 = DEFAULT_CHECKPOINT.parent.parent / "darkroom_ad_ctx1000" / "model.pt"  # for compression at a long context
KEY_TO_DOOR = DEFAULT_CHECKPOINT.parent.parent / "key_to_door_ad" / "model.pt"  # the second task family
SHIPPED = [DEFAULT_CHECKPOINT, CTX1000, KEY_TO_DOOR]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_checkpoint_is_plain_data(path):
    assert path.is_file(), f"a shipped model is missing: {path.parent.name}/model.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "config", "step"}
    assert "optimizer" not in ckpt  # the shipped file holds weights and config only
    assert path.stat().st_size < 5_000_000


def test_default_model_trained_on_training_tasks_only():
    _, meta = load_model()
    spec = get_spec(meta["env"])
    train, held = spec.split()
    assert len(train) == 73 and len(held) == 8
    assert meta["model"]["max_context"] >= 240


def test_key_to_door_model_trained_on_its_training_pairs_only():
    """150 seeded training pairs, the 50 held-out pairs disjoint from them, a context of 5 episodes;
    its recorded evaluation is on those held-out pairs with key and door parts."""
    _, meta = load_model(KEY_TO_DOOR)
    spec = get_spec(meta["env"])
    train, held = spec.split()
    assert spec.name == "key_to_door" and len(train) == 150 and len(held) == 50
    pairs = lambda tasks: {(tuple(t["key"]), tuple(t["door"])) for t in tasks}  # noqa: E731
    assert not pairs(train) & pairs(held)
    assert meta["model"]["max_context"] == 5 * spec.horizon
    recorded = json.loads((KEY_TO_DOOR.parent / "eval_results.json").read_text())
    assert recorded["tasks"] == held and len(recorded["seeds"]) >= 3 and not recorded["greedy"]
    assert {"key_return_per_episode", "door_return_per_episode"} <= set(recorded)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_short_evaluation_reproduces_recorded_returns(path):
    recorded = json.loads((path.parent / "eval_results.json").read_text())
    seed = recorded["seeds"][0]
    model, meta = load_model(path)
    spec = get_spec(meta["env"])
    tasks = spec.tasks_for("test")
    assert recorded["tasks"] == tasks
    n = 4  # the first episodes of the recorded run, same seed: the same sampled actions
    with torch.no_grad():
        short = evaluate(model, spec, tasks, n, [seed], greedy=recorded["greedy"], progress=False)
    got = np.array([pt["returns"] for pt in short["per_task"]])
    want = np.array([pt["returns_per_seed"][0][:n] for pt in recorded["per_task"]])
    np.testing.assert_allclose(got, want)


def test_default_model_learns_in_context_when_re_evaluated():
    """What the README reports, measured again rather than read back: the recorded seeds, 50 sampled
    episodes (10-20 s on one core), a low first episode, >= 0.90 over episodes 31-50, no held-out goal
    below 0.75 there; and the recorded file says the same (the docs quote it)."""
    recorded = json.loads(Path(RESULTS).read_text())
    assert len(recorded["seeds"]) >= 3 and recorded["episodes"] == 50 and not recorded["greedy"]
    model, meta = load_model()
    spec = get_spec(meta["env"])
    with torch.no_grad():
        r = evaluate(model, spec, spec.tasks_for("test"), 50, recorded["seeds"], greedy=False, progress=False)
    norm = np.array(r["normalized_return_per_episode"])
    assert norm[0] <= 0.5
    assert norm[30:50].mean() >= 0.90
    per_goal = [np.mean(np.array(pt["returns_per_seed"])[:, 30:50]) / pt["optimal_return"] for pt in r["per_task"]]
    assert len(per_goal) == 8 and min(per_goal) >= 0.75
    assert norm[30:50].mean() - norm[:5].mean() >= 0.5  # learned in context, not known from the start
    # the same sampled actions as the recorded run; a tolerance only for another CPU's rounding
    assert norm[30:50].mean() == pytest.approx(np.mean(recorded["normalized_return_per_episode"][30:50]), abs=0.02)
