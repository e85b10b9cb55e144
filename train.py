"""Train an Algorithm Distillation transformer on learning histories (training tasks only).

    python train.py --data data/darkroom --out checkpoints/my_ad --steps 3000
    torchrun --nproc_per_node=2 train.py --data data/darkroom --out checkpoints/my_ad   # DDP

The loss is the cross-entropy of the source learner's action at every context position.
AdamW with linear warmup and cosine decay, gradient clipping, a validation loss on the held-out
tasks' histories every `eval_every` steps, and atomic checkpoints: `OUT/model.pt` (weights and
resolved config, what every other script loads) and `OUT/train_state.pt` (optimizer, for --resume).

Snapshots for studying how in-context learning emerges (`training_progression.py`): copies of the
weights at chosen steps, `OUT/snapshots/step_XXXXXX.pt`, each in the format of `model.pt`:

    python train.py --config config/darkroom.yaml --out runs/progression/darkroom_ad --snapshot-geometric 12 --snapshot-every 500

A resumed run keeps the snapshots already written and continues the schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from adlens.config import add_config_flags, load_yaml, resolve, run_cli, section
from adlens.errors import UserError
from env import env_section
from env import get_spec
from model.ad import ADConfig, ADTransformer
from model.checkpoint import read_checkpoint, resolve_device, save_atomic
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
    "grid_embedding": True,  # embed states as row + column of the grid (False: one embedding per state)
    "episode_strides": [1, 2, 4],  # keep every k-th episode of a stream; one k drawn per window
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
    "device": "auto",  # auto | cpu | cuda
    "threads": 0,  # torch CPU threads per process (0 = torch's default)
    "resume": False,  # continue from OUT/train_state.pt
    "snapshot_every": 0,  # keep OUT/snapshots/step_XXXXXX.pt every K steps (0 = none)
    "snapshot_steps": [],  # also keep snapshots at these steps
    "snapshot_geometric": 0,  # also keep N snapshots spaced evenly on a log scale from snapshot_first to steps
    "snapshot_first": 25,  # first step of the geometric schedule
}
MODEL_KEYS = ("n_layer", "n_head", "d_model", "dropout")  # passed to ADConfig as they are


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
        accs.append((logits.argmax(-1).cpu() == tgt).float().mean().item())
    model.train()
    return float(np.mean(losses)), float(np.mean(accs))


def _snapshot_steps(cfg: dict) -> list[int]:
    return snapshot_schedule(cfg["steps"], cfg["snapshot_every"], cfg["snapshot_steps"], cfg["snapshot_geometric"], cfg["snapshot_first"])


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with 'env', 'model' and 'train' sections")
    add_config_flags(parser, TRAIN_CONFIG)
    args = parser.parse_args(argv)
    ycfg = load_yaml(args.config) if args.config else {}
    flat, env_sec = env_section(ycfg)
    model_sec = section(ycfg, "model", MODEL_KEYS + ("context", "grid_embedding"))
    flat.update(model_sec)
    flat.update(section(ycfg, "train", TRAIN_CONFIG))
    cfg = resolve(TRAIN_CONFIG, args, flat)
    cfg["env_extra"] = env_sec
    for key in ("steps", "batch_size", "context", "eval_every", "save_every", "val_batches"):
        if cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["lr"] <= 0:
        raise UserError(f"--lr must be > 0, got {cfg['lr']}")
    try:
        cfg["snapshot_steps"] = [int(s) for s in cfg["snapshot_steps"]]
    except (TypeError, ValueError):
        raise UserError(f"--snapshot-steps must be whole numbers, got {cfg['snapshot_steps']}") from None
    _snapshot_steps(cfg)  # validates the schedule before any work
    return cfg


def main(argv=None) -> Path:
    cfg = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg["device"])
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    spec = get_spec({"name": cfg["env"], "size": cfg["size"], **cfg["env_extra"]})
    train_tasks, held_tasks = spec.split()
    data = HistoryData.from_dir(cfg["data"], spec, train_tasks, cfg["context"], cfg["episode_strides"], cfg["augment"], cfg["loss_mask"])
    val = HistoryData.from_dir(cfg["data"], spec, held_tasks, cfg["context"], cfg["episode_strides"], goal_free=False)
    val_rng = np.random.default_rng(12345)
    val_batches = [val.sample(val_rng, cfg["batch_size"]) for _ in range(cfg["val_batches"])]

    mcfg = ADConfig(
        n_states=spec.n_states, n_actions=spec.n_actions, horizon=spec.horizon, max_context=cfg["context"],
        grid_size=spec.size if cfg["grid_embedding"] else 0,
        **{k: cfg[k] for k in MODEL_KEYS},
    )  # fmt: skip
    model = ADTransformer(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup_steps"], cfg["steps"]))
    out = Path(cfg["out"])
    step = 0
    if cfg["resume"]:
        state = read_checkpoint(out / "train_state.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        if rank == 0:
            print(f"resuming from step {step}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    rng = np.random.default_rng(cfg["seed"] + 1000 * rank + step)

    meta = {
        "model": mcfg.to_dict(),
        "env": spec.to_dict(),
        "train": {k: v for k, v in cfg.items() if k != "env_extra"} | {"world_size": world},
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(meta, indent=2))
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {data.n_streams} training streams "
              f"of {data.n_episodes} episodes from {len(train_tasks)} tasks; device {device}, {world} process(es)")  # fmt: skip

    snapshot_steps = set(_snapshot_steps(cfg))
    if rank == 0 and snapshot_steps:
        print(f"snapshots at steps {sorted(snapshot_steps)} -> {out / SNAPSHOT_DIR}")

    def weights() -> dict:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def save():
        w = weights()
        save_atomic({"model": w, "config": meta, "step": step}, out / "model.pt")
        save_atomic(
            {"model": w, "config": meta, "step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
            out / "train_state.pt",
        )

    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg["steps"], initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
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
