"""History compression for AD inference: measured speedup against measured loss of return.

    python compression_template.py                                  # COMPRESSION_CONFIG below
    python compression_template.py --strategy topk --ratio 0.3 --interval 10 --seeds 0 1 2
    python compression_template.py --sweep --out runs/compression   # every strategy x ratio
    python compression_template.py --sweep --backend ray --ray-address auto   # configurations over a Ray cluster

Runs the same held-out in-context evaluation with and without compression, same seeds, in one
process, and reports `speedup = time_without / time_with` (the whole rollout: model and environment)
and `performance_loss = (return_without - return_with) / return_without` (mean episode return over
all tasks and episodes). Writes OUT/compression_results.json; with --sweep also
OUT/compression_tradeoff.png and a printed table.

Adding a strategy: write a small dataclass in adlens/compression.py (fields = its parameters; a
`keep_mask` for a pure selection or a `plan` for merging) and add one line to `STRATEGIES`:

    @dataclass
    class Strided(Compression):
        '''Keep every other old token and the newest ones.'''
        keep_recent: int = 20
        def keep_mask(self, n, budget, scores, batch):
            keep = torch.zeros(batch, n, dtype=torch.bool)
            keep[:, n - self.keep_recent:] = True
            old = torch.arange(n - self.keep_recent).flip(0)[::2][: budget - self.keep_recent]
            keep[:, old] = True
            return keep

    STRATEGIES["strided"] = Strided

Then `python compression_template.py --strategy strided` measures it like the others.
"""

from __future__ import annotations

import argparse
import time
from contextlib import closing
from dataclasses import fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from adlens.compression import STRATEGIES, make_compression  # noqa: E402
from adlens.config import COMMON_BOUNDS, add_config_flags, check_out, make_parser, none_or, pin_threads, resolve, run_cli  # noqa: E402
from adlens.device import resolve_device  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import provenance, stamp, write_json_atomic  # noqa: E402
from adlens.ray_pool import BACKENDS, backend_session, fan_out, check_workers  # noqa: E402
from adlens.plots import plot_compression_tradeoff, save_figure  # noqa: E402

ENGINES = ("kv", "rerun")  # the project's engines; an --adapter model runs its own rollout (engine "adapter")
COMPRESSION_CONFIG = {
    "use_compression": True,  # False: only the uncompressed baseline is measured
    "compression_interval": 20,  # steps between compressions
    "compression_ratio": 0.5,  # fraction of the model's context kept (1.0 = no compression)
    "compression_strategy": "fixed_window",  # none | fixed_window | topk | pooling | sink_window | reward_anchor | episode_pool | reward_recent
    "keep_recent": 20,  # fixed_window / pooling / topk / reward_anchor / episode_pool / reward_recent: newest tokens kept as they are
    "window_size": 0,  # pooling: tokens per pooled window (0 = as large as the budget needs)
    "n_sink": 4,  # sink_window / reward_anchor: first tokens kept (attention sinks)
    "lead": 0,  # reward_anchor: steps kept before each episode's first rewarded step
    "n_anchor": 4,  # reward_anchor: episodes whose first rewarded step is kept (the newest ones)
    "per_episode": 2,  # episode_pool: slots each finished episode keeps (its first rewarded step + pooled rest)
    "n_reward": 8,  # reward_recent: newest rewarded tokens kept
    "score_queries": 0,  # topk / pooling / reward_anchor: score from the last K queries of each interval (0 = every query, H2O)
    "engine": "kv",  # kv (KV-cached incremental rollout) | rerun (whole window re-run every step)
    "compare_rerun": False,  # also time the uncompressed rerun engine (combined gain of compressed kv)
    "episodes": 50,  # in-context episodes per task
    "seeds": [0, 1, 2],  # sampling seeds; the same for both runs
    "tasks": "test",  # test (held-out) | train
    "checkpoint": "default",  # the project's model.pt ("default" = the shipped Darkroom model)
    "adapter": "none",  # or your own model: path to an adapter file (see adlens/adapter.py); excludes --checkpoint
    "device": "cpu",
    "sweep": False,  # every strategy of sweep_strategies x every ratio of sweep_ratios
    "sweep_strategies": ["fixed_window", "topk", "pooling", "sink_window"],
    "sweep_ratios": [0.7, 0.5, 0.3, 0.2, 0.1],
    "vec_env": "dummy",  # dummy (stable-baselines3 DummyVecEnv) | batched (all envs in one numpy call)
    "threads": 0,  # torch CPU threads for the timed runs (0 = half the cores, at least 1)
    "backend": "local",  # local | ray: where the configurations of a sweep run (each one a job, timed on one node)
    "workers": 1,  # configurations in parallel (local: processes, one at a time per node when timed; ray local: CPUs)
    "ray_address": "local",  # ray backend: local (a private Ray instance) | auto (the running cluster) | HOST:PORT
    "out": "runs/compression",
}
ALIASES = {"compression_strategy": ["--strategy"], "compression_ratio": ["--ratio"], "compression_interval": ["--interval"]}


