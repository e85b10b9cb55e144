"""The attention capture file: a documented, versioned format written by `evaluate_with_attention.py`.

    >>> cap = load_capture("runs/attention/capture.pt")      # torch.load(weights_only=True) inside
    >>> cap["query_attn"].shape                                # (N, S, L, H, T)

Format version 2, a dict of plain data and tensors (N tasks rolled out together, S steps each):

    format        "ad-attention-capture"
    version       2
    meta          dict: checkpoint, env, tasks (N task descriptions), task (the representative task,
                  = tasks[full_task]), seed, greedy, eval_timesteps (S), max_context (T), horizon,
                  n_layer (L), n_head (H), layer_names, grid_size, optimal_return(s), reward_of_token
    query_attn    (N, S, L, H, T) float16: at rollout step s, the newest (query) token's attention over
                  its context, positions in temporal order (oldest first; position context_len[i, s]-1
                  is the query token itself); zero beyond context_len
    context_len   (N, S) long: tokens in the context at step s
    ctx_step      (N, S, T) long: rollout step whose token sits at each context position, -1 beyond
    state         (N, S) long: state id of step s's token (row * grid_size + col)
    action        (N, S) long: action taken at step s
    reward        (N, S) float: the reward step s's token carries (the project's tokens: r_{s-1}, received
                  on arriving in the state; an adapter's transition tokens: r_s; meta reward_of_token)
    episode       (N, S) long: episode index of step s
    timestep      (N, S) long: step within its episode
    full_task     int: the task whose full matrices are kept (default: the one with the median return)
    full_steps    (K,) long: steps at which full matrices were recorded
    full_attn     list of K tensors (L, H, n, n) float32, n = context_len at that step: the full
                  causal (query x key) attention of a forward pass over that step's context, task full_task
    returns       (N, E) float: episode returns of the rollout

Version 1 (one task: no N dimension, no full_task) still loads: `load_capture` adds the task
dimension. `task_view(cap, i)` gives one task's steps in the version-1 layout, which the metrics use.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from adlens.errors import UserError
from adlens.io import atomic_path

CAPTURE_FORMAT = "ad-attention-capture"
CAPTURE_VERSION = 2
PER_STEP = ("query_attn", "context_len", "ctx_step", "state", "action", "reward", "episode", "timestep")
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


def default_capture_steps(max_context: int, horizon: int) -> int:
    """Twice the model's context, in whole episodes: the context fills, then slides for as long again."""
    return math.ceil(2 * max_context / horizon) * horizon


def full_steps_for(n_steps: int, num_full: int) -> list[int]:
    """`num_full` steps spread over the run, the last one included."""
    if num_full <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(n_steps / num_full - 1, n_steps - 1, num_full)})


def representative_task(returns: torch.Tensor) -> int:
    """The task whose total return is the (lower) median: returns (N, E) -> index."""
    total = torch.as_tensor(returns).float().sum(-1)
    return int(total.argsort()[(len(total) - 1) // 2])


def upgrade(cap: dict) -> dict:
    """A version-1 capture (one task, query_attn (S, L, H, T)) in the version-2 layout; a version-2 one unchanged."""
    if torch.as_tensor(cap["query_attn"]).dim() == 5:
        return cap
    out = dict(cap, version=2, full_task=0, returns=torch.as_tensor(cap["returns"])[None])
    for k in PER_STEP:
        out[k] = torch.as_tensor(cap[k])[None]
    out["meta"] = dict(cap["meta"], tasks=[cap["meta"].get("task")])
    return out


def n_tasks(cap: dict) -> int:
    return int(cap["query_attn"].shape[0])


def task_view(cap: dict, i: int) -> dict:
    """Task i of a version-2 capture in the version-1 (single-task) layout."""
    out = {k: v for k, v in cap.items() if k not in PER_STEP}
    out.update({k: cap[k][i] for k in PER_STEP})
    out["returns"] = cap["returns"][i]
    out["meta"] = dict(cap["meta"], task=cap["meta"].get("tasks", [cap["meta"].get("task")])[i])
    return out


def pool_tasks(cap: dict) -> dict:
    """All tasks' steps one after the other in the version-1 layout (N * S steps; `ctx_step` offset so
    that it indexes the pooled steps): means over its steps are means over tasks and steps."""
    N, S = cap["query_attn"].shape[:2]
    out = task_view(cap, int(cap.get("full_task", 0)))
    for k in PER_STEP:
        out[k] = torch.as_tensor(cap[k]).flatten(0, 1)
    offset = (torch.arange(N) * S).view(N, 1, 1)
    steps = torch.as_tensor(cap["ctx_step"])
    out["ctx_step"] = torch.where(steps >= 0, steps + offset, steps).flatten(0, 1)
    return out


def save_capture(cap: dict, path: str | Path) -> Path:
    """Write atomically (temporary name, then rename); a single-task (version-1 layout) dict is written as version 2."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**upgrade(cap), "format": CAPTURE_FORMAT, "version": CAPTURE_VERSION}, tmp)
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
    if cap.get("version") not in (1, CAPTURE_VERSION):
        raise UserError(f"{path} has capture format version {cap.get('version')}; this toolkit reads versions 1 and {CAPTURE_VERSION}")
    missing = [k for k in REQUIRED if k not in cap]
    if missing:
        raise UserError(f"capture file {path} lacks {missing}")
    dims = 4 if cap["version"] == 1 else 5
    qa = cap["query_attn"]
    if not isinstance(qa, torch.Tensor) or qa.dim() != dims or 0 in qa.shape[: dims - 3]:
        raise UserError(f"capture file {path} holds no steps (query_attn must be {'(S, L, H, T)' if dims == 4 else '(N, S, L, H, T)'})")
    cap = upgrade(cap)
    N, S = cap["query_attn"].shape[:2]
    for k in PER_STEP[1:]:
        if not isinstance(cap[k], torch.Tensor) or tuple(cap[k].shape[:2]) != (N, S):
            raise UserError(f"capture file {path} is inconsistent: {N} tasks x {S} steps but {k} has shape {tuple(getattr(cap[k], 'shape', ()))}")
    return cap
