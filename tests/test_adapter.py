"""Your own AD model through an adapter: the history hook, capture, compression and the scripts.

The end-to-end tests run the scripts in a subprocess whose working directory is a copy of
tests/user_ad/, a small AD codebase with its own top-level `model/` and `env/` packages (which the
toolkit must not shadow); the unit tests use adapters whose model is defined inline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adlens.adapter import load_adapter, record_capture
from adlens.capture import capture_attention
from adlens.compression import STRATEGIES, make_compression
from adlens.errors import UserError
from adlens.history import HistoryCompressor, default_token_steps
from conftest import refused, run_script

ROOT = Path(__file__).resolve().parent.parent
USER_AD = ROOT / "tests" / "user_ad"
GUIDE = ROOT / "ATTENTION_ANALYSIS_README.md"


def _encoder(D=16, heads=2, layers=2, batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, heads, 2 * D, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


class _Spy:
    """Records what the module really received (registered after the compressor's pre-hook)."""

    def __init__(self, module):
        self.inputs = []
        self.handle = module.register_forward_pre_hook(lambda _m, args, kwargs: self.inputs.append((args, kwargs)), with_kwargs=True)


def _roll(enc, comp, steps=70, T=24, B=3, mask="float", batch_first=True, pad=False):
    """Re-run a sliding window of random token rows through `enc` under the compressor."""
    g = torch.Generator().manual_seed(1)
    hist = torch.randn(B, steps, enc.layers[0].self_attn.embed_dim, generator=g)
    step = [0]
    outs, windows = [], []
    with HistoryCompressor(enc, comp, T, lambda: step[0]) as hc:
        spy = _Spy(enc)
        for t in range(steps):
            step[0] = t
            n = min(t + 1, T)
            x = hist[:, t + 1 - n : t + 1]
            kw = {}
            if mask == "float":
                kw["mask"] = nn.Transformer.generate_square_subsequent_mask(n)
            elif mask == "bool":
                kw["mask"] = torch.ones(n, n, dtype=torch.bool).triu(1)
            if pad:
                kw["src_key_padding_mask"] = torch.zeros(B, n, dtype=torch.bool)
            with torch.no_grad():
                o = enc(x if batch_first else x.transpose(0, 1), **kw)
            o = o if batch_first else o.transpose(0, 1)
            outs.append(o[:, -1])
            windows.append(x)
        spy.handle.remove()
    return torch.stack(outs, 1), windows, spy.inputs, hc.lengths


@pytest.mark.parametrize("comp", [None, ("none", {}), ("fixed_window", {"ratio": 1.0}), ("topk", {"ratio": 1.0})])
def test_compressor_is_the_identity_without_compression(comp):
    enc = _encoder()
    ref, *_ = _roll(enc, None)
    c = make_compression(comp[0], context=24, **comp[1]) if comp else None
    out, _, inputs, lengths = _roll(enc, c)
    assert torch.equal(out, ref)
    assert all(kw.get("src") is None for _a, kw in inputs)  # the call was never rewritten
    assert lengths == [min(t + 1, 24) for t in range(70)]


@pytest.mark.parametrize("name", ["fixed_window", "topk", "pooling", "sink_window"])
@pytest.mark.parametrize("mask", ["float", "bool", None])
def test_compressed_history_is_what_the_module_computes_over(name, mask):
    enc = _encoder()
    kw = {"n_sink": 2} if name == "sink_window" else {"keep_recent": 3}
    comp = make_compression(name, ratio=0.25, interval=5, context=24, **kw)
    out, windows, inputs, lengths = _roll(enc, comp, mask=mask)
    budget = comp.budget(24)
    assert max(lengths[30:]) <= budget + comp.interval and min(lengths[30:]) >= 1
    assert lengths[-1] < 24  # really shorter than the full window
    for t in (40, 55, 69):
        _args, kw_in = inputs[t]
        src = kw_in["src"]
        n_out = src.shape[1]
        assert n_out == lengths[t]
        if mask is not None:  # a causal mask of the same kind, rebuilt for the shorter sequence
            want = (
                nn.Transformer.generate_square_subsequent_mask(n_out)
                if mask == "float"
                else torch.ones(n_out, n_out, dtype=torch.bool).triu(1)
            )
            assert torch.equal(kw_in["mask"], want)
        assert torch.equal(src[:, -1], windows[t][:, -1])  # the newest token as it is
        if name in ("topk", "sink_window"):  # a selection: every row is one of the window's rows, in temporal order
            win = windows[t]
            idx = torch.cdist(src, win).argmin(-1)  # (B, n_out)
            assert torch.allclose(win.gather(1, idx[..., None].expand_as(src)), src)
            assert (idx.diff(dim=1) > 0).all()
        with torch.no_grad():  # the newest output is the module's own computation over the kept rows
            m = kw_in.get("mask")
            ref = enc(src, mask=m)[:, -1]
        torch.testing.assert_close(out[:, t], ref, atol=1e-5, rtol=1e-5)


def test_compressor_seq_first_layout_and_padding_mask():
    enc = _encoder(batch_first=False)
    comp = make_compression("fixed_window", ratio=0.25, interval=5, context=24, keep_recent=3)
    out, windows, inputs, lengths = _roll(enc, comp, batch_first=False, pad=True)
    _a, kw = inputs[60]
    assert kw["src"].shape[0] == lengths[60] and kw["src"].shape[1] == 3  # (n, B, D)
    assert kw["src_key_padding_mask"].shape == (3, lengths[60]) and not kw["src_key_padding_mask"].any()
    with torch.no_grad():
        ref = enc(kw["src"], mask=kw["mask"], src_key_padding_mask=kw["src_key_padding_mask"])[-1]
    torch.testing.assert_close(out[:, 60], ref, atol=1e-5, rtol=1e-5)


def test_compressor_refuses_a_mask_of_another_kind():
    enc = _encoder()
    comp = make_compression("fixed_window", ratio=0.25, interval=2, context=24, keep_recent=3)
    step = [0]
    with HistoryCompressor(enc, comp, 24, lambda: step[0]), torch.no_grad(), pytest.raises(UserError, match="not a causal mask"):
        for t in range(20):
            step[0] = t
            n = min(t + 1, 24)
            enc(torch.randn(2, n, 16), mask=torch.zeros(n, n, dtype=torch.bool))  # full attention mask


def test_token_steps_convention():
    f = default_token_steps(3)
    assert f(7, 10).tolist() == [8, 8, 8, 9, 9, 9, 10]
    with pytest.raises(UserError, match="fits no step alignment"):
        f(6, 10)


def test_compressor_keeps_several_tokens_per_step_together():
    enc = _encoder()
    comp = make_compression("fixed_window", ratio=0.4, interval=3, context=31, keep_recent=4)
    steps = default_token_steps(3)
    step = [0]
    g = torch.Generator().manual_seed(0)
    with HistoryCompressor(enc, comp, 31, lambda: step[0], token_steps=steps) as hc, torch.no_grad():
        for t in range(40):
            step[0] = t
            n = 1 + 3 * min(t, 10)
            enc(torch.randn(2, n, 16, generator=g), mask=nn.Transformer.generate_square_subsequent_mask(n))
    assert max(hc.lengths[20:]) < 31 and hc.lengths[-1] >= 1


# ---- the adapter file ---------------------------------------------------------------------------------
INLINE = """
import numpy as np
import torch
import torch.nn as nn
from stable_baselines3.common.vec_env import DummyVecEnv
import gymnasium as gym

HORIZON = 4
MAX_CONTEXT = 13


class Walk(gym.Env):
    observation_space = gym.spaces.Box(0, 4, shape=(1,), dtype=np.int64)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, goal):
        self.goal = goal

    def reset(self, seed=None, options=None):
        self.x, self.t = 2, 0
        return np.array([self.x]), {}

    def step(self, a):
        self.x = int(np.clip(self.x + int(a) - 1, 0, 4))
        self.t += 1
        return np.array([self.x]), float(self.x == self.goal), False, self.t >= HORIZON, {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 16)
        self.pos = nn.Parameter(torch.randn(1, MAX_CONTEXT, 16) * 0.1)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, s):
        x = self.emb(s) + self.pos[:, : s.shape[1]]
        MASK
        return self.head(self.encoder(x, mask=mask))[:, -1]


def load_model(device):
    torch.manual_seed(0)
    return Net().to(device)


def tasks(split):
    return [0, 4, 1] if split == "test" else [2, 3]


def make_vec_env(tasks):
    return DummyVecEnv([lambda g=g: Walk(g) for g in tasks])


def rollout(model, venv, n_steps):
    obs = venv.reset()
    hist, ret = [], np.zeros((venv.num_envs, n_steps // HORIZON))
    for t in range(n_steps):
        hist.append(torch.as_tensor(obs[:, 0]))
        s = torch.stack(hist[-MAX_CONTEXT:], 1)
        a = torch.distributions.Categorical(logits=model(s)).sample()
        obs, r, done, _ = venv.step(a.numpy())
        ret[:, t // HORIZON] += r
    return RETURN
"""
CAUSAL = "mask = nn.Transformer.generate_square_subsequent_mask(s.shape[1])"


def _write_adapter(tmp_path, name="walk_adapter.py", mask=CAUSAL, returns="ret", drop=None, extra=""):
    src = INLINE.replace("MASK", mask).replace("RETURN", returns) + extra
    if drop:
        src = re.sub(rf"\ndef {drop}\(.*?(?=\n\n\n|\Z)", "", src, flags=re.S)
    path = tmp_path / name
    path.write_text(src)
    return path


def test_inline_adapter_runs_compresses_and_captures(tmp_path):
    adapter = load_adapter(_write_adapter(tmp_path))
    model = adapter.load_model("cpu")
    tasks = adapter.tasks("test")
    base = adapter.run(model, tasks, 40, seed=3)
    same = adapter.run(model, tasks, 40, seed=3, compression=make_compression("pooling", ratio=1.0, context=13, keep_recent=2))
    assert base["returns"].shape == (3, 10) and (base["returns"] == same["returns"]).all()
    comp = adapter.run(model, tasks, 40, seed=3, compression=make_compression("sink_window", ratio=0.4, interval=2, context=13, n_sink=1))
    assert comp["mean_context_length"] < base["mean_context_length"]
    cap = record_capture(adapter, model, tasks, 20, seed=0, num_full=2, full_task=1)
    assert cap["query_attn"].shape == (3, 20, 2, 2, 13) and cap["full_steps"].tolist() == [9, 19] and cap["full_task"] == 1
    n = cap["context_len"]
    assert n.tolist() == [[min(t + 1, 13) for t in range(20)]] * 3
    torch.testing.assert_close(cap["query_attn"].float().sum(-1), torch.ones(3, 20, 2, 2), atol=2e-3, rtol=0)
    assert cap["ctx_step"][2, 19, :13].tolist() == list(range(7, 20))
    full = cap["full_attn"][-1]  # (L, H, n, n): its last row is the step's query row, for the kept task
    assert full.untyped_storage().nbytes() == full.numel() * 4  # one task's matrices, not a view of every task's
    torch.testing.assert_close(full[:, :, -1], cap["query_attn"][1, 19].float(), atol=2e-3, rtol=0)
    assert cap["reward"].shape == (3, 20) and cap["action"].shape == (3, 20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop": "rollout"}, "does not define rollout"),
        ({"returns": "ret[:, :1]"}, "rollout returned 1 episodes"),
        ({"returns": "ret[0]"}, "must return per-environment, per-episode returns"),
        ({"extra": "\nHORIZON = 0\n"}, "HORIZON must be an integer >= 1"),
        ({"extra": "\ndef tasks(split):\n    return [object()]\n"}, "must be JSON-serialisable"),
        ({"extra": "\nHISTORY_MODULE = 'decoder'\n"}, "HISTORY_MODULE 'decoder' is not a module"),
        ({"extra": "\nTOKENS_PER_STEP = 2\n"}, "fits no step alignment"),
        ({"extra": "\nraise RuntimeError('boom')\n"}, "failed to import: RuntimeError: boom"),
    ],
)
def test_bad_adapters_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        adapter = load_adapter(_write_adapter(tmp_path, **kwargs))
        model = adapter.load_model("cpu")
        adapter.run(
            model,
            adapter.tasks("test"),
            8,
            seed=0,
            compression=make_compression("fixed_window", ratio=0.5, interval=1, context=13, keep_recent=2),
        )


