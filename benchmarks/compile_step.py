"""The KV-cached step, eager against `torch.compile`, compile time included; side by side, interleaved.

    python benchmarks/compile_step.py                  # shipped model, 240 transitions, 8 envs, 1 thread
    python benchmarks/compile_step.py --envs 256 --rounds 5
    python benchmarks/compile_step.py --cpp-wrapper     # inductor's C++ wrapper around the compiled kernels

Eager is the engine's own cached step (`ADTransformer.step_embeddings`). The compiled function is
the same step with tensors only and the cache read-only: each layer attends over the cache as it
was, the slot the new token replaces masked out, with the fused CPU kernel, which also returns the
log-sum-exp of its scores, and merges the new token's own key and value into that result; the new
keys and values of all layers come back and one copy writes them into the cache outside the graph.
(Written in place inside the graph, the cache write is functionalised: inductor then copied every
layer's whole cache three times per step, and the compiled step was slower than eager.) Shapes and
guards never change, so nothing recompiles. The compiled step is first checked to give the eager
step's logits and cache. Then `rounds` rounds time `steps` steps of each in turn (ABAB) on a full
context. Reported: compile seconds (the first call), ms per step (wall and process CPU time),
their ratio with its per-round spread, and how many steps a run must take before compiling pays,
against a typical evaluation (8 held-out goals x 50 episodes x 20 steps x 3 seeds = 3,000 steps).
`cpp_wrapper` calls the compiled kernels from generated C++ instead of Python. Inductor keeps
compiled code on disk, so a second run compiles faster than the first. CPU only.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from model.ad import Tokens  # noqa: E402
from model.checkpoint import load_model  # noqa: E402

CONFIG = {
    "checkpoint": "default",  # model.pt (default: the shipped model)
    "envs": 8,  # parallel environments (batch)
    "steps": 200,  # timed steps per round and variant
    "rounds": 3,  # interleaved rounds
    "typical_steps": 3000,  # steps of the run the compile time is charged to
    "threads": 1,  # torch CPU threads
    "cpp_wrapper": False,  # compile with inductor's C++ wrapper
    "out": "",  # write the results as JSON here
}


def readonly_step(model):
    """The cached step as a function of tensors only, for `torch.compile`:
    f(x (B, D), kv (L, 2, B, H, C, Dh) read-only, cos, sin (1, Dh/2) (`KVCache.rope_at`), mask
    (1, 1, 1, C) additive, -inf at empty slots and at the one being replaced, *params) -> logits (B, A)
    and the new keys and values (L, 2, B, H, 1, Dh). `params` are `step_param_list(model)`. Queries and
    keys in pair order, as the cache's, rotated in real arithmetic (inductor generates no code for
    complex tensors): the same products as the cached step's complex one."""
    cfg, params = model.cfg, model.step_params()
    L, H, Dh, D = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.d_model
    eps = [(w[2], w[5]) for _, w in params.blocks] + [params.ln_f[2]]  # layer-norm epsilons, as the step reads them
    scale = 1 / math.sqrt(Dh)

    def step(x, kv, cos, sin, mask, *w):
        B = x.shape[0]
        new = []
        for i in range(L):
            l1w, l1b, qw, qb, pw, pb, l2w, l2b, uw, ub, dw, db = w[12 * i : 12 * i + 12]
            qkv = F.linear(F.layer_norm(x, (D,), l1w, l1b, eps[i][0]), qw, qb).view(B, 3, H, 1, Dh // 2, 2)
            a, b = qkv[:, :2, ..., 0], qkv[:, :2, ..., 1]  # each rotary pair of q and k
            qk = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)  # (B, 2, H, 1, Dh)
            q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2].flatten(-2)  # (B, H, 1, Dh)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv[i, 0], kv[i, 1], attn_mask=mask)[:2]
            own = (q * k).sum(-1) * scale  # (B, H, 1): the new token's score for its own key
            top = torch.maximum(lse, own)
            a, b = (lse - top).exp().unsqueeze(-1), (own - top).exp().unsqueeze(-1)
            y = (out * a + v * b) / (a + b)  # softmax over the old slots and the new token together
            new.append(torch.stack([k, v], 1))
            x = x + F.linear(y.reshape(B, D), pw, pb)
            h = F.layer_norm(x, (D,), l2w, l2b, eps[i][1])
            x = x + F.linear(F.gelu(F.linear(h, uw, ub)), dw, db)
        lw, lb, hw, hb = w[12 * L :]
        return F.linear(F.layer_norm(x, (D,), lw, lb, eps[L]), hw, hb), torch.stack(new).transpose(1, 2)

    return step


def step_param_list(model) -> list[torch.Tensor]:
    """The parameters `readonly_step` takes, in its order, from `ADTransformer.step_params` (what the
    eager step reads)."""
    params, w = model.step_params(), []
    for _, (ln1_w, ln1_b, _, ln2_w, ln2_b, _, up_w, up_b, down_w, down_b, attn, (qkv_w, qkv_b, proj_w, proj_b)) in params.blocks:
        w += [ln1_w, ln1_b, *attn.pair_qkv(qkv_w, qkv_b), proj_w, proj_b, ln2_w, ln2_b, up_w, up_b, down_w, down_b]
    return [t.detach() for t in w + [*params.ln_f[:2], *params.head]]


