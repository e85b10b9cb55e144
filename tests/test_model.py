"""Tests of the AD transformer (causality, fused vs explicit attention, KV-cache decoding, rollout
engines) and of the training windows cut from learning histories.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_model.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from adlens.errors import UserError
from env import MOVES, get_spec, make_env
import model.ad as ad
from model.ad import ADConfig, ADTransformer, CausalSelfAttention, Tokens, single_query_attention
from adlens.capture import capture_attention
from model.data import HistoryData, grid_symmetries
from model.rope import apply_rope, pair_order, rope_cos_sin, rope_pairs, rotate_pairs
from model.rollout import run_episodes

ATOL = 1e-5


@pytest.fixture
def make_model():
    """Factory of small seeded AD models in eval mode (dropout 0).

    Weights are redrawn with std 0.3 instead of the training init's 0.02: at that init attention is
    almost uniform and logits almost equal, so a wrong score, mask or rotation would hide under atol.
    """

    def make(**overrides) -> ADTransformer:
        cfg = {"n_states": 9, "n_actions": 5, "horizon": 4, "max_context": 16, "n_layer": 2, "n_head": 2, "d_model": 16, "dropout": 0.0}
        torch.manual_seed(0)
        model = ADTransformer(ADConfig(**(cfg | overrides))).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    m.weight.normal_(0.0, 0.3)
        return model

    return make


def random_tokens(cfg: ADConfig, batch: int, length: int, seed: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length).expand(batch, length)
    return Tokens(
        states=torch.randint(cfg.n_states, (batch, length), generator=g),
        prev_actions=torch.randint(cfg.n_actions + 1, (batch, length), generator=g),  # n_actions = "none"
        prev_rewards=torch.randint(2, (batch, length), generator=g).float(),
        timesteps=(t % cfg.horizon).contiguous(),
    )


def _set_record(model: ADTransformer, on: bool) -> None:
    mods = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    assert len(mods) == model.cfg.n_layer
    for m in mods:
        m.record = on


def _slice(tok: Tokens, sl) -> Tokens:
    return Tokens(*[f[:, sl] for f in tok])


# ---- configuration and shapes --------------------------------------------------------------------
def test_config_validation_and_round_trip():
    cfg = ADConfig(n_states=9, max_context=16, n_layer=2, n_head=2, d_model=16)
    assert ADConfig.from_dict(cfg.to_dict()) == cfg and cfg.head_size == 8
    with pytest.raises(ValueError, match="even"):
        ADConfig(d_model=18, n_head=2)  # head size 9: rotary needs pairs
    with pytest.raises(ValueError, match="max_context"):
        ADConfig(max_context=0)
    with pytest.raises(ValueError, match="dropout"):
        ADConfig(dropout=1.0)
    with pytest.raises(ValueError, match="bogus"):
        ADConfig.from_dict(cfg.to_dict() | {"bogus": 1})


def test_attention_dropout_follows_dropout_unless_set():
    base = ADConfig(n_states=9, max_context=16, n_layer=2, n_head=2, d_model=16, dropout=0.2)
    assert [b.attn.dropout for b in ADTransformer(base).blocks] == [0.2, 0.2]
    fused = ADConfig(**(base.to_dict() | {"attn_dropout": 0.0}))
    model = ADTransformer(fused).train()
    assert [b.attn.dropout for b in model.blocks] == [0.0, 0.0] and model.blocks[0].drop.p == 0.2
    with pytest.raises(ValueError, match="attn_dropout"):
        ADConfig(attn_dropout=1.0)
    # in training, attention dropout 0 leaves only the residual and embedding dropout: with those off
    # too, training-mode outputs are the evaluation outputs
    quiet = ADTransformer(ADConfig(**(base.to_dict() | {"dropout": 0.0, "attn_dropout": 0.0})))
    tok = random_tokens(quiet.cfg, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(quiet.train()(tok), quiet.eval()(tok), atol=0, rtol=0)
    noisy = ADTransformer(ADConfig(**(base.to_dict() | {"dropout": 0.0, "attn_dropout": 0.5})))
    with torch.no_grad():
        assert not torch.equal(noisy.train()(tok), noisy.eval()(tok))


def test_logits_shape_and_context_limit(make_model):
    model = make_model()
    tok = random_tokens(model.cfg, 3, 16)
    assert model(tok).shape == (3, 16, 5)
    assert model(_slice(tok, slice(0, 1))).shape == (3, 1, 5)
    with pytest.raises(ValueError, match="max_context"):
        model(random_tokens(model.cfg, 1, 17))


# ---- attention: causality and the two paths ------------------------------------------------------
@pytest.mark.parametrize("record", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("pos", [0, 7, 15])
def test_later_tokens_never_change_earlier_logits(make_model, record, pos):
    model = make_model()
    _set_record(model, record)
    tok = random_tokens(model.cfg, 2, 16)
    changed = Tokens(
        states=tok.states.clone(), prev_actions=tok.prev_actions.clone(),
        prev_rewards=tok.prev_rewards.clone(), timesteps=tok.timesteps.clone(),
    )  # fmt: skip
    changed.states[:, pos:] = (tok.states[:, pos:] + 1) % model.cfg.n_states
    changed.prev_actions[:, pos:] = (tok.prev_actions[:, pos:] + 1) % (model.cfg.n_actions + 1)
    changed.prev_rewards[:, pos:] = 1.0 - tok.prev_rewards[:, pos:]
    with torch.no_grad():
        a, b = model(tok), model(changed)
    torch.testing.assert_close(a[:, :pos], b[:, :pos], atol=1e-6, rtol=0)
    assert (a[:, pos] - b[:, pos]).abs().max() > 1e-4  # the change itself is seen


def test_fused_and_explicit_attention_agree(make_model):
    model = make_model()
    tok = random_tokens(model.cfg, 3, 16, seed=1)
    with torch.no_grad():
        fused = model(tok)
        _set_record(model, True)
        explicit = model(tok)
        _set_record(model, False)
    torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=0)


def test_capture_gives_causal_rows_and_keeps_logits(make_model):
    model = make_model()
    tok = random_tokens(model.cfg, 2, 12, seed=2)
    with torch.no_grad():
        fused = model(tok)
        with capture_attention(model) as rec:
            captured = model(tok)
    torch.testing.assert_close(fused, captured, atol=ATOL, rtol=0)
    w = rec.stacked()  # (L, B, H, Tq, Tk)
    assert w.shape == (2, 2, 2, 12, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 2, 12), atol=1e-6, rtol=0)
    assert (w.triu(1) == 0).all()
    assert not any(m.record for m in model.modules() if isinstance(m, CausalSelfAttention))


# ---- incremental decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("n_layer, grid_size", [(1, 0), (2, 0), (2, 3)])
def test_kv_cache_step_equals_full_forward(make_model, n_layer, grid_size):
    # Exact equality is claimed only while the context fits in max_context. Beyond it the kv engine is a
    # streaming window (model/rollout.py docstring): cached keys/values of older tokens stay as computed
    # when those tokens arrived, while a full forward over the last max_context tokens recomputes them
    # from that window alone, so layers above the first differ (see the next test).
    model = make_model(n_layer=n_layer, max_context=24, grid_size=grid_size)
    T = model.cfg.max_context
    tok = random_tokens(model.cfg, 3, T, seed=3)
    with torch.no_grad():
        full = model(tok).softmax(-1)  # (B, T, A)
    cache = model.new_cache(batch_size=3)
    for t in range(T):
        step = model.step(_slice(tok, slice(t, t + 1)), cache).softmax(-1)  # (B, A)
        torch.testing.assert_close(step, full[:, t], atol=ATOL, rtol=0)
        assert len(cache) == t + 1 and cache.n_added == t + 1
    assert cache.full


def test_pair_order_rotation_is_apply_rope():
    """The cached step's rotation (pair order, one complex product) gives `apply_rope`'s numbers in pair
    order to rounding (a CPU that fuses the complex product's multiply-adds may round differently in
    the last bit), at large positions too; in place as well."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 1, 16, generator=g) * 10
    order = pair_order(16)
    assert order.tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    for pos in (0, 7, 239, 100_003):
        cos, sin = rope_cos_sin(torch.tensor([pos]), 16, 10000.0)
        expect = apply_rope(x, cos, sin)[..., order]
        torch.testing.assert_close(rotate_pairs(x[..., order], rope_pairs(cos, sin)), expect, atol=1e-5, rtol=1e-6)
        y = x[..., order].contiguous()
        rotate_pairs(y[:, :2], rope_pairs(cos, sin), out=y[:, :2])  # part of a tensor, in place
        torch.testing.assert_close(y[:, :2], expect[:, :2], atol=1e-5, rtol=1e-6)
        assert torch.equal(y[:, 2:], x[:, 2:][..., order])


