"""The cached step's attention: the fused kernel against the explicit single-query attention, side by side.

    python benchmarks/step_attention.py                       # shipped model, 8 32 64 256 envs, 1 thread
    python benchmarks/step_attention.py --envs 256 --configs none fixed_window:0.5:keep_recent=20 --rounds 10

`model.ad.step_attention` picks, per call, the fused `scaled_dot_product_attention` or the explicit
`single_query_attention` (one batched product for the scores, softmax in place, one for the output).
This measures both ways, each forced, in one process:

1. One layer's attention per call, for every batch and slot count given: the query a strided slice
   of a q/k/v projection, as in the step; both ways alternated for `rounds` rounds.
2. The whole KV engine, per batch and configuration (`none`, or `strategy:ratio[:param=value...]`
   as in benchmarks/rl_compression.py, interval 20): two engines filled to the same context, one
   forced to each way, `steps`-step blocks alternated for `rounds` rounds (ABAB). Reported: ms per
   step, the ratio of summed times (fused / explicit: above 1 the explicit way is faster) with its
   per-round range, which way `step_attention` takes by default there, and the largest difference
   between the two engines' logits. Inputs are random tokens (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model.ad as ad  # noqa: E402
from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from benchmarks.compaction_cost import _tokens  # noqa: E402
from benchmarks.rl_compression import parse_config  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.rollout import KVEngine  # noqa: E402

CONFIG = {
    "checkpoint": "default",  # model.pt (default: the shipped model)
    "envs": [8, 32, 64, 256],  # parallel sequences (batch)
    "configs": ["none", "fixed_window:0.5:keep_recent=20", "sink_window:0.1"],  # none | strategy:ratio[:param=value...]
    "slots": [16, 24, 32, 48, 130, 240],  # slot counts of the per-call part (empty: skip it)
    "rounds": 8,  # alternated rounds per measurement
    "steps": 40,  # engine steps per round and way
    "threads": 1,  # torch CPU threads
    "out": "",  # write the rows as JSON here
}
BOUNDS = {"envs": (1, 65_536), "slots": (1, 100_000), "rounds": (1, 10_000), "steps": (1, 10**6), "threads": (1, 1024)}

WAYS = {
    "fused": lambda q, keys, values, mask=None: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask),
    "explicit": lambda q, keys, values, mask=None: ad.single_query_attention(q, keys, values, mask),
}


def _alternate(fns: dict, reps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, per round, the order flipped every round."""
    per = {k: [] for k in fns}
    for r in range(rounds):
        for name in fns if r % 2 == 0 else reversed(list(fns)):
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[name]()
            per[name].append((time.perf_counter() - t0) / reps)
    return per


def per_call(model, B: int, n: int, rounds: int) -> dict:
    H, Dh = model.cfg.n_head, model.cfg.head_size
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, 3, H, 1, Dh, generator=g)[:, 0]  # a strided slice, as the step's query
    k, v = torch.randn(B, H, n, Dh, generator=g), torch.randn(B, H, n, Dh, generator=g)
    fns = {name: (lambda f=f: f(q, k, v)) for name, f in WAYS.items()}
    reps = max(3, int(2e6 / (B * H * max(n, 32) * Dh)))
    _alternate(fns, reps, 2)  # warm-up
    per = _alternate(fns, reps, rounds)
    ratio = np.array(per["fused"]) / np.array(per["explicit"])
    return {"envs": B, "slots": n, "fused_us": 1e6 * float(np.mean(per["fused"])), "explicit_us": 1e6 * float(np.mean(per["explicit"])),
            "speedup": float(np.sum(per["fused"]) / np.sum(per["explicit"])), "speedup_min": float(ratio.min()),
            "speedup_max": float(ratio.max())}  # fmt: skip


def whole_step(model, B: int, spec: str, comp, rounds: int, steps: int) -> dict:
    """Both ways over the KV engine with compression `comp` (None: uncompressed; strategies keep no state)."""
    T = model.cfg.max_context
    engines = {name: KVEngine(model, B, comp) for name in WAYS}
    toks = [_tokens(model.cfg, B, t) for t in range(T + steps + 40)]
    slots = engines["fused"].cache.capacity
    real = ad.step_attention
    try:
        with torch.inference_mode():
            for name, eng in engines.items():
                ad.step_attention = WAYS[name]
                for t in range(T + 40):  # past the first slide or compactions
                    eng.step(toks[t])

            def block(name):
                ad.step_attention = WAYS[name]
                for t in range(steps):
                    engines[name].step(toks[T + 40 + t])

            fns = {name: (lambda name=name: block(name)) for name in WAYS}
            per = _alternate(fns, 1, rounds)
            logits = {}
            for name, eng in engines.items():
                ad.step_attention = WAYS[name]
                logits[name] = eng.step(toks[-1])
    finally:
        ad.step_attention = real
    default = "explicit" if ad.explicit_attention(B * model.cfg.n_head, slots, torch.device("cpu")) else "fused"
    ratio = np.array(per["fused"]) / np.array(per["explicit"])
    return {"envs": B, "config": spec, "slots": slots, "fused_ms": 1000 * float(np.mean(per["fused"])) / steps,
            "explicit_ms": 1000 * float(np.mean(per["explicit"])) / steps, "speedup": float(np.sum(per["fused"]) / np.sum(per["explicit"])),
            "speedup_min": float(ratio.min()), "speedup_max": float(ratio.max()), "default": default,
            "max_logit_diff": float((logits["fused"] - logits["explicit"]).abs().max())}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv), bounds=BOUNDS)
    torch.set_num_threads(cfg["threads"])
    model, _ = load_model(cfg["checkpoint"])
    T = model.cfg.max_context
    comps = {spec: None if spec == "none" else parse_config(spec, 20, T)[2] for spec in cfg["configs"]}  # validated before measuring
    print(f"{T} transitions, {cfg['threads']} thread(s), {cfg['rounds']} alternated rounds; ratio = fused / explicit time")
    calls, steps = [], []
    if cfg["slots"]:
        print(f"{'envs':>5} {'slots':>6}  one layer, us per call: {'fused':>9} {'explicit':>9}  {'ratio [rounds]':>18}")
    with torch.inference_mode():
        for B in cfg["envs"]:
            for n in cfg["slots"]:
                row = per_call(model, B, n, cfg["rounds"])
                calls.append(row)
                print(f"{B:>5} {n:>6}  {'':22} {row['fused_us']:>9.1f} {row['explicit_us']:>9.1f}  "
                      f"{row['speedup']:>6.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]")  # fmt: skip
    print(
        f"{'envs':>5}  {'configuration':<34}{'slots':>6}  ms/step: {'fused':>7} {'explicit':>8}  {'ratio [rounds]':>18}  default   logits differ by"
    )
    for B in cfg["envs"]:
        for spec in cfg["configs"]:
            row = whole_step(model, B, spec, comps[spec], cfg["rounds"], cfg["steps"])
            steps.append(row)
            print(f"{B:>5}  {spec:<34}{row['slots']:>6}  {'':9}{row['fused_ms']:>7.2f} {row['explicit_ms']:>8.2f}  "
                  f"{row['speedup']:>6.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  {row['default']:<9} {row['max_logit_diff']:.1e}")  # fmt: skip
    return finish_result(
        "ad-benchmark-step-attention", {"config": cfg, "torch": torch.__version__, "calls": calls, "steps": steps}, cfg["out"]
    )


if __name__ == "__main__":
    run_cli(main)
