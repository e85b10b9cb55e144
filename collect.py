"""Collect learning histories: one stable-baselines3 PPO learner per task, every transition kept.

    python collect.py --env darkroom --out data/darkroom --workers 2

Each task's learner runs `n_streams` parallel environments; every transition of every stream is
recorded from the very first step (the whole learning history, as AD needs, arXiv 2210.14215).
One compressed file per task, `task_XXXX.npz`, is written under a temporary name and renamed when
complete, so an interrupted run resumes with the tasks still missing and never leaves half a file.
Ctrl-C stops the workers at once (exit code 130); one run at a time writes into a folder.

`--tasks none` collects `goal_free_learners` learners in a Darkroom without a goal (one file each;
Key-to-Door trains on them too: config/key_to_door_explore.yaml, the empty room with 50-step episodes):
histories of pure exploration. Never rewarded, PPO alone drifts into mostly repeating one path
within a few dozen episodes; with `--novelty-bonus B` each learner is also paid B/sqrt(n) for
reaching a cell its streams have entered n times so far, and keeps heading for parts of the room it
has seen least.
The bonus only shapes PPO's training: the stored rewards are the environment's.

    python collect.py --config config/darkroom_explore.yaml   # --tasks none --novelty-bonus 0.3

`--backend ray` runs each task as a Ray task holding one CPU (or `--gpus-per-task` of a GPU with
`--device cuda`) on a Ray cluster, `--ray-address auto` or HOST:PORT, or on a private local Ray
instance of `--workers` CPUs (`local`, the default). Workers send their histories back and this
process writes them, exactly as the local backend does: the same files, byte for byte, for the same
seeds. A task that fails or whose worker is lost is retried `--max-retries` times, then reported.

    ray start --head --num-cpus 16            # on the head node; `ray start --address HEAD:6379` on the others
    python collect.py --config config/key_to_door.yaml --backend ray --ray-address auto
"""

from __future__ import annotations

import functools
import io
import json
import time
import zipfile
from contextlib import closing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adlens.config import add_config_flags, check_memory, check_out, load_yaml, make_parser, resolve, run_cli, section
from adlens.device import check_device_name, resolve_device
from adlens.errors import UserError
from adlens.io import atomic_path, lock_folder, remove_stale_temps, write_json_atomic
from adlens.ray_pool import BACKENDS, backend_session, check_address, check_workers, fan_out
from env import env_section
from env import get_spec
from env.tasks import EnvSpec

COLLECT_CONFIG = {
    "env": "darkroom",  # darkroom | darkroom_permuted | key_to_door
    "size": 9,  # grid side
    "out": "data/darkroom",  # one task_XXXX.npz per task
    "tasks": "all",  # all | train | test | none (a room without a goal: goal_free_learners exploration histories)
    "first_tasks": 0,  # collect only the first N of the chosen tasks (0 = all): a quick per-task cost before a full run
    "goal_free_learners": 10,  # learners (files) collected with tasks none
    "novelty_bonus": 0.0,  # B: PPO is also paid B/sqrt(visits of the cell reached so far); stored rewards stay the env's
    "observe_key": False,  # key_to_door: PPO also observes whether it holds the key; stored states stay (row, col)
    "n_streams": 100,  # parallel environments per PPO learner
    "n_learners": 1,  # independent PPO learners per task (histories per task = n_learners * n_streams)
    "timesteps": 100_000,  # PPO timesteps per learner, all its streams together
    "workers": 2,  # tasks collected in parallel processes (with --backend ray --ray-address local: CPUs of the local Ray instance)
    "backend": "local",  # local (processes on this machine) | ray (one Ray task per task)
    "ray_address": "local",  # ray backend: local (a private Ray instance) | auto (the running cluster, RAY_ADDRESS) | HOST:PORT
    "gpus_per_task": 0.0,  # ray backend with --device cuda: the share of a GPU each task holds (e.g. 0.25)
    "max_retries": 2,  # a task that fails or whose worker is lost is run again this many times
    "seed": 0,
    "learning_rate": 1e-3,
    "n_epochs": 4,  # PPO epochs per update
    "batch_size": 500,  # PPO minibatch size
    "ent_coef": 0.01,
    "device": "cpu",  # PPO's device: cpu (fastest for these small MLPs) | cuda | auto
}
GOAL_FREE_SEED = 1_000_000  # goal-free learner k is seeded seed + GOAL_FREE_SEED + 1000 k


