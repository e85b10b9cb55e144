"""Attention capture: hook lifetime, exactness against a manual recomputation, no effect on outputs,
the recorded rollout and its capture file."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adlens.capture_file import load_capture, save_capture
from conftest import build_capture, refused, run_script, tiny_model
from model.record import record_rollout
from adlens.errors import UserError
from env import get_spec
from model import Tokens
from adlens.capture import attention_modules, capture_attention

ROOT = Path(__file__).resolve().parent.parent


def _tiny(max_context=24, seed=0):
    return tiny_model(max_context, seed)


def _tokens(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Tokens(
        torch.randint(0, 9, (B, T), generator=g),
        torch.randint(0, 6, (B, T), generator=g),
        torch.randint(0, 2, (B, T), generator=g).float(),
        torch.arange(T).remainder(5).expand(B, T).clone(),
    )


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception():
    model = _tiny()
    attn_mods = [m for _, m in attention_modules(model)]
    assert _n_hooks(model) == 0
    with capture_attention(model) as rec:
        assert _n_hooks(model) == len(attn_mods)
        assert all(m.record for m in attn_mods)
        model(_tokens(1, 6))
    assert _n_hooks(model) == 0 and not any(m.record for m in attn_mods)
    assert len(rec.weights["blocks.0.attn"]) == 1
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            assert _n_hooks(model) > 0
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0 and not any(m.record for m in attn_mods)


def test_ad_weights_rows_sum_to_one_causal_and_outputs_unchanged():
    model = _tiny()
    tok = _tokens(2, 12)
    ref = model(tok)
    with capture_attention(model) as rec:
        out = model(tok)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert rec.names == ["blocks.0.attn", "blocks.1.attn"]
    for name in rec.names:
        (w,) = rec.weights[name]
        assert w.shape == (2, 2, 12, 12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 12))
        assert (w.triu(1) == 0).all()


def test_capture_only_some_layers():
    model = _tiny()
    with capture_attention(model, layers=[1]) as rec:
        model(_tokens(1, 5))
    assert list(rec.weights) == ["blocks.1.attn"]
    with pytest.raises(ValueError, match="out of range"):
        with capture_attention(model, layers=[7]):
            pass
    assert _n_hooks(model) == 0


def _encoder(d=16, heads=4, layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def _manual_layer_attention(layer: nn.TransformerEncoderLayer, x, mask):
    """softmax(Q K^T / sqrt(d) + mask) from the layer's own projection weights, per head."""
    mha = layer.self_attn
    d, h = mha.embed_dim, mha.num_heads
    q, k, _ = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).split(d, dim=-1)
    B, T, _ = x.shape
    q = q.view(B, T, h, d // h).transpose(1, 2)
    k = k.view(B, T, h, d // h).transpose(1, 2)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(d // h) + mask).softmax(-1)  # (B, H, T, T)


def test_transformer_encoder_per_head_weights_match_manual_recomputation():
    enc = _encoder()
    x = torch.randn(3, 7, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    fast_before = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        ref = enc(x, mask=mask, is_causal=True)
        with capture_attention(enc) as rec:
            out = enc(x, mask=mask, is_causal=True)
    assert torch.backends.mha.get_fastpath_enabled() == fast_before
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert rec.names == ["layers.0.self_attn", "layers.1.self_attn"]
    # recompute layer by layer from each layer's own input (norm_first=False: input is the residual stream)
    h = x
    with torch.no_grad():
        for i, layer in enumerate(enc.layers):
            manual = _manual_layer_attention(layer, h, mask)
            (got,) = rec.weights[f"layers.{i}.self_attn"]
            assert got.shape == (3, 4, 7, 7)
            torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)
            assert (got.triu(1) == 0).all()
            h = layer(h, src_mask=mask, is_causal=True)
    assert _n_hooks(enc) == 0


def test_mha_positional_arguments_kept():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 4, 8)
    kpm = torch.tensor([[False, False, False, True]])
    with torch.no_grad():
        ref, _ = mha(x, x, x, kpm, False)
        with capture_attention(mha) as rec:
            out, _ = mha(x, x, x, kpm, False)
    torch.testing.assert_close(out, ref)
    (w,) = rec.weights[""]
    assert w.shape == (1, 2, 4, 4) and (w[..., 3] == 0).all()


def test_rollout_capture_keeps_actions_and_records_exact_rows(tmp_path):
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2})
    model = _tiny(max_context=40)
    tasks = spec.tasks_for("test")  # two held-out tasks, rolled out together
    from env import make_vec_env
    from model.rollout import run_episodes

    acts_plain = []
    venv = make_vec_env(spec, tasks, "batched")
    run_episodes(model, venv, spec, 6, seed=3, on_step=lambda t, tok, a, r, e: acts_plain.append(a.tolist()))
    cap = record_rollout(model, spec, tasks, eval_timesteps=30, seed=3, num_full=3, full_task=1)
    assert cap["action"].T.tolist() == acts_plain  # capturing never changes the sampled actions

    N, S = cap["query_attn"].shape[:2]
    assert (N, S) == (2, 30) and cap["context_len"].tolist() == [list(range(1, 31))] * 2
    assert cap["meta"]["tasks"] == tasks and cap["meta"]["task"] == tasks[1] and cap["full_task"] == 1
    rows = cap["query_attn"].float()
    for i in range(N):
        for s in range(S):
            n = int(cap["context_len"][i, s])
            torch.testing.assert_close(rows[i, s, :, :, :n].sum(-1), torch.ones(2, 2), atol=2e-3, rtol=0)
            assert (rows[i, s, :, :, n:] == 0).all()
            assert cap["ctx_step"][i, s, :n].tolist() == list(range(n))
    assert not torch.equal(rows[0], rows[1])  # each task's own attention
    # the full matrix's last row is the query row the rollout used (up to float16 storage), for the kept task
    for t, full in zip(cap["full_steps"].tolist(), cap["full_attn"]):
        n = int(cap["context_len"][1, t])
        assert full.shape == (2, 2, n, n)
        assert full.untyped_storage().nbytes() == full.numel() * 4  # its own storage: the file keeps one task's matrices
        torch.testing.assert_close(full[:, :, -1], rows[1, t, :, :, :n], atol=2e-3, rtol=0)
    path = save_capture(cap, tmp_path / "cap.pt")
    back = load_capture(path)
    assert back["version"] == 2 and torch.equal(back["query_attn"], cap["query_attn"])
    assert back["meta"]["tasks"] == tasks


