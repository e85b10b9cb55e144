"""Compression strategies, cache compaction, compressed rollouts and compression_template.py."""

import copy
import json
from pathlib import Path

import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from env import get_spec, make_env
from model.rope import apply_rope, pair_order, rope_cos_sin
from model.cache import KVCache
from adlens.compression import STRATEGIES, make_compression
from adlens.compression import merge_rows
from conftest import tiny_model
from model.rollout import ENGINES, run_episodes

ROOT = Path(__file__).resolve().parent.parent
SPEC = get_spec({"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2})
PARAMS = {
    "none": {},
    "fixed_window": {"keep_recent": 3},
    "topk": {"keep_recent": 2},
    "pooling": {"keep_recent": 3},
    "sink_window": {"n_sink": 2},
    "reward_anchor": {"keep_recent": 2, "n_sink": 0},
    "episode_pool": {"per_episode": 2},
    "reward_recent": {"keep_recent": 2},
}


def _tiny(max_context=20):
    return tiny_model(max_context)


def _kept(assign, row=0):
    return [i for i, a in enumerate(assign[row].tolist()) if a >= 0]


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "none" and not STRATEGIES[n].needs_meta])  # those: test_rl_compression.py
def test_plan_fits_budget_and_keeps_newest(name):
    comp = make_compression(name, context=20, ratio=0.5, interval=1, **PARAMS[name])
    scores = torch.rand(2, 16)
    assign, weight, n_out = comp.plan(16, 20, scores=scores)
    assert n_out == comp.budget(20) == 10
    assert assign.shape == weight.shape == (2, 16)
    for b in range(2):
        a = assign[b]
        assert a[-1] == n_out - 1  # the newest token stays, last
        used = a[a >= 0]
        assert set(used.tolist()) == set(range(n_out))  # every output slot gets a token
        assert (used.diff() >= 0).all()  # temporal order is kept


def test_fixed_window_keeps_recent_and_merges_older():
    comp = make_compression("fixed_window", context=20, ratio=0.5, keep_recent=4)
    assign, weight, n_out = comp.plan(16, 20)
    assert n_out == 10
    assert assign[0, -4:].tolist() == [6, 7, 8, 9]  # the last 4 as they are
    assert sorted(set(assign[0, :12].tolist())) == list(range(6))  # 12 older -> 6 merged slots of 2
    assert (weight == 1).all()


def test_sink_window_keeps_first_and_last():
    comp = make_compression("sink_window", context=20, ratio=0.25, n_sink=2)
    assign, _, n_out = comp.plan(16, 20)
    assert n_out == 5 and _kept(assign) == [0, 1, 13, 14, 15]


def test_topk_keeps_highest_scores():
    comp = make_compression("topk", context=10, ratio=0.5, keep_recent=1)
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.5, 0.2, 0.8, 0.05, 0.3, 0.0, 0.01]])
    assign, _, n_out = comp.plan(10, 10, scores=scores)
    assert n_out == 5 and _kept(assign) == [1, 3, 5, 7, 9]  # top-4 older by score + the newest


def test_identity_at_ratio_one():
    for name in STRATEGIES:
        comp = make_compression(name, context=12, ratio=1.0, **PARAMS[name])
        assign, weight, n_out = comp.plan(12, 12, scores=torch.rand(1, 12))
        assert n_out == 12 and assign[0].tolist() == list(range(12)) and (weight == 1).all()
        assert not comp.due(100, 12, 12)


