"""In-context evaluation of an AD checkpoint on held-out tasks (or the training tasks).

    python evaluate.py                                   # the shipped default model, 8 held-out goals
    python evaluate.py --checkpoint checkpoints/my_ad/model.pt --episodes 50 --seed 0 --num-seeds 3

The model starts with an empty context in every task and acts for `episodes` episodes, its own
growing history as context: any improvement across episodes is learned in context (no weights change).
Writes OUT/eval_results.json and OUT/in_context_curve.png, and prints a per-task table. On Dark
Key-to-Door the results also split each episode's return into its key part and its door part.

Seeds can run in parallel: `--workers 4` (processes on this machine) or `--backend ray` (one Ray
task per seed, `--ray-address auto` or HOST:PORT for a cluster); the returns are the same as one
seed after another in this process. Parallel seeds share their nodes, so their timings
(env_steps_per_second) are marked shared-load and each seed records the worker that ran it.

    python evaluate.py --num-seeds 10 --backend ray --ray-address auto
"""

from __future__ import annotations

import copy
import json
from contextlib import closing
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from adlens.plots import save_figure  # noqa: E402
from adlens.config import add_config_flags, check_out, make_parser, none_or, resolve, run_cli  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import stamp, write_json_atomic  # noqa: E402
from adlens.ray_pool import BACKENDS, backend_session, check_address, check_workers, fan_out  # noqa: E402
from env import VEC_ENVS, get_spec, make_vec_env  # noqa: E402
from env.torch_grid import TorchGridEnv  # noqa: E402
from model.checkpoint import load_model, resolve_device  # noqa: E402
from model.data import SIBLING_SHARE, HistoryData, episode_returns, learner_rate_before, streams_per_learner  # noqa: E402
from model.device_rollout import run_on_device  # noqa: E402
from model.rollout import ENGINES, run_episodes  # noqa: E402

EVAL_CONFIG = {
    "checkpoint": "default",  # path to model.pt; "default" = the shipped Darkroom model
    "tasks": "test",  # test (held-out) | train
    "episodes": 50,  # episodes per task, one continuous in-context run
    "seed": 0,  # first sampling seed
    "num_seeds": 1,  # seeds seed, seed+1, ...; results are means over seeds
    "greedy": False,  # argmax actions instead of sampling
    "vec_env": "batched",  # batched (all envs in one numpy call) | dummy | subproc (stable-baselines3 VecEnvs) | device (tensors on the model's device: no host round trip per step; kv engine); same trajectories
    "cuda_graph": False,  # with --vec-env device on CUDA: replay each episode's steps from one captured CUDA graph
    "engine": "kv",  # kv | rerun
    "device": "auto",  # auto | cpu | cuda
    "source_data": "none",  # folder of collect.py histories: also report the source PPO's own curve on these tasks
    "backend": "local",  # local | ray: where the seeds run (see --workers)
    "workers": 1,  # seeds run in parallel: processes (local; 1 = one after another in this process) or CPUs of a local Ray instance
    "ray_address": "local",  # ray backend: local (a private Ray instance) | auto (the running cluster, RAY_ADDRESS) | HOST:PORT
    "out": "runs/eval",
}


def rollouts(
    model, spec, tasks, episodes, seeds, greedy, vec_env, engine, compression, progress, threads=0, cuda_graph=False
) -> list[dict]:
    """run_episodes for each seed, every task in one VecEnv; `threads` > 0 pins torch's threads (in a worker).
    vec_env "device": the whole rollout on the model's device (`run_on_device`), as a CUDA graph with `cuda_graph`."""
    if threads:
        torch.set_num_threads(threads)
    if vec_env == "device":
        if engine != "kv" or compression is not None:
            raise UserError(
                "--vec-env device runs the uncompressed kv engine only; use --vec-env batched for the rerun engine or compression"
            )
        env = TorchGridEnv(spec, tasks, next(model.parameters()).device)
        try:
            return [run_on_device(model, env, episodes, greedy=greedy, seed=s, graph=cuda_graph, progress=progress) for s in seeds]
        except RuntimeError as e:
            if not cuda_graph:
                raise
            raise UserError(f"--cuda-graph: the captured rollout failed ({str(e).splitlines()[0]}); run without --cuda-graph") from None
    venv = make_vec_env(spec, tasks, vec_env)
    try:
        return [
            run_episodes(model, venv, spec, episodes, engine=engine, compression=compression, greedy=greedy, seed=s, progress=progress)
            for s in seeds
        ]
    finally:
        venv.close()


