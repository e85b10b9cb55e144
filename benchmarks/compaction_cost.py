"""Where a compressed KV rollout's time goes: the step, and each compaction's scores, plan and apply.

    python benchmarks/compaction_cost.py                                   # shipped model, 8 and 256 envs
    python benchmarks/compaction_cost.py --envs 256 --configs topk:0.5 topk:0.5:score_queries=4

For each configuration (`strategy:ratio[:param=value...]`, as in benchmarks/rl_compression.py, with
keep_recent 20 and interval 20 unless given) a KV engine is filled past its first compactions
(untimed), then `steps` steps run with the cache's score computation, the strategy's plan and the
cache's apply timed separately (wall time, one process), in `rounds` blocks that take the engines in
turn (uncompressed, then each configuration, then again), so that the machine's slow spells fall on
all of them alike. Reported per configuration: ms per step
(all of it; also the mean of the steps between compactions and of the steps that compact), and per
compaction the ms spent on scores, plan and apply, with their share of the step time they amortise
to; the uncompressed engine's step the same way, for reference. Also times one layer's attention (as
the step computes it) at the model's full context and at each configuration's mean context, the most
compression can save per step. Inputs are random tokens (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model.rollout as rollout  # noqa: E402
from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.errors import ConfigError  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from benchmarks.rl_compression import parse_config  # noqa: E402
from model.ad import Tokens, step_attention  # noqa: E402
from model.checkpoint import load_model  # noqa: E402

CONFIG = {
    "checkpoint": "default",  # model.pt (default: the shipped model)
    "envs": [8, 256],  # parallel sequences (batch)
    "configs": [
        "topk:0.5:keep_recent=20",
        "topk:0.5:keep_recent=20:score_queries=4",
        "pooling:0.5:keep_recent=20",
        "pooling:0.5:keep_recent=20:score_queries=4",
        "fixed_window:0.5:keep_recent=20",
    ],  # strategy:ratio[:param=value...]
    "interval": 20,  # steps between compactions, unless a configuration sets its own
    "steps": 400,  # timed steps per configuration (a multiple of the interval)
    "rounds": 10,  # the steps run in this many blocks, configurations taken in turn (steps must divide by it)
    "threads": 1,  # torch CPU threads
    "out": "",  # write the rows as JSON here
}
BOUNDS = {"envs": (1, 65_536), "steps": (1, 10**6), "rounds": (1, 10**6), "threads": (1, 1024), "interval": (1, 10**6)}


def _tokens(cfg, B: int, t: int) -> Tokens:
    g = torch.Generator().manual_seed(t)
    return Tokens(torch.randint(0, cfg.n_states, (B, 1), generator=g), torch.randint(0, cfg.n_actions + 1, (B, 1), generator=g),
                  torch.randint(0, 2, (B, 1), generator=g).float(), torch.full((B, 1), t % cfg.horizon))  # fmt: skip


def _attention_us(model, B: int, n: int, reps: int = 300, blocks: int = 7) -> float:
    """Microseconds of one layer's single-query attention over n keys, as the cached step computes it:
    the median of `blocks` timed blocks (one block can land on a busy moment of a shared machine)."""
    H, Dh = model.cfg.n_head, model.cfg.head_size
    q, k, v = torch.randn(B, H, 1, Dh), torch.randn(B, H, n, Dh), torch.randn(B, H, n, Dh)
    per = max(1, reps // blocks)
    for _ in range(per):
        step_attention(q, k, v)
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per):
            step_attention(q, k, v)
        times.append((time.perf_counter() - t0) / per)
    return 1e6 * float(np.median(times))


class _Timed:
    """One configuration's KV engine, filled past its first compactions (untimed), with its cache's
    score computation and apply timed separately; the strategy's plan is timed by `measure`."""

    def __init__(self, model, B: int, spec: str, comp, steps: int):
        self.B, self.spec = B, spec
        self.engine = rollout.KVEngine(model, B, comp)
        warm = model.cfg.max_context + 3 * (comp.interval if comp is not None else 20)
        for t in range(warm):
            self.engine.step(_tokens(model.cfg, B, t))
        self.spent = {"scores": 0.0, "plan": 0.0, "apply": 0.0}  # from here on
        self.compactions, self.lengths, self.between, self.compacting, self.total = 0, [], [], [], 0.0
        cache = self.engine.cache
        cache._flush_scores = self.timed("scores", cache._flush_scores)
        cache.apply_plan = self.timed("apply", cache.apply_plan)
        self.tokens = [_tokens(model.cfg, B, t) for t in range(warm, warm + steps)]

    def timed(self, key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.spent[key] += time.perf_counter() - t0
            if key == "apply":
                self.compactions += 1
            return out

        return wrapper

    def block(self, tokens) -> None:
        t0 = time.perf_counter()
        for tok in tokens:
            before, s0 = self.compactions, time.perf_counter()
            self.engine.step(tok)
            (self.compacting if self.compactions > before else self.between).append(time.perf_counter() - s0)
            self.lengths.append(len(self.engine))
        self.total += time.perf_counter() - t0

    def row(self) -> dict:
        steps, n = len(self.lengths), max(1, self.compactions)
        row = {"envs": self.B, "config": self.spec, "ms_per_step": 1000 * self.total / steps, "compactions": self.compactions,
               "mean_context": float(np.mean(self.lengths)), "ms_between_compactions": 1000 * float(np.mean(self.between)),
               "ms_compaction_step": 1000 * float(np.mean(self.compacting)) if self.compacting else 0.0}  # fmt: skip
        for key, s in self.spent.items():
            row[f"{key}_ms_per_compaction"] = 1000 * s / n
            row[f"{key}_share"] = s / self.total
        return row


def measure(model, B: int, configs: list, steps: int, rounds: int) -> list[dict]:
    """Time `steps` steps of the uncompressed KV engine and of each configuration's (`configs`: (spec,
    Compression) pairs) as described above, in `rounds` blocks taken in turn (engine after engine, block after
    block), so that a slow spell of a shared machine falls on all of them alike. Rows: uncompressed first."""
    with torch.inference_mode():
        runs = [_Timed(model, B, "none", None, steps)] + [_Timed(model, B, spec, comp, steps) for spec, comp in configs]
    plan, current = rollout._plan, runs[0]

    def timed_plan(*a, **k):  # the engines share the module's plan function: the time goes to the one stepping
        t0 = time.perf_counter()
        out = plan(*a, **k)
        current.spent["plan"] += time.perf_counter() - t0
        return out

    rollout._plan = timed_plan
    try:
        with torch.inference_mode():
            per = steps // rounds
            for i in range(rounds):
                for current in runs:
                    current.block(current.tokens[i * per : (i + 1) * per])
    finally:
        rollout._plan = plan
    return [run.row() for run in runs]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv), bounds=BOUNDS)
    torch.set_num_threads(cfg["threads"])
    model, _ = load_model(cfg["checkpoint"])
    T = model.cfg.max_context
    comps = [(spec, parse_config(spec, cfg["interval"], T)[2]) for spec in cfg["configs"]]  # validated before measuring
    if cfg["steps"] % cfg["rounds"]:
        raise ConfigError(f"--steps ({cfg['steps']}) must be a multiple of --rounds ({cfg['rounds']})")
    rows = []
    print(f"{T} transitions, {cfg['threads']} thread(s), {cfg['steps']} timed steps per configuration")
    print(
        f"{'envs':>5}  {'configuration':<44}{'ms/step':>9}{'ctx':>7}  per compaction: {'scores':>8}{'plan':>8}{'apply':>8} ms  (share of time)"
    )
    for B in cfg["envs"]:
        full = _attention_us(model, B, T)
        plain, *measured = measure(model, B, comps, cfg["steps"], cfg["rounds"])
        plain["attention_us_full"] = plain["attention_us_mean_context"] = full
        rows.append(plain)
        print(f"{B:>5}  {'none (uncompressed)':<44}{plain['ms_per_step']:>9.2f}{plain['mean_context']:>7.0f}")
        for spec, row in zip(cfg["configs"], measured):
            row["attention_us_full"], row["attention_us_mean_context"] = full, _attention_us(model, B, max(1, round(row["mean_context"])))
            rows.append(row)
            shares = "/".join(f"{100 * row[f'{k}_share']:.0f}%" for k in ("scores", "plan", "apply"))
            print(f"{B:>5}  {spec:<44}{row['ms_per_step']:>9.2f}{row['mean_context']:>7.0f}  {'':16}"
                  f"{row['scores_ms_per_compaction']:>8.2f}{row['plan_ms_per_compaction']:>8.2f}{row['apply_ms_per_compaction']:>8.2f} ms  ({shares})")  # fmt: skip
        saved = model.cfg.n_layer * (full - min(r["attention_us_mean_context"] for r in rows if r["envs"] == B)) / 1000
        for r in rows[-len(cfg["configs"]) :]:
            print(f"{B:>5}  {r['config']:<44} between compactions {r['ms_between_compactions']:.3f} ms/step (uncompressed "
                  f"{plain['ms_between_compactions']:.3f}), a compacting step {r['ms_compaction_step']:.3f} ms")  # fmt: skip
        print(
            f"{B:>5}  one layer's attention: {full:.0f} us at {T} slots; compression saves at most ~{saved:.2f} ms per step over {model.cfg.n_layer} layers"
        )
    finish_result("ad-benchmark-compaction-cost", {"config": cfg, "torch": torch.__version__, "rows": rows}, cfg["out"])
    return rows


if __name__ == "__main__":
    run_cli(main)
