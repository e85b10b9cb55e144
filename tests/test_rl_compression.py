"""RL-aware compression (reward_anchor, episode_pool, reward_recent): kept positions on small synthetic
histories, the identity at ratio 1.0, the meta kept aligned with the key/value cache and the re-run
token history, and the same plan applied to both giving the same next step.

python -m pytest -q tests/test_rl_compression.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from stable_baselines3.common.vec_env import DummyVecEnv

from adlens.compression import STRATEGIES, HistoryMeta, first_reach, make_compression, merge_meta, merge_rows
from adlens.errors import UserError
from adlens.history import HistoryCompressor
from env import get_spec, make_env
from model.ad import ADConfig, ADTransformer, Tokens
from model.rollout import EpisodeCounter, run_episodes
from conftest import tiny_model

RL = [n for n, cls in STRATEGIES.items() if cls.needs_meta]
PARAMS = {"reward_anchor": {"keep_recent": 3, "lead": 1, "n_sink": 0, "n_anchor": 4}, "episode_pool": {"per_episode": 2},
          "reward_recent": {"keep_recent": 3, "n_reward": 2}}  # fmt: skip
ATOL = 1e-5


def _meta(rewards: list[list[float]], horizon: int) -> HistoryMeta:
    """Meta of histories that start at an episode's first step, `horizon` steps per episode."""
    reward = torch.tensor(rewards, dtype=torch.float32)
    t = torch.arange(reward.shape[1]).expand_as(reward)
    return HistoryMeta(reward, t // horizon, t % horizon)


def _kept(assign, row=0):
    return [i for i, a in enumerate(assign[row].tolist()) if a >= 0]


# 3 episodes of 5 steps: reward first reached at step 2 (episode 0) and step 3 (episode 1), none in episode 2.
# Position 10 (episode 2, step 0) carries the reward of episode 1's last step: not a first reach.
HIST = [[0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]]


def test_first_reach_marks_one_step_per_rewarded_episode():
    assert first_reach(_meta(HIST, 5))[0].nonzero()[:, 0].tolist() == [2, 8]


def test_reward_anchor_keeps_first_reaches_and_their_lead():
    comp = make_compression("reward_anchor", context=20, ratio=0.4, interval=1, keep_recent=3, lead=1, n_sink=0)
    scores = torch.zeros(1, 15)
    scores[0, 11] = 1.0  # the one token the attention fill adds
    assign, weight, n_out = comp.plan(15, 20, scores=scores, meta=_meta(HIST, 5))
    assert n_out == comp.budget(20) == 8
    assert _kept(assign) == [1, 2, 7, 8, 11, 12, 13, 14]  # lead + anchor per episode, attention, newest 3
    assert (weight[assign >= 0] == 1).all() and assign[0, -1] == n_out - 1


def test_reward_anchor_drops_the_oldest_anchors_first_and_fills_rows_alike():
    # Row 0 has first reaches in 4 episodes, row 1 in none: the budget holds 2 anchors + the newest 2.
    rows = [[0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0], [0] * 15]
    comp = make_compression("reward_anchor", context=10, ratio=0.4, interval=1, keep_recent=2, lead=0, n_sink=0)
    scores = torch.arange(15.0).flip(0).expand(2, 15)  # the oldest tokens drew the most attention
    assign, _, n_out = comp.plan(15, 10, scores=scores, meta=_meta(rows, 3))
    assert n_out == 4 and (assign >= 0).sum(1).tolist() == [4, 4]  # the budget, in every row
    assert _kept(assign, 0) == [7, 10, 13, 14]  # the two newest first reaches, never the older ones
    assert _kept(assign, 1) == [0, 1, 13, 14]  # no anchors: filled by attention
    comp = make_compression("reward_anchor", context=10, ratio=0.4, interval=1, keep_recent=2, lead=0, n_sink=0, n_anchor=1)
    assign, _, _ = comp.plan(15, 10, scores=scores, meta=_meta(rows, 3))
    assert _kept(assign, 0) == [0, 10, 13, 14]  # only the newest anchor; attention fills the rest


def test_episode_pool_honours_episode_boundaries():
    comp = make_compression("episode_pool", context=20, ratio=0.4, interval=1, per_episode=2)
    meta = _meta(HIST, 5)
    assign, weight, n_out = comp.plan(15, 20, meta=meta)
    a = assign[0].tolist()
    assert n_out == 8
    assert a[10:] == [3, 4, 5, 6, 7]  # the current episode whole
    assert a[5:10] == [2, 2, 2, 1, 2]  # episode 1: its first reach, then the rest pooled into one slot
    assert a[:5] == [-1, -1, 0, -1, -1]  # 9 slots for 8: episode 0 keeps its first reach, drops its pooled rest
    merged = merge_meta(meta, assign, n_out)
    assert merged.episode[0].tolist() == [0, 1, 1, 2, 2, 2, 2, 2]
    assert merged.reward[0, :3].tolist() == [1, 1, 1]  # the pooled rest of episode 1 was rewarded too
    # the plan is stable: a history already pooled is not pooled again (the same slots come back)
    again, _, n_again = comp.plan(8, 20, meta=merged)
    assert n_again == 8 and again[0].tolist() == list(range(8))


def test_episode_pool_keeps_the_newest_tokens_whole():
    # keep_recent 7 reaches into episode 1 (from position 8): its older part (5-7) is pooled like a
    # finished episode; 11 slots for 8 drop episode 0 first, then the oldest pooled group.
    comp = make_compression("episode_pool", context=20, ratio=0.4, interval=1, per_episode=2, keep_recent=7)
    assign, _, n_out = comp.plan(15, 20, meta=_meta(HIST, 5))
    assert n_out == 8 and assign[0].tolist() == [-1] * 6 + [0, 0] + list(range(1, 8))


def test_episode_pool_rows_keep_one_length_within_the_budget():
    # Row 1's first episode has no reward (2 pooled groups), row 0's has one (anchor + 1 group); the
    # oldest slots go when the current episode leaves less room.
    comp = make_compression("episode_pool", context=10, ratio=0.5, interval=1, per_episode=2)
    rows = [[0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], [0] * 13]
    assign, _, n_out = comp.plan(13, 10, meta=_meta(rows, 4))
    assert n_out == comp.budget(10) == 5
    for b in range(2):
        used = assign[b][assign[b] >= 0]
        assert set(used.tolist()) == set(range(5)) and assign[b, -1] == 4
        assert assign[b, 12] == 4 and assign[b, :8].max() < 4  # current episode (1 token) whole, older episodes pooled


def test_reward_recent_keeps_the_newest_rewarded_steps():
    comp = make_compression("reward_recent", context=20, ratio=0.4, interval=1, keep_recent=3, n_reward=2)
    assign, _, n_out = comp.plan(15, 20, meta=_meta(HIST, 5))
    assert n_out == 8 and _kept(assign) == [7, 8, 9, 10, 11, 12, 13, 14]  # 8, 9 rewarded (10 is step 0), then recency
    rows = [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]]  # 13 is in the recent window: it does not count
    assign, _, _ = comp.plan(15, 20, meta=_meta(rows, 5))
    assert _kept(assign) == [1, 2, 9, 10, 11, 12, 13, 14]


