"""Extra attention views: the Darkroom grid, per-head profiles over time, and a bertviz export.

    python visualize_attention.py --capture runs/attention/capture.pt --out figs/attention_analysis --step 120

Writes into `--out`:
    grid_attention_step{N}.png      where on the grid the query at step N looks: its attention summed
                                    per visited state (grey: no token of that cell in the context),
                                    with the goal (or key and door), the start and the agent marked
    head_attention_over_time.png    one panel per layer x head: attention by relative position per step
    bertviz_step{N}.pt              the full attention at step N for bertviz (only when the capture
                                    recorded a full matrix at step N):
                                        d = torch.load("bertviz_step120.pt")
                                        from bertviz import head_view; head_view(d["attention"], d["tokens"])
    visualize_config.json           the resolved configuration

`--step -1` picks the last step with a full matrix; `--layer -1` / `--head -1` average over layers / heads.
Configuration precedence: VISUALIZE_CONFIG < the `visualize` section of a `--config` YAML file < flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adlens import metrics as M  # noqa: E402
from adlens import plots as P  # noqa: E402
from adlens.capture_file import load_capture, n_tasks, task_view  # noqa: E402
from adlens.config import add_config_flags, check_out, load_yaml, make_parser, resolve, run_cli, section  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import staged_output  # noqa: E402

VISUALIZE_CONFIG = {
    "capture": "runs/attention/capture.pt",  # capture file written by evaluate_with_attention.py
    "out": "figs/attention_analysis",  # output folder
    "task": -1,  # captured task to show; -1 = the one with full matrices (the representative task)
    "step": -1,  # rollout step to show; -1 = the last step with a full attention matrix
    "layer": -1,  # layer for the grid view; -1 = mean over layers
    "head": -1,  # head for the grid view; -1 = mean over heads
    "dpi": 100,  # PNG resolution
}
ACTION_NAMES = "UDLRS"  # up, down, left, right, stay (env/darkroom.py)


def resolve_step(capture: dict, step: int) -> int:
    """A rollout step in [0, S): -1 means the last full-matrix step (or the last step if none)."""
    S = capture["query_attn"].shape[0]
    if step == -1:
        full = M.to_numpy(capture["full_steps"]).reshape(-1)
        return int(full[-1]) if len(full) else S - 1
    if not 0 <= step < S:
        raise UserError(f"--step must be in [0, {S - 1}] or -1, got {step}")
    return int(step)


def full_index(capture: dict, step: int) -> int | None:
    """Index into `full_steps`/`full_attn` of rollout step `step`, or None when it has no full matrix."""
    full = [int(x) for x in M.to_numpy(capture["full_steps"]).reshape(-1)]
    return full.index(step) if step in full else None


def _select(rows: np.ndarray, layer: int, head: int) -> np.ndarray:
    """rows (L, H, T) -> (T,) for one layer/head, -1 averaging that axis."""
    L, H = rows.shape[:2]
    if not -1 <= layer < L:
        raise UserError(f"--layer must be in [0, {L - 1}] or -1, got {layer}")
    if not -1 <= head < H:
        raise UserError(f"--head must be in [0, {H - 1}] or -1, got {head}")
    rows = rows.mean(0) if layer == -1 else rows[layer]
    return rows.mean(0) if head == -1 else rows[head]


def _cell(state_id: int, size: int) -> tuple[int, int]:
    return int(state_id) // size, int(state_id) % size


def grid_marks(capture: dict, step: int) -> dict:
    """Cells to mark on the grid: goal (or key and door), start and the agent at `step`."""
    meta = capture["meta"]
    size = int(meta["grid_size"])
    task = meta.get("task") or {}
    env = meta.get("env") or {}
    marks = {}
    if isinstance(task, dict) and "goal" in task:
        marks["goal"] = tuple(int(v) for v in task["goal"])
    elif isinstance(env, dict) and env.get("name") == "darkroom_permuted":
        marks["goal"] = (size - 1, size - 1)  # that family's goal is fixed in the far corner
    for name in ("key", "door"):
        if isinstance(task, dict) and name in task:
            marks[name] = tuple(int(v) for v in task[name])
    marks["start"] = (size // 2, size // 2)
    marks["agent"] = _cell(M.to_numpy(capture["state"])[step], size)
    return marks


def grid_view(capture: dict, step: int, layer: int = -1, head: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The query's attention at `step` summed per grid cell.

    Returns (weight (G, G), visited (G, G) bool), G = meta["grid_size"].
    """
    size = int(capture["meta"]["grid_size"])
    n = M.to_numpy(capture["context_len"])
    rows = M.normalise_rows(capture["query_attn"][step : step + 1], n[step : step + 1])[0]  # (L, H, T)
    weight, visited = M.grid_attention(_select(rows, layer, head), M.to_numpy(capture["ctx_step"])[step], capture["state"], size * size)
    return weight.reshape(size, size), visited.reshape(size, size)


def _task_name(capture: dict) -> str:
    return json.dumps(capture["meta"].get("task"))


def plot_grid(capture: dict, step: int, layer: int = -1, head: int = -1, ax=None):
    """Figure of `grid_view` with the task's cells marked."""
    weight, visited = grid_view(capture, step, layer, head)
    which_layer = "mean over layers" if layer == -1 else f"layer {layer}"
    which = f"{which_layer}, {'mean over heads' if head == -1 else f'head {head}'}"
    n = int(M.to_numpy(capture["context_len"])[step])
    ep = int(M.to_numpy(capture["episode"])[step])
    title = f"Where the query looks at step {step} (episode {ep}), task {_task_name(capture)}\n({n} tokens in context; {which})"
    return P.plot_grid_attention(weight, visited, grid_marks(capture, step), ax=ax, title=title)


