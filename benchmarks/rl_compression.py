"""Several compression configurations against one uncompressed rollout per seed, interleaved.

    python benchmarks/rl_compression.py --engine rerun --seeds 100 101 102 --configs fixed_window:0.1 \
        reward_anchor:0.1:keep_recent=8:lead=2 episode_pool:0.1:per_episode=2 --out runs/rl_compression

A configuration is `strategy:ratio[:param=value...]` (the strategy's own parameters, as in
adlens/compression.py; `interval` among them, default --interval). For every seed the uncompressed
rollout and each configuration run back to back on the same seed, in forward order on even-indexed
seeds and in reverse order on odd ones (A B C .. C B A), so drift in the machine's speed hits all
alike; the baseline runs once per seed, not once per configuration as in compression_template.py,
which makes comparing many configurations on many seeds affordable. Per configuration: speedup =
summed baseline time / its summed time over the same seeds (with the lowest and highest per-seed
ratio), loss = mean per-seed relative loss of mean return, with its standard error.
Writes OUT/compression_results.json with compression_template.py's rows (so the results harness and
the trade-off figure read it as a sweep; `label` tells configurations of one strategy apart) and
OUT/compression_tradeoff.png. Each finished seed is appended to OUT/seeds.jsonl (its runs' times and
returns), so a long run that stops can go on with --resume: the seeds already there are reused, the
rest measured (the settings, thread count included, must be the same).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adlens.compression import STRATEGIES, make_compression  # noqa: E402
from adlens.config import COMMON_BOUNDS, add_config_flags, check_out, make_parser, pin_threads, resolve, run_cli  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import atomic_path, provenance, stamp, write_json_atomic  # noqa: E402
from adlens.plots import plot_compression_tradeoff, save_figure  # noqa: E402
from compression_template import CheckpointRunner, print_table  # noqa: E402
from evaluate import key_door_parts  # noqa: E402

CONFIG = {
    "configs": ["fixed_window:0.1", "reward_anchor:0.1"],  # strategy:ratio[:param=value...] each
    "interval": 20,  # steps between compressions, unless a configuration sets its own
    "engine": "rerun",  # kv | rerun
    "episodes": 50,  # in-context episodes per task
    "seeds": [0, 1, 2],  # sampling seeds; the same for every configuration
    "tasks": "test",  # test (held-out) | train
    "checkpoint": "default",  # the project's model.pt ("default" = the shipped Darkroom model)
    "device": "cpu",
    "vec_env": "dummy",  # dummy | batched
    "threads": 1,  # torch CPU threads (0 = half the cores, at least 1)
    "out": "runs/rl_compression",
    "resume": False,  # reuse the seeds OUT/seeds.jsonl already holds (same settings), measure the rest
}
SEEDS_FILE = "seeds.jsonl"  # one line per finished seed: the baseline's and each configuration's run
SETTINGS = ("configs", "interval", "engine", "episodes", "tasks", "checkpoint", "device", "vec_env")  # what a resumed run must share
BOUNDS = {"interval": (1, 10**6), "engine": {"kv", "rerun"}, "episodes": (1, 10**5), "seeds": COMMON_BOUNDS["seed"],
          "tasks": {"test", "train"}, "device": {"auto", "cpu", "cuda"}, "vec_env": {"dummy", "batched"}}  # fmt: skip


def parse_config(text: str, interval: int, context: int):
    """'strategy:ratio[:param=value...]' -> (label, strategy, Compression); one-line errors."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in STRATEGIES:
        raise UserError(f"configuration {text!r}: expected strategy:ratio[:param=value...] with a strategy of {', '.join(STRATEGIES)}")
    try:
        params = {"ratio": float(parts[1]), "interval": interval}
        for item in parts[2:]:
            key, value = item.split("=")
            params[key] = float(value) if "." in value else int(value)
    except ValueError:
        raise UserError(f"configuration {text!r}: ratio and parameters must be numbers, as param=value") from None
    return text, parts[0], make_compression(parts[0], context=context, **params)  # ConfigError (a UserError) if out of range


def _record(run: dict) -> dict:
    return {"time_s": run["time_s"], "context": run["context"], "returns": np.asarray(run["returns"]).tolist()}


def _unrecord(rec: dict, seed: int) -> dict:
    return {"time_s": float(rec["time_s"]), "context": float(rec["context"]), "returns": np.asarray(rec["returns"], dtype=float), "seed": seed}


def read_done(path: Path, settings: dict, n_configs: int) -> dict[int, tuple[dict, list[dict]]]:
    """{seed: (baseline run, configuration runs)} of the finished seeds in OUT/seeds.jsonl; a run of
    other settings, or a damaged line other than the last (which a kill may have cut short), is refused.
    The file is rewritten without a cut-short last line, so that new seeds start on a line of their own."""
    done: dict = {}
    if not path.is_file():
        return done
    good = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            seed, base, runs = int(rec["seed"]), rec["base"], rec["runs"]
            if len(runs) != n_configs or rec.get("settings", settings) != settings:
                raise UserError(f"{path} holds a run of other settings ({rec.get('settings')}); drop --resume or give another --out")
            done[seed] = (_unrecord(base, seed), [_unrecord(r, seed) for r in runs])
            good.append(line + "\n")
        except UserError:
            raise
        except (ValueError, KeyError, TypeError):
            if n < len(lines):
                raise UserError(f"{path} line {n} is damaged; delete the file to measure afresh") from None
    if len(good) < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(good))
    return done