def test_adapter_without_attention_and_with_a_non_causal_mask(tmp_path):
    no_attn = "\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear(1, 3)\n"
    with pytest.raises(UserError, match="no attention module found"):
        load_adapter(_write_adapter(tmp_path, "flat.py", extra=no_attn)).load_model("cpu")
    adapter = load_adapter(_write_adapter(tmp_path, "full_mask.py", mask="mask = torch.zeros(s.shape[1], s.shape[1])"))
    model = adapter.load_model("cpu")
    comp = make_compression("fixed_window", ratio=0.3, interval=1, context=13, keep_recent=2)
    with pytest.raises(UserError, match="not a causal mask"):
        adapter.run(model, adapter.tasks("test"), 30, seed=0, compression=comp)


# ---- Hugging Face models --------------------------------------------------------------------------------
def test_hugging_face_gpt2_capture_and_compression():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    gpt = GPT2Model(cfg).eval()
    impl = gpt.config._attn_implementation
    x = torch.randn(2, 12, 32)
    with torch.no_grad(), capture_attention(gpt) as rec:
        out = gpt(inputs_embeds=x, output_attentions=True)
    assert gpt.config._attn_implementation == impl  # eager only for the capture
    assert rec.names == ["h.0.attn", "h.1.attn"]
    torch.testing.assert_close(rec.stacked(), torch.stack(out.attentions), atol=1e-6, rtol=0)

    hist = torch.randn(2, 80, 32)
    step = [0]

    def roll(comp):
        outs, ins = [], []
        with HistoryCompressor(gpt, comp, 40, lambda: step[0]) as hc, torch.no_grad():
            h = gpt.register_forward_pre_hook(lambda _m, a, kw: ins.append(dict(kw)), with_kwargs=True)
            for t in range(80):
                step[0] = t
                n = min(t + 1, 40)
                outs.append(gpt(inputs_embeds=hist[:, t + 1 - n : t + 1], use_cache=False).last_hidden_state[:, -1])
            h.remove()
        return torch.stack(outs, 1), ins, hc.lengths

    ref, _, _ = roll(None)
    same, _, _ = roll(make_compression("topk", ratio=1.0, context=40))
    assert torch.equal(ref, same)
    out, ins, lengths = roll(make_compression("topk", ratio=0.25, interval=5, context=40, keep_recent=3))
    assert lengths[-1] < 40
    kw = ins[-1]
    pos = kw["position_ids"]  # the kept tokens' original positions: learned positions stay what training saw
    assert pos.shape == kw["inputs_embeds"].shape[:2] and (pos.diff(dim=1) > 0).all() and int(pos[0, -1]) == 39
    with torch.no_grad():
        direct = gpt(inputs_embeds=kw["inputs_embeds"], position_ids=pos, use_cache=False).last_hidden_state[:, -1]
    torch.testing.assert_close(out[:, -1], direct, atol=1e-5, rtol=1e-5)