def _time(fn, steps):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv))
    for key in ("envs", "steps", "rounds", "typical_steps", "threads"):
        if cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    torch.set_num_threads(cfg["threads"])
    model, _ = load_model(cfg["checkpoint"])
    B, T = cfg["envs"], model.cfg.max_context
    g = torch.Generator().manual_seed(0)
    tok = Tokens(torch.randint(0, model.cfg.n_states, (B, 1), generator=g), torch.zeros(B, 1, dtype=torch.long),
                 torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.long))  # fmt: skip
    with torch.inference_mode():
        x = model.embed(tok)  # (B, 1, D)
        cache = model.new_cache(B)
        for _ in range(T + 5):  # a full context whose window slides: the steady state of a long rollout
            model.step_embeddings(x, cache)
        kv, params, slots = cache.kv.clone(), step_param_list(model), torch.arange(T)
        masks = torch.zeros(T, T)
        masks.fill_diagonal_(float("-inf"))  # row s: slot s is being replaced
        masks = masks.view(T, 1, 1, 1, T)
        at = {"pos": cache.n_added}  # the read-only side's own rollout step

        def readonly(fn):
            pos = at["pos"]
            at["pos"] += 1
            logits, new = fn(x[:, -1], kv, *cache.rope_at(pos), masks[pos % T], *params)
            kv.index_copy_(4, slots[pos % T : pos % T + 1], new)  # the slot the eager cache overwrites too
            return logits

        def eager():
            return model.step_embeddings(x, cache)

        step = readonly_step(model)
        torch.testing.assert_close(readonly(step), eager(), atol=1e-5, rtol=0)
        torch.testing.assert_close(kv, cache.kv, atol=1e-5, rtol=0)
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = bool(cfg["cpp_wrapper"])
        compiled = torch.compile(step, dynamic=False)
        t0 = time.perf_counter()
        got = readonly(compiled)
        compile_s = time.perf_counter() - t0
        torch.testing.assert_close(got, eager(), atol=1e-5, rtol=0)
        torch.testing.assert_close(kv, cache.kv, atol=1e-5, rtol=0)
        fns = {"eager": eager, "compiled": lambda: readonly(compiled)}
        for fn in fns.values():
            _time(fn, 10)  # warm-up
        wall, cpu = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}
        for rnd in range(cfg["rounds"]):
            for name in ("eager", "compiled") if rnd % 2 == 0 else ("compiled", "eager"):
                w, c = _time(fns[name], cfg["steps"])
                wall[name].append(w / cfg["steps"])
                cpu[name].append(c / cfg["steps"])
    ratio = np.array(wall["eager"]) / np.array(wall["compiled"])
    eager_ms, comp_ms = 1000 * np.mean(wall["eager"]), 1000 * np.mean(wall["compiled"])
    saved_per_step_s = (eager_ms - comp_ms) / 1000
    break_even = compile_s / saved_per_step_s if saved_per_step_s > 0 else float("inf")
    result = {
        "date": str(datetime.date.today()), "torch": torch.__version__, "cores": os.cpu_count(), "config": cfg,
        "compile_s": compile_s, "eager_ms": eager_ms, "compiled_ms": comp_ms,
        "eager_cpu_ms": 1000 * np.mean(cpu["eager"]), "compiled_cpu_ms": 1000 * np.mean(cpu["compiled"]),
        "speedup": float(np.sum(wall["eager"]) / np.sum(wall["compiled"])), "speedup_min": float(ratio.min()),
        "speedup_max": float(ratio.max()), "break_even_steps": break_even,
        "typical_run_s": {"eager": cfg["typical_steps"] * eager_ms / 1000, "compiled": compile_s + cfg["typical_steps"] * comp_ms / 1000},
    }  # fmt: skip
    print(
        f"{result['date']}  torch {torch.__version__}, {cfg['threads']} thread(s), {B} envs, {T} transitions, {cfg['rounds']} rounds x {cfg['steps']} steps"
        + (", C++ wrapper" if cfg["cpp_wrapper"] else "")
    )
    print(f"compile: {compile_s:.1f} s")
    print(
        f"step: eager {eager_ms:.3f} ms ({result['eager_cpu_ms']:.3f} ms CPU), compiled {comp_ms:.3f} ms ({result['compiled_cpu_ms']:.3f} ms CPU)"
    )
    print(
        f"compiled vs eager: {result['speedup']:.2f}x [{result['speedup_min']:.2f}-{result['speedup_max']:.2f}]; break-even after {break_even:.0f} steps"
    )
    print(
        f"a typical run of {cfg['typical_steps']} steps: eager {result['typical_run_s']['eager']:.1f} s, compiled {result['typical_run_s']['compiled']:.1f} s"
    )
    return finish_result("ad-benchmark-compile-step", result, cfg["out"])


if __name__ == "__main__":
    run_cli(main)
