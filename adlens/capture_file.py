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
from adlens.io import atomic_path, load_torch_file

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


def _integer(x) -> bool:
    return isinstance(x, torch.Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def check_capture(cap: dict, where: str = "capture") -> dict:
    """Check every field of a capture (version 1 or 2 layout) against the format above and against each
    other; returns it in the version-2 layout. Any problem is a one-line UserError that starts with
    `where` (the file's path, for a file).

    Checked: every field present; tensors of the documented dtype kind and shapes that agree on N tasks,
    S steps, L layers, H heads, T context positions; meta's horizon, max_context, n_layer, n_head and
    grid_size whole numbers >= 1 that agree with the shapes; context lengths in [1, T]; context steps
    -1 beyond the context and in [0, s] within it; state ids -1 (none) or in [0, grid_size**2);
    timesteps in [0, horizon); attention weights finite and in [0, 1]; rewards and returns finite;
    full_task in [0, N); full steps in [0, S), each with a (L, H, n, n) matrix, n its context length.
    """

    def bad(msg: str):
        raise UserError(f"{where}: {msg}")

    if not isinstance(cap, dict):
        bad(f"a capture must be a dict, got {type(cap).__name__}")
    missing = [k for k in REQUIRED if k not in cap]
    if missing:
        bad(f"lacks {missing}")
    qa = cap["query_attn"]
    if not isinstance(qa, torch.Tensor) or not qa.is_floating_point() or qa.dim() not in (4, 5) or 0 in qa.shape[: qa.dim() - 3]:
        bad(f"query_attn must be a float tensor (N, S, L, H, T) (or (S, L, H, T)) with N, S >= 1, got {_describe(qa)}")
    for k in PER_STEP[1:] + ("returns",):
        if not isinstance(cap[k], torch.Tensor):
            bad(f"{k} must be a tensor, got {_describe(cap[k])}")
    if not isinstance(cap["meta"], dict):
        bad(f"meta must be a dict, got {_describe(cap['meta'])}")
    cap = upgrade(cap)
    qa, meta = cap["query_attn"], cap["meta"]
    N, S, L, H, T = qa.shape
    for key, want in (("horizon", None), ("max_context", T), ("n_layer", L), ("n_head", H), ("grid_size", None)):
        value = meta.get(key)
        if type(value) is not int or value < 1:
            bad(f"meta {key} must be a whole number >= 1, got {value!r}")
        if want is not None and value != want:
            bad(f"meta {key} is {value}, but query_attn (N, S, L, H, T) has shape {tuple(qa.shape)}")
    if "layer_names" in meta and (not isinstance(meta["layer_names"], list) or len(meta["layer_names"]) != L):
        bad(f"meta layer_names must be a list of {L} names, got {meta['layer_names']!r}")
    if not isinstance(meta.get("tasks"), list) or len(meta["tasks"]) != N:
        bad(f"meta tasks must be a list of the {N} captured tasks, got {_describe(meta.get('tasks'))}")
    shapes = {"context_len": (N, S), "ctx_step": (N, S, T), "state": (N, S), "action": (N, S), "reward": (N, S),
              "episode": (N, S), "timestep": (N, S)}  # fmt: skip
    for k, shape in shapes.items():
        x = cap[k]
        if tuple(x.shape) != shape:
            bad(f"{N} tasks x {S} steps x {T} positions, but {k} has shape {tuple(x.shape)} (expected {shape})")
        if k != "reward" and not _integer(x):
            bad(f"{k} must hold integers, got {x.dtype}")
    if not cap["reward"].is_floating_point() and not _integer(cap["reward"]):
        bad(f"reward must hold numbers, got {cap['reward'].dtype}")
    n = cap["context_len"]
    if n.min() < 1 or n.max() > T:
        bad(f"context_len must be in [1, {T}], got values in [{int(n.min())}, {int(n.max())}]")
    ctx = cap["ctx_step"]
    inside = torch.arange(T) < n[..., None]  # (N, S, T)
    step = torch.arange(S).view(1, S, 1)
    if ((ctx >= 0) != inside).any() or (ctx < -1).any() or (ctx > step).any():
        bad("ctx_step must be -1 beyond context_len and a step in [0, s] within it")
    grid = meta["grid_size"]
    st = cap["state"]
    if st.min() < -1 or st.max() >= grid * grid:
        bad(
            f"state ids must be -1 (none) or in [0, {grid * grid - 1}] (grid_size {grid}), got values in [{int(st.min())}, {int(st.max())}]"
        )
    if cap["episode"].min() < 0:
        bad("episode indices must be >= 0")
    ts = cap["timestep"]
    if ts.min() < 0 or ts.max() >= meta["horizon"]:
        bad(f"timestep must be in [0, horizon - 1 = {meta['horizon'] - 1}], got values in [{int(ts.min())}, {int(ts.max())}]")
    _check_weights(qa, "query_attn", bad)
    if not torch.isfinite(cap["reward"].float()).all():
        bad("reward holds NaN or infinite values")
    ret = cap["returns"]
    if ret.dim() != 2 or ret.shape[0] != N or not torch.isfinite(ret.float()).all():
        bad(f"returns must be finite, (N={N}, episodes), got {_describe(ret)}")
    full_task = cap.get("full_task", 0)
    if type(full_task) is not int or not 0 <= full_task < N:
        bad(f"full_task must be a task index in [0, {N - 1}], got {full_task!r}")
    fs, fa = cap["full_steps"], cap["full_attn"]
    if not _integer(fs) or fs.dim() != 1 or (len(fs) and (fs.min() < 0 or fs.max() >= S)):
        bad(f"full_steps must be (K,) integer steps in [0, {S - 1}], got {_describe(fs)}")
    if not isinstance(fa, (list, tuple)) or len(fa) != len(fs):
        bad(f"full_attn must be a list of {len(fs)} matrices (one per full step), got {_describe(fa)}")
    for k, (s, m) in enumerate(zip(fs.tolist(), fa)):
        size = int(n[full_task, s])
        if not isinstance(m, torch.Tensor) or not m.is_floating_point() or tuple(m.shape) != (L, H, size, size):
            bad(f"full_attn[{k}] (step {s}) must be float (L, H, n, n) = {(L, H, size, size)}, got {_describe(m)}")
        _check_weights(m, f"full_attn[{k}]", bad)
    return cap


def _check_weights(w: torch.Tensor, name: str, bad) -> None:
    lo, hi = torch.aminmax(w)  # NaN propagates into both, and fails both comparisons
    if not (lo >= 0 and hi <= 1 + 1e-2):  # float16 rounding of weights near 1
        bad(f"{name} must hold finite attention weights in [0, 1], got values in [{float(lo):.3g}, {float(hi):.3g}]")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:80]


def load_capture(path: str | Path) -> dict:
    """Read and check a capture file; any problem is a one-line `UserError`."""
    path = Path(path)
    cap = load_torch_file(path, "capture file", "run evaluate_with_attention.py first")
    if not isinstance(cap, dict) or cap.get("format") != CAPTURE_FORMAT:
        raise UserError(f"{path} is not an attention capture file")
    if cap.get("version") not in (1, CAPTURE_VERSION):
        raise UserError(f"{path} has capture format version {cap.get('version')}; this toolkit reads versions 1 and {CAPTURE_VERSION}")
    return check_capture(cap, f"capture file {path}")