def test_rollout_capture_after_window_slides():
    spec = get_spec({"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2})
    model = _tiny(max_context=12)
    cap = record_rollout(model, spec, spec.tasks_for("test")[:1], eval_timesteps=25, seed=0, num_full=0)
    assert cap["context_len"].max() == 12
    last = cap["ctx_step"][0, -1, :12].tolist()
    assert last == list(range(13, 25))  # the newest 12 steps, oldest first


def test_version_one_captures_load_in_the_task_layout(tmp_path):
    from adlens.capture_file import task_view, upgrade

    v2 = build_capture(S=20, T=10)
    v1 = {k: v for k, v in v2.items()}
    cap = upgrade(v1)
    assert cap["query_attn"].shape[:2] == (1, 20) and cap["ctx_step"].shape == (1, 20, 10) and cap["full_task"] == 0
    one = task_view(cap, 0)
    for k in ("query_attn", "context_len", "ctx_step", "reward", "episode"):
        assert torch.equal(torch.as_tensor(one[k]), torch.as_tensor(v1[k]))
    torch.save({"format": "ad-attention-capture", "version": 1, **v1}, tmp_path / "v1.pt")
    assert load_capture(tmp_path / "v1.pt")["query_attn"].shape[:2] == (1, 20)


def test_load_capture_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_capture(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_capture(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match="cannot read"):
        load_capture(tmp_path / "junk.pt")
    torch.save({"format": "ad-attention-capture", "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(UserError, match="version"):
        load_capture(tmp_path / "v99.pt")


def _script(*args, cwd):
    return run_script("evaluate_with_attention.py", *args, cwd=cwd)


def test_evaluate_with_attention_script(tiny_checkpoint, tmp_path):
    out = tmp_path / "att"
    r = _script("--checkpoint", str(tiny_checkpoint), "--eval-timesteps", "12", "--num-full", "2", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cap = load_capture(out / "capture.pt")
    assert cap["query_attn"].shape[:2] == (2, 15)  # both held-out tasks; rounded up to whole episodes
    returns = json.loads((out / "returns.json").read_text())
    assert (returns["schema"], returns["schema_version"]) == ("ad-capture-returns", 1) and len(returns["tasks"]) == 2
    assert (out / "capture_config.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "missing.pt"], "checkpoint not found"),
        (["--task", "5"], "--task must be in"),
        (["--eval-timesteps", "0"], "--eval-timesteps must be >= 1"),
    ],
)
def test_evaluate_with_attention_bad_input(tiny_checkpoint, tmp_path, args, message, capsys):
    """In-process through run_cli (the exit codes of real processes: tests/test_bad_input.py)."""
    import evaluate_with_attention

    args = ["--checkpoint", str(tiny_checkpoint), *args] if args[0] != "--checkpoint" else args
    assert message in refused(capsys, evaluate_with_attention.main, args, tmp_path / "out")