def test_pooling_conserves_attention_mass_and_weights_by_attention():
    comp = make_compression("pooling", context=12, ratio=0.5, keep_recent=2, interval=1)
    cache = KVCache(1, 2, 1, 12, 4, "cpu", torch.float32, track_scores=True)
    for _ in range(12):
        cache.advance()
    cache.k.normal_()
    cache.v.normal_()
    cache.ordered_scores()  # fold the steps' (empty) queries in before setting scores by hand
    cache.scores[:, :12] = torch.rand(2, 12)
    total = cache.scores[:, :12].sum(1)
    v_before = cache.temporal()["v"][0, 0, 0].clone()  # (12, Dh) of batch 0
    s_before = cache.scores[0, :12].clone()
    assign, weight, n_out = comp.plan(12, 12, scores=cache.temporal()["scores"])
    cache.apply_plan(assign, weight, n_out)
    assert len(cache) == n_out == 6
    torch.testing.assert_close(cache.scores[:, :n_out].sum(1), total)
    # the first pooled slot's value is the attention-weighted mean of its members
    members = [i for i in range(12) if assign[0, i] == 0]
    w = s_before[members] + 1e-6
    expect = (v_before[members] * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(cache.v[0, 0, 0, 0], expect, atol=1e-5, rtol=0)


def test_apply_plan_rerotates_kept_keys_to_contiguous_positions():
    Dh = 8
    cache = KVCache(1, 1, 1, 10, Dh, "cpu", torch.float32)
    raw, order = torch.randn(10, Dh), pair_order(Dh)  # the cache keeps keys in pair order
    for t in range(10):
        pos = cache.advance()
        cos, sin = rope_cos_sin(torch.tensor([pos]), Dh, 10000.0)
        k = apply_rope(raw[t : t + 1], cos, sin)[:, order]
        cache.write(0, k.view(1, 1, 1, Dh), k.view(1, 1, 1, Dh))
    keep = torch.tensor([[True, False, False, True, False, True, False, False, True, True]])
    assign = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(keep, -1, dtype=torch.long))
    cache.apply_plan(assign, keep.float(), 5)
    t = cache.temporal()  # slots need not stay in temporal order
    assert t["pos"][0].tolist() == [5, 6, 7, 8, 9]  # contiguous, ending at the newest
    assert t["src_step"][0].tolist() == [0, 3, 5, 8, 9]
    kept = [0, 3, 5, 8, 9]
    cos, sin = rope_cos_sin(torch.arange(5, 10), Dh, 10000.0)
    torch.testing.assert_close(t["k"][0, 0, 0], apply_rope(raw[kept], cos, sin)[:, order], atol=1e-5, rtol=0)