@pytest.mark.parametrize("name", RL)
def test_identity_at_ratio_one_and_within_budget(name):
    meta = _meta(HIST, 5)
    for ratio, context in ((1.0, 15), (0.9, 20)):  # n <= budget: nothing to do
        comp = make_compression(name, context=context, ratio=ratio, **PARAMS[name])
        assign, weight, n_out = comp.plan(15, context, scores=torch.rand(1, 15), meta=meta)
        assert n_out == 15 and assign[0].tolist() == list(range(15)) and (weight == 1).all()


@pytest.mark.parametrize("name", RL)
def test_refuses_to_plan_without_meta_and_in_the_history_hook(name):
    comp = make_compression(name, context=20, ratio=0.3, interval=2, **PARAMS[name])
    with pytest.raises(UserError, match="needs each token's reward and episode"):
        comp.plan(15, 20, scores=torch.rand(1, 15))
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
    with pytest.raises(UserError, match="history hook cannot tell"):
        HistoryCompressor(enc, comp, 20, step_of=lambda: 0)


# ---- the same plan on the key/value cache and on the token history ---------------------------------
def _model(n_layer=1, max_context=24) -> ADTransformer:
    """Seeded small model, weights drawn with std 0.3 so a wrong position or token shows in the logits."""
    torch.manual_seed(0)
    cfg = ADConfig(n_states=9, n_actions=5, horizon=4, max_context=max_context, n_layer=n_layer, n_head=2, d_model=16, dropout=0.0)
    model = ADTransformer(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.3)
    return model


