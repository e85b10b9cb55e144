"""In-context rollout throughput: (a) re-running the whole window every step, (b) the KV-cached
incremental rollout, (c) (b) with compression; same weights, measured side by side, interleaved.

    python benchmarks/inference_speed.py                          # 8 and 256 envs, contexts 240 and 1000
    python benchmarks/inference_speed.py --contexts 240 --envs 8 --strategies sink_window --ratios 0.3
    python benchmarks/inference_speed.py --envs 1024 4096 --device cuda

For each (context, number of environments) every engine is built once and its context filled
(untimed): (a) and (b) to the full context, (c) until its compressed context cycles (budget +
2 intervals). Then, in each of `rounds` rounds, every other engine is timed for `steps` rollout steps
(model, action sampling and environment step) in a pair with (b), back to back, the order within
each pair alternating (ABBA), so that load on a shared machine hits both of a pair alike. Reported:
ms per step, environment steps per second, every (c) against (b) as the ratio of the summed times of
its pairs with the lowest and highest per-pair ratio, and (b) against (a) the same way ((c) against
(a) through (b)). The shipped model is used where its context allows; longer contexts use a
model of the same size with random weights (speed does not depend on the weights). Also checks that
(a) and (b) pick the same greedy actions while the context is within the model's window.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adlens.compression import make_compression  # noqa: E402
from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from env import get_spec, make_vec_env  # noqa: E402
from env.batched import BatchedGridEnv  # noqa: E402
from model.ad import ADConfig, ADTransformer, Tokens  # noqa: E402
from adlens.device import describe_device  # noqa: E402
from model.checkpoint import load_model, resolve_device  # noqa: E402
from model.device_rollout import draw  # noqa: E402
from model.rollout import make_engine, run_episodes  # noqa: E402

CONFIG = {
    "checkpoint": "default",  # model.pt (default: the shipped model)
    "contexts": [240, 1000],  # transitions in the model's context
    "envs": [8, 256],  # parallel environments (batch)
    "steps": 40,  # timed kv steps per engine per round (a multiple of the interval: same compactions per round)
    "rerun_steps": 4,  # timed steps of (a) per round (re-running 1,000 transitions x 256 envs takes seconds)
    "rounds": 4,  # rounds of pairs with (b) (an even number: each order of a pair equally often)
    "rerun": True,  # time (a) at all
    "strategies": ["fixed_window", "topk", "pooling", "sink_window"],  # compression for (c)
    "ratios": [0.5, 0.3, 0.1],
    "interval": 20,
    "keep_recent": 20,  # fixed_window / topk / pooling
    "score_queries": [0],  # topk / pooling: each value a configuration; score from the last K queries of each interval (0 = every query)
    "n_sink": 4,  # sink_window
    "dynamic": False,  # also time (c) attending over the valid prefix instead of the static masked cache
    "threads": 1,  # torch CPU threads (0 = torch's default)
    "vec_env": "batched",  # batched | dummy
    "device": "cpu",
    "out": "",  # write the results as JSON here
}


def prefill(eng, model, B, n, device, gen):
    """Fill an engine's context with n random tokens (untimed)."""
    cfg = model.cfg
    tok = Tokens(
        torch.randint(0, cfg.n_states, (B, n), generator=gen).to(device),
        torch.randint(0, cfg.n_actions, (B, n), generator=gen).to(device),
        torch.randint(0, 2, (B, n), generator=gen).float().to(device),
        (torch.arange(n) % cfg.horizon).expand(B, n).to(device),
    )
    if hasattr(eng, "cache"):
        for t in range(n):
            eng.step(Tokens(*[f[:, t : t + 1] for f in tok]))
    else:  # rerun: the context is just the embedding buffer
        eng.x[:, :n] = model.embed(tok)
        eng.n = n