@pytest.mark.parametrize("track_scores", [False, True])
def test_selection_fast_path_equals_general_merge(track_scores):
    """A plan that only drops tokens takes a gather-only path; it must give what the general merge gives."""
    cache = KVCache(2, 3, 2, 12, 8, "cpu", torch.float32, track_scores=track_scores)
    for _ in range(17):  # past capacity: the ring buffer has wrapped, slots are out of temporal order
        cache.advance()
        cache.write(0, torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
        cache.write(1, torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
        if track_scores:
            cache.observe(0, torch.rand(3, 2, 1, len(cache)))
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[:, -3:] = True
    keep[0, [0, 4, 7]] = keep[1, [1, 2, 3]] = keep[2, [5, 6, 8]] = True  # 6 per row, different per row
    assign = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(keep, -1, dtype=torch.long))
    fast, slow = copy.deepcopy(cache), copy.deepcopy(cache)
    fast.apply_plan(assign, keep.float(), 6)
    slow._apply_merge(assign, keep.float(), keep, 6)
    tf, ts = fast.temporal(), slow.temporal()  # compared in temporal order: the fast path leaves slots out of order
    for name in ("k", "v", "pos", "src_step") + (("scores",) if track_scores else ()):
        torch.testing.assert_close(tf[name], ts[name], atol=1e-5, rtol=0)
    assert len(fast) == len(slow) == 6 and tf["src_step"].tolist() == ts["src_step"].tolist()


def test_selection_that_moves_nothing_on_a_wrapped_cache_keeps_temporal_order():
    """A cache whose ring wrapped, compacted by a plan that drops exactly the tokens at or past n_out:
    nothing moves, and the slots stay out of temporal order (positions follow the tokens, not the slots)."""
    cache = KVCache(1, 2, 1, 12, 8, "cpu", torch.float32)
    for _ in range(15):  # slots 0-2 hold the three newest tokens
        cache.advance()
        cache.write(0, torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[:, 6:9] = False  # the tokens in slots 9-11
    assign = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(keep, -1, dtype=torch.long))
    fast, slow = copy.deepcopy(cache), copy.deepcopy(cache)
    fast.apply_plan(assign, keep.float(), 9)
    slow._apply_merge(assign, keep.float(), keep, 9)
    assert not fast._in_order and fast.pos[0, :3].tolist() == [12, 13, 14]
    tf, ts = fast.temporal(), slow.temporal()
    for name in ("k", "v", "pos", "src_step"):
        torch.testing.assert_close(tf[name], ts[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("track_scores", [False, True])
def test_in_place_merge_equals_general_merge(track_scores):
    """A plan whose groups every sequence shares, on a cache in temporal order, is merged in place
    (members rotated and weighed straight into their slots); it must give what the general merge gives."""
    cache = KVCache(2, 3, 2, 12, 8, "cpu", torch.float32, track_scores=track_scores)
    for _ in range(11):  # in temporal order, one slot free
        cache.advance()
        cache.write(0, torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
        cache.write(1, torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
        if track_scores:
            cache.observe(0, torch.rand(3, 2, 1, len(cache)))
    assign = torch.tensor([[0, 0, 0, -1, 1, 2, 2, 3, -1, 4, 5]]).expand(3, 11)  # merged runs, drops, singles
    weight = torch.rand(3, 11) + 0.1  # per-sequence weights
    fast, slow = copy.deepcopy(cache), copy.deepcopy(cache)
    fast.apply_plan(assign, weight, 6)
    slow._in_order = False  # the same slots, through the general path
    slow.apply_plan(assign, weight, 6)
    tf, ts = fast.temporal(), slow.temporal()
    for name in ("k", "v", "pos", "src_step") + (("scores",) if track_scores else ()):
        torch.testing.assert_close(tf[name], ts[name], atol=1e-5, rtol=0)
    assert len(fast) == len(slow) == 6 and fast._in_order


@pytest.mark.parametrize("track_scores", [False, True])
def test_repeated_in_place_merge_reuses_its_layout(track_scores):
    """A fixed-size cache brings the same plan at every compaction: the second and later ones reuse the
    first one's layout (indices and rotations), and still give what the general merge gives."""
    fast = KVCache(2, 3, 2, 12, 8, "cpu", torch.float32, track_scores=track_scores, track_meta=True)
    slow = copy.deepcopy(fast)
    assign = torch.tensor([[0, 0, 0, -1, 1, 2, 2, 3, -1, 4, 5]]).expand(3, 11)
    layouts = []
    for _ in range(3):
        while len(fast) < 11:  # new tokens after each compaction, the same in both caches
            kv = [torch.randn(3, 2, 2, 1, 8) for _ in range(2)]
            reward, step = torch.rand(3), torch.randint(0, 5, (3,))
            for cache in (fast, slow):
                cache.advance()
                for layer in range(2):
                    cache.write_kv(layer, kv[layer])
                cache.set_meta(reward, step, step)
                if track_scores:
                    cache.observe(0, torch.ones(3, 2, 1, len(cache)) / len(cache))
        weight = torch.rand(3, 11) + 0.1
        fast.apply_plan(assign.clone(), weight, 6)
        slow._in_order = False  # the general path
        slow.apply_plan(assign, weight, 6)
        layouts.append(fast._layout)
        tf, ts = fast.temporal(), slow.temporal()
        for name in ("k", "v", "pos", "src_step") + (("scores",) if track_scores else ()):
            torch.testing.assert_close(tf[name], ts[name], atol=1e-5, rtol=0)
        for name, value in fast.ordered_meta()._asdict().items():
            torch.testing.assert_close(value, getattr(slow.ordered_meta(), name))
    assert layouts[0] is layouts[1] is layouts[2]
    # another plan: a new layout
    fast.advance()
    for layer in range(2):
        fast.write_kv(layer, torch.randn(3, 2, 2, 1, 8))
    fast.apply_plan(torch.tensor([[0, 0, 1, 1, 2, 3, 4]]).expand(3, 7), torch.ones(3, 7), 5)
    assert fast._layout is not layouts[0] and len(fast) == 5


def test_merge_rows_weighted_mean():
    x = torch.arange(12.0).view(1, 4, 3)
    out = merge_rows(x, torch.tensor([[0, 0, -1, 1]]), torch.tensor([[1.0, 3.0, 5.0, 1.0]]), 2)
    torch.testing.assert_close(out[0, 0], (x[0, 0] + 3 * x[0, 1]) / 4)
    torch.testing.assert_close(out[0, 1], x[0, 3])


def _rollout(model, engine, comp, episodes=8, seed=1):
    tasks = SPEC.tasks_for("test")
    venv = DummyVecEnv([make_env(SPEC, **t) for t in tasks])
    acts = []
    out = run_episodes(model, venv, SPEC, episodes, engine=engine, compression=comp, seed=seed,
                       on_step=lambda t, tok, a, r, e: acts.append(a.tolist()))  # fmt: skip
    return out, acts


@pytest.mark.parametrize("engine", ENGINES)
def test_ratio_one_reproduces_uncompressed_actions(engine):
    model = _tiny(max_context=20)
    _, ref = _rollout(model, engine, None)
    for name in STRATEGIES:
        comp = make_compression(name, context=20, ratio=1.0, interval=3, **PARAMS[name])
        _, acts = _rollout(model, engine, comp)
        assert acts == ref, name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "none"])
def test_compressed_rollout_end_to_end(engine, name):
    model = _tiny(max_context=20)
    comp = make_compression(name, context=20, ratio=0.3, interval=4, **PARAMS[name])
    out, _ = _rollout(model, engine, comp)
    full, _ = _rollout(model, engine, None)
    assert out["returns"].shape == (2, 8)
    assert out["mean_context_length"] < full["mean_context_length"]
    assert out["mean_context_length"] <= comp.budget(20) + comp.interval


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 0.0}, "compression_ratio must be in"),
        ({"ratio": 1.5}, "compression_ratio must be in"),
        ({"interval": 0}, "compression_interval must be >= 1"),
        ({"keep_recent": 50}, "keep_recent must be in"),
    ],
)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_compression("fixed_window", context=20, **kwargs)


