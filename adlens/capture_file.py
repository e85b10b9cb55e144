"""The attention capture file: a documented, versioned format written by `evaluate_with_attention.py`.

    >>> cap = load_capture("runs/attention/capture.pt")      # torch.load(weights_only=True) inside
    >>> cap["query_attn"].shape                                # (S, L, H, T)

Format version 1, a dict of plain data and tensors:

    format        "ad-attention-capture"
    version       1
    meta          dict: checkpoint, env (EnvSpec dict), task, seed, greedy, eval_timesteps (S),
                  max_context (T), horizon, n_layer (L), n_head (H), layer_names, grid_size
    query_attn    (S, L, H, T) float16: at rollout step s, the newest (query) token's attention over
                  its context, positions in temporal order (oldest first; position context_len[s]-1
                  is the query token itself); zero beyond context_len[s]
    context_len   (S,) long: tokens in the context at step s
    ctx_step      (S, T) long: rollout step whose token sits at each context position, -1 beyond
    state         (S,) long: state id of step s's token (row * grid_size + col)
    action        (S,) long: action taken at step s
    reward        (S,) float: the reward step s's token carries (the project's tokens: r_{s-1}, received on
                  arriving in the state; an adapter's transition tokens: r_s, meta reward_of_token "r_t")
    episode       (S,) long: episode index of step s
    timestep      (S,) long: step within its episode
    full_steps    (K,) long: steps at which full matrices were recorded
    full_attn     list of K tensors (L, H, n, n) float32, n = context_len at that step: the full
                  causal (query x key) attention of a forward pass over that step's context
    returns       (E,) float: episode returns of the rollout
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from adlens.errors import UserError

CAPTURE_FORMAT = "ad-attention-capture"
CAPTURE_VERSION = 1
REQUIRED = (
    "meta",
    "query_attn",
    "context_len",
    "ctx_step",
    "state",
    "action",
    "reward",
    "episode",
    "timestep",
    "full_steps",
    "full_attn",
    "returns",
)


def default_eval_timesteps(horizon: int) -> int:
    """The guide's default capture length."""
    return min(horizon * 10, 500)


def full_steps_for(n_steps: int, num_full: int) -> list[int]:
    """`num_full` steps spread over the run, the last one included."""
    if num_full <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(n_steps / num_full - 1, n_steps - 1, num_full)})


def save_capture(cap: dict, path: str | Path) -> Path:
    """Write atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CAPTURE_FORMAT, "version": CAPTURE_VERSION, **cap}, tmp)
    os.replace(tmp, path)
    return path


def load_capture(path: str | Path) -> dict:
    """Read and check a capture file; any problem is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"capture file not found: {path} (run evaluate_with_attention.py first)")
    if path.stat().st_size == 0:
        raise UserError(f"capture file {path} is empty")
    try:
        cap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read capture file {path}: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(cap, dict) or cap.get("format") != CAPTURE_FORMAT:
        raise UserError(f"{path} is not an attention capture file")
    if cap.get("version") != CAPTURE_VERSION:
        raise UserError(f"{path} has capture format version {cap.get('version')}; this toolkit reads version {CAPTURE_VERSION}")
    missing = [k for k in REQUIRED if k not in cap]
    if missing:
        raise UserError(f"capture file {path} lacks {missing}")
    S = cap["query_attn"].shape[0] if cap["query_attn"].dim() == 4 else 0
    if S == 0:
        raise UserError(f"capture file {path} holds no steps")
    if cap["context_len"].shape != (S,) or cap["ctx_step"].shape[0] != S:
        raise UserError(f"capture file {path} is inconsistent: {S} steps but context_len/ctx_step disagree")
    return cap