def evaluate(
    model,
    spec,
    tasks: list[dict],
    episodes: int,
    seeds: list[int],
    greedy=False,
    vec_env=EVAL_CONFIG["vec_env"],
    engine="kv",
    compression=None,
    progress=True,
    backend="local",
    workers=1,
    ray_address="local",
    cuda_graph=False,
) -> dict:
    """Run every task in one VecEnv for each seed; returns the eval_results dict.

    backend, workers, ray_address: with workers > 1 or backend ray, each seed is a job of
    `adlens.ray_pool.fan_out` (one CPU, one torch thread); otherwise the seeds run here in turn.
    """
    who = None
    if backend == "local" and workers == 1:
        runs = rollouts(model, spec, tasks, episodes, seeds, greedy, vec_env, engine, compression, progress, cuda_graph=cuda_graph)
    else:
        if backend == "ray" and next(model.parameters()).is_cuda:
            model = copy.deepcopy(model).cpu()  # a Ray worker may have no GPU
        jobs = [(model, spec, tasks, episodes, [s], greedy, vec_env, engine, compression, False, 1, cuda_graph) for s in seeds]
        runs, who = [None] * len(seeds), [None] * len(seeds)
        with closing(fan_out(rollouts, jobs, backend, workers, ray_address, desc="evaluate", progress=progress)) as done_iter:
            for done in done_iter:
                runs[done.idx], who[done.idx] = done.result[0], done.worker
    returns = np.stack([r["returns"] for r in runs])  # (n_seeds, n_tasks, episodes)
    opt = np.array([spec.optimal_return(t) for t in tasks])
    if (opt <= 0).any():
        raise UserError("a task's optimal return is 0 (horizon too short to reach it): returns cannot be normalised")
    norm = returns / opt[None, :, None]
    return {
        "tasks": tasks,
        "episodes": episodes,
        "seed": seeds[0],
        "seeds": seeds,
        "greedy": greedy,
        "engine": engine,
        "return_per_episode": returns.mean((0, 1)).tolist(),
        "normalized_return_per_episode": norm.mean((0, 1)).tolist(),
        "per_task": [
            {
                "task": t,
                "optimal_return": float(opt[i]),
                "returns": returns[:, i].mean(0).tolist(),
                "returns_per_seed": returns[:, i].tolist(),
            }
            for i, t in enumerate(tasks)
        ],
        **key_door_parts(spec, returns),
        "env_steps_per_second": float(np.mean([r["env_steps_per_second"] for r in runs])),
        "time_s": float(sum(r["time_s"] for r in runs)),
        "mean_context_length": float(np.mean([r["mean_context_length"] for r in runs])),
        "timing": "one seed at a time" if who is None else "shared-load (seeds in parallel)",
        **({} if who is None else {"workers_per_seed": who}),
    }


def key_door_parts(spec, returns: np.ndarray, prefix: str = "") -> dict:
    """Dark Key-to-Door: an episode's return is 1 for the key plus 1 for the door, which pays only
    after the key, so the parts are min(return, 1) and max(return - 1, 0). (..., episodes) returns ->
    {"key_return_per_episode", "door_return_per_episode"} averaged over the leading axes ({} for
    other families)."""
    if spec.name != "key_to_door":
        return {}
    flat = np.asarray(returns).reshape(-1, np.shape(returns)[-1])
    return {f"{prefix}key_return_per_episode": np.minimum(flat, 1).mean(0).tolist(),
            f"{prefix}door_return_per_episode": np.maximum(flat - 1, 0).mean(0).tolist()}  # fmt: skip