# ---- end to end on a codebase with its own model/ and env/ --------------------------------------------
def guide_adapter() -> str:
    m = re.search(r"<!-- adapter -->[ \t]*\n```python\n(.*?)^```", GUIDE.read_text(), re.S | re.M)
    assert m, "the guide's adapter example is marked <!-- adapter -->"
    return m.group(1)


def test_guide_adapter_is_the_shipped_example():
    assert guide_adapter() == (USER_AD / "ad_adapter.py").read_text()
    assert len(guide_adapter().strip().splitlines()) <= 32


@pytest.fixture(scope="module")
def codebase(tmp_path_factory):
    dst = tmp_path_factory.mktemp("user_ad") / "my_ad"
    shutil.copytree(USER_AD, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "ad_adapter.py").write_text(guide_adapter())
    return dst


def _run(script, *args, cwd):
    return run_script(script, *args, cwd=cwd)


def test_one_click_on_a_codebase_with_its_own_model_and_env(codebase):
    r = _run("run_attention_analysis.py", "--adapter", "ad_adapter.py", "--out", "figs", "--capture-out", "cap",
             "--eval-timesteps", "60", "--check-episodes", "3", "--check-seeds", "1", "--tasks-limit", "3", "--threads", "1", cwd=codebase)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = codebase / "figs"
    for name in ("attention_analysis_comprehensive.png", "compression_recommendations.txt", "layer_head_analysis.png",
                 "attention_metrics.json", "compression_results.json"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    cap = torch.load(codebase / "cap" / "capture.pt", weights_only=True)
    assert cap["meta"]["checkpoint"].startswith("adapter:") and cap["query_attn"].shape[:3] == (3, 60, 4)  # --tasks-limit 3
    doc = json.loads((out / "recommendation.json").read_text())
    assert doc["candidates"] and {r["engine"] for r in doc["candidates"]} == {"adapter"} and doc["candidates"][0]["n_tasks"] == 3
    assert doc["rerun_best"] is None  # the user's model is the re-run engine already
    assert "Recommended:" in r.stdout


def test_compression_sweep_and_capture_on_the_codebase(codebase):
    r = _run("compression_template.py", "--adapter", "ad_adapter.py", "--sweep", "--sweep-strategies", "fixed_window", "topk",
             "--sweep-ratios", "0.1", "--interval", "10", "--keep-recent", "5", "--episodes", "4", "--seeds", "0", "1",
             "--threads", "1", "--out", "sweep", cwd=codebase)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((codebase / "sweep" / "compression_results.json").read_text())["rows"]
    assert [(x["strategy"], x["engine"]) for x in rows] == [("fixed_window", "adapter"), ("topk", "adapter")]
    for x in rows:
        assert x["mean_context_length"] < x["full_context_length"] and x["shortens_context"]
        assert len(x["time_full_s"]) == len(x["time_compressed_s"]) == 2
    assert (codebase / "sweep" / "compression_tradeoff.png").is_file()



def test_adapter_and_checkpoint_together_are_refused(codebase, monkeypatch, capsys):
    import evaluate_with_attention

    monkeypatch.chdir(codebase)
    argv = ["--adapter", "ad_adapter.py", "--checkpoint", "x.pt"]
    assert "mutually exclusive" in refused(capsys, evaluate_with_attention.main, argv, codebase / "c2")


CHECK = """
import json, sys
import torch
sys.path.insert(0, TOOLKIT)
from adlens.adapter import load_adapter, record_capture
from adlens.compression import make_compression
ad = load_adapter("ad_adapter.py")
import model, env
assert model.__file__.startswith(CODEBASE) and env.__file__.startswith(CODEBASE), (model.__file__, env.__file__)
m = ad.load_model("cpu")
# what the first attention layer computes itself, from its own input and weights
seen = []
attn = m.transformer.layers[0].self_attn
h = m.transformer.layers[0].self_attn.register_forward_pre_hook(lambda mod, a, kw: seen.append(a[0].detach().clone()), with_kwargs=True)
cap = record_capture(ad, m, ad.tasks("test")[2:3], 30, seed=0, num_full=1)
h.remove()
torch.set_grad_enabled(False)
x = seen[-1][0]  # (n, D) the last step's input to layer 0, env 0
n, D = x.shape
q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(D, -1)
H = attn.num_heads
q, k = (t.view(n, H, D // H).transpose(0, 1) for t in (q, k))
s = q @ k.transpose(1, 2) / (D // H) ** 0.5 + torch.nn.Transformer.generate_square_subsequent_mask(n)
manual = s.softmax(-1)[:, -1]  # (H, n) the query token's row
err = (cap["query_attn"][0, 29, 0, :, :n].float() - manual).abs().max().item()
full_err = (cap["full_attn"][0][0] - s.softmax(-1)).abs().max().item()
tasks = ad.tasks("test")[:3]
a = ad.run(m, tasks, 40, seed=7)["returns"]
b = ad.run(m, tasks, 40, seed=7, compression=make_compression("fixed_window", ratio=1.0, context=241))["returns"]
print(json.dumps({"err": err, "full_err": full_err, "identity": bool((a == b).all()), "n": n}))
"""


def test_captured_weights_are_the_models_own_and_ratio_one_is_the_identity(codebase):
    script = CHECK.replace("TOOLKIT", repr(str(ROOT))).replace("CODEBASE", repr(str(codebase)))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=codebase, timeout=600,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})  # one thread, as run_script: no spinning on a busy machine
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 30 and res["err"] < 1e-3 and res["full_err"] < 1e-5  # query rows are stored in float16
    assert res["identity"]


