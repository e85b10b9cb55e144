"""Your own AD model through a small adapter file: capture, analysis and compression without editing it.

    python run_attention_analysis.py --adapter path/to/my_adapter.py
    python compression_template.py --adapter path/to/my_adapter.py --sweep

The adapter is a plain Python file beside your code. Required names:

    HORIZON                      steps per episode
    MAX_CONTEXT                  the model's context length in tokens (compression ratios refer to it)
    load_model(device)           -> torch.nn.Module (the toolkit puts it in eval mode)
    tasks(split)                 "test" | "train" -> list of JSON-serialisable task descriptions
    make_vec_env(tasks)          -> a stable-baselines3 VecEnv, one environment per task, in order
    rollout(model, venv, n_steps) your own in-context evaluation for n_steps environment steps
                                 -> returns per environment and episode, shape (n_envs, n_episodes)

Optional names (defaults in brackets):

    HISTORY_MODULE               name (in model.named_modules()) of the module whose first input is the
                                 (B, n, D) token history [the first nn.TransformerEncoder, or the Hugging
                                 Face transformer called with inputs_embeds]
    TOKENS_PER_STEP              tokens per environment step; attention is summed per step [1]
    token_steps(n_tokens, step)  -> the environment step of each history position, for layouts other
                                 than "newest token = current step, older tokens = earlier steps"
    optimal_return(task)         for normalised returns
    state_to_cell(obs)           -> (row, col) of one environment's observation, for the grid views
    GRID_SIZE                    grid side for the grid views [largest cell seen + 1]

Loading puts the adapter's folder first on `sys.path`, so its own `import model...` and `import env...`
find your packages; the toolkit imports nothing from its own `model/` or `env/` in this mode.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from adlens.capture import attention_modules, capture_attention
from adlens.capture_file import full_steps_for, representative_task
from adlens.errors import UserError
from adlens.history import HistoryCompressor, default_token_steps

REQUIRED = ("HORIZON", "MAX_CONTEXT", "load_model", "tasks", "make_vec_env", "rollout")
_TOOLKIT_ROOT = Path(__file__).resolve().parent.parent


_LOADED: dict[Path, Adapter] = {}


def load_adapter(path: str | Path) -> Adapter:
    """Import the adapter file (its folder first on sys.path) and check what it defines; once per process."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    if path.resolve() in _LOADED:
        return _LOADED[path.resolve()]
    folder = str(path.resolve().parent)
    for name in ("model", "env"):  # the toolkit's own packages, once imported, would shadow the user's
        mod = sys.modules.get(name)
        mine = Path(folder) / name
        if (
            mod is not None
            and Path(getattr(mod, "__file__", "") or "").resolve().parent == _TOOLKIT_ROOT / name
            and (mine.is_dir() or mine.with_suffix(".py").is_file())
        ):
            raise UserError(
                f"the toolkit's own '{name}' package is already imported in this process, so the adapter's '{name}' "
                f"({mine}) cannot be: use the toolkit's scripts with --adapter, or import only adlens in your own script"
            )
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"adlens_adapter_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # whatever the user's file raises while importing
        raise UserError(f"adapter {path} failed to import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    adapter = _LOADED[path.resolve()] = Adapter(module, path)
    return adapter


class Adapter:
    """A loaded adapter file, validated; runs the user's rollout with recording and compression."""

    def __init__(self, module, path: Path):
        self.path, self.m = path, module
        missing = [n for n in REQUIRED if not hasattr(module, n)]
        if missing:
            raise self.error(f"does not define {', '.join(missing)} (required: {', '.join(REQUIRED)})")
        for name in ("load_model", "tasks", "make_vec_env", "rollout"):
            if not callable(getattr(module, name)):
                raise self.error(f"{name} must be a function")
        self.horizon = self._int("HORIZON", module.HORIZON, 1)
        self.max_context = self._int("MAX_CONTEXT", module.MAX_CONTEXT, 2)
        self.tokens_per_step = self._int("TOKENS_PER_STEP", getattr(module, "TOKENS_PER_STEP", 1), 1)
        self.history_name = getattr(module, "HISTORY_MODULE", None)
        self.grid_size = getattr(module, "GRID_SIZE", None)
        if self.grid_size is not None:
            self.grid_size = self._int("GRID_SIZE", self.grid_size, 1)
        user_steps = getattr(module, "token_steps", None)
        self.token_steps = user_steps if callable(user_steps) else default_token_steps(self.tokens_per_step)
        self.name = path.stem

    def error(self, what: str) -> UserError:
        return UserError(f"adapter {self.path}: {what}")

    def _int(self, name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.error(f"{name} must be an integer >= {low}, got {value!r}")
        return value

    # ---- what the adapter provides, checked --------------------------------------------------------
    def load_model(self, device) -> nn.Module:
        model = self.m.load_model(device)
        if not isinstance(model, nn.Module):
            raise self.error(f"load_model must return a torch.nn.Module, got {type(model).__name__}")
        model.eval()
        if not attention_modules(model):
            raise self.error(
                "no attention module found in the model (nn.MultiheadAttention, nn.TransformerEncoderLayer or a Hugging Face model with eager attention)"
            )
        self.history_module(model)  # fail early
        return model

    def tasks(self, split: str) -> list:
        if split not in ("test", "train"):
            raise UserError(f"--tasks must be test or train, got {split!r}")
        tasks = self.m.tasks(split)
        if not isinstance(tasks, (list, tuple)) or not tasks:
            raise self.error(f"tasks({split!r}) must return a non-empty list, got {type(tasks).__name__}")
        try:
            json.dumps(list(tasks))
        except TypeError as e:
            raise self.error(f"tasks({split!r}) must be JSON-serialisable: {e}") from None
        return list(tasks)

    def optimal_return(self, task) -> float | None:
        fn = getattr(self.m, "optimal_return", None)
        return float(fn(task)) if callable(fn) else None

    def history_module(self, model: nn.Module) -> nn.Module:
        if self.history_name is not None:
            found = dict(model.named_modules()).get(self.history_name)
            if found is None:
                raise self.error(f"HISTORY_MODULE {self.history_name!r} is not a module of the model")
            return found
        for _name, mod in model.named_modules():
            if isinstance(mod, nn.TransformerEncoder) or _hf_base(mod):
                return mod
        raise self.error(
            "no nn.TransformerEncoder or Hugging Face transformer found: set HISTORY_MODULE to the module that receives the token history"
        )

    # ---- running the user's rollout ----------------------------------------------------------------
    def run(self, model: nn.Module, tasks: list, n_steps: int, seed: int, compression=None, on_step=None) -> dict:
        """The user's rollout on `tasks` for n_steps, seeded, recorded, optionally compressed.

        Returns returns (n_envs, n_episodes), time_s, mean_context_length (tokens the history module
        computed over, per forward), the recorder and the compressor."""
        venv = self.m.make_vec_env(list(tasks))
        if getattr(venv, "num_envs", None) != len(tasks):
            raise self.error(
                f"make_vec_env must return a VecEnv with one environment per task ({len(tasks)}), got num_envs {getattr(venv, 'num_envs', None)}"
            )
        rec = recording_vec_env(venv, on_step)
        hist = HistoryCompressor(self.history_module(model), compression, self.max_context, step_of=lambda: rec.t,
                                 token_steps=self.token_steps, score_model=model)  # fmt: skip
        seed_everything(seed)
        try:
            with hist, torch.inference_mode():
                t0 = time.perf_counter()
                out = self.m.rollout(model, rec, n_steps)
                elapsed = time.perf_counter() - t0
        finally:
            rec.close()
        if rec.t != n_steps:
            raise self.error(f"rollout(model, venv, {n_steps}) stepped the environments {rec.t} times")
        returns = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
        want = math.ceil(n_steps / self.horizon)
        if returns.ndim != 2 or returns.shape[0] != len(tasks):
            raise self.error(
                f"rollout must return per-environment, per-episode returns of shape ({len(tasks)}, n_episodes), got shape {returns.shape}"
            )
        if returns.shape[1] not in (want, n_steps // self.horizon):
            raise self.error(
                f"rollout returned {returns.shape[1]} episodes for {n_steps} steps of HORIZON {self.horizon} (expected {want})"
            )
        lengths = hist.lengths or [0]
        return {"returns": returns, "time_s": elapsed, "mean_context_length": float(np.mean(lengths)), "recorder": rec}


def seed_everything(seed: int) -> None:
    """The same seed for torch, numpy and random before each rollout: paired runs see the same draws."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def recording_vec_env(venv, on_step=None):
    """Wrap a stable-baselines3 VecEnv so every step's observations, actions, rewards and dones are kept.

    `t` counts completed steps; `obs[t]` is what the agent saw before acting at step t."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class RecordingVecEnv(VecEnvWrapper):
        def __init__(self, venv):
            super().__init__(venv)
            self.t = 0
            self.obs, self.actions, self.rewards, self.dones = [], [], [], []
            self._last = None

        def reset(self):
            self._last = self.venv.reset()
            return self._last

        def step_async(self, actions):
            self.actions.append(np.asarray(actions).copy())
            self.venv.step_async(actions)

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            self.obs.append(np.asarray(self._last).copy())
            self.rewards.append(np.asarray(rewards, dtype=np.float64).copy())
            self.dones.append(np.asarray(dones).copy())
            self._last = obs
            self.t += 1
            if on_step is not None:
                on_step(self.t - 1)
            return obs, rewards, dones, infos

    return RecordingVecEnv(venv)


def record_capture(adapter: Adapter, model: nn.Module, tasks: list, n_steps: int, seed: int = 0, num_full: int = 5,
                   full_task: int | None = None) -> dict:  # fmt: skip
    """Run the user's rollout on `tasks` (one VecEnv) under the hooks; a capture in format v2 (adlens/capture_file.py).

    At every step the last forward of the history module is the one the actions came from: its newest
    token's attention, summed per environment step, is the step's query row. Full matrices (rows
    averaged over a step's queries) are kept for `full_task`, or the task with the median return."""
    N, k = len(tasks), adapter.tokens_per_step
    T = 1 + math.ceil((adapter.max_context - 1) / k)  # steps a full context spans
    rows: dict[int, tuple] = {}
    want_full = set(full_steps_for(n_steps, num_full))
    full: dict[int, torch.Tensor] = {}
    holder: dict = {}

    def on_forward(_m, args, kwargs, output):
        step = holder["rec"].t
        w = torch.stack([cap.weights[name][-1] for name in cap.names]).float()  # (L, B, H, n, n)
        for name in cap.names:
            cap.weights[name].clear()
        n = w.shape[-1]
        if w.shape[1] != N:
            raise adapter.error(f"the history module's batch is {w.shape[1]}, not one row per environment ({N})")
        if n > adapter.max_context:
            raise adapter.error(f"the history module saw {n} tokens at step {step}, more than MAX_CONTEXT {adapter.max_context}")
        steps = torch.as_tensor(adapter.token_steps(n, step), dtype=torch.long)
        uniq, inverse = torch.unique(steps, return_inverse=True)  # ascending steps
        if int(uniq[-1]) != step:
            raise adapter.error(f"token_steps({n}, {step}) puts no token at the current step {step}")
        per_step = torch.zeros(*w.shape[:-1], len(uniq)).index_add_(-1, inverse, w)  # (L, B, H, n, m) keys summed per step
        newest = torch.nonzero(steps == step)[-1, 0]
        rows[step] = (per_step[..., newest, :].to(torch.float16), uniq)  # (L, B, H, m)
        if step in want_full:
            q = torch.zeros(*w.shape[:3], len(uniq), len(uniq)).index_add_(3, inverse, per_step)
            q = q / torch.bincount(inverse, minlength=len(uniq)).clamp(min=1)[:, None].float()  # mean over a step's queries
            full[step] = q  # (L, B, H, m, m), float32 until one task is kept

    hist = adapter.history_module(model)
    with capture_attention(model) as cap:
        handle = hist.register_forward_hook(on_forward, with_kwargs=True)
        try:
            venv = adapter.m.make_vec_env(list(tasks))
            rec = holder["rec"] = recording_vec_env(venv)
            seed_everything(seed)
            with torch.inference_mode():
                out = adapter.m.rollout(model, rec, n_steps)
            rec.close()
        finally:
            handle.remove()
    if rec.t != n_steps:
        raise adapter.error(f"rollout(model, venv, {n_steps}) stepped the environments {rec.t} times")
    missing = [t for t in range(n_steps) if t not in rows]
    if missing:
        raise adapter.error(f"the history module ran no forward at step(s) {missing[:5]}: is HISTORY_MODULE the module your rollout calls every step?")
    L, _, H = rows[0][0].shape[:3]
    query_attn = torch.zeros(N, n_steps, L, H, T, dtype=torch.float16)
    ctx_step = torch.full((N, n_steps, T), -1, dtype=torch.long)
    context_len = torch.zeros(N, n_steps, dtype=torch.long)
    for t in range(n_steps):
        row, steps = rows[t]
        m = min(len(steps), T)
        query_attn[:, t, :, :, :m] = row[..., -m:].permute(1, 0, 2, 3)
        ctx_step[:, t, :m] = steps[-m:]
        context_len[:, t] = m
    returns = torch.as_tensor(np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64), dtype=torch.float32)
    keep = representative_task(returns) if full_task is None else full_task
    obs = np.stack(rec.obs)  # (S, N, ...)
    cells = [_cells(adapter, obs[:, i]) for i in range(N)]
    grid = adapter.grid_size or (max(int(c.max()) for c in cells) + 1 if cells[0] is not None else 1)
    state = torch.stack([torch.as_tensor(c[:, 0] * grid + c[:, 1] if c is not None else np.full(n_steps, -1), dtype=torch.long) for c in cells])
    t_idx = torch.arange(n_steps).expand(N, n_steps)
    return {
        "meta": {
            "checkpoint": f"adapter:{adapter.path}",
            "env": {"name": f"adapter:{adapter.name}"},
            "tasks": list(tasks),
            "task": tasks[keep],
            "seed": seed,
            "greedy": None,
            "eval_timesteps": n_steps,
            "max_context": T,
            "horizon": adapter.horizon,
            "n_layer": L,
            "n_head": H,
            "layer_names": list(cap.names),
            "grid_size": grid,
            "optimal_return": adapter.optimal_return(tasks[keep]),
            "optimal_returns": [adapter.optimal_return(t) for t in tasks],
            "tokens_per_step": k,
            "reward_of_token": "r_t",  # a step's tokens carry the reward of that step's transition
        },
        "query_attn": query_attn,
        "context_len": context_len,
        "ctx_step": ctx_step,
        "reward": torch.as_tensor(np.stack(rec.rewards).T, dtype=torch.float32),
        "state": state,
        "action": torch.as_tensor(np.stack(rec.actions).reshape(n_steps, N, -1)[..., 0].T, dtype=torch.long),
        "episode": t_idx // adapter.horizon,
        "timestep": t_idx % adapter.horizon,
        "full_task": keep,
        "full_steps": torch.tensor(sorted(full), dtype=torch.long),
        "full_attn": [full[t][:, keep, :, -T:, -T:].clone() for t in sorted(full)],  # clone: a view would save every task's storage
        "returns": returns,
    }


def _cells(adapter: Adapter, obs: np.ndarray) -> np.ndarray | None:
    fn = getattr(adapter.m, "state_to_cell", None)
    if not callable(fn):
        return None
    cells = np.asarray([fn(o) for o in obs], dtype=np.int64)
    if cells.shape != (len(obs), 2) or (cells < 0).any():
        raise adapter.error(f"state_to_cell(obs) must return (row, col) >= 0, got e.g. {cells[:1].tolist()}")
    return cells


# ---- Hugging Face models (optional dependency) ------------------------------------------------------
def _hf_base(module: nn.Module) -> bool:
    """A Hugging Face transformer body (e.g. GPT2Model) that takes inputs_embeds."""
    return any(c.__module__.startswith("transformers.") and c.__name__.endswith("Model") for c in type(module).__mro__[:1]) and hasattr(
        module, "get_input_embeddings"
    )
