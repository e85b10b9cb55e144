"""The streaming (sink + ring buffer) cache, the static-shape cached step and lazily computed scores.

python -m pytest -q tests/test_streaming.py
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from adlens.capture import capture_attention
from benchmarks.inference_speed import main as benchmark_main
from adlens.compression import make_compression
from adlens.errors import UserError
from env import get_spec, make_env
from model.ad import ADConfig, ADTransformer, Tokens
from model.cache import KVCache
from model.rollout import KVEngine, run_episodes

ATOL = 1e-5


def _model(n_layer=1, max_context=16, **overrides) -> ADTransformer:
    """Seeded small model; weights drawn with std 0.3 so that a wrong position or mask shows in the logits."""
    torch.manual_seed(0)
    cfg = {"n_states": 9, "n_actions": 5, "horizon": 4, "max_context": max_context, "n_layer": n_layer, "n_head": 2, "d_model": 16}
    model = ADTransformer(ADConfig(**(cfg | {"dropout": 0.0} | overrides))).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, 0.3)
    return model


def _tokens(cfg: ADConfig, batch: int, length: int, seed: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    return Tokens(
        torch.randint(cfg.n_states, (batch, length), generator=g),
        torch.randint(cfg.n_actions + 1, (batch, length), generator=g),
        torch.randint(2, (batch, length), generator=g).float(),
        (torch.arange(length) % cfg.horizon).expand(batch, length).contiguous(),
    )


def _at(tok: Tokens, idx) -> Tokens:
    return Tokens(*[f[:, idx] for f in tok])


@pytest.mark.parametrize("n_sink", [0, 1, 3])
def test_streaming_cache_equals_full_forward_over_kept_tokens(n_sink):
    # With one layer, keys/values depend on their own token only, so the cached step must equal a full
    # forward over exactly the kept tokens (sinks + newest) at positions 0..n-1: before the ring wraps,
    # at the wrap and many steps after it (the sinks re-rotated every step).
    model = _model(n_layer=1, max_context=16)
    cap, n = 7, 30
    tok = _tokens(model.cfg, 3, n, seed=1)
    cache = model.new_cache(3, capacity=cap, n_sink=n_sink)
    for t in range(n):
        step = model.step(_at(tok, slice(t, t + 1)), cache)  # (B, A)
        kept = list(range(t + 1)) if t < cap else list(range(n_sink)) + list(range(t + 1 - (cap - n_sink), t + 1))
        assert len(cache) == len(kept)
        assert cache.src_step[0, cache.order()[0]].tolist() == kept  # temporal order, the lead's capture reads it
        with torch.no_grad():
            full = model(_at(tok, kept))[:, -1]
        torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_streaming_cache_equals_compaction_at_every_step(static):
    # Any depth: the ring buffer must give what the compacting cache gives when sink_window's plan is
    # applied after every step (the same kept keys/values, re-rotated to contiguous positions). The
    # ring attends over `budget` tokens, the new one included, so the compacting cache keeps one fewer.
    model = _model(n_layer=3, max_context=16)
    comp = make_compression("sink_window", context=16, ratio=0.5, n_sink=2)
    before_step = make_compression("sink_window", context=16, ratio=7 / 16, n_sink=2)
    assert before_step.budget(16) == comp.budget(16) - 1
    tok = _tokens(model.cfg, 2, 40, seed=2)
    ring = model.new_cache(2, capacity=comp.budget(16), n_sink=2, static=static)
    ref = model.new_cache(2)
    for t in range(40):
        a = model.step(_at(tok, slice(t, t + 1)), ring)
        b = model.step(_at(tok, slice(t, t + 1)), ref)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert len(ring) == len(ref) == min(t + 1, comp.budget(16))
        if before_step.due(1, len(ref), 16):
            ref.apply_plan(*before_step.plan(len(ref), 16, batch=2))


def _rollout(model, engine, comp, spec, episodes, record_len=False):
    tasks = spec.tasks_for("test")
    venv = DummyVecEnv([make_env(spec, **t) for t in tasks])
    logs = []
    out = run_episodes(model, venv, spec, episodes, engine=engine, compression=comp, greedy=True, seed=0,
                       on_step=lambda t, tok, a, r, e: logs.append((a.tolist(), len(e))))  # fmt: skip
    return out, logs


def test_sink_window_kv_and_rerun_keep_the_same_tokens():
    # One layer: with the same kept tokens at the same positions both engines compute the same policy,
    # far past the point where the ring wrapped; the context length is the same at every step.
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 4, "n_holdout": 2})
    model = _model(n_layer=1, max_context=16)
    comp = make_compression("sink_window", context=16, ratio=0.5, interval=5, n_sink=2)
    _, kv = _rollout(model, "kv", comp, spec, episodes=12)
    _, rerun = _rollout(model, "rerun", comp, spec, episodes=12)
    assert kv == rerun
    assert max(n for _, n in kv) == comp.budget(16)


@pytest.mark.parametrize("n_sink_or_none", [None, 2])
def test_static_step_equals_dynamic_step(n_sink_or_none):
    # The masked full-capacity attention (fixed shapes) equals attention over the valid prefix, while
    # the cache fills and after it slides or wraps.
    model = _model(n_layer=2, max_context=12)
    tok = _tokens(model.cfg, 3, 20, seed=3)
    caches = [model.new_cache(3, static=s, n_sink=n_sink_or_none) for s in (False, True)]
    for t in range(20):
        a, b = (model.step(_at(tok, slice(t, t + 1)), c) for c in caches)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name, params", [("fixed_window", {"keep_recent": 3}), ("topk", {"keep_recent": 2}), ("pooling", {"keep_recent": 3})]
)
def test_static_compressed_engine_equals_dynamic(name, params):
    model = _model(n_layer=2, max_context=16)
    comp = make_compression(name, context=16, ratio=0.4, interval=3, **params)
    tok = _tokens(model.cfg, 2, 40, seed=4)
    engines = [KVEngine(model, 2, comp, static=s) for s in (False, True)]
    assert engines[1].cache.capacity == comp.budget(16) + comp.interval  # a compressed cache is a smaller one
    with torch.inference_mode():
        for t in range(40):
            a, b = (e.step(_at(tok, slice(t, t + 1))) for e in engines)
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            assert len(engines[0]) == len(engines[1])


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("capacity", [20, 9])
def test_scores_equal_per_step_accumulation(capacity, eager):
    # Scores equal the attention each step's query paid, accumulated step by step (H2O), both when
    # computed lazily from stored queries in one product when read and when summed from the step's
    # own weights (eager): also when the cache slides (capacity 9) and when the query store fills
    # (score_window 4) between reads.
    model = _model(n_layer=2, max_context=20)
    tok = _tokens(model.cfg, 2, 16, seed=5)
    cache = model.new_cache(2, capacity=capacity, track_scores=True, score_window=4, eager_scores=eager)
    assert cache.eager_scores == eager
    ref = torch.zeros(2, capacity)
    with capture_attention(model) as rec:
        for t in range(16):
            model.step(_at(tok, slice(t, t + 1)), cache)
            ref[:, cache.newest_slot] = 0.0
            for name in rec.names:
                attn = rec.weights[name][-1]  # (B, H, 1, n) over slots
                ref[:, : attn.shape[-1]] += attn[:, :, 0].mean(1) / model.cfg.n_layer
            if t in (6, 15):
                torch.testing.assert_close(cache.ordered_scores(), ref[:, : len(cache)].gather(1, cache.order()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("name, params", [("topk", {"keep_recent": 2}), ("pooling", {"keep_recent": 3})])
def test_score_queries_count_only_the_last_queries_of_each_interval(name, params, eager):
    # With score_queries k, the scores a compaction reads are the attention paid by the last k queries
    # of each interval (accumulated over the token's life, as H2O's), and only those queries are stored.
    model = _model(n_layer=2, max_context=16)
    interval, k = 5, 2
    comp = make_compression(name, context=16, ratio=0.5, interval=interval, score_queries=k, **params)
    engine = KVEngine(model, 2, comp, eager_scores=eager)
    if not eager:
        assert engine.cache._q.shape[3] == k  # the query store holds k, not the interval
    tok = _tokens(model.cfg, 2, 40, seed=8)
    ref = torch.zeros(2, engine.cache.capacity)  # per slot
    seen, state = [], {}
    orig_plan = comp.plan

    def fold_in():  # the new token starts at 0; add the attention the step's query paid, if it counts
        if state["folded"]:
            return
        state["folded"] = True
        ref[:, engine.cache.newest_slot] = 0.0
        if state["counts"]:
            for layer in rec.names:
                attn = rec.weights[layer][-1]  # (B, H, 1, n) over slots
                ref[:, : attn.shape[-1]] += attn[:, :, 0].mean(1) / model.cfg.n_layer

    def plan(n, context, scores=None, batch=None):
        fold_in()
        seen.append((scores.clone(), ref[:, :n].gather(1, engine.cache.order()).clone()))
        state["compacted"] = True
        return orig_plan(n, context, scores=scores, batch=batch)

    comp.plan = plan
    with capture_attention(model) as rec, torch.inference_mode():
        for t in range(40):
            state.update(counts=engine._since % interval >= interval - k, folded=False, compacted=False)
            engine.step(_at(tok, slice(t, t + 1)))
            if state["compacted"]:  # the scores moved with the plan (tested in apply_plan's tests): follow them
                ref.zero_()
                ref[:, : len(engine.cache)] = engine.cache.scores[:, : len(engine.cache)]
            else:
                fold_in()
    assert len(seen) >= 4
    for got, want in seen:
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # k at least the interval is every query: the same engine as the default
    full = KVEngine(model, 2, make_compression(name, context=16, ratio=0.5, interval=interval, score_queries=interval, **params),
                    eager_scores=eager)  # fmt: skip
    plain = KVEngine(model, 2, make_compression(name, context=16, ratio=0.5, interval=interval, **params), eager_scores=eager)
    with torch.inference_mode():
        for t in range(40):
            assert torch.equal(full.step(_at(tok, slice(t, t + 1))), plain.step(_at(tok, slice(t, t + 1))))
    with pytest.raises(ValueError, match="score_queries must be >= 0"):
        make_compression(name, context=16, ratio=0.5, score_queries=-1, **params)


def test_ratio_one_and_none_build_the_uncompressed_engine():
    model = _model(n_layer=2, max_context=16)
    tok = _tokens(model.cfg, 2, 30, seed=6)
    plain = KVEngine(model, 2, None)
    names = ("none", "sink_window", "topk", "fixed_window")
    same = [
        KVEngine(model, 2, make_compression(n, context=16, ratio=1.0, **({} if n in ("none", "sink_window") else {"keep_recent": 4})))
        for n in names
    ]
    with torch.inference_mode():
        for t in range(30):
            want = plain.step(_at(tok, slice(t, t + 1)))
            for e in same:
                assert torch.equal(e.step(_at(tok, slice(t, t + 1))), want)


def test_streaming_cache_rejects_bad_sinks_and_plans():
    model = _model()
    with pytest.raises(ValueError, match="n_sink must be in"):
        model.new_cache(2, capacity=4, n_sink=4)
    cache = model.new_cache(2, capacity=4, n_sink=1)
    with pytest.raises(NotImplementedError):
        cache.apply_plan(*make_compression("sink_window", context=4, ratio=0.5, n_sink=1).plan(4, 4, batch=2))
    assert copy.deepcopy(cache).n_sink == 1


@pytest.mark.parametrize("grid_size", [0, 3])
def test_step_embedding_equals_embed_also_after_a_weight_update(grid_size):
    model = _model(grid_size=grid_size)
    tok = _tokens(model.cfg, 3, 5, seed=7)
    with torch.no_grad():
        assert torch.equal(model._embed_step(tok), model.embed(tok))
        for p in model.parameters():
            p.add_(0.1)  # an optimizer step: the cached state table must follow
        assert torch.equal(model._embed_step(tok), model.embed(tok))


def test_step_reads_the_parameters_new_cache_looked_up():
    """The cached step reads parameters looked up once per cache: in-place updates show at once, a
    parameter replaced by another object from the next `new_cache` on."""
    model = _model(n_layer=2, grid_size=3)
    tok = _tokens(model.cfg, 3, 1, seed=3)

    def step_vs_forward(cache) -> float:
        return float((model.step(tok, cache) - model(tok)[:, -1]).abs().max())

    with torch.no_grad():
        assert step_vs_forward(model.new_cache(3)) < ATOL
        model.blocks[1].mlp[2].bias.add_(0.5)  # in place: seen by the parameters already looked up
        model.action_emb.weight.mul_(2.0)
        model.blocks[0].attn.qkv.weight.mul_(1.5)  # also through the step's query/key rows in pair order
        cache = KVCache(2, 3, 2, 16, model.cfg.head_size, "cpu", torch.float32)  # a cache made without new_cache
        assert step_vs_forward(cache) < ATOL
        model.head.bias = torch.nn.Parameter(model.head.bias + 1.0)  # replaced: seen from the next new_cache on
        assert step_vs_forward(model.new_cache(3)) < ATOL


def test_inference_speed_benchmark_smoke(tmp_path):
    """The benchmark times every engine in pairs with (b) and reports (c) against (b); bad input exits 2."""
    out = tmp_path / "bench.json"
    res = benchmark_main(["--contexts", "24", "--envs", "2", "--steps", "2", "--rounds", "2", "--no-rerun", "--ratios", "0.5",
                "--interval", "2", "--keep-recent", "2", "--n-sink", "1", "--out", str(out)])  # fmt: skip
    assert torch.is_grad_enabled()  # the benchmark's no_grad ends with it
    labels = [r["engine"] for r in res["rows"]]
    assert labels == ["(b) kv", "(c) fixed_window 0.5", "(c) topk 0.5", "(c) pooling 0.5", "(c) sink_window 0.5"]
    for r in res["rows"][1:]:  # (c) against (b) in its own pairs
        assert r["speedup_vs_kv"] == pytest.approx(r["kv_ms_per_step_paired"] / r["ms_per_step"])
        assert r["speedup_vs_kv_min"] <= r["speedup_vs_kv"] <= r["speedup_vs_kv_max"]
    assert all(r["env_steps_per_s"] == pytest.approx(1000 * 2 / r["ms_per_step"]) for r in res["rows"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and res["schema"] == "ad-benchmark-inference-speed"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "inference_speed.py"
    r = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--rounds must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_score_queries_configurations_in_the_speed_benchmark():
    res = benchmark_main(["--contexts", "24", "--envs", "2", "--steps", "2", "--rounds", "1", "--no-rerun", "--ratios", "0.5",
                          "--interval", "4", "--keep-recent", "2", "--strategies", "topk", "sink_window", "--score-queries", "0", "2"])  # fmt: skip
    assert [r["engine"] for r in res["rows"]] == ["(b) kv", "(c) topk 0.5", "(c) topk 0.5 q2", "(c) sink_window 0.5"]


def test_step_attention_benchmark_forces_each_way_and_reports_the_default(tmp_path):
    """benchmarks/step_attention.py times the fused and the explicit attention side by side and says
    which one the step takes: explicit over the full 240 slots at 32 environments (128 rows), fused
    over sink_window 0.1's 24 slots. It leaves the step's own choice in place afterwards."""
    import model.ad as ad
    from benchmarks.step_attention import main as attention_main

    real, threads = ad.step_attention, torch.get_num_threads()
    out = tmp_path / "attention.json"
    try:
        doc = attention_main(["--envs", "32", "--slots", "24", "--rounds", "1", "--steps", "2", "--configs", "none", "sink_window:0.1",
                              "--out", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert ad.step_attention is real
    assert [(c["slots"], c["fused_us"] > 0, c["explicit_us"] > 0) for c in doc["calls"]] == [(24, True, True)]
    assert [(r["config"], r["slots"], r["default"]) for r in doc["steps"]] == [("none", 240, "explicit"), ("sink_window:0.1", 24, "fused")]
    assert all(r["max_logit_diff"] < 1e-4 and r["fused_ms"] > 0 and r["explicit_ms"] > 0 for r in doc["steps"])
    assert json.loads(out.read_text())["schema"] == "ad-benchmark-step-attention"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "step_attention.py"
    r = subprocess.run([sys.executable, str(script), "--configs", "topk:2.0"], capture_output=True, text=True)
    assert r.returncode == 2 and "ratio" in r.stderr and "Traceback" not in r.stderr


def test_compaction_cost_benchmark_times_every_compaction(tmp_path, monkeypatch):
    from benchmarks import compaction_cost
    from benchmarks.compaction_cost import main as cost_main

    order, block = [], compaction_cost._Timed.block
    monkeypatch.setattr(compaction_cost._Timed, "block", lambda self, tokens: (order.append((self.spec, len(tokens))), block(self, tokens)))
    out = tmp_path / "cost.json"
    rows = cost_main(["--envs", "2", "--steps", "40", "--rounds", "2", "--configs", "topk:0.5:keep_recent=20:score_queries=4",
                      "fixed_window:0.5:keep_recent=20", "--out", str(out)])  # fmt: skip
    specs = ["none", "topk:0.5:keep_recent=20:score_queries=4", "fixed_window:0.5:keep_recent=20"]
    assert order == [(x, 20) for x in specs] * 2  # the engines take turns, block by block
    assert [r["config"] for r in rows] == ["none", "topk:0.5:keep_recent=20:score_queries=4", "fixed_window:0.5:keep_recent=20"]
    plain, rows = rows[0], rows[1:]
    assert plain["compactions"] == 0 and plain["mean_context"] == 240 and plain["ms_compaction_step"] == 0  # the uncompressed reference
    for r in rows:
        assert r["compactions"] == 2 and 120 <= r["mean_context"] <= 140  # every 20 steps, between budget and budget + interval
        assert 0 < r["apply_ms_per_compaction"] and 0 < r["apply_share"] < 1
        assert (
            r["ms_compaction_step"] > r["apply_ms_per_compaction"] and r["ms_between_compactions"] > 0
        )  # a compacting step includes its apply
        assert abs(38 * r["ms_between_compactions"] + 2 * r["ms_compaction_step"] - 40 * r["ms_per_step"]) < 0.05 * 40 * r["ms_per_step"]
    assert rows[0]["scores_ms_per_compaction"] > 0 and rows[1]["scores_ms_per_compaction"] == 0  # fixed_window reads no scores
    assert json.loads(out.read_text())["schema"] == "ad-benchmark-compaction-cost"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compaction_cost.py"
    r = subprocess.run([sys.executable, str(script), "--configs", "topk:2.0"], capture_output=True, text=True)
    assert r.returncode == 2 and "ratio" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(script), "--steps", "40", "--rounds", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--rounds" in r.stderr and "Traceback" not in r.stderr


def test_train_step_benchmark_compares_attention_dropout_with_the_fused_kernel(tmp_path):
    from benchmarks.train_step import main as train_step_main

    res = train_step_main(["--context", "16", "--batch-size", "2", "--steps", "1", "--rounds", "2", "--out", str(tmp_path / "t.json")])
    ms = res["ms_per_step"]
    assert set(ms) == {"attn_dropout", "fused"} and res["speedup_min"] <= res["speedup"] <= res["speedup_max"]
    assert res["schema"] == "ad-benchmark-train-step"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"
    r = subprocess.run([sys.executable, str(script), "--attn-dropout", "1.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "--attn-dropout must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / ".git").exists(), reason="needs the project's git history")
def test_step_commits_runs_two_revisions_side_by_side(tmp_path, tiny_checkpoint):
    """benchmarks/step_commits.py with the same commit on both sides: both workers run, alternate, and
    give the same logits; an unknown revision is refused before any worker starts."""
    from benchmarks.step_commits import main as commits_main

    out = tmp_path / "commits.json"
    doc = commits_main(["--base", "HEAD", "--new", "HEAD", "--checkpoint", str(tiny_checkpoint), "--envs", "2", "--configs",
                        "topk:0.5:keep_recent=4", "--rounds", "2", "--pairs", "1", "--steps", "3", "--out", str(out)])  # fmt: skip
    assert doc["revisions"]["base"] == doc["revisions"]["new"]
    assert [(r["envs"], r["config"], r["steps"]) for r in doc["rows"]] == [(2, "topk:0.5:keep_recent=4", 3)]
    assert all(r["max_logit_diff"] == 0.0 and r["base_ms"] > 0 and r["new_ms"] > 0 and r["speedup"] > 0 for r in doc["rows"])
    assert json.loads(out.read_text())["schema"] == "ad-benchmark-step-commits"
    with pytest.raises(UserError, match="no-such-revision"):
        commits_main(["--base", "no-such-revision", "--checkpoint", str(tiny_checkpoint)])


@pytest.mark.parametrize("name, params", [("topk", {"keep_recent": 2}), ("pooling", {"keep_recent": 3}),
                                          ("topk", {"keep_recent": 2, "score_queries": 2})])  # fmt: skip
def test_eager_scores_equal_lazy_scores(name, params):
    # Summing the step's own attention weights gives the scores the lazy product gives (to rounding),
    # so both keep the same tokens and the rollouts agree, through many compactions.
    model = _model(n_layer=2, max_context=16)
    comp = make_compression(name, context=16, ratio=0.5, interval=3, **params)
    tok = _tokens(model.cfg, 3, 60, seed=9)
    lazy, eager = KVEngine(model, 3, comp, eager_scores=False), KVEngine(model, 3, comp, eager_scores=True)
    assert eager.cache.eager_scores and not lazy.cache.eager_scores and eager.cache._q is None
    with torch.inference_mode():
        for t in range(60):
            a, b = (e.step(_at(tok, slice(t, t + 1))) for e in (lazy, eager))
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            torch.testing.assert_close(lazy.cache.ordered_scores(), eager.cache.ordered_scores(), atol=ATOL, rtol=0)
            assert lazy.cache.order().tolist() == eager.cache.order().tolist()