@functools.cache
def _novelty_bonus_wrapper():
    """The VecEnv wrapper class, built once per process (stable-baselines3 is imported only where PPO runs)."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class NoveltyBonus(VecEnvWrapper):
        """Adds beta / sqrt(n) to each reward, n = visits of the reached cell by all streams so far.
        The environment's own reward travels in info["env_reward"]."""

        def __init__(self, venv, beta: float, spec: EnvSpec):
            super().__init__(venv)
            self.beta, self.spec = beta, spec
            self.visits = np.zeros(spec.n_states)

        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            reached = np.array([info["terminal_observation"] if d else o for o, d, info in zip(obs, dones, infos)])
            cells = self.spec.state_index(reached)
            np.add.at(self.visits, cells, 1)
            for info, r in zip(infos, rewards):
                info["env_reward"] = float(r)
            return obs, rewards + self.beta / np.sqrt(self.visits[cells]), dones, infos

    return NoveltyBonus


def _npz_bytes(arrays: dict) -> bytes:
    """np.savez_compressed into memory with a fixed timestamp on every member, so that the same
    history is the same bytes whichever worker, machine or backend produced it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def _collect_task(spec_dict: dict, task_idx: int, task: dict, cfg: dict) -> tuple[dict, dict]:
    """Train PPO on one task, recording every transition of every stream. Runs in a worker; returns
    (the bytes of task_XXXX.npz, compressed here, a summary) for the driver to write and print."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    from env import ObserveKey, make_env

    torch.set_num_threads(1)
    resolve_device(cfg["device"])  # on a Ray node, too: stable-baselines3 would fall back to the CPU silently
    spec = EnvSpec(**spec_dict)
    n = cfg["n_streams"]
    horizon = spec.horizon
    n_steps = horizon  # one PPO update per episode of every stream

    class Recorder(BaseCallback):
        def __init__(self):
            super().__init__()
            self.rows = {k: [] for k in ("states", "actions", "rewards", "next_states", "dones")}

        def _on_step(self) -> bool:
            loc = self.locals
            nxt = np.array(loc["new_obs"], copy=True)
            for i, done in enumerate(loc["dones"]):
                if done:  # auto-reset replaced the final observation
                    nxt[i] = loc["infos"][i]["terminal_observation"]
            self.rows["states"].append(np.array(self.model._last_obs[:, :2], copy=True))  # without the key flag
            self.rows["actions"].append(np.array(loc["actions"], copy=True).reshape(n))
            rewards = [info.get("env_reward", r) for info, r in zip(loc["infos"], loc["rewards"])]
            self.rows["rewards"].append(np.array(rewards, dtype=np.float32))
            self.rows["next_states"].append(nxt[:, :2])
            self.rows["dones"].append(np.array(loc["dones"], dtype=bool, copy=True))
            return True

    learners = []
    goal_free = task is None
    for j in range(1 if goal_free else cfg["n_learners"]):
        thunk = make_env(spec, **({"goal": None} if goal_free else task))
        make = (lambda t=thunk: ObserveKey(t())) if cfg["observe_key"] else thunk  # the learner also sees the key flag
        vec = DummyVecEnv([make] * n)
        if cfg["novelty_bonus"] > 0:
            vec = _novelty_bonus_wrapper()(vec, cfg["novelty_bonus"], spec)  # visits counted per learner
        rec = Recorder()
        model = PPO(
            "MlpPolicy",
            vec,
            n_steps=n_steps,
            batch_size=min(cfg["batch_size"], n_steps * n),
            n_epochs=cfg["n_epochs"],
            learning_rate=cfg["learning_rate"],
            ent_coef=cfg["ent_coef"],
            gamma=0.99,
            seed=cfg["seed"] + (GOAL_FREE_SEED if goal_free else 0) + 1000 * task_idx + j,
            device=cfg["device"],
            verbose=0,
        )
        model.learn(total_timesteps=cfg["timesteps"], callback=rec)
        learners.append({k: np.stack(v, axis=1) for k, v in rec.rows.items()})  # (n_streams, n_steps, ...)
    arrays = {k: np.concatenate([lr[k] for lr in learners]) for k in learners[0]}
    arrays["states"] = arrays["states"].astype(np.int8)
    arrays["next_states"] = arrays["next_states"].astype(np.int8)
    arrays["actions"] = arrays["actions"].astype(np.int8)
    n_ep = arrays["rewards"].shape[1] // horizon
    ep_returns = arrays["rewards"][:, : n_ep * horizon].reshape(-1, n_ep, horizon).sum(-1)  # (S, E)
    summary = {"task_idx": task_idx, "task": task, "first": float(ep_returns[:, 0].mean()), "last": float(ep_returns[:, -1].mean())}
    return _npz_bytes({"task": json.dumps(task), "horizon": horizon, **arrays}), summary