def build_compression(cfg: dict, strategy: str, ratio: float, context: int):
    """The strategy object for one configuration; only the parameters the strategy has are passed."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown compression strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    valid = {f.name for f in fields(STRATEGIES[strategy])}
    params = {"ratio": ratio, "interval": cfg["compression_interval"], "keep_recent": cfg["keep_recent"], "n_sink": cfg["n_sink"],
              "lead": cfg["lead"], "n_anchor": cfg["n_anchor"], "per_episode": cfg["per_episode"], "n_reward": cfg["n_reward"],
              "score_queries": cfg["score_queries"]}  # fmt: skip
    params["window_size"] = cfg["window_size"] or None
    return make_compression(strategy, context=context, **{k: v for k, v in params.items() if k in valid})  # ConfigError if out of range


class CheckpointRunner:
    """Held-out rollouts of the project's model with one of its engines."""

    def __init__(self, cfg: dict):
        from env import get_spec, make_vec_env
        from model.checkpoint import load_model
        from model.rollout import run_episodes

        if cfg["engine"] not in ENGINES:
            raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {cfg['engine']!r}")
        if cfg["vec_env"] not in ("dummy", "batched"):
            raise UserError(f"--vec-env must be dummy or batched, got {cfg['vec_env']!r}")
        self.device = resolve_device(cfg["device"])
        self.model, meta = load_model(cfg["checkpoint"], self.device)
        self.context = self.model.cfg.max_context
        self.spec = get_spec(meta["env"])
        self.tasks = self.spec.tasks_for(cfg["tasks"])
        self.cfg, self.engine, self._run, self._make = cfg, cfg["engine"], run_episodes, make_vec_env
        self.reopen()

    def reopen(self) -> None:
        """(Re)build the environments for `self.tasks`."""
        self.venv = self._make(self.spec, self.tasks, self.cfg["vec_env"])

    def run(self, compression, seed: int, engine: str | None = None) -> dict:
        out = self._run(self.model, self.venv, self.spec, self.cfg["episodes"], engine=engine or self.engine, compression=compression, seed=seed)
        return {"time_s": out["time_s"], "returns": out["returns"], "context": out["mean_context_length"]}

    def profile(self, compression, seed: int) -> tuple[list[int], list[float]]:
        """One rollout timed step by step: (context length, seconds) of every step."""
        import time

        lens, times, last = [], [], [time.perf_counter()]

        def on_step(t, tok, actions, rewards, eng):
            now = time.perf_counter()
            lens.append(len(eng))
            times.append(now - last[0])
            last[0] = now

        self._run(self.model, self.venv, self.spec, self.cfg["episodes"], engine=self.engine, compression=compression, seed=seed, on_step=on_step)
        return lens[1:], times[1:]

    def close(self):
        self.venv.close()


class AdapterRunner:
    """Held-out rollouts of the user's own model, by the user's own rollout, through the adapter."""

    def __init__(self, cfg: dict):
        from adlens.adapter import load_adapter

        self.adapter = load_adapter(cfg["adapter"])
        self.device = resolve_device("cpu" if cfg["device"] == "auto" else cfg["device"])
        self.model = self.adapter.load_model(self.device)
        self.context = self.adapter.max_context
        self.tasks = self.adapter.tasks(cfg["tasks"])
        self.cfg, self.engine = cfg, "adapter"

    def reopen(self) -> None:
        pass

    def run(self, compression, seed: int, engine: str | None = None) -> dict:
        out = self.adapter.run(self.model, self.tasks, self.cfg["episodes"] * self.adapter.horizon, seed, compression)
        return {"time_s": out["time_s"], "returns": out["returns"], "context": out["mean_context_length"]}

    def close(self):
        pass


def make_runner(cfg: dict):
    if cfg["tasks"] not in ("test", "train"):
        raise UserError(f"--tasks must be test or train, got {cfg['tasks']!r}")
    return AdapterRunner(cfg) if cfg["adapter"] else CheckpointRunner(cfg)