def source_key_door(data_dir, spec, tasks: list[dict]) -> dict:
    """key_door_parts of the source learner's own episodes on `tasks` (every stream), keys prefixed source_."""
    returns = [episode_returns(HistoryData.from_dir(data_dir, spec, [t], context=1, goal_free=False).rewards, spec.horizon) for t in tasks]
    n = min(r.shape[1] for r in returns)
    return key_door_parts(spec, np.concatenate([r[:, :n] for r in returns]), prefix="source_")


def first_reward_after_learner(
    rewards: np.ndarray, horizon: int, per_learner: int | None = None, share: float = SIBLING_SHARE
) -> tuple[int, int]:
    """Streams whose first reward comes after their learner already found the goal in more than
    `share` of its streams in the episode before, and streams that are rewarded at all.

    rewards: (streams, steps) of one task, `per_learner` streams per PPO learner (None: one learner).
    Such a stream's improvement comes from its sibling streams, not from its own evidence: what AD
    cannot learn from a single stream's context.
    """
    found = episode_returns(rewards, horizon) > 0  # (streams, episodes)
    rate_before = learner_rate_before(rewards, horizon, per_learner)  # the learner's success rate one episode earlier
    rewarded = found.any(1)
    first = found.argmax(1)
    return int((rate_before[np.arange(len(first)), first] > share)[rewarded].sum()), int(rewarded.sum())


def source_stats(data_dir, spec, tasks: list[dict]) -> tuple[np.ndarray, float]:
    """The source learner on `tasks`: its normalised return per episode (mean over tasks and streams)
    and the share of rewarded streams first rewarded after their learner (first_reward_after_learner)."""
    curves, late = [], np.zeros(2, dtype=np.int64)
    per_learner = streams_per_learner(data_dir)
    for task in tasks:
        rewards = HistoryData.from_dir(data_dir, spec, [task], context=1, goal_free=False).rewards  # (streams, steps)
        curves.append(episode_returns(rewards, spec.horizon).mean(0) / spec.optimal_return(task))
        late += first_reward_after_learner(rewards, spec.horizon, per_learner)
    return np.mean(curves, axis=0), float(late[0] / max(late[1], 1))


def plot_curve(results: dict, path: Path, title: str = "In-context learning on held-out tasks") -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    ep = np.arange(1, results["episodes"] + 1)
    if "source_normalized_return_per_episode" in results:
        src = results["source_normalized_return_per_episode"]
        ax.plot(np.arange(1, len(src) + 1), src, color="tab:gray", lw=1.5, ls=":", label="source PPO (its own learning, per stream)")
    for pt in results["per_task"]:
        ax.plot(ep, np.array(pt["returns"]) / pt["optimal_return"], color="tab:blue", alpha=0.25, lw=1)
    ax.plot(ep, results["normalized_return_per_episode"], color="tab:blue", lw=2.5, label=f"mean over {len(results['tasks'])} tasks")
    for part, color in (("key", "tab:orange"), ("door", "tab:green")):  # Key-to-Door: each part of at most 1
        if f"{part}_return_per_episode" in results:
            ax.plot(ep, results[f"{part}_return_per_episode"], color=color, lw=1.5, ls="--", label=f"{part} part (of 1)")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="optimal")
    ax.set(xlabel="episode (AD: in context, no weight updates)", ylabel="return / optimal return", title=title, ylim=(-0.05, 1.1))
    ax.set_xlim(0.5, max(results["episodes"], len(results.get("source_normalized_return_per_episode", []))) + 0.5)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def print_table(results: dict) -> None:
    print(f"{'task':<22}{'optimal':>8}{'episode 1':>11}{'last 10':>9}{'normalised':>12}")
    for pt in results["per_task"]:
        r = np.array(pt["returns"])
        print(
            f"{json.dumps(pt['task']):<22}{pt['optimal_return']:>8.0f}{r[0]:>11.2f}{r[-10:].mean():>9.2f}{r[-10:].mean() / pt['optimal_return']:>12.3f}"
        )
    norm = np.array(results["normalized_return_per_episode"])
    print(f"mean normalised return: episode 1 {norm[0]:.3f}, last 10 episodes {norm[-10:].mean():.3f}; "
          f"{results['env_steps_per_second']:.0f} env steps/s")  # fmt: skip
    for who in ("", "source_"):
        if f"{who}key_return_per_episode" in results:
            key, door = (np.array(results[f"{who}{part}_return_per_episode"]) for part in ("key", "door"))
            print(f"{'source PPO' if who else 'AD'}: key part episode 1 {key[0]:.3f}, last 10 {key[-10:].mean():.3f}; "
                  f"door part episode 1 {door[0]:.3f}, last 10 {door[-10:].mean():.3f} (each of at most 1)")  # fmt: skip