def test_readonly_step_of_the_compile_benchmark_equals_the_cached_step(make_model):
    """benchmarks/compile_step.py's step for `torch.compile` (run here eagerly): the cache read-only,
    the replaced slot masked out, the new token merged in through the kernel's log-sum-exp, its keys
    and values written afterwards, gives the cached step's logits and cache, the window sliding."""
    from benchmarks.compile_step import readonly_step, step_param_list

    model = make_model()
    B, T = 3, model.cfg.max_context
    tok = random_tokens(model.cfg, B, 3 * T, seed=5)
    x_all = model.embed(tok).detach()
    cache = model.new_cache(B)
    with torch.inference_mode():
        for t in range(T + 3):  # full, and sliding
            model.step_embeddings(x_all[:, t : t + 1], cache)
        kv, step, params = cache.kv.clone(), readonly_step(model), step_param_list(model)
        for t in range(T + 3, 2 * T + 6):  # every slot replaced once more
            pos = cache.n_added
            mask = torch.zeros(1, 1, 1, T)
            mask[..., pos % T] = float("-inf")
            logits, new = step(x_all[:, t], kv, *cache.rope_at(pos), mask, *params)
            kv.index_copy_(4, torch.tensor([pos % T]), new)
            torch.testing.assert_close(logits, model.step_embeddings(x_all[:, t : t + 1], cache), atol=ATOL, rtol=0)
            torch.testing.assert_close(kv, cache.kv, atol=ATOL, rtol=0)