BOUNDS = {
    "size": (2, 1000), "tasks": {"all", "train", "test", "none"}, "first_tasks": (0, None), "goal_free_learners": (1, 100_000),
    "novelty_bonus": (0.0, 1e6), "n_streams": (1, 100_000), "n_learners": (1, 10_000), "timesteps": (1, None),
    "backend": set(BACKENDS), "gpus_per_task": (0.0, 1.0), "max_retries": (0, 100), "learning_rate": (1e-9, 10.0),
    "n_epochs": (1, 1000), "batch_size": (1, 10**7), "ent_coef": (0.0, 100.0), "device": {"auto", "cpu", "cuda"},
}  # fmt: skip
# Settings that shape the histories: a rerun into a folder collected with other values would mix
# two datasets, so it is refused (the rest, e.g. workers or backend, may differ between runs).
HISTORY_KEYS = ("env", "size", "goal_free_learners", "novelty_bonus", "observe_key", "n_streams", "n_learners", "timesteps", "seed",
                "learning_rate", "n_epochs", "batch_size", "ent_coef")  # fmt: skip
TIMESTEPS_PER_S = 5000  # PPO timesteps per second per worker on one CPU core, Darkroom (rough, measured)
BYTES_PER_TIMESTEP = 1.2  # compressed history on disk, Darkroom (84 KB per 100k timesteps)


def check_resumed_folder(out: Path, spec: EnvSpec, cfg: dict) -> None:
    """A folder that already holds a collection is resumed only with the same environment, kind of
    tasks and history-shaping settings (HISTORY_KEYS): its task_XXXX.npz files count as done, so
    files of another env or other settings would be mixed in silently."""
    try:
        old = json.loads((out / "collect_config.json").read_text())
        old_env, old_cfg = dict(old["env"]), dict(old["collect"])
        old_goal_free = old_cfg["tasks"] == "none"
    except FileNotFoundError:
        return
    except (OSError, KeyError, TypeError, ValueError):  # unreadable, not JSON, or not of collect.py
        raise UserError(f"{out / 'collect_config.json'} is damaged; collect into a new --out") from None
    diff = [k for k in ("name", "size", "horizon") if old_env.get(k) != getattr(spec, k)]
    if diff:
        raise UserError(f"{out} holds histories of env {', '.join(f'{k} {old_env.get(k)!r}' for k in diff)}, not "
                        f"{', '.join(f'{k} {getattr(spec, k)!r}' for k in diff)}; collect into a new --out")  # fmt: skip
    if old_goal_free != (cfg["tasks"] == "none"):
        kind = "a room without a goal (--tasks none)" if old_goal_free else "goal tasks"
        raise UserError(f"{out} holds histories of {kind}; collect the other kind into a new --out")
    diff = [k for k in HISTORY_KEYS if old_cfg.get(k) != cfg[k]] + (["env"] if old_env != spec.to_dict() else [])
    if diff:
        got = ", ".join(f"{k} {old_cfg.get(k)!r} -> {cfg[k]!r}" for k in diff if k in cfg)
        raise UserError(f"{out} holds histories collected with other settings ({got or 'env'}); collect into a new --out")


