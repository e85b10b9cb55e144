"""Attention across training: run the same evaluation and attention capture on every training
snapshot and show, against training step, when in-context learning emerges and what changes in
the model's attention when it does.

    python train.py --config config/darkroom.yaml --out runs/progression/darkroom_ad --threads 1 \\
        --snapshot-geometric 14 --snapshot-first 10 --snapshot-every 500
    python training_progression.py --snapshots runs/progression/darkroom_ad --capture-timesteps 500 --reference default

`--snapshots` is a training run's folder (its `snapshots/` is used) or a folder of
`step_XXXXXX.pt` files, all from one model config. For every snapshot, with the same tasks and seeds:
  * in-context return on the held-out tasks from an empty context (`episodes` episodes, sampled
    actions, `num_seeds` seeds from `seed`): episode 1 and the mean of the last `late_episodes`;
  * attention captures (the query token's attention at every step, KV-cached rollout) on the first
    `capture_tasks` held-out tasks x `capture_seeds` seeds, `capture_timesteps` steps each, summarised
    with the metrics of analyze_attention.py: attention on rewarding transitions relative to their
    share of the context, attention on the current vs earlier episodes, recency share, positions
    holding 90% of attention, normalised entropy per layer.
Writes OUT/training_progression.json (every number, per snapshot, plus `emergence`: the first step
at which each curve has covered half of its change over the run), OUT/training_progression.png and
OUT/progression_config.json. Each snapshot's numbers are also kept in OUT/points/step_XXXXXX.json, so
running the command again while training goes on (or after an interruption) computes only the
snapshots that are new or changed. `--reference` adds other checkpoints (e.g. the shipped model, "default")
evaluated on the same tasks and seeds, drawn as dashed lines.

Configuration precedence, lowest first: PROGRESSION_CONFIG below < command-line flags. Every
snapshot is read and checked before any work; outputs are staged and moved into place at the end.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adlens import plots as P  # noqa: E402
from adlens.config import add_config_flags, check_out, make_parser, resolve, run_cli  # noqa: E402
from adlens.device import check_device_name, resolve_device  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import stamp, staged_output, write_json_atomic  # noqa: E402
from adlens.progression import ATTENTION_KEYS, emergence  # noqa: E402
from adlens.ray_pool import BACKENDS, backend_session, check_address, check_workers, fan_out  # noqa: E402
from env import get_spec  # noqa: E402
from model.checkpoint import load_model, read_checkpoint  # noqa: E402
from model.progression import snapshot_point  # noqa: E402
from adlens.capture_file import default_capture_steps  # noqa: E402
from model.snapshots import SNAPSHOT_DIR, check_same_model, read_snapshots  # noqa: E402

PROGRESSION_CONFIG = {
    "snapshots": "runs/progression/darkroom_ad",  # training run folder (or its snapshots/ folder)
    "tasks": "test",  # test (held-out) | train
    "episodes": 50,  # in-context episodes per task for the return (as evaluate.py)
    "late_episodes": 10,  # "late" return = mean over the last this many episodes
    "seed": 100,  # first sampling seed (evaluation and captures)
    "num_seeds": 3,  # evaluation seeds seed, seed+1, ...
    "capture_tasks": 0,  # first N tasks of the set get attention captures (0 = all)
    "capture_seeds": 1,  # capture seeds seed, seed+1, ...
    "capture_timesteps": 0,  # steps per capture, whole episodes (0 = twice the model's context, as the one-click)
    "recent_window": 5,  # newest tokens counted as "recent" (as in analyze_attention.py)
    "sink_positions": 4,  # as in analyze_attention.py: steps with contexts <= recent_window + this are skipped
    "reference": [],  # other checkpoints evaluated alike, drawn as dashed lines ("default" = the shipped model)
    "reuse": True,  # reuse OUT/points/step_XXXXXX.json computed earlier with the same settings on the same file (--no-reuse: recompute)
    "threads": 1,  # torch CPU threads (0 = torch's default); per worker with --workers > 1 or --backend ray
    "device": "cpu",  # cpu | cuda | auto
    "backend": "local",  # local (processes on this machine) | ray (one Ray task per snapshot)
    "workers": 1,  # snapshots computed in parallel (local: processes; ray with --ray-address local: CPUs)
    "ray_address": "local",  # ray backend: local (a private Ray instance) | auto (the running cluster) | HOST:PORT
    "out": "runs/progression/analysis",
}


POINTS_DIR = "points"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or damaged: computed again


BOUNDS = {"late_episodes": (1, 10_000), "capture_seeds": (1, 1000), "recent_window": (1, 100_000), "capture_tasks": (0, 100_000),
          "capture_timesteps": (0, 10**7), "sink_positions": (0, 100_000), "tasks": {"test", "train"}, "device": {"auto", "cpu", "cuda"},
          "backend": set(BACKENDS)}  # fmt: skip


def check_config(cfg: dict) -> dict:
    if cfg["late_episodes"] > cfg["episodes"]:
        raise UserError(f"--late-episodes ({cfg['late_episodes']}) must be at most --episodes ({cfg['episodes']})")
    check_device_name(cfg["device"])
    check_workers(cfg["backend"], cfg["ray_address"], cfg["workers"])
    if cfg["backend"] == "ray":
        check_address(cfg["ray_address"])
    check_out(cfg["out"])
    return cfg


def point_job(path: str | None, device: str, threads: int, spec_dict: dict, args: tuple) -> dict:
    """One snapshot's point (returns and attention), in a worker: untimed, so jobs pack densely.
    `path` None is the shipped model."""
    from env import get_spec

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(path, torch.device(device))
    spec = get_spec(spec_dict)
    return snapshot_point(model, spec, *args)


def snapshot_folder(path: str | Path) -> Path:
    """A run folder holding snapshots/ -> that; anything else as given."""
    path = Path(path)
    return path / SNAPSHOT_DIR if (path / SNAPSHOT_DIR).is_dir() else path


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    add_config_flags(parser, PROGRESSION_CONFIG)
    cfg = check_config(resolve(PROGRESSION_CONFIG, parser.parse_args(argv), bounds=BOUNDS))
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])

    # ---- everything is read and checked before any work
    folder = snapshot_folder(cfg["snapshots"])
    snaps = read_snapshots(folder)
    ref_cfg = check_same_model(snaps)
    spec = get_spec(ref_cfg["env"])
    tasks = spec.tasks_for(cfg["tasks"])
    if cfg["capture_tasks"] > len(tasks):
        raise UserError(f"--capture-tasks must be at most {len(tasks)} (the {cfg['tasks']} tasks), got {cfg['capture_tasks']}")
    capture_tasks = tasks[: cfg["capture_tasks"] or len(tasks)]
    references = []
    for ref in cfg["reference"]:
        rmeta = read_checkpoint(None if ref == "default" else ref)["config"]
        if rmeta.get("env") != ref_cfg["env"]:
            raise UserError(
                f"--reference {ref} was trained on another environment ({rmeta.get('env')}) than the snapshots ({ref_cfg['env']})"
            )
        references.append(ref)
    seeds = list(range(cfg["seed"], cfg["seed"] + cfg["num_seeds"]))
    capture_seeds = list(range(cfg["seed"], cfg["seed"] + cfg["capture_seeds"]))
    capture_steps = cfg["capture_timesteps"] or default_capture_steps(int(ref_cfg["model"]["max_context"]), spec.horizon)

    settings = {k: cfg[k] for k in ("tasks", "episodes", "late_episodes", "recent_window", "sink_positions", "device")}
    settings |= {"seeds": seeds, "capture_seeds": capture_seeds, "n_capture_tasks": len(capture_tasks), "capture_timesteps": capture_steps}

    args = (tasks, capture_tasks, cfg["episodes"], seeds, capture_seeds, capture_steps, cfg["late_episodes"], cfg["recent_window"],
            cfg["sink_positions"])  # fmt: skip
    out = Path(cfg["out"])
    t0 = time.perf_counter()
    points: list = [None] * len(snaps)
    keys, todo = [], []  # todo: (index, path or None for the shipped model); indices past the snapshots are references
    for i, (step, path) in enumerate(snaps):
        st = path.stat()
        keys.append({"snapshot": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "settings": settings})
        old = _read_json(out / POINTS_DIR / f"step_{step:06d}.json") if cfg["reuse"] else None
        if old is not None and old.get("key") == keys[-1]:
            points[i] = old["point"]
        else:
            todo.append((i, str(path)))
    n_reused = len(snaps) - len(todo)
    todo += [(len(snaps) + j, None if r == "default" else r) for j, r in enumerate(references)]
    ref_points: list = [None] * len(references)

    def keep(i: int, result: dict) -> None:
        if i < len(snaps):
            step, path = snaps[i]
            points[i] = {"step": step, "path": str(path), **result}
            write_json_atomic(out / POINTS_DIR / f"step_{step:06d}.json", {"key": keys[i], "point": points[i]})
        else:
            r = references[i - len(snaps)]
            ref_points[i - len(snaps)] = {"name": "shipped model" if r == "default" else Path(r).parent.name or r, "path": r, **result}

    if cfg["backend"] == "local" and cfg["workers"] == 1:
        for i, path in tqdm(todo, desc="snapshots", dynamic_ncols=True):
            keep(i, point_job(path, str(device), 0, spec.to_dict(), args))
    else:  # one job per snapshot; the driver writes each point as it arrives
        jobs = [(path, str(device), cfg["threads"] or 1, spec.to_dict(), args) for _, path in todo]
        with backend_session(cfg["backend"], cfg["ray_address"], cfg["workers"], point_job):
            with closing(fan_out(point_job, jobs, cfg["backend"], cfg["workers"], cfg["ray_address"], desc="snapshots")) as done_iter:
                for done in done_iter:
                    keep(todo[done.idx][0], done.result)
    elapsed = time.perf_counter() - t0

    model_cfg = ref_cfg["model"]
    doc = stamp("ad-training-progression", {
        "meta": {
            "snapshots": str(folder),
            "env": ref_cfg["env"],
            "env_name": spec.name,
            "model": model_cfg,
            "n_layer": model_cfg["n_layer"],
            "layer_names": [f"layer {i}" for i in range(model_cfg["n_layer"])],
            "horizon": spec.horizon,
            "tasks": cfg["tasks"],
            "n_tasks": len(tasks),
            "n_capture_tasks": len(capture_tasks),
            "seeds": seeds,
            "capture_seeds": capture_seeds,
            "capture_timesteps": capture_steps,
            "episodes": cfg["episodes"],
            "recent_window": cfg["recent_window"],
            "n_snapshots": len(points),
            "threads": torch.get_num_threads() if cfg["workers"] == 1 and cfg["backend"] == "local" else cfg["threads"] or 1,
            "backend": cfg["backend"],
            "workers": cfg["workers"],
            "time_s": round(elapsed, 1),
            "n_reused": n_reused,
            "metrics": ATTENTION_KEYS,
        },
        "snapshots": points,
        "references": ref_points,
        "emergence": emergence(points),
    })  # fmt: skip
    with staged_output(out) as stage:
        (stage / "training_progression.json").write_text(json.dumps(doc, indent=1))
        P.save_figure(P.plot_progression(doc), stage / "training_progression.png")
        (stage / "progression_config.json").write_text(json.dumps(cfg, indent=2))

    print(f"{'step':>7}{'ep 1':>8}{'late':>8}{'reward x':>10}{'current ep':>12}{'recent':>8}{'n90':>7}{'entropy':>9}")
    for p in points:
        r, a = p["returns"], p["attention"]
        enr = "-" if a["reward_enrichment"] is None else f"{a['reward_enrichment']:.2f}"
        print(f"{p['step']:>7}{r['episode_1']:>8.3f}{r['late']:>8.3f}{enr:>10}{a['current_episode_share']:>12.3f}"
              f"{a['recent_share']:>8.3f}{a['positions_for_90']:>7.1f}{a['entropy_normalised']:>9.3f}")  # fmt: skip
    for p in ref_points:
        print(f"{p['name']}: episode 1 {p['returns']['episode_1']:.3f}, late {p['returns']['late']:.3f}")
    print("half of the change reached at step: " + ", ".join(f"{k} {v}" for k, v in doc["emergence"].items()))
    print(
        f"{len(points)} snapshots ({n_reused} reused from {out / POINTS_DIR}) in {elapsed:.0f} s -> {out / 'training_progression.png'}, {out / 'training_progression.json'}"
    )
    return doc


if __name__ == "__main__":
    run_cli(main)
