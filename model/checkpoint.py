"""Checkpoints: weights plus the resolved config as plain data, written atomically, read safely.

    >>> model, meta = load_model("checkpoints/darkroom_ad/model.pt")   # meta["env"], meta["train"], ...

Every load uses `torch.load(..., weights_only=True)`, which cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adlens.errors import UserError
from adlens.io import atomic_path
from model.ad import ADConfig, ADTransformer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "darkroom_ad" / "model.pt"


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a unique temporary name, then rename: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_path(path: str | Path | None) -> Path:
    """None or "default" -> the shipped model; anything else as given."""
    return DEFAULT_CHECKPOINT if path is None or str(path) == "default" else Path(path)


def read_checkpoint(path: str | Path | None) -> dict:
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (train one with train.py or pass --checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        why = "it holds objects other than tensors and plain data" if "weights_only" in str(e) else str(e).splitlines()[0][:160]
        raise UserError(f"cannot read checkpoint {path}: {why}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not an AD checkpoint (expected keys 'model' and 'config')")
    return ckpt


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[ADTransformer, dict]:
    """Build the model a checkpoint describes and load its weights; returns (model in eval mode, config)."""
    path = checkpoint_path(path)
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    try:
        model = ADTransformer(ADConfig.from_dict(cfg["model"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit its config: {str(e).splitlines()[0][:200]}") from None
    return model.to(device).eval(), cfg


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
