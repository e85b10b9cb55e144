"""The KV-cached step, eager against `torch.compile`, compile time included; side by side, interleaved.

    python benchmarks/compile_step.py                  # shipped model, 240 transitions, 8 envs, 1 thread
    python benchmarks/compile_step.py --envs 256 --rounds 5
    python benchmarks/compile_step.py --cpp-wrapper     # inductor's C++ wrapper around the compiled kernels

The step is the model's static-shape cached step (the cache's full capacity, a validity mask, the
slot to write given as a tensor, so that shapes and guards never change and the compiled graph is
never recompiled). It is first checked to give the logits of `ADTransformer.step`. Then the
compiled function is built and called once (timed: that is the compile cost), and `rounds` rounds
time `steps` steps of eager and compiled in turn (ABAB). Reported: compile seconds, ms per step
(wall and process CPU time), their ratio with its per-round spread, and how many steps a run must
take before compiling pays, against a typical evaluation (8 held-out goals x 50 episodes x 20 steps
x 3 seeds = 3,000 steps). `cpp_wrapper` calls the compiled kernels from generated C++ instead of
Python, which removes per-call Python overhead. Inductor keeps compiled code on disk, so a second
run compiles faster than the first.
"""

from __future__ import annotations

import argparse
import datetime
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
from model.rope import apply_rope_full  # noqa: E402

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


def static_step(model, x, kv, slot, cos, sin, valid):
    """`ADTransformer.step_embeddings` after `advance`, with tensors only: x (B, 1, D) embeddings,
    kv (L, 2, B, H, C, Dh) the cache (written in place at `slot` (1,) long), cos/sin full-width (3, 1, 1, Dh),
    valid (1, 1, 1, C) bool -> logits (B, A)."""
    B, _, D = x.shape
    H, Dh = model.cfg.n_head, model.cfg.head_size
    for i, blk in enumerate(model.blocks):
        a, up, down = blk.attn, blk.mlp[0], blk.mlp[2]
        h = F.layer_norm(x, (D,), blk.ln1.weight, blk.ln1.bias, blk.ln1.eps)
        qkv = apply_rope_full(F.linear(h, a.qkv.weight, a.qkv.bias).view(B, 3, H, 1, Dh), cos, sin)
        kv[i].index_copy_(3, slot, qkv[:, 1:].transpose(0, 1))
        y = F.scaled_dot_product_attention(qkv[:, 0], kv[i, 0], kv[i, 1], attn_mask=valid)
        x = x + F.linear(y.reshape(B, 1, D), a.proj.weight, a.proj.bias)
        h = F.layer_norm(x, (D,), blk.ln2.weight, blk.ln2.bias, blk.ln2.eps)
        x = x + F.linear(F.gelu(F.linear(h, up.weight, up.bias)), down.weight, down.bias)
    lnf = model.ln_f
    return F.linear(F.layer_norm(x[:, -1], (D,), lnf.weight, lnf.bias, lnf.eps), model.head.weight, model.head.bias)


def _time(fn, args_at, steps):
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(steps):
        fn(*args_at(s))
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
        x = model.embed(tok)
        cache = model.new_cache(B)
        for _ in range(T):  # a full context: the steady state of a long rollout
            model.step_embeddings(x, cache)
        valid = torch.ones(1, 1, 1, T, dtype=torch.bool)
        pos = cache.n_added
        kv = cache.kv.clone()
        ref = model.step_embeddings(x, cache)  # writes slot pos % T at position pos
        got = static_step(model, x, kv, torch.tensor([pos % T]), *cache.rotation_at(pos), valid)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

        def args_at(s):
            return (model, x, kv, torch.tensor([s % T]), *cache.rotation_at(pos + s), valid)

        t0 = time.perf_counter()
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = bool(cfg["cpp_wrapper"])
        compiled = torch.compile(static_step, dynamic=False)
        torch.testing.assert_close(compiled(*args_at(0)), static_step(*args_at(0)), atol=1e-5, rtol=0)
        compile_s = time.perf_counter() - t0
        for fn in (static_step, compiled):
            _time(fn, args_at, 10)  # warm-up
        wall, cpu = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}
        for rnd in range(cfg["rounds"]):
            for name in ("eager", "compiled") if rnd % 2 == 0 else ("compiled", "eager"):
                w, c = _time(static_step if name == "eager" else compiled, args_at, cfg["steps"])
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