def row_for(label, strategy, comp, engine, base: list[dict], runs: list[dict], spec=None) -> dict:
    """compression_template.measure's row, from runs paired per seed with the shared baseline runs; on
    Dark Key-to-Door (`spec`) also the key and door parts of the return, uncompressed and compressed."""
    t_full = np.array([b["time_s"] for b in base])
    t_comp = np.array([r["time_s"] for r in runs])
    r_full = np.array([b["returns"].mean() for b in base])
    r_comp = np.array([r["returns"].mean() for r in runs])
    loss = np.where(r_full != 0, (r_full - r_comp) / np.where(r_full != 0, r_full, 1), 0.0)
    ctx_full, ctx_comp = float(np.mean([b["context"] for b in base])), float(np.mean([r["context"] for r in runs]))
    n = len(runs)
    row = {
        "label": label, "engine": engine, "strategy": strategy, "ratio": comp.ratio, "interval": comp.interval,
        "params": {f.name: getattr(comp, f.name) for f in fields(comp)},
        "mean_context_length": ctx_comp, "full_context_length": ctx_full, "shortens_context": ctx_comp < ctx_full,
        "speedup": float(t_full.sum() / t_comp.sum()),
        "speedup_pair_min": float((t_full / t_comp).min()), "speedup_pair_max": float((t_full / t_comp).max()),
        "return_full": float(r_full.mean()), "return_compressed": float(r_comp.mean()),
        "return_full_last10": float(np.mean([b["returns"][:, -10:].mean() for b in base])),
        "return_compressed_last10": float(np.mean([r["returns"][:, -10:].mean() for r in runs])),
        "performance_loss": float(loss.mean()),
        "performance_loss_stderr": float(loss.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "loss_per_seed": loss.tolist(), "time_full_s": t_full.tolist(), "time_compressed_s": t_comp.tolist(),
        "seeds": [b["seed"] for b in base], "episodes": int(base[0]["returns"].shape[1]), "n_tasks": int(base[0]["returns"].shape[0]),
    }  # fmt: skip
    if spec is not None and spec.name == "key_to_door":
        for name, rs in (("full", base), ("compressed", runs)):
            parts = key_door_parts(spec, np.stack([r["returns"] for r in rs]))
            row |= {f"key_{name}": float(np.mean(parts["key_return_per_episode"])), f"door_{name}": float(np.mean(parts["door_return_per_episode"]))}
    return row


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    add_config_flags(parser, CONFIG)
    cfg = resolve(CONFIG, parser.parse_args(argv), bounds=BOUNDS)
    check_out(cfg["out"])
    if not cfg["configs"]:
        raise UserError("--configs needs at least one strategy:ratio")
    threads = pin_threads(cfg["threads"])
    out = Path(cfg["out"])
    settings = {k: cfg[k] for k in SETTINGS} | {"threads": threads}
    done = read_done(out / SEEDS_FILE, settings, len(cfg["configs"])) if cfg["resume"] else {}
    runner = CheckpointRunner(cfg)
    configs = [parse_config(c, cfg["interval"], runner.context) for c in cfg["configs"]]
    print(f"{runner.engine} engine, {len(runner.tasks)} {cfg['tasks']} tasks, {cfg['episodes']} episodes, seeds {cfg['seeds']}, "
          f"{threads} torch thread(s), {len(configs)} configuration(s) + the baseline per seed, order reversed every other seed", flush=True)  # fmt: skip
    reused = [s for s in cfg["seeds"] if s in done]
    if reused:
        print(f"reusing {len(reused)} seed(s) from {out / SEEDS_FILE}", flush=True)
    t0 = time.perf_counter()
    base, runs = [], [[] for _ in configs]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / SEEDS_FILE, "a" if cfg["resume"] else "w") as log:
        try:
            if len(reused) < len(cfg["seeds"]):
                runner.run(None, next(s for s in cfg["seeds"] if s not in done))  # warm-up, untimed
            for i, seed in enumerate(cfg["seeds"]):
                if seed in done:
                    b, rs = done[seed]
                else:
                    order, got = [None, *range(len(configs))], {}
                    for j in order if i % 2 == 0 else order[::-1]:
                        got[j] = runner.run(configs[j][2] if j is not None else None, seed) | {"seed": seed}
                    b, rs = got[None], [got[j] for j in range(len(configs))]
                    log.write(json.dumps({"seed": seed, "settings": settings, "base": _record(b), "runs": [_record(r) for r in rs]}) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                    print(f"seed {seed} done ({i + 1}/{len(cfg['seeds'])}, {time.perf_counter() - t0:.0f} s)", flush=True)
                base.append(b)
                for j, r in enumerate(rs):
                    runs[j].append(r)
        finally:
            runner.close()
    rows = [row_for(label, s, comp, runner.engine, base, r, runner.spec) for (label, s, comp), r in zip(configs, runs)]
    result = stamp("ad-compression-results", {"provenance": provenance(), "rows": rows, "config": cfg, "model_context": runner.context,
                                              "device": str(runner.device), "torch_threads": threads})  # fmt: skip
    write_json_atomic(out / "compression_results.json", result)
    print_table(rows)
    save_figure(plot_compression_tradeoff(rows), out / "compression_tradeoff.png", dpi=120)
    print(f"wrote {out / 'compression_results.json'}")
    return result


if __name__ == "__main__":
    run_cli(main)
