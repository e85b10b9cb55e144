"""In-context rollout throughput with the environments on the model's device, eager and (CUDA) as a
replayed CUDA graph, against the host loop; side by side, interleaved.

    python benchmarks/device_rollout.py                                   # CPU: 8 and 256 envs
    python benchmarks/device_rollout.py --device cuda --envs 8 64 256 1024 4096 8192

Three ways to roll out the same model (uncompressed KV cache, the same seed):
  host    `run_episodes`: numpy batched environments, observations and actions cross to the host
          every step (the project's default loop)
  device  `run_on_device`: tensor environments on the model's device, no host round trip
  graph   `run_on_device(graph=True)`, CUDA only: one episode of steps captured once in a CUDA graph
          and replayed (capture time reported apart, not counted in the step time)
Each run is a fresh rollout of `episodes` episodes on the held-out goals tiled to the number of
environments. In each of `rounds` rounds every way runs once, in alternating order (ABC, CBA), after
one untimed warm-up run each. Reported: ms per step, environment steps per second, and each way
against `host` as the ratio of summed times with its lowest and highest per-round ratio; also whether
the returns are the same as the host loop's (they are on the CPU, where the tests check it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from env import get_spec  # noqa: E402
from env.batched import BatchedGridEnv  # noqa: E402
from env.torch_grid import TorchGridEnv  # noqa: E402
from adlens.device import describe_device  # noqa: E402
from model.checkpoint import load_model, resolve_device  # noqa: E402
from model.device_rollout import run_on_device  # noqa: E402
from model.rollout import run_episodes  # noqa: E402

CONFIG = {
    "checkpoint": "default",  # model.pt (default: the shipped model)
    "envs": [8, 256],  # parallel environments (batch)
    "episodes": 12,  # episodes per timed run (12 x 20 steps fill the 240-transition window)
    "rounds": 2,  # interleaved rounds (an even number: each order equally often)
    "ways": ["host", "device", "graph"],  # graph is skipped on a CPU
    "threads": 1,  # torch CPU threads (0 = torch's default)
    "device": "cpu",
    "seed": 0,
    "out": "",  # write the results as JSON here
}
WAYS = ("host", "device", "graph")


def run_way(way, model, spec, tasks, episodes, seed, device):
    if way == "host":
        return run_episodes(model, BatchedGridEnv(spec, tasks), spec, episodes, engine="kv", seed=seed)
    return run_on_device(model, TorchGridEnv(spec, tasks, device), episodes, seed=seed, graph=way == "graph")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv))
    for key in ("episodes", "rounds"):
        if cfg[key] < 1:
            raise UserError(f"--{key} must be >= 1, got {cfg[key]}")
    if not cfg["envs"] or min(cfg["envs"]) < 1:
        raise UserError(f"--envs must be numbers >= 1, got {cfg['envs']}")
    unknown = [w for w in cfg["ways"] if w not in WAYS]
    if unknown or "host" not in cfg["ways"]:
        raise UserError(f"--ways must include host and be among {', '.join(WAYS)}, got {cfg['ways']}")
    if cfg["threads"] < 0:
        raise UserError(f"--threads must be >= 0, got {cfg['threads']}")
    device = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model, ckpt_cfg = load_model(cfg["checkpoint"], device)
    spec = get_spec(ckpt_cfg["env"])
    held = spec.tasks_for("test")
    ways = [w for w in cfg["ways"] if w != "graph" or device.type == "cuda"]
    hw = describe_device(device)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  device {device} ({hw}), torch {torch.__version__}, "
          f"{cfg['threads'] or torch.get_num_threads()} thread(s), {cfg['episodes']} episodes per run, {cfg['rounds']} rounds")  # fmt: skip
    rows, failed = [], []
    for B in cfg["envs"]:
        tasks = (held * (B // len(held) + 1))[:B]
        times = {w: [] for w in ways}
        extra = {w: {} for w in ways}
        for w in list(ways):  # warm-up
            try:
                run_way(w, model, spec, tasks, 1, cfg["seed"], device)
            except RuntimeError as e:  # a CUDA graph this torch cannot capture: report it, time the rest
                if w != "graph":
                    raise
                print(f"{B:>6} envs  graph: capture failed ({str(e).splitlines()[0]}); timing the other loops")
                failed.append({"envs": B, "way": w, "error": str(e).splitlines()[0]})
                ways = [x for x in ways if x != "graph"]
        for rnd in range(cfg["rounds"]):
            for w in ways if rnd % 2 == 0 else ways[::-1]:
                out = run_way(w, model, spec, tasks, cfg["episodes"], cfg["seed"], device)
                times[w].append(out["time_s"])
                extra[w] = {"returns": out["returns"], "capture_s": out.get("capture_s", 0.0)}
        steps = cfg["episodes"] * spec.horizon
        for w in ways:
            t = np.array(times[w])
            ratio = np.array(times["host"]) / t
            row = {
                "envs": B, "way": w, "ms_per_step": 1000 * t.sum() / (len(t) * steps),
                "env_steps_per_s": B * steps * len(t) / t.sum(),
                "vs_host": float(np.sum(times["host"]) / t.sum()), "vs_host_min": float(ratio.min()), "vs_host_max": float(ratio.max()),
                "same_returns_as_host": bool(np.array_equal(extra[w]["returns"], extra["host"]["returns"])),
                "capture_s": extra[w]["capture_s"],
            }  # fmt: skip
            rows.append(row)
            cap = f", capture {row['capture_s']:.2f} s" if w == "graph" else ""
            print(f"{B:>6} envs  {w:<6} {row['ms_per_step']:9.3f} ms/step {row['env_steps_per_s']:12,.0f} env steps/s  "
                  f"{row['vs_host']:6.2f}x [{row['vs_host_min']:.2f}-{row['vs_host_max']:.2f}] vs host"
                  f"  same returns: {'yes' if row['same_returns_as_host'] else 'no'}{cap}")  # fmt: skip
    result = {
        "date": str(datetime.date.today()), "device": str(device), "hardware": hw, "torch": torch.__version__,
        "cores": os.cpu_count(), "config": cfg, "rows": rows, "failed": failed,
    }  # fmt: skip
    return finish_result("ad-benchmark-device-rollout", result, cfg["out"])


if __name__ == "__main__":
    run_cli(main)