class Runner:
    """One engine with its environments and the rollout loop of model.rollout, timed in slices."""

    def __init__(self, model, spec, tasks, engine, comp, B, device, vec_env, static=True, seed=0):
        self.model, self.spec, self.B, self.device = model, spec, B, device
        self.venv = make_vec_env(spec, (tasks * (B // len(tasks) + 1))[:B], vec_env)  # B envs cycling over the tasks
        opts = {"static": static} if engine == "kv" else {}
        self.eng = make_engine(engine, model, B, comp, **opts)
        T = model.cfg.max_context
        n = T if comp is None else min(T, comp.budget(T) + 2 * comp.interval)
        prefill(self.eng, model, B, n, device, torch.Generator().manual_seed(seed))
        self.obs = self.venv.reset()
        self.prev_a = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.prev_r = torch.zeros(B, 1, device=device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.t = 0

    @torch.inference_mode()
    def run(self, steps: int) -> float:
        """Seconds for `steps` more rollout steps."""
        B, spec, device = self.B, self.spec, self.device
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            states = torch.as_tensor(spec.state_index(self.obs), device=device).view(B, 1)
            ts = torch.full((B, 1), self.t % spec.horizon, dtype=torch.long, device=device)
            logits = self.eng.step(Tokens(states, self.prev_a, self.prev_r, ts))
            actions = draw(logits.softmax(-1), self.gen)  # as run_episodes draws
            self.obs, rewards, _, _ = self.venv.step(actions.cpu().numpy())
            self.prev_a = actions.view(B, 1)
            self.prev_r = torch.as_tensor(rewards, dtype=torch.float32, device=device).view(B, 1)
            self.t += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def close(self):
        self.venv.close()


def greedy_agreement(model, spec, tasks, n_episodes) -> tuple[float, float]:
    """Share of identical greedy actions of (a) and (b): within the window, and after it slides."""
    acts = {}
    for engine in ("rerun", "kv"):
        rec = []
        venv = BatchedGridEnv(spec, tasks)
        run_episodes(
            model, venv, spec, n_episodes, engine=engine, greedy=True, on_step=lambda t, tok, a, r, e, rec=rec: rec.append(a.cpu().numpy())
        )
        acts[engine] = np.stack(rec)  # (steps, B)
    same = acts["rerun"] == acts["kv"]
    T = model.cfg.max_context
    return float(same[:T].mean()), float(same[T:].mean()) if len(same) > T else float("nan")


def validate(cfg: dict) -> None:
    for key in ("steps", "rerun_steps", "rounds", "interval"):
        if cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if min(cfg["contexts"]) < 1 or min(cfg["envs"]) < 1:
        raise UserError("--contexts and --envs must be >= 1")
    if cfg["threads"] < 0:
        raise UserError(f"--threads must be >= 0, got {cfg['threads']}")
    if cfg["vec_env"] not in ("batched", "dummy"):
        raise UserError(f"--vec-env must be batched or dummy, got {cfg['vec_env']!r}")


SCORED = ("topk", "pooling")  # strategies that read attention scores (score_queries applies)


def build_comp(cfg, name, ratio, T, score_queries=0):
    kw = {"keep_recent": cfg["keep_recent"]} if name in ("fixed_window", "topk", "pooling") else {}
    kw |= {"n_sink": cfg["n_sink"]} if name == "sink_window" else {}
    kw |= {"score_queries": score_queries} if name in SCORED else {}
    try:
        return make_compression(name, context=T, ratio=ratio, interval=cfg["interval"], **kw)
    except ValueError as e:
        raise UserError(str(e)) from None


def measure(model, spec, tasks, cfg, T, B, device) -> list[dict]:
    """Every engine for one (context, envs), interleaved; one row per engine."""
    variants = [("(b) kv", "kv", None, True)]
    if cfg["rerun"]:
        variants.insert(0, ("(a) rerun", "rerun", None, True))
    for name in cfg["strategies"]:
        for ratio in cfg["ratios"]:
            for sq in cfg["score_queries"] if name in SCORED else [0]:
                comp = build_comp(cfg, name, ratio, T, sq)
                label = f"(c) {name} {ratio:g}" + (f" q{sq}" if sq else "")
                variants.append((label, "kv", comp, True))
                if cfg["dynamic"]:
                    variants.append((f"{label} dynamic", "kv", comp, False))
    runners = {label: Runner(model, spec, tasks, eng, comp, B, device, cfg["vec_env"], static) for label, eng, comp, static in variants}
    steps = {label: cfg["rerun_steps"] if label.startswith("(a)") else cfg["steps"] for label in runners}
    for label, r in runners.items():
        r.run(min(3, steps[label]))  # warm-up
    # every other engine is timed in a pair with (b), back to back, the pair's order alternating
    # (ABBA ...): a ratio compares two runs a few hundred ms apart, whatever the machine does meanwhile
    others = [label for label in runners if label != "(b) kv"]
    own = {label: [] for label in others}  # (rounds,) seconds per step of the engine
    base = {label: [] for label in others}  # (rounds,) seconds per step of (b) in its pairs
    for rnd in range(cfg["rounds"]):
        for i, label in enumerate(others):
            pair = ("(b) kv", label) if (rnd + i) % 2 == 0 else (label, "(b) kv")
            for x in pair:
                t = runners[x].run(steps[x]) / steps[x]
                (base if x == "(b) kv" else own)[label].append(t)
    for r in runners.values():
        r.close()
    if not others:  # (b) alone
        base["(b) kv"] = [runners["(b) kv"].run(steps["(b) kv"]) / steps["(b) kv"] for _ in range(cfg["rounds"])]
    per_step = {label: np.array(t) for label, t in own.items()} | {"(b) kv": np.concatenate([np.array(t) for t in base.values()])}
    vs_b = {label: sum(base[label]) / sum(own[label]) for label in others} | {"(b) kv": 1.0}  # paired: (b)'s time / the engine's
    rows = []
    for label in runners:
        ms = 1000 * per_step[label].mean()
        row = {"context": T, "envs": B, "engine": label, "ms_per_step": ms, "env_steps_per_s": 1000 * B / ms}
        if "(a) rerun" in own:  # through the pairs: (a) against (b), (b) against this engine
            row["speedup_vs_rerun"] = float(vs_b[label] / vs_b["(a) rerun"])
        if label.startswith("(c)"):
            b, c = np.array(base[label]), per_step[label]
            pairs = b / c
            row |= {"speedup_vs_kv": float(vs_b[label]), "speedup_vs_kv_min": float(pairs.min()), "speedup_vs_kv_max": float(pairs.max()),
                    "speedup_vs_kv_se": float(pairs.std(ddof=1) / np.sqrt(len(pairs))) if len(pairs) > 1 else float("nan"),
                    "kv_ms_per_step_paired": 1000 * float(b.mean())}  # fmt: skip
        rows.append(row)
    return rows


@torch.no_grad()  # for the run only: a caller's autograd mode is restored on return
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv))
    validate(cfg)
    device = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    base, meta = load_model(cfg["checkpoint"], device)
    spec = get_spec(meta["env"])
    tasks = spec.tasks_for("test")
    for T in cfg["contexts"]:  # validate every configuration before measuring
        for name in cfg["strategies"]:
            for ratio in cfg["ratios"]:
                for sq in cfg["score_queries"]:
                    build_comp(cfg, name, ratio, T, sq)
    hw = describe_device(device)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  device {device} ({hw}), torch {torch.__version__}, env {cfg['vec_env']}, "
          f"{cfg['rounds']} rounds of {cfg['steps']}-step pairs with (b) ((a): {cfg['rerun_steps']} steps)")  # fmt: skip
    print(f"{'context':>8}{'envs':>6}  {'engine':<32}{'ms/step':>9}{'env steps/s':>13}{'vs (a)':>9}{'vs (b) [min-max] se':>30}")
    rows = []
    for T in cfg["contexts"]:
        if T == base.cfg.max_context:
            model = base
        else:
            torch.manual_seed(0)
            model = ADTransformer(ADConfig(**(base.cfg.to_dict() | {"max_context": T}))).to(device).eval()
        for B in cfg["envs"]:
            for row in measure(model, spec, tasks, cfg, T, B, device):
                rows.append(row)
                va = f"{row['speedup_vs_rerun']:.1f}x" if "speedup_vs_rerun" in row else ""
                vb = (
                    f"{row['speedup_vs_kv']:.2f}x [{row['speedup_vs_kv_min']:.2f}-{row['speedup_vs_kv_max']:.2f}] se {row['speedup_vs_kv_se']:.2f}"
                    if "speedup_vs_kv" in row
                    else ""
                )
                print(
                    f"{T:>8}{B:>6}  {row['engine']:<32}{row['ms_per_step']:>9.2f}{row['env_steps_per_s']:>13.0f}{va:>9}{vb:>30}", flush=True
                )
    result = {
        "date": str(datetime.date.today()),
        "device": str(device),
        "hardware": hw,
        "torch": torch.__version__,
        "config": cfg,
        "rows": rows,
    }
    if cfg["rerun"]:
        n_ep = 2 * base.cfg.max_context // spec.horizon
        within, after = greedy_agreement(base, spec, tasks, n_ep)
        print(f"greedy actions (a) vs (b): {100 * within:.1f}% identical within the window, {100 * after:.1f}% after it slides")
        result |= {"greedy_agreement_within_window": within, "greedy_agreement_after_slide": after}
    return finish_result("ad-benchmark-inference-speed", result, cfg["out"])


if __name__ == "__main__":
    run_cli(main)
