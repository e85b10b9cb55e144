"""Train an Algorithm Distillation transformer on learning histories (training tasks only).

    python train.py --data data/darkroom --out checkpoints/my_ad --steps 3000
    torchrun --nproc_per_node=2 train.py --data data/darkroom --out checkpoints/my_ad   # DDP

The loss is the cross-entropy of the source learner's action at every context position.
AdamW with linear warmup and cosine decay, gradient clipping, a validation loss on the held-out
tasks' histories every `eval_every` steps, and atomic checkpoints: `OUT/model.pt` (weights and
resolved config, what every other script loads) and `OUT/train_state.pt` (weights, optimizer and
scheduler of one step in one file, for --resume). A run killed at any moment resumes from its last
`train_state.pt`; metric rows it logged past that step are dropped, so each step is logged once.
One run at a time writes into OUT: a second one is refused with a one-line error.

Fine-tuning: `--init MODEL.pt` starts from another model's weights with a fresh optimizer and
schedule. Rotary positions carry no weights, so the context may differ (a longer-context model from
the default one); the network and the environment's task split must be the same:

    python train.py --config config/darkroom_ctx1000.yaml --init checkpoints/darkroom_ad/model.pt --lr 0.0003 --steps 1500

Snapshots for studying how in-context learning emerges (`training_progression.py`): copies of the
weights at chosen steps, `OUT/snapshots/step_XXXXXX.pt`, each in the format of `model.pt`:

    python train.py --config config/darkroom.yaml --out runs/progression/darkroom_ad --snapshot-geometric 12 --snapshot-every 500

A resumed run keeps the snapshots already written and continues the schedule.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from adlens.config import add_config_flags, check_memory, check_out, load_yaml, make_parser, resolve, run_cli, section
from adlens.errors import UserError
from adlens.io import atomic_path, lock_folder, remove_stale_temps, write_json_atomic
from env import env_section
from env import get_spec
from model.ad import ADConfig, ADTransformer
from model.checkpoint import check_same_run, config_diff, read_checkpoint, resolve_device, save_atomic
from model.data import HistoryData
from model.snapshots import SNAPSHOT_DIR, snapshot_name, snapshot_schedule

TRAIN_CONFIG = {
    "data": ["data/darkroom"],  # folder(s) written by collect.py
    "out": "checkpoints/my_ad",  # model.pt, train_state.pt, metrics.jsonl, train_config.json
    "env": "darkroom",  # darkroom | darkroom_permuted | key_to_door
    "size": 9,  # grid side
    "context": 240,  # transitions per window (= the model's max_context)
    "n_layer": 4,  # transformer blocks
    "n_head": 4,  # attention heads per block
    "d_model": 64,  # model width
    "dropout": 0.1,
    "attn_dropout": -1.0,  # dropout on attention weights (-1 = same as dropout); 0 keeps the fused kernel, several times faster on a CPU
    "grid_embedding": True,  # embed states as row + column of the grid (False: one embedding per state)
    "episode_strides": [1, 2, 4],  # keep every k-th episode of a stream; one k drawn per window
    "min_context": 0,  # > 0: window lengths drawn from [min_context, context], short ones padded and masked (0 = all full)
    "augment": "none",  # none | dihedral (each window under a random grid symmetry that maps to a training task)
    "loss_mask": "none",  # none | sibling_taught: no loss on steps before any reward in the window while the stream's PPO learner had already found the goal through its other streams (in more than model.data.SIBLING_SHARE of them)
    "steps": 3000,  # optimizer steps
    "batch_size": 32,  # windows per step (per process under torchrun)
    "lr": 1e-3,  # peak AdamW learning rate: linear warmup, then cosine down to a tenth of it
    "weight_decay": 0.01,
    "warmup_steps": 100,  # steps of linear learning-rate warmup
    "grad_clip": 1.0,  # gradient-norm clip
    "eval_every": 250,  # validation loss on held-out tasks every K steps
    "val_batches": 4,  # batches of held-out windows per validation
    "save_every": 500,  # checkpoint every K steps (and at the end)
    "seed": 0,  # training seed (model init and window sampling)
    "init": "",  # model.pt whose weights start the run (fine-tuning, e.g. to a longer context); "" = random init
    "device": "auto",  # auto | cpu | cuda
    "threads": 0,  # torch CPU threads per process (0 = torch's default)
    "resume": False,  # continue from OUT/train_state.pt
    "snapshot_every": 0,  # keep OUT/snapshots/step_XXXXXX.pt every K steps (0 = none)
    "snapshot_steps": [],  # also keep snapshots at these steps
    "snapshot_geometric": 0,  # also keep N snapshots spaced evenly on a log scale from snapshot_first to steps
    "snapshot_first": 25,  # first step of the geometric schedule
}
MODEL_KEYS = ("n_layer", "n_head", "d_model", "dropout")  # passed to ADConfig as they are
TRAIN_FILES = ("model.pt", "train_state.pt", "train_config.json", "metrics.jsonl")  # what a run writes into OUT


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def _validate(model, val_batches, device) -> tuple[float, float]:
    model.eval()
    losses, accs = [], []
    for tok, tgt in val_batches:
        logits = model(type(tok)(*[t.to(device) for t in tok]))
        losses.append(F.cross_entropy(logits.flatten(0, 1), tgt.to(device).flatten()).item())
        accs.append((logits.argmax(-1).cpu() == tgt)[tgt >= 0].float().mean().item())  # masked targets are -100
    model.train()
    return float(np.mean(losses)), float(np.mean(accs))


def _snapshot_steps(cfg: dict) -> list[int]:
    return snapshot_schedule(cfg["steps"], cfg["snapshot_every"], cfg["snapshot_steps"], cfg["snapshot_geometric"], cfg["snapshot_first"])


BOUNDS = {
    "size": (2, 1000), "context": (1, 100_000), "n_layer": (1, 64), "n_head": (1, 64), "d_model": (2, 16_384),
    "dropout": (0.0, 0.99), "attn_dropout": (-1.0, 0.99), "episode_strides": (1, 1000), "min_context": (0, 100_000), "augment": {"none", "dihedral"},
    "loss_mask": {"none", "sibling_taught"}, "steps": (1, 10**8), "batch_size": (1, 65_536), "lr": (1e-9, 10.0),
    "weight_decay": (0.0, 100.0), "warmup_steps": (0, 10**8), "grad_clip": (1e-6, 1e6), "eval_every": (1, None),
    "val_batches": (1, 10_000), "save_every": (1, None), "device": {"auto", "cpu", "cuda"},
    "snapshot_every": (0, None), "snapshot_steps": (1, None), "snapshot_geometric": (0, 10_000), "snapshot_first": (1, None),
}  # fmt: skip
# What `--resume` may change (applied and recorded in train_config.json); any other flag that
# differs from the saved run is refused. Keys not given are taken from the saved run.
RESUME_MAY_CHANGE = ("steps", "eval_every", "save_every", "val_batches", "snapshot_every", "snapshot_steps",
                     "snapshot_geometric", "snapshot_first", "threads", "device", "resume")  # fmt: skip


def _train_bytes(cfg: dict) -> float:
    """Rough peak memory of a training step: attention maps and activations kept for backward."""
    B, T, D, H, L = cfg["batch_size"], cfg["context"], cfg["d_model"], cfg["n_head"], cfg["n_layer"]
    return 2 * 4 * L * B * (H * T * T + 16 * T * D)


def _resume_config(cfg: dict, explicit: set) -> dict:
    """On --resume: the saved run's settings, with the flags RESUME_MAY_CHANGE allows; a given flag
    that contradicts the saved run is an error."""
    state_path = Path(cfg["out"]) / "train_state.pt"
    if not state_path.is_file():
        raise UserError(f"--resume: nothing to resume in {cfg['out']} (no train_state.pt); drop --resume to start a new run")
    saved_meta = read_checkpoint(state_path)["config"]
    saved = saved_meta.get("train", {})
    clash = [k for k in sorted(explicit) if k in saved and k not in RESUME_MAY_CHANGE + ("out",) and saved[k] != cfg[k]]
    saved_env = {k: v for k, v in saved_meta.get("env", {}).items() if k not in ("name", "size")}
    if cfg["env_extra"] and any(saved_env.get(k) != v for k, v in cfg["env_extra"].items()):
        clash.append("env")
    if clash:
        got = ", ".join(f"{k}={cfg[k]!r} (saved {saved[k]!r})" if k in saved else k for k in clash)
        raise UserError(f"--resume: {got} contradict(s) the run saved in {cfg['out']}; only "
                        f"{', '.join(RESUME_MAY_CHANGE[:-1])} may change on resume")
    changed = {k: cfg[k] for k in sorted(explicit) if k in RESUME_MAY_CHANGE and k != "resume" and saved.get(k) != cfg[k]}
    out = {**cfg, **{k: v for k, v in saved.items() if k in TRAIN_CONFIG and k not in explicit}, "env_extra": saved_env}
    out["resume_changes"] = saved.get("resume_changes", []) + ([changed] if changed else [])
    return out


def parse(argv=None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--config", help="YAML file with 'env', 'model' and 'train' sections")
    add_config_flags(parser, TRAIN_CONFIG)
    args = parser.parse_args(argv)
    ycfg = load_yaml(args.config) if args.config else {}
    flat, env_sec = env_section(ycfg)
    model_sec = section(ycfg, "model", MODEL_KEYS + ("attn_dropout", "context", "grid_embedding"))
    flat.update(model_sec)
    flat.update(section(ycfg, "train", TRAIN_CONFIG))
    explicit: set = set()
    cfg = resolve(TRAIN_CONFIG, args, flat, BOUNDS, explicit, where=args.config or "config")
    cfg["env_extra"] = env_sec
    if not all(isinstance(s, int) for s in cfg["snapshot_steps"]):
        raise UserError(f"--snapshot-steps must be whole numbers, got {cfg['snapshot_steps']}")
    if cfg["resume"]:
        cfg = _resume_config(cfg, explicit)
    check_out(cfg["out"])
    check_memory(_train_bytes(cfg), f"a training step of batch {cfg['batch_size']} over {cfg['context']} transitions",
                 "lower --batch-size or --context")  # fmt: skip
    resolve_device(cfg["device"])
    _snapshot_steps(cfg)  # validates the schedule before any work
    return cfg


def read_train_state(out: Path) -> dict:
    """OUT/train_state.pt, checked: weights, optimizer and scheduler state in one file, all of one step."""
    state = read_checkpoint(out / "train_state.pt", need=("optimizer", "scheduler", "step"))
    step = int(state["step"])
    opt_steps = {int(s["step"]) for s in state["optimizer"].get("state", {}).values() if "step" in s}  # a parameter without a gradient skips a step
    if state["scheduler"].get("last_epoch") != step or max(opt_steps, default=step) != step:
        raise UserError(f"{out / 'train_state.pt'} is inconsistent (step {step}, scheduler {state['scheduler'].get('last_epoch')}, "
                        f"optimizer {sorted(opt_steps)}); train afresh without --resume")  # fmt: skip
    return state


# what may differ between a run and the model it starts from (--init): nothing else shapes the weights
INIT_MAY_DIFFER = ("max_context", "dropout", "attn_dropout")


def read_init(path: str, mcfg: ADConfig, spec) -> dict:
    """The weights of `path` to start a run from, checked: the same network (rotary positions have no
    weights, so the context may differ) and the same environment and held-out split (a model that saw
    the held-out tasks would leak them)."""
    ckpt = read_checkpoint(path)
    diff = config_diff(ckpt["config"]["model"], mcfg.to_dict(), ignore=INIT_MAY_DIFFER)
    if diff:
        raise UserError(f"--init {path} is another network: {', '.join(diff)}; only {', '.join(INIT_MAY_DIFFER)} may differ")
    diff = config_diff(ckpt["config"]["env"], spec.to_dict())
    if diff:
        raise UserError(f"--init {path} was trained on another environment or task split: {', '.join(diff)}")
    return ckpt["model"]


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (a killed run may have logged past its last
    checkpoint, and its last line may be cut short), so a resumed run logs every step once."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(rows))


def main(argv=None) -> Path:
    """Validate everything (each process under torchrun), then train while holding OUT (rank 0):
    a second train.py into the same OUT is refused instead of mixing its checkpoints with this one's."""
    cfg = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg["device"])
    spec = get_spec({"name": cfg["env"], "size": cfg["size"], **cfg["env_extra"]})
    train_tasks, held_tasks = spec.split()
    mcfg = ADConfig(
        n_states=spec.n_states, n_actions=spec.n_actions, horizon=spec.horizon, max_context=cfg["context"],
        grid_size=spec.size if cfg["grid_embedding"] else 0,
        attn_dropout=None if cfg["attn_dropout"] < 0 else cfg["attn_dropout"], **{k: cfg[k] for k in MODEL_KEYS},
    )  # fmt: skip
    out = Path(cfg["out"])
    state = None
    if cfg["resume"]:  # the saved run is read and checked before the histories are
        state = read_train_state(out)
        check_same_run(state, mcfg.to_dict(), spec.to_dict(), out / "train_state.pt")
    init = read_init(cfg["init"], mcfg, spec) if cfg["init"] and state is None else None
    data = HistoryData.from_dir(cfg["data"], spec, train_tasks, cfg["context"], cfg["episode_strides"], cfg["augment"], cfg["loss_mask"],
                                min_context=cfg["min_context"] or None)  # fmt: skip
    val = HistoryData.from_dir(cfg["data"], spec, held_tasks, cfg["context"], cfg["episode_strides"], goal_free=False,
                               min_context=cfg["min_context"] or None)  # the windows training sees, of the held-out tasks
    with lock_folder(out, "train.py run") if rank == 0 else nullcontext():
        if rank == 0:
            remove_stale_temps(out, TRAIN_FILES)
            remove_stale_temps(out / SNAPSHOT_DIR, ["step_*.pt"])
        return _train(cfg, world, rank, device, spec, mcfg, data, val, state, init)


