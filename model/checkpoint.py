"""Checkpoints: weights plus the resolved config as plain data, written atomically, read safely.

    >>> model, meta = load_model("checkpoints/darkroom_ad/model.pt")   # meta["env"], meta["train"], ...

Every load uses `torch.load(..., weights_only=True)`, which cannot run code.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import torch

from adlens.device import resolve_device  # noqa: F401  (the scripts that load checkpoints import it from here)
from adlens.errors import UserError
from adlens.io import atomic_path, load_torch_file
from model.ad import ADConfig, ADTransformer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "darkroom_ad" / "model.pt"


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a unique temporary name, then rename: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_path(path: str | Path | None) -> Path:
    """None or "default" -> the shipped model; anything else as given."""
    return DEFAULT_CHECKPOINT if path is None or str(path) == "default" else Path(path)


def read_checkpoint(path: str | Path | None, need: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint and check it whole: its config, its weights against that config, its environment
    against its model; `need` names further keys it must hold (train_state.pt: optimizer, scheduler).

    Any problem is a one-line UserError naming the file. Nothing is allocated for the weights beyond
    what the file holds: the expected shapes come from a model built on the `meta` device.
    """
    path = checkpoint_path(path)
    ckpt = load_torch_file(path, "checkpoint", "train one with train.py or pass --checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not an AD checkpoint (expected keys 'model' and 'config')")
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {missing}")
    step = ckpt.get("step", 0)
    if type(step) is not int or step < 0:
        raise UserError(f"checkpoint {path}: step must be a whole number >= 0, got {step!r}")
    for key in set(need) & {"optimizer", "scheduler"}:
        if not isinstance(ckpt[key], dict):
            raise UserError(f"checkpoint {path}: {key} must be a state dict, got {type(ckpt[key]).__name__}")
    cfg = ckpt["config"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("env"), dict):
        raise UserError(f"checkpoint {path}: config must hold 'model' and 'env' mappings; was it written by train.py?")
    mcfg = _model_config(cfg["model"], path)
    _check_weights(ckpt["model"], mcfg, path)
    _check_env(cfg["env"], mcfg, path)
    return ckpt


OPTIONAL_MODEL_KEYS = {"attn_dropout"}  # added later; checkpoints written before lack them (None when absent)


def _model_config(d: dict, path: Path) -> ADConfig:
    """The ADConfig of a checkpoint: every field present, of its type, finite and in range."""
    want = {f.name: f.type for f in fields(ADConfig)}
    missing, unknown = sorted(set(want) - set(d) - OPTIONAL_MODEL_KEYS), sorted(set(d) - set(want))
    if missing or unknown:
        raise UserError(f"checkpoint {path}: model config " + (f"lacks {missing}" if missing else f"has unknown key(s) {unknown}"))
    for key, value in d.items():
        if value is None and key in OPTIONAL_MODEL_KEYS:
            continue
        ok = type(value) is int if want[key] == "int" else type(value) in (int, float) and math.isfinite(value)
        if not ok:
            raise UserError(f"checkpoint {path}: model {key} must be a finite {want[key]}, got {value!r}")
    try:
        return ADConfig(**d)
    except ValueError as e:
        raise UserError(f"checkpoint {path}: {e}") from None


def _check_weights(state: dict, mcfg: ADConfig, path: Path) -> None:
    """The weights are exactly the tensors the config's model has (names, shapes, dtypes) and finite."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path}: 'model' must map parameter names to tensors")
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.") and k.count(".") > 1}
    if len(blocks) != mcfg.n_layer:  # before building anything of n_layer layers
        raise UserError(f"checkpoint {path} does not fit its config: n_layer {mcfg.n_layer}, weights of {len(blocks)} layer(s)")
    with torch.device("meta"):
        expected = ADTransformer(mcfg).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"lacks weights {missing[:3]}" if missing else f"has unexpected weights {unexpected[:3]}"
        raise UserError(f"checkpoint {path} does not fit its config: it {what}{' ...' if len(missing or unexpected) > 3 else ''}")
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            raise UserError(f"checkpoint {path} does not fit its config: {name} is {got.dtype} {tuple(got.shape)}, "
                            f"the config's model has {want.dtype} {tuple(want.shape)}")  # fmt: skip
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise UserError(f"checkpoint {path}: weight {name} holds NaN or infinite values")


def _check_env(env: dict, mcfg: ADConfig, path: Path) -> None:
    """The environment config is a valid EnvSpec whose states, actions and episode length are the model's."""
    from env import get_spec

    want = ("name", "size", "horizon", "n_holdout", "split_seed")  # EnvSpec.to_dict(): a missing one would default silently
    missing = [k for k in want if k not in env]
    if missing:
        raise UserError(f"checkpoint {path}: env config lacks {missing}")
    for key, value in env.items():
        if key == "name" and not isinstance(value, str) or key != "name" and type(value) is not int:
            raise UserError(f"checkpoint {path}: env {key} must be {'a name' if key == 'name' else 'a whole number'}, got {value!r}")
    if env["size"] ** 2 != mcfg.n_states:  # checked before the spec enumerates size x size cells
        raise UserError(f"checkpoint {path}: env size {env['size']} has {env['size'] ** 2} states, the model {mcfg.n_states}")
    try:
        spec = get_spec(env)
    except (ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path}: {e}") from None
    fit = {"n_actions": (spec.n_actions, mcfg.n_actions), "horizon": (spec.horizon, mcfg.horizon)}
    if mcfg.grid_size:
        fit["grid_size"] = (spec.size, mcfg.grid_size)
    for key, (env_value, model_value) in fit.items():
        if env_value != model_value:
            raise UserError(f"checkpoint {path}: env {key} {env_value} does not fit the model's {model_value}")


def config_diff(saved: dict, now: dict, ignore: tuple = ()) -> list[str]:
    """'key saved (now value)' for every key outside `ignore` whose value differs between two configs."""
    keys = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    return [f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in keys]


def check_same_run(ckpt: dict, model: dict, env: dict, path: str | Path) -> None:
    """A saved run (`--resume`) must be of the model and environment the command builds."""
    for what, saved, now in (("model", ckpt["config"]["model"], model), ("environment", ckpt["config"]["env"], env)):
        diff = config_diff(saved, now)
        if diff:
            raise UserError(f"{path} was saved with another {what} config: {', '.join(diff)}; resume with the same config or use a new --out")


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[ADTransformer, dict]:
    """Build the model a checkpoint describes and load its weights; returns (model in eval mode, config)."""
    path = checkpoint_path(path)
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    model = ADTransformer(ADConfig.from_dict(cfg["model"]))
    model.load_state_dict(ckpt["model"])  # read_checkpoint checked names and shapes
    return model.to(device).eval(), cfg