BOUNDS = {"engine": set(ENGINES), "tasks": {"test", "train"}, "backend": set(BACKENDS), "vec_env": {*VEC_ENVS, "device"},
          "device": {"auto", "cpu", "cuda"}}  # fmt: skip


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    add_config_flags(parser, EVAL_CONFIG)
    cfg = resolve(EVAL_CONFIG, parser.parse_args(argv), bounds=BOUNDS)
    out = check_out(cfg["out"])
    check_workers(cfg["backend"], cfg["ray_address"], cfg["workers"])
    if cfg["backend"] == "ray":
        check_address(cfg["ray_address"])
    device = resolve_device(cfg["device"])
    if cfg["vec_env"] == "device" and cfg["engine"] != "kv":
        raise UserError("--vec-env device runs the kv engine only; use --vec-env batched with --engine rerun")
    if cfg["cuda_graph"] and (cfg["vec_env"] != "device" or device.type != "cuda" or cfg["backend"] == "ray"):
        raise UserError("--cuda-graph needs --vec-env device on a CUDA device (--device cuda), with the local backend")
    model, meta = load_model(cfg["checkpoint"], device)
    spec = get_spec(meta["env"])
    tasks = spec.tasks_for(cfg["tasks"])
    seeds = list(range(cfg["seed"], cfg["seed"] + cfg["num_seeds"]))
    if min(spec.optimal_return(t) for t in tasks) <= 0:
        raise UserError(f"a task's optimal return is 0 (horizon {spec.horizon} too short to reach it): returns cannot be normalised")
    source = source_stats(cfg["source_data"], spec, tasks) if none_or(cfg["source_data"], str) else None  # read before any rollout
    with torch.no_grad(), backend_session(cfg["backend"], cfg["ray_address"], cfg["workers"], rollouts):
        results = evaluate(model, spec, tasks, cfg["episodes"], seeds, cfg["greedy"], cfg["vec_env"], cfg["engine"],
                           backend=cfg["backend"], workers=cfg["workers"], ray_address=cfg["ray_address"], cuda_graph=cfg["cuda_graph"])  # fmt: skip
    results["checkpoint"] = str(cfg["checkpoint"])
    if source is not None:
        src, late = source
        results["source_normalized_return_per_episode"] = src.tolist()
        results["source_final_normalized_return"] = float(src[-10:].mean())
        results["source_first_reward_after_learner"] = late
        results.update(source_key_door(cfg["source_data"], spec, tasks))
    results = stamp("ad-eval-results", results)
    write_json_atomic(out / "eval_results.json", results)
    plot_curve(results, out / "in_context_curve.png")
    print_table(results)
    if "source_final_normalized_return" in results:
        print(f"source PPO on the same tasks: normalised return {results['source_final_normalized_return']:.3f} over its last 10 episodes")
        print(f"source streams first rewarded after their learner found the goal in > {SIBLING_SHARE:.0%} of its streams: "
              f"{results['source_first_reward_after_learner']:.1%}")  # fmt: skip
    print(f"wrote {out / 'eval_results.json'} and {out / 'in_context_curve.png'}")
    return results


if __name__ == "__main__":
    run_cli(main)