def measure(runner, strategy: str, compression, seeds: list[int], compare_rerun: bool = False) -> dict:
    """Baseline and compressed rollouts paired per seed and alternated (ABBA...), so that drift in the
    machine's speed hits both alike. speedup = summed baseline time / summed compressed time."""
    full, comp, rerun = [], [], []
    for i, seed in enumerate(seeds):
        pair = [("full", None), ("comp", compression)]
        for name, c in pair if i % 2 == 0 else pair[::-1]:
            (full if name == "full" else comp).append(runner.run(c, seed))
        if compare_rerun:
            rerun.append(runner.run(None, seed, engine="rerun"))
    t_full = np.array([f["time_s"] for f in full])
    t_comp = np.array([c["time_s"] for c in comp])
    r_full = np.array([f["returns"].mean() for f in full])
    r_comp = np.array([c["returns"].mean() for c in comp])
    loss = np.where(r_full != 0, (r_full - r_comp) / np.where(r_full != 0, r_full, 1), 0.0)
    pair_speed = t_full / t_comp
    n = len(seeds)
    ctx_full = float(np.mean([f["context"] for f in full]))
    ctx_comp = float(np.mean([c["context"] for c in comp]))
    row = {
        "engine": runner.engine,
        "strategy": strategy,
        "ratio": compression.ratio,
        "interval": compression.interval,
        "params": {f.name: getattr(compression, f.name) for f in fields(compression)},
        "mean_context_length": ctx_comp,
        "full_context_length": ctx_full,
        "shortens_context": ctx_comp < ctx_full,
        "speedup": float(t_full.sum() / t_comp.sum()),
        "speedup_pair_min": float(pair_speed.min()),
        "speedup_pair_max": float(pair_speed.max()),
        "return_full": float(r_full.mean()),
        "return_compressed": float(r_comp.mean()),
        "return_full_last10": float(np.mean([f["returns"][:, -10:].mean() for f in full])),
        "return_compressed_last10": float(np.mean([c["returns"][:, -10:].mean() for c in comp])),
        "performance_loss": float(loss.mean()),
        "performance_loss_stderr": float(loss.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "time_full_s": t_full.tolist(),
        "time_compressed_s": t_comp.tolist(),
        "seeds": list(seeds),
        "episodes": int(full[0]["returns"].shape[1]),
        "n_tasks": int(full[0]["returns"].shape[0]),
    }
    if rerun:
        row["speedup_vs_rerun_full"] = float(sum(r["time_s"] for r in rerun) / t_comp.sum())
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':<8}{'strategy':<14}{'ratio':>6}{'context':>9}{'speedup (pairs)':>22}{'return':>9}{'loss % (se)':>14}")
    for r in rows:
        speed = f"{r['speedup']:.2f}x ({r['speedup_pair_min']:.2f}-{r['speedup_pair_max']:.2f})" if r["shortens_context"] else "n/a: not shorter"
        se = f" ({100 * r['performance_loss_stderr']:.1f})" if r["performance_loss_stderr"] is not None else ""
        print(f"{r['engine']:<8}{r['strategy']:<14}{r['ratio']:>6.2f}{r['mean_context_length']:>9.1f}{speed:>22}"
              f"{r['return_compressed']:>9.2f}{100 * r['performance_loss']:>8.1f}{se:<6}")  # fmt: skip


def best_within(rows: list[dict], max_loss: float = 0.05) -> dict | None:
    ok = [r for r in rows if r["performance_loss"] < max_loss and r["strategy"] != "none" and r["shortens_context"]]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def timed_row(cfg: dict, strategy: str, ratio: float) -> dict:
    """One configuration measured on one worker: its own runner, warm-up, then baseline and compressed
    runs alternated (a job of `adlens.ray_pool.fan_out`; a speedup never mixes workers)."""
    pin_threads(cfg["threads"])
    runner = make_runner(cfg)
    try:
        comp = build_compression(cfg, strategy, ratio, runner.context)
        runner.run(None, cfg["seeds"][0])  # warm-up, untimed
        return measure(runner, strategy, comp, cfg["seeds"], cfg["compare_rerun"] and runner.engine == "kv")
    finally:
        runner.close()


BOUNDS = {
    "compression_interval": (1, 10**6), "compression_ratio": (1e-6, 1.0), "sweep_ratios": (1e-6, 1.0), "keep_recent": (0, 10**6), "window_size": (0, 10**6),
    "n_sink": (0, 10**6), "lead": (0, 10**6), "n_anchor": (0, 10**6), "per_episode": (1, 10**6), "n_reward": (0, 10**6), "score_queries": (0, 10**6), "engine": set(ENGINES), "seeds": COMMON_BOUNDS["seed"], "tasks": {"test", "train"},
    "device": {"auto", "cpu", "cuda"}, "vec_env": {"dummy", "batched"}, "backend": set(BACKENDS),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add_config_flags(parser, COMPRESSION_CONFIG, aliases=ALIASES)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = resolve(COMPRESSION_CONFIG, args, bounds=BOUNDS)
    cfg["adapter"] = none_or(cfg["adapter"], str)
    if cfg["adapter"] and args.checkpoint is not None:
        raise UserError("--checkpoint and --adapter are mutually exclusive: analyse the project's model or yours")
    check_out(cfg["out"])
    check_workers(cfg["backend"], cfg["ray_address"], cfg["workers"])
    if cfg["sweep"] and not (cfg["sweep_strategies"] and cfg["sweep_ratios"]):
        raise UserError("--sweep needs at least one strategy (--sweep-strategies) and one ratio (--sweep-ratios)")
    threads = pin_threads(cfg["threads"])
    runner = make_runner(cfg)
    # validate every configuration before running or writing anything
    if cfg["sweep"]:
        configs = [(s, r) for s in cfg["sweep_strategies"] for r in cfg["sweep_ratios"]]
    elif cfg["use_compression"]:
        configs = [(cfg["compression_strategy"], cfg["compression_ratio"])]
    else:
        configs = [("none", 1.0)]
    comps = [(s, build_compression(cfg, s, r, runner.context)) for s, r in configs]
    out = Path(cfg["out"])
    print(f"{runner.engine} engine, {len(runner.tasks)} {cfg['tasks']} tasks, {cfg['episodes']} episodes, seeds {cfg['seeds']}, "
          f"{threads} torch thread(s); baseline and compressed runs alternate per seed", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    runner.run(None, cfg["seeds"][0])  # warm-up, untimed; its duration sizes the whole run
    runs = len(configs) * len(cfg["seeds"]) * (2 + (cfg["compare_rerun"] and runner.engine == "kv"))
    print(f"{runs} timed rollouts of about {time.perf_counter() - t0:.1f} s each (the baseline's; compressed ones are shorter) "
          f"on {cfg['workers']} worker(s)", flush=True)  # fmt: skip
    if cfg["backend"] != "local" or cfg["workers"] > 1:  # every configuration a job, timed on one worker
        runner.close()
        rows: list = [None] * len(configs)
        with backend_session(cfg["backend"], cfg["ray_address"], cfg["workers"], timed_row):
            done_iter = fan_out(timed_row, [(cfg, s, r) for s, r in configs], cfg["backend"], cfg["workers"], cfg["ray_address"],
                                exclusive=True, desc="sweep")  # fmt: skip
            with closing(done_iter):
                for done in done_iter:
                    rows[done.idx] = done.result | {"worker": done.worker}
    else:
        try:
            rows = []
            for i, (s, comp) in enumerate(comps):
                print(f"[{i + 1}/{len(comps)}] {runner.engine} {s} ratio={comp.ratio} interval={comp.interval}", flush=True)
                rows.append(measure(runner, s, comp, cfg["seeds"], cfg["compare_rerun"] and runner.engine == "kv"))
        finally:
            runner.close()
    out.mkdir(parents=True, exist_ok=True)
    result = stamp("ad-compression-results", {"provenance": provenance(), "rows": rows, "config": cfg, "model_context": runner.context,
                                              "device": str(runner.device), "torch_threads": threads})  # fmt: skip
    best = best_within(rows)
    result["recommended"] = best
    write_json_atomic(out / "compression_results.json", result)
    print_table(rows)
    if cfg["sweep"]:
        save_figure(plot_compression_tradeoff(rows), out / "compression_tradeoff.png", dpi=120)
    if best:
        print(
            f"fastest within 5% loss: {best['strategy']} ratio {best['ratio']} -> {best['speedup']:.2f}x, loss {100 * best['performance_loss']:.1f}%"
        )
    else:
        print("no configuration that shortens the context stayed within 5% loss")
    print(f"wrote {out / 'compression_results.json'}")
    return result


if __name__ == "__main__":
    run_cli(main)