def test_single_query_attention_equals_fused_kernel():
    """The explicit single-query attention over a cache layer, a prefix of its slots, and with a mask."""
    torch.manual_seed(0)
    q = torch.randn(5, 3, 1, 8) * 2
    k, v = torch.randn(5, 3, 12, 8) * 2, torch.randn(5, 3, 12, 8)
    mask = torch.zeros(1, 1, 1, 12)
    mask[..., 9:] = float("-inf")
    for keys, values, m in ((k, v, None), (k[:, :, :7], v[:, :, :7], None), (k, v, mask)):
        want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=m)
        torch.testing.assert_close(single_query_attention(q, keys, values, m), want, atol=1e-6, rtol=0)


def test_step_gelu_is_gelu_and_contiguous():
    """The step's GELU (PyTorch's own kernel through a transposed view) gives F.gelu's values to float32
    rounding, as a contiguous (B, F) tensor, at one sequence and at many."""
    torch.manual_seed(0)
    for shape in ((1, 16), (8, 256), (300, 64)):
        u = torch.randn(*shape) * 4
        g = ad.step_gelu(u)
        assert g.shape == u.shape and g.is_contiguous()
        torch.testing.assert_close(g, torch.nn.functional.gelu(u), atol=2e-6, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_step_with_explicit_attention_equals_full_forward(make_model, monkeypatch, static):
    """From `EXPLICIT_ATTENTION_ROWS` (sequence, head) rows and `EXPLICIT_ATTENTION_SLOTS` slots on,
    with one CPU thread, the cached step attends explicitly instead of through the fused kernel: the
    same logits, with and without the static cache's mask, on either side of the slot threshold."""
    model = make_model(max_context=ad.EXPLICIT_ATTENTION_SLOTS + 4)
    B, T = ad.EXPLICIT_ATTENTION_ROWS // model.cfg.n_head, model.cfg.max_context
    tok = random_tokens(model.cfg, B, T, seed=5)
    calls = []
    monkeypatch.setattr(ad, "single_query_attention", lambda *a: calls.append(a[3] is not None) or single_query_attention(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            full = model(tok).softmax(-1)
            cache = model.new_cache(batch_size=B, static=static)
            for t in range(T):
                step = model.step(_slice(tok, slice(t, t + 1)), cache).softmax(-1)
                torch.testing.assert_close(step, full[:, t], atol=ATOL, rtol=0)
    finally:
        torch.set_num_threads(threads)
    # a static cache attends over all its slots (with a mask until full); a dynamic one over those filled
    explicit_steps = T if static else T + 1 - ad.EXPLICIT_ATTENTION_SLOTS
    assert len(calls) == explicit_steps * model.cfg.n_layer
    assert any(calls) == static


def test_kv_cache_past_max_context_is_a_sliding_window(make_model):
    # With one layer, keys/values depend only on their own token, so the streaming window is exactly
    # a full forward over the last max_context tokens (rotary positions are relative).
    # With more layers only the window length is guaranteed (no equality is claimed).
    T, n = 8, 20
    for n_layer in (1, 2):
        model = make_model(n_layer=n_layer, max_context=T)
        tok = random_tokens(model.cfg, 2, n, seed=4)
        cache = model.new_cache(batch_size=2)
        for t in range(n):
            step = model.step(_slice(tok, slice(t, t + 1)), cache).softmax(-1)
            assert len(cache) == min(t + 1, T)
            if n_layer == 1:
                with torch.no_grad():
                    window = model(_slice(tok, slice(max(0, t + 1 - T), t + 1)))[:, -1].softmax(-1)
                torch.testing.assert_close(step, window, atol=ATOL, rtol=0)
        assert cache.n_added == n
        assert sorted(cache.pos[0].tolist()) == list(range(n - T, n))


def _step_recorder():
    """An `on_step` callback for run_episodes that keeps every step's actions and states."""
    actions, states = [], []

    def on_step(t, tok, a, r, eng):
        actions.append(a.clone())
        states.append(tok.states.clone())

    return on_step, actions, states


def test_rollout_engines_agree_within_max_context(make_model):
    # kv and rerun see the same tokens and give the same policy up to max_context tokens; after that
    # kv is a streaming window (see the test above), so the comparison stops at max_context.
    model = make_model(max_context=16, horizon=4)
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 4, "n_holdout": 1})
    tasks = spec.tasks()[:3]
    runs = {}
    for engine in ("kv", "rerun"):
        venv = DummyVecEnv([make_env(spec, **t) for t in tasks])
        on_step, actions, states = _step_recorder()
        out = run_episodes(model, venv, spec, n_episodes=4, engine=engine, greedy=True, seed=0, on_step=on_step)
        runs[engine] = (out, torch.stack(actions), torch.stack(states))
    (kv, kv_a, kv_s), (rr, rr_a, rr_s) = runs["kv"], runs["rerun"]
    assert kv_a.shape == (16, 3)
    assert torch.equal(kv_a, rr_a) and torch.equal(kv_s, rr_s)
    np.testing.assert_array_equal(kv["returns"], rr["returns"])
    assert kv["returns"].shape == (3, 4)
    assert kv["mean_context_length"] == rr["mean_context_length"] == np.mean(np.arange(1, 17))
    with pytest.raises(ValueError, match="engine"):
        run_episodes(model, DummyVecEnv([make_env(spec, **tasks[0])]), spec, 1, engine="warp")


# ---- training windows ----------------------------------------------------------------------------
H, N_ACT = 4, 5


def _coded_history(n_streams: int, n_episodes: int):
    """Arrays whose every value encodes (stream, step): code = 1000 * (stream + 1) + step."""
    steps = np.arange(n_episodes * H)
    code = 1000 * (np.arange(n_streams)[:, None] + 1) + steps[None]  # (S, N)
    return code.copy(), code.copy(), code.astype(np.float32)


def _decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x).astype(np.int64)
    return x // 1000 - 1, x % 1000