def _tokens(batch: int, length: int, horizon: int = 4, seed: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    return Tokens(torch.randint(9, (batch, length), generator=g), torch.randint(6, (batch, length), generator=g),
                  (torch.rand(batch, length, generator=g) < 0.4).float(), (torch.arange(length) % horizon).expand(batch, length).contiguous())  # fmt: skip


def _at(tok: Tokens, idx) -> Tokens:
    return Tokens(*[f[:, idx] for f in tok])


@pytest.mark.parametrize("name", RL)
@torch.no_grad()
def test_kv_cache_and_token_history_apply_the_same_plan(name):
    # The same tokens fill a key/value cache of 16 slots (it slides, so its slots leave temporal order)
    # and a token history of their embeddings; the meta both carry must agree before and after one
    # plan. One layer: a key/value depends on its own token and position only, so after a selection
    # plan the cached step must equal a full forward over the kept tokens. (A merging plan averages
    # keys/values in the cache but embeddings in the history, which no model makes equal.)
    model = _model(n_layer=1, max_context=24)
    B, n, C = 3, 29, 16
    tok = _tokens(B, n + 1, seed=5)
    cache = model.new_cache(B, capacity=C, track_scores=True, track_meta=True)
    count = EpisodeCounter(B)
    xs, metas = [], []
    for t in range(n):
        step_tok = _at(tok, slice(t, t + 1))
        model.step(step_tok, cache)
        m = count(step_tok)
        cache.set_meta(*m)
        xs.append(model.embed(step_tok))
        metas.append(torch.stack([v.double() for v in m], 1))  # (B, 3)
    assert not cache._in_order  # the ring wrapped
    x = torch.cat(xs[-C:], dim=1)  # (B, C, D): the tokens the cache holds
    hm = torch.stack(metas[-C:], 1)  # (B, C, 3)
    hist_meta = HistoryMeta(hm[..., 0].float(), hm[..., 1].long(), hm[..., 2].long())
    meta = cache.ordered_meta()
    for a, b in zip(meta, hist_meta):
        assert torch.equal(a, b)
    comp = make_compression(name, context=24, ratio=0.4, interval=1, **PARAMS[name])  # budget 10 of 16
    assign, weight, n_out = comp.plan(C, 24, scores=cache.ordered_scores(), meta=meta)
    assert n_out == 10 or (name == "episode_pool" and n_out <= 10)  # episode_pool may need fewer slots
    cache.apply_plan(assign, weight, n_out)
    for a, b in zip(cache.ordered_meta(), merge_meta(hist_meta, assign, n_out)):
        assert torch.equal(a, b)
    new = _at(tok, slice(n, n + 1))
    step = model.step(new, cache)
    full = model.forward_embeddings(torch.cat([merge_rows(x, assign, weight, n_out), model.embed(new)], dim=1))[:, -1]
    if name != "episode_pool":
        assert bool(((assign >= 0).sum(1) == n_out).all())  # a selection
        torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["reward_recent", "episode_pool"])
def test_kv_and_rerun_engines_agree_through_many_compactions(name):
    # Score-free strategies: with one layer both engines keep the same tokens and pick the same greedy
    # actions at every step, many compactions in (episode_pool's merged slots aside, which it
    # creates only in finished episodes: checked by the context lengths alone).
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 4, "n_holdout": 2})
    model = _model(n_layer=1, max_context=24)
    comp = make_compression(name, context=24, ratio=0.4, interval=3, **PARAMS[name])
    logs = {}
    for engine in ("kv", "rerun"):
        venv = DummyVecEnv([make_env(spec, **t) for t in spec.tasks_for("test")])
        steps = logs[engine] = []
        run_episodes(model, venv, spec, 15, engine=engine, compression=comp, greedy=True, seed=0,
                     on_step=lambda t, tok, a, r, e, steps=steps: steps.append((a.tolist(), len(e))))  # fmt: skip
    assert [n for _, n in logs["kv"]] == [n for _, n in logs["rerun"]]
    assert max(n for _, n in logs["kv"]) <= comp.budget(24) + comp.interval
    if name == "reward_recent":
        assert logs["kv"] == logs["rerun"]