def _train(cfg: dict, world: int, rank: int, device: torch.device, spec, mcfg: ADConfig, data: HistoryData, val: HistoryData,
           state: dict | None, init: dict | None = None) -> Path:
    """state: a saved run to resume (weights, optimizer, scheduler, step); init: weights to start from."""
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    train_tasks = spec.split()[0]
    val_rng = np.random.default_rng(12345)
    val_batches = [val.sample(val_rng, cfg["batch_size"]) for _ in range(cfg["val_batches"])]

    out = Path(cfg["out"])
    model = ADTransformer(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup_steps"], cfg["steps"]))
    step = 0
    if init is not None:  # weights only: a fresh optimizer and schedule
        model.load_state_dict(init)
        if rank == 0:
            print(f"starting from the weights of {cfg['init']}")
    if state is not None:
        model.load_state_dict(state["model"])
        try:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{out / 'train_state.pt'}: its optimizer or scheduler state does not fit this model ({e})") from None
        step = int(state["step"])
        if rank == 0:
            print(f"resuming from step {step}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    rng = np.random.default_rng(cfg["seed"] + 1000 * rank + step)

    meta = {
        "model": mcfg.to_dict(),
        "env": spec.to_dict(),
        "train": {k: v for k, v in cfg.items() if k != "env_extra"} | {"world_size": world},  # with resume_changes
    }
    if rank == 0:
        write_json_atomic(out / "train_config.json", meta)
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {data.n_streams} training streams "
              f"of {data.n_episodes} episodes from {len(train_tasks)} tasks; device {device}, {world} process(es)")  # fmt: skip

    snapshot_steps = set(_snapshot_steps(cfg))
    if rank == 0 and snapshot_steps:
        print(f"snapshots at steps {sorted(snapshot_steps)} -> {out / SNAPSHOT_DIR}")

    def weights() -> dict:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def save():  # train_state.pt holds weights, optimizer and step together: --resume reads only it
        w = weights()
        save_atomic(
            {"model": w, "config": meta, "step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
            out / "train_state.pt",
        )
        save_atomic({"model": w, "config": meta, "step": step}, out / "model.pt")

    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg["steps"], initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    if rank == 0 and step:
        _trim_metrics(out / "metrics.jsonl", step)
    log = open(out / "metrics.jsonl", "a" if step else "w") if rank == 0 else None
    while step < cfg["steps"]:
        tok, tgt = data.sample(rng, cfg["batch_size"])
        tok = type(tok)(*[t.to(device, non_blocking=True) for t in tok])
        tgt = tgt.to(device)
        logits = ddp(tok)  # (B, T, A): a prediction at every position
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        sched.step()
        step += 1
        if rank == 0:
            acc = (logits.argmax(-1) == tgt)[tgt >= 0].float().mean().item()  # masked targets are -100
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
            bar.update(1)
            row = {"step": step, "loss": round(loss.item(), 5), "acc": round(acc, 4), "time_s": round(time.time() - t0, 1)}
            if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
                row["val_loss"], row["val_acc"] = _validate(model, val_batches, device)
                bar.write(f"step {step}: train loss {loss.item():.4f}, val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}")
            log.write(json.dumps(row) + "\n")
            if step in snapshot_steps:  # weights + config + step, the format of model.pt
                save_atomic({"model": weights(), "config": meta, "step": step}, out / SNAPSHOT_DIR / snapshot_name(step))
            if step % cfg["save_every"] == 0 or step == cfg["steps"]:
                log.flush()
                save()
    bar.close()
    if rank == 0:
        log.close()
        print(f"trained {step} steps in {time.time() - t0:.0f} s -> {out / 'model.pt'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out / "model.pt"


if __name__ == "__main__":
    run_cli(main)