def head_profiles(capture: dict) -> np.ndarray:
    """Query attention by relative position for every head: (S, L, H, T), NaN where absent."""
    n = M.to_numpy(capture["context_len"])
    return M.right_align(M.normalise_rows(capture["query_attn"], n), n)


def plot_heads_over_time(capture: dict):
    """Figure with one panel per layer x head (relative position vs step), episode starts and the
    first reward marked."""
    S, L = capture["query_attn"].shape[:2]
    tokens = {"episode": M.to_numpy(capture["episode"]), "reward": M.to_numpy(capture["reward"])}
    title = f"Per-head attention by relative position over time: task {_task_name(capture)}, steps 0-{S - 1}"
    return P.plot_head_profiles(head_profiles(capture), [f"layer {i}" for i in range(L)], tokens, title)


def token_labels(capture: dict, step_index: int) -> list[str]:
    """Labels "s(row,col) a<prev action> r<reward>" of the tokens of full matrix `step_index`
    (an index into `full_steps`); the previous action is "-" at an episode's first step."""
    step = int(M.to_numpy(capture["full_steps"]).reshape(-1)[step_index])
    n = int(capture["full_attn"][step_index].shape[-1])
    size = int(capture["meta"]["grid_size"])
    ctx = M.to_numpy(capture["ctx_step"])[step, :n]
    state, action = M.to_numpy(capture["state"]), M.to_numpy(capture["action"])
    reward, timestep = M.to_numpy(capture["reward"]), M.to_numpy(capture["timestep"])
    labels = []
    for j in ctx:
        j = int(j)
        r, c = _cell(state[j], size)
        prev = int(action[j - 1]) if j > 0 and timestep[j] > 0 else None
        a = "-" if prev is None else (ACTION_NAMES[prev] if prev < len(ACTION_NAMES) else str(prev))
        labels.append(f"s({r},{c}) a{a} r{float(reward[j]):g}")
    return labels


def to_bertviz(capture: dict, step_index: int) -> list[torch.Tensor]:
    """Full matrix `step_index` (an index into `full_steps`) in bertviz's layout: a list of L
    tensors (1, H, n, n), float32, rows summing to 1 (query x key)."""
    full = capture["full_attn"]
    if not 0 <= step_index < len(full):
        raise UserError(f"step_index must be in [0, {len(full) - 1}], got {step_index}")
    attn = torch.as_tensor(full[step_index]).float()  # (L, H, n, n)
    return [attn[li].unsqueeze(0) for li in range(attn.shape[0])]


BOUNDS = {"task": (-1, None), "step": (-1, None), "layer": (-1, None), "head": (-1, None)}


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--config", help="YAML file whose 'visualize' section overrides VISUALIZE_CONFIG")
    add_config_flags(parser, VISUALIZE_CONFIG)
    args = parser.parse_args(argv)
    ycfg = load_yaml(args.config) if args.config else {}
    cfg = resolve(VISUALIZE_CONFIG, args, section(ycfg, "visualize", VISUALIZE_CONFIG) if ycfg else None, BOUNDS, where=args.config or "config")
    check_out(cfg["out"])
    capture = load_capture(cfg["capture"])  # checked before anything is written
    N, full_task = n_tasks(capture), int(capture.get("full_task", 0))
    view = full_task if int(cfg["task"]) == -1 else int(cfg["task"])
    if not 0 <= view < N:
        raise UserError(f"--task must be in [0, {N - 1}] (the capture holds {N} tasks) or -1, got {cfg['task']}")
    capture = task_view(capture, view)
    if view != full_task:  # full matrices were kept for one task only
        capture["full_steps"], capture["full_attn"] = torch.zeros(0, dtype=torch.long), []
    step = resolve_step(capture, int(cfg["step"]))
    layer, head = int(cfg["layer"]), int(cfg["head"])
    L, H = capture["query_attn"].shape[1:3]
    _select(np.zeros((L, H, 1)), layer, head)  # validate indices early
    k = full_index(capture, step)
    suffix = ("" if layer == -1 else f"_layer{layer}") + ("" if head == -1 else f"_head{head}")
    names = {
        "grid": f"grid_attention_step{step}{suffix}.png",
        "heads": "head_attention_over_time.png",
        "config": "visualize_config.json",
    }
    if k is not None:
        names["bertviz"] = f"bertviz_step{step}.pt"
    out_dir = Path(cfg["out"])
    with staged_output(out_dir) as stage:
        P.save_figure(plot_grid(capture, step, layer, head), stage / names["grid"], int(cfg["dpi"]))
        P.save_figure(plot_heads_over_time(capture), stage / names["heads"], int(cfg["dpi"]))
        if k is not None:
            doc = {
                "attention": to_bertviz(capture, k),
                "tokens": token_labels(capture, k),
                "step": step,
                "layer_names": list(capture["meta"].get("layer_names") or []),
            }
            torch.save(doc, stage / names["bertviz"])
        (stage / names["config"]).write_text(json.dumps({**cfg, "task": view, "step": step}, indent=2))
    if k is None:
        full = [int(x) for x in M.to_numpy(capture["full_steps"]).reshape(-1)]
        print(f"no full attention matrix at step {step}, so no bertviz export (full matrices at steps {full})")
    print(f"wrote {', '.join(names.values())} to {out_dir}")
    return {key: out_dir / name for key, name in names.items()}


if __name__ == "__main__":
    run_cli(main)