@pytest.mark.parametrize("engine", ["kv", "rerun"])
@pytest.mark.parametrize("name", RL)
def test_compressed_rollout_end_to_end(engine, name):
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2})
    model = tiny_model(max_context=20)
    comp = make_compression(name, context=20, ratio=0.3, interval=4, **PARAMS[name])
    venv = DummyVecEnv([make_env(spec, **t) for t in spec.tasks_for("test")])
    out = run_episodes(model, venv, spec, 8, engine=engine, compression=comp, seed=1)
    assert out["returns"].shape == (2, 8)
    assert out["mean_context_length"] <= comp.budget(20) + comp.interval


# ---- benchmarks/rl_compression.py: resuming a long run, and pooling runs on disjoint seeds ----------


def _bench(ckpt, out, seeds, *extra):
    from benchmarks.rl_compression import main

    argv = ["--checkpoint", str(ckpt), "--engine", "kv", "--episodes", "2", "--configs", "reward_recent:0.5:keep_recent=3:n_reward=2",
            "--seeds", *map(str, seeds), "--out", str(out), *extra]  # fmt: skip
    return main(argv)["rows"][0]


def test_benchmark_resume_reuses_finished_seeds_and_refuses_other_settings(tiny_checkpoint, tmp_path, capsys):
    import json

    from adlens.config import run_cli

    out = tmp_path / "bench"
    first = _bench(tiny_checkpoint, out, [0, 1])
    log = out / "seeds.jsonl"
    assert [json.loads(x)["seed"] for x in log.read_text().splitlines()] == [0, 1]
    log.write_text(log.read_text() + '{"seed": 2, "ba')  # a line cut short by a kill is measured again
    resumed = _bench(tiny_checkpoint, out, [0, 1, 2], "--resume")
    assert resumed["seeds"] == [0, 1, 2]
    assert resumed["time_full_s"][:2] == first["time_full_s"] and resumed["loss_per_seed"][:2] == first["loss_per_seed"]
    assert [json.loads(x)["seed"] for x in log.read_text().splitlines()[-1:]] == [2]
    fresh = _bench(tiny_checkpoint, out, [2])  # without --resume the log starts afresh
    assert fresh["loss_per_seed"] == resumed["loss_per_seed"][2:] and len(log.read_text().splitlines()) == 1
    before = log.read_text()
    from benchmarks.rl_compression import main

    for change, damage in ((["--episodes", "3"], None), ([], "not json\n")):
        if damage:
            log.write_text(damage + before)
        with pytest.raises(SystemExit) as e:
            run_cli(main, ["--checkpoint", str(tiny_checkpoint), "--engine", "kv", "--episodes", "2", "--seeds", "2", "3", "--configs",
                           "reward_recent:0.5:keep_recent=3:n_reward=2", "--out", str(out), "--resume", *change])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "seeds.jsonl" in err[0]
    assert log.read_text() == damage + before  # refused before anything was appended


def test_pooled_rows_equal_one_run_over_all_seeds():
    from benchmarks.regenerate import pool_rows
    from benchmarks.rl_compression import row_for
    import numpy as np

    rng = np.random.default_rng(0)
    comp = make_compression("reward_recent", context=20, ratio=0.5, interval=1, keep_recent=3, n_reward=2)

    def runs(n):
        return [{"time_s": float(rng.uniform(1, 2)), "context": float(rng.uniform(5, 20)), "returns": rng.uniform(0, 5, (2, 4)), "seed": i}
                for i in range(n)]  # fmt: skip

    base, comp_runs = runs(7), runs(7)
    whole = row_for("x", "reward_recent", comp, "kv", base, comp_runs)
    a = row_for("x", "reward_recent", comp, "kv", base[:3], comp_runs[:3])
    b = row_for("x", "reward_recent", comp, "kv", base[3:], comp_runs[3:])
    pooled = pool_rows([(a, 3), (b, 4)])
    for key in ("speedup", "speedup_pair_min", "speedup_pair_max", "performance_loss", "performance_loss_stderr", "mean_context_length",
                "full_context_length", "return_full", "return_compressed"):  # fmt: skip
        assert pooled[key] == pytest.approx(whole[key], rel=1e-12), key
    with pytest.raises(ValueError):
        pool_rows([(a, 4), (b, 4)])