@pytest.mark.parametrize("strides", [(1,), (2,), (3,), (1, 2, 3)])
def test_windows_are_consecutive_kept_steps(strides):
    n_streams, n_episodes, context = 3, 12, 10
    states, actions, rewards = _coded_history(n_streams, n_episodes)
    data = HistoryData(states, actions, rewards, H, N_ACT, context, strides)
    assert (data.n_streams, data.n_episodes) == (n_streams, n_episodes)
    tok, target = data.sample(np.random.default_rng(0), 400)
    assert all(f.shape == (400, context) for f in tok) and target.shape == (400, context)
    assert tok.states.dtype == tok.prev_actions.dtype == tok.timesteps.dtype == target.dtype == torch.long
    assert tok.prev_rewards.dtype == torch.float32
    seen_strides, seen_offsets, n_starts = set(), set(), 0
    for b in range(400):
        stream, step = _decode(tok.states[b].numpy())
        assert (stream == stream[0]).all()
        episode = step // H
        # the episodes of a window are every k-th one: a common stride k, one offset
        gaps = set(np.diff(np.unique(episode)).tolist())
        assert len(gaps) <= 1
        k = gaps.pop() if gaps else None
        assert k is None or k in strides
        if k is not None:
            seen_strides.add(k)
            seen_offsets.add((k, int(episode[0] % k)))
        # consecutive kept steps: within an episode +1, across kept episodes from its last step to the next's first
        kept = (episode - episode[0]) // (k or 1) * H + step % H
        assert (np.diff(kept) == 1).all()
        # timesteps = step within the episode; targets = the actions of the same steps
        assert tok.timesteps[b].tolist() == (step % H).tolist()
        t_stream, t_step = _decode(target[b].numpy())
        assert (t_stream == stream).all() and (t_step == step).all()
        # previous action/reward = the previous kept step's, for every position after the first
        for name in ("prev_actions", "prev_rewards"):
            p_stream, p_step = _decode(getattr(tok, name)[b, 1:].numpy())
            assert (p_stream == stream[:-1]).all() and (p_step == step[:-1]).all(), name
        # at the first position: the previous kept step (if the window does not start the kept stream)
        first_kept_episode = episode[0] % (k or 1) if k else None
        if k is not None and step[0] == first_kept_episode * H:
            n_starts += 1
            assert tok.prev_actions[b, 0] == N_ACT and tok.prev_rewards[b, 0] == 0.0
        elif step[0] % H:
            assert _decode(tok.prev_actions[b, :1].numpy())[1][0] == step[0] - 1
            assert _decode(tok.prev_rewards[b, :1].numpy())[1][0] == step[0] - 1
    assert seen_strides == ({s for s in strides})
    if max(strides) > 1:
        assert len(seen_offsets) > len(seen_strides)  # several first kept episodes are drawn
    assert n_starts > 0  # windows that start a (kept) stream are drawn too