def main(argv=None) -> list[dict]:
    parser = make_parser(__doc__)
    parser.add_argument("--config", help="YAML file whose 'env' and 'collect' sections override the defaults")
    add_config_flags(parser, COLLECT_CONFIG)
    args = parser.parse_args(argv)
    ycfg = load_yaml(args.config) if args.config else {}
    env_own, env_sec = env_section(ycfg)
    cfg = resolve(COLLECT_CONFIG, args, env_own | section(ycfg, "collect", COLLECT_CONFIG), BOUNDS, where=args.config or "config")
    spec = get_spec({"name": cfg["env"], "size": cfg["size"], **env_sec})
    if cfg["backend"] == "local":
        resolve_device(cfg["device"])  # cuda without CUDA is refused, never run on the CPU instead
    else:
        check_device_name(cfg["device"])  # the Ray tasks that hold a GPU check theirs
    check_workers(cfg["backend"], cfg["ray_address"], cfg["workers"])
    if cfg["backend"] == "ray":
        check_address(cfg["ray_address"])
        if cfg["device"] == "cuda" and cfg["gpus_per_task"] == 0:
            raise UserError("--device cuda on Ray needs --gpus-per-task (the share of a GPU each task holds, e.g. 0.25)")
    if cfg["observe_key"] and spec.name != "key_to_door":
        raise UserError(f"--observe-key needs env key_to_door (the flag is whether the key is held), got {spec.name!r}")
    if cfg["timesteps"] < cfg["n_streams"] * spec.horizon:
        raise UserError(f"--timesteps must cover at least one episode per stream ({cfg['n_streams'] * spec.horizon})")
    per_task = cfg["timesteps"] * cfg["n_learners"]
    check_memory(64 * per_task * (cfg["workers"] if cfg["backend"] == "local" else 1),
                 f"recording {per_task:,} timesteps per task", "lower --timesteps, --n-learners or --workers")  # fmt: skip
    out = check_out(cfg["out"])
    check_resumed_folder(out, spec, cfg)

    all_tasks = spec.tasks()
    if cfg["tasks"] == "none":
        if spec.name != "darkroom":
            raise UserError(f"--tasks none (a room without a goal) needs env darkroom, got {spec.name!r}")
        all_tasks = [None] * cfg["goal_free_learners"]
        wanted = list(range(len(all_tasks)))
    elif cfg["tasks"] == "all":  # the training tasks (a subset with env train_tasks) and the held-out ones
        train, held = spec.split()
        index = {json.dumps(t): i for i, t in enumerate(all_tasks)}
        wanted = sorted(index[json.dumps(t)] for t in train + held)
    else:
        chosen = spec.tasks_for(cfg["tasks"])
        index = {json.dumps(t): i for i, t in enumerate(all_tasks)}
        wanted = [index[json.dumps(t)] for t in chosen]

    wanted = wanted[: cfg["first_tasks"] or None]
    todo = [i for i in wanted if not (out / f"task_{i:04d}.npz").exists()]
    parallel = cfg["workers"] if cfg["backend"] == "local" or cfg["ray_address"] == "local" else None
    hours = len(todo) * per_task / TIMESTEPS_PER_S / 3600 / (parallel or 1)
    disk = len(todo) * per_task * BYTES_PER_TIMESTEP
    if todo:
        when = f"about {hours:.1f} h on {parallel} worker(s)" if parallel else f"about {hours:.1f} worker-hours on the cluster"
        print(f"{len(todo)} tasks of {per_task:,} timesteps: {when} and {disk / 2**20:,.0f} MB of disk, by a rough estimate")
    results = []
    with (
        backend_session(cfg["backend"], cfg["ray_address"], cfg["workers"], _collect_task),  # a bad address fails here, before any output
        lock_folder(out, "collect.py run"),
    ):
        remove_stale_temps(out, ["task_*.npz", "collect_config.json"])  # left by a run killed mid-write
        write_json_atomic(out / "collect_config.json", {"env": spec.to_dict(), "collect": cfg})
        todo = [i for i in wanted if not (out / f"task_{i:04d}.npz").exists()]
        print(f"{len(wanted) - len(todo)} of {len(wanted)} tasks already collected in {out}; {len(todo)} to go")
        t0 = time.time()
        jobs = [(spec.to_dict(), i, all_tasks[i], cfg) for i in todo]
        done_iter = fan_out(_collect_task, jobs, cfg["backend"], cfg["workers"], cfg["ray_address"], cpus=1.0, gpus=cfg["gpus_per_task"],
                            max_retries=cfg["max_retries"], desc="collect")  # fmt: skip
        with closing(done_iter):  # Ctrl-C anywhere in the loop stops the workers at once; written tasks stay
            for done in done_iter:
                data, r = done.result
                with atomic_path(out / f"task_{r['task_idx']:04d}.npz") as tmp:
                    tmp.write_bytes(data)
                results.append(r | {"worker": done.worker})
                optimal = "" if r["task"] is None else f", optimal {spec.optimal_return(r['task']):.0f}"
                tqdm.write(f"task {r['task_idx']:4d} {json.dumps(r['task'])}: first episode return {r['first']:.2f}, last {r['last']:.2f}{optimal}")
    if results:
        print(f"collected {len(results)} tasks in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    run_cli(main)