def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: none, fixed_window, topk, pooling, sink_window"):
        make_compression("magic")


def _template(*args, cwd):
    """compression_template.py in-process, one torch thread (the real process: tests/test_bad_input.py)."""
    import compression_template

    compression_template.main([*args, "--threads", "1"] if "--threads" not in args else list(args))


def test_compression_template_single_and_sweep(tiny_checkpoint, tmp_path):
    out = tmp_path / "one"
    _template("--checkpoint", str(tiny_checkpoint), "--strategy", "topk", "--ratio", "0.5", "--interval", "5",
                  "--keep-recent", "4", "--episodes", "6", "--seeds", "0", "1", "--out", str(out), cwd=tmp_path)  # fmt: skip
    rows = json.loads((out / "compression_results.json").read_text())["rows"]
    assert len(rows) == 1
    for key in (
        "engine",
        "strategy",
        "ratio",
        "interval",
        "mean_context_length",
        "speedup",
        "return_full",
        "return_compressed",
        "performance_loss",
        "seeds",
    ):
        assert key in rows[0]
    row = rows[0]
    assert row["engine"] == "kv" and row["seeds"] == [0, 1] and len(row["time_full_s"]) == len(row["time_compressed_s"]) == 2
    assert row["speedup"] == pytest.approx(sum(row["time_full_s"]) / sum(row["time_compressed_s"]))  # summed times, paired runs
    assert row["speedup_pair_min"] <= row["speedup"] <= row["speedup_pair_max"]
    assert row["mean_context_length"] < row["full_context_length"] and row["shortens_context"]  # budget 10 of 20 tokens
    res = json.loads((out / "compression_results.json").read_text())
    assert (res["schema"], res["schema_version"]) == ("ad-compression-results", 2)

    out = tmp_path / "sweep"
    _template("--checkpoint", str(tiny_checkpoint), "--sweep", "--engine", "rerun", "--episodes", "5", "--seeds", "0",
                  "--keep-recent", "2", "--n-sink", "1", "--out", str(out), cwd=tmp_path)  # fmt: skip
    res = json.loads((out / "compression_results.json").read_text())
    assert len(res["rows"]) == 4 * 5 and {r["engine"] for r in res["rows"]} == {"rerun"}
    assert (out / "compression_tradeoff.png").stat().st_size > 10_000

    out = tmp_path / "subset"
    _template("--checkpoint", str(tiny_checkpoint), "--sweep", "--sweep-strategies", "pooling", "sink_window",
                  "--sweep-ratios", "0.5", "0.25", "--vec-env", "batched", "--threads", "1", "--episodes", "3", "--seeds", "0",
                  "--keep-recent", "2", "--n-sink", "1", "--out", str(out), cwd=tmp_path)  # fmt: skip
    res = json.loads((out / "compression_results.json").read_text())
    assert [(r["strategy"], r["ratio"]) for r in res["rows"]] == [
        ("pooling", 0.5), ("pooling", 0.25), ("sink_window", 0.5), ("sink_window", 0.25)
    ]  # fmt: skip
    assert res["torch_threads"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "0"], "--compression-ratio must be in [1e-06, 1.0]"),
        (["--ratio", "1.2"], "--compression-ratio must be in [1e-06, 1.0]"),
        (["--strategy", "magic"], "valid: none, fixed_window"),
        (["--interval", "0"], "--compression-interval must be in [1, 1000000]"),
        (["--keep-recent", "500"], "keep_recent must be in"),
        (["--sweep", "--sweep-strategies", "magic"], "valid: none, fixed_window"),
        (["--sweep", "--sweep-ratios", "0.5", "0"], "--sweep-ratios must be in [1e-06, 1.0]"),
        (["--vec-env", "subproc"], "--vec-env must be one of batched, dummy"),
        (["--threads", "-1"], "--threads must be in [0, "),
    ],
)
def test_compression_template_bad_input(tiny_checkpoint, tmp_path, args, message, capsys):
    """In-process through run_cli (the exit codes of real processes: tests/test_bad_input.py)."""
    import compression_template

    from adlens.config import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(compression_template.main, ["--checkpoint", str(tiny_checkpoint), *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