def test_window_at_a_kept_episode_boundary_uses_the_previous_kept_step():
    # stride 2, context = 2 episodes: with enough draws some window starts exactly at a kept episode
    # other than the first; its previous step is the last step of the kept episode before it.
    states, actions, rewards = _coded_history(1, 8)
    data = HistoryData(states, actions, rewards, H, N_ACT, 2 * H, (2,))
    tok, _ = data.sample(np.random.default_rng(1), 300)
    _, first_step = _decode(tok.states[:, 0].numpy())
    hits = 0
    for b in np.flatnonzero((first_step % H == 0) & (first_step >= 2 * H)):
        _, prev = _decode(tok.prev_actions[b, :1].numpy())
        assert prev[0] == first_step[b] - H - 1  # skipped one episode
        hits += 1
    starts = np.flatnonzero((first_step == 0) | (first_step == H))  # the first kept episode's first step
    assert hits > 0 and len(starts) > 0
    assert (tok.prev_actions[starts, 0] == N_ACT).all() and (tok.prev_rewards[starts, 0] == 0).all()


def test_windows_reject_short_histories_and_bad_strides():
    states, actions, rewards = _coded_history(2, 6)
    HistoryData(states, actions, rewards, H, N_ACT, 6 * H, (1,))  # exactly fits
    with pytest.raises(UserError, match="too short"):
        HistoryData(states, actions, rewards, H, N_ACT, 6 * H + 1, (1,))
    with pytest.raises(UserError, match="too short"):
        HistoryData(states, actions, rewards, H, N_ACT, 3 * H + 1, (1, 2))  # stride 2 keeps 3 episodes
    with pytest.raises(UserError, match="strides"):
        HistoryData(states, actions, rewards, H, N_ACT, H, (0,))