def test_adlens_never_imports_the_projects_packages():
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    code += "import adlens.adapter, adlens.history, adlens.metrics, adlens.plots, adlens.capture_file, adlens.config\n"
    code += "import compression_template, evaluate_with_attention, analyze_attention, run_attention_analysis\n"
    code += "bad = [m for m in ('model', 'env') if m in sys.modules]\nassert not bad, bad\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_strategy_is_accepted_by_the_history_hook():
    enc = _encoder()
    for name in [n for n in STRATEGIES if not STRATEGIES[n].needs_meta]:  # the others are refused (test_rl_compression.py)
        kw = {"n_sink": 2} if name == "sink_window" else {"keep_recent": 3} if name != "none" else {}
        ratio = 1.0 if name == "none" else 0.3
        _roll(enc, make_compression(name, ratio=ratio, interval=4, context=24, **kw), steps=30)


def test_the_installable_package_is_adlens_alone(tmp_path):
    """`pip install -e .` / a wheel brings `adlens` only, never top-level `model` or `env` packages."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("adlens", "model", "env"):  # the project's packages are there, and must stay out of the wheel
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("adlens-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"adlens"}, tops


def test_a_capture_written_before_the_package_move_still_loads_and_analyses(tmp_path):
    """tests/data/capture_v1_tiny.pt was written by the toolkit before `adlens` existed (format version 1)."""
    import analyze_attention
    from adlens.capture_file import load_capture

    raw = torch.load(ROOT / "tests" / "data" / "capture_v1_tiny.pt", weights_only=True)
    assert raw["version"] == 1 and raw["query_attn"].shape == (20, 2, 2, 12)
    cap = load_capture(ROOT / "tests" / "data" / "capture_v1_tiny.pt")  # in the version-2 layout: one task
    assert cap["query_attn"].shape == (1, 20, 2, 2, 12) and torch.equal(cap["query_attn"][0], raw["query_attn"])
    res = analyze_attention.analyze(cap, tmp_path / "figs", {"dpi": 30})
    assert (tmp_path / "figs" / "attention_metrics.json").is_file() and res["pattern"]