def test_windows_train_the_model(make_model):
    # the windows are valid model input: one optimizer step lowers the loss on a fixed batch
    model = make_model(n_states=81, max_context=12, horizon=H).train()
    rng = np.random.default_rng(0)
    states = rng.integers(81, size=(2, 8 * H))
    actions = rng.integers(N_ACT, size=(2, 8 * H))
    data = HistoryData(states, actions, rng.integers(2, size=(2, 8 * H)).astype(np.float32), H, N_ACT, 12, (1, 2))
    tok, tgt = data.sample(rng, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(tok).flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_grid_symmetries_commute_with_the_dynamics():
    size = 5
    sym_states, sym_actions, cell_maps = grid_symmetries(size, MOVES)
    assert (sym_states[0] == np.arange(size * size)).all() and (sym_actions[0] == np.arange(N_ACT + 1)).all()
    assert len({tuple(m) for m in sym_states}) == 8  # eight distinct maps, each a permutation
    assert all(sorted(m) == list(range(size * size)) for m in sym_states)
    assert (sym_actions[:, N_ACT] == N_ACT).all() and (sym_actions[:, 4] == 4).all()  # start token, no-op
    centre = size // 2 * (size + 1)
    assert (sym_states[:, centre] == centre).all()  # every episode starts where it started
    for k, f in enumerate(cell_maps):
        for r, c, a in np.ndindex(size, size, N_ACT):
            moved = np.clip(np.array([r, c]) + MOVES[a], 0, size - 1)
            image = np.clip(np.array(f(r, c)) + MOVES[sym_actions[k, a]], 0, size - 1)
            assert tuple(image) == tuple(f(*moved)), (k, r, c, a)  # map then step == step then map
            assert sym_states[k, r * size + c] == f(r, c)[0] * size + f(r, c)[1]


@pytest.mark.parametrize("k", [1, 2, 6])
def test_augmented_windows_are_the_plain_windows_under_the_drawn_symmetry(k):
    # only symmetry k allowed: the same draws give the same windows, mapped by k
    rng = np.random.default_rng(0)
    S, n_ep, size = 3, 6, 3
    states = rng.integers(0, size * size, (S, n_ep * H))
    actions = rng.integers(0, N_ACT, (S, n_ep * H))
    rewards = rng.random((S, n_ep * H)).astype(np.float32)
    sym_states, sym_actions, _ = grid_symmetries(size, MOVES)
    allowed = np.zeros((S, 8), dtype=bool)
    allowed[:, k] = True
    plain = HistoryData(states, actions, rewards, H, N_ACT, 2 * H, (1, 2))
    aug = HistoryData(states, actions, rewards, H, N_ACT, 2 * H, (1, 2), (sym_states, sym_actions, allowed))
    tok_p, tgt_p = plain.sample(np.random.default_rng(5), 64)
    tok_a, tgt_a = aug.sample(np.random.default_rng(5), 64)
    assert torch.equal(tok_a.states, torch.from_numpy(sym_states[k])[tok_p.states])
    assert torch.equal(tok_a.prev_actions, torch.from_numpy(sym_actions[k])[tok_p.prev_actions])
    assert torch.equal(tgt_a, torch.from_numpy(sym_actions[k])[tgt_p])
    assert torch.equal(tok_a.prev_rewards, tok_p.prev_rewards) and torch.equal(tok_a.timesteps, tok_p.timesteps)
    assert not torch.equal(tok_a.states, tok_p.states)


def test_a_context_no_one_can_mean_is_refused_before_any_allocation():
    from adlens.errors import UserError
    from model.ad import MAX_CONTEXT

    with pytest.raises(UserError, match="max_context must be at most"):
        ADConfig(n_states=9, n_actions=5, horizon=6, max_context=MAX_CONTEXT + 1)
