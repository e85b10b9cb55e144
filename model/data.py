"""Learning histories on disk -> training windows for AD.

    >>> data = HistoryData.from_dir("data/darkroom", spec, tasks=spec.tasks_for("train"), context=240)
    >>> tok, target = data.sample(np.random.default_rng(0), batch_size=32)   # Tokens (B, T), (B, T)

A window is `context` consecutive steps of one learning stream, after keeping every `stride`-th
episode of that stream: a stride above 1 packs more of the source learner's improvement into one
context (AD, arXiv 2210.14215, subsamples its histories for the same reason).

With `min_context` below `context`, each window's length is drawn uniformly from [min_context,
context] and the rest of its row is padded with the loss masked: a causal model's positions never
see what comes after them, so a short window trains exactly as it would alone. Each window draws its
stride among those that fit its length. A long-context model then also sees short histories from
any point of a stream (at 1,000 transitions a 50-episode stream holds a single full window).

With `augment="dihedral"` each window is also drawn under one of the 8 symmetries of the square
grid about its centre (where every episode starts): states, actions and the task's cells are mapped
together, and only images that are not held-out tasks are used, so a held-out task never becomes a
training task. (With env `train_tasks`, a subset, the images reach training tasks that were not
collected: Key-to-Door's 8 images of a (key, door) pair are 8 pairs.)

A folder collected with `collect.py --tasks none` (a room without a goal) adds all of its
histories to those of the tasks: pure exploration, never rewarded, under all 8 symmetries. Such a
Darkroom folder serves Key-to-Door as well, when its grid and horizon are Key-to-Door's.

With `loss_mask="sibling_taught"` the loss skips the steps whose action the window cannot explain:
taken before any reward is visible in the window while the stream's PPO learner already reached the
goal in more than `SIBLING_SHARE` of its streams in the episode before. All streams of a learner share
one policy, so such a step heads for a goal that only the sibling streams have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from adlens.errors import UserError
from model.ad import Tokens

AUGMENTS = ("none", "dihedral")
LOSS_MASKS = ("none", "sibling_taught")
SIBLING_SHARE = 0.2  # a learner "has found the goal" once more than this share of its streams reach it


def episode_returns(rewards: np.ndarray, horizon: int) -> np.ndarray:
    """(streams, steps) rewards -> (streams, episodes) returns; a trailing partial episode is dropped."""
    n_ep = rewards.shape[1] // horizon
    return rewards[:, : n_ep * horizon].reshape(len(rewards), n_ep, horizon).sum(-1)


def _collect_config(data_dir) -> dict:
    """The 'collect' section of a folder's collect_config.json ({} if it has none)."""
    try:
        meta = json.loads((Path(data_dir) / "collect_config.json").read_text())["collect"]
    except (OSError, KeyError, TypeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def streams_per_learner(data_dir) -> int | None:
    """n_streams from a folder's collect_config.json (None if it has none)."""
    try:
        return int(_collect_config(data_dir)["n_streams"])
    except (KeyError, TypeError, ValueError):
        return None


def is_goal_free(data_dir) -> bool:
    """A folder collected with --tasks none: learners in a room without a goal."""
    return _collect_config(data_dir).get("tasks") == "none"


def learner_rate_before(rewards: np.ndarray, horizon: int, per_learner: int | None = None) -> np.ndarray:
    """(streams, steps) rewards of one task -> (streams, episodes): the share of the stream's learner's
    streams rewarded in the episode before (0 in the first). collect.py stores a task's learners one
    after the other, `per_learner` streams each (None: all streams are one learner)."""
    found = episode_returns(rewards, horizon) > 0
    step = per_learner or len(rewards)
    rate = np.zeros(found.shape, dtype=np.float32)
    for i in range(0, len(rewards), step):
        rate[i : i + step, 1:] = found[i : i + step, :-1].mean(0)
    return rate


HISTORY_KEYS = ("task", "horizon", "states", "actions", "rewards")  # what training reads of a collect.py file


def read_history(path, spec, task: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One collect.py file, checked whole: (states (streams, steps, 2) int64 cells, actions (streams, steps)
    int64, rewards (streams, steps) float32). It must hold `task` (None: a goal-free learner), be
    collected with the env's horizon, and hold cells, action ids and rewards the env can produce;
    anything else is a UserError naming the file."""
    try:
        with np.load(path) as d:
            missing = [k for k in HISTORY_KEYS if k not in d.files]
            if missing:
                raise UserError(f"learning history {path} lacks {missing}; was it written by collect.py?")
            held, horizon = json.loads(str(d["task"])), d["horizon"]
            s, a, r = d["states"], d["actions"], d["rewards"]
    except UserError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ValueError (pickled arrays), ...
        raise UserError(f"corrupt learning history {path}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
    if held != task:
        raise UserError(f"{path} holds task {json.dumps(held)}, expected {json.dumps(task)}")
    if horizon.shape != () or horizon.dtype.kind not in "iu" or int(horizon) != spec.horizon:
        raise UserError(f"{path} was collected with horizon {horizon.tolist()}, the env config says {spec.horizon}")
    if s.ndim != 3 or s.shape[2] != 2 or s.shape[0] < 1 or s.shape[1] < spec.horizon:
        raise UserError(f"learning history {path}: states must be (streams, steps, 2) with steps >= horizon {spec.horizon}, got {s.shape}")
    for name, x in (("actions", a), ("rewards", r)):
        if x.shape != s.shape[:2]:
            raise UserError(f"learning history {path}: {name} has shape {x.shape}, the states {s.shape[:2]} (streams, steps)")
    for name, x, lo, hi in (("states", s, 0, spec.size - 1), ("actions", a, 0, spec.n_actions - 1)):
        if x.dtype.kind not in "iu" or x.min() < lo or x.max() > hi:
            raise UserError(f"learning history {path}: {name} must be integers in [{lo}, {hi}] for env {spec.name} "
                            f"of size {spec.size}, got {x.dtype} in [{x.min()}, {x.max()}]")  # fmt: skip
    if r.dtype.kind not in "fiu" or not np.isfinite(r).all():
        raise UserError(f"learning history {path}: rewards must be finite numbers")
    return s.astype(np.int64), a.astype(np.int64), r.astype(np.float32)


def check_folder_env(data_dir, spec) -> None:
    """A folder's collect_config.json (when it has one) must name the env the command uses."""
    try:
        env = json.loads((Path(data_dir) / "collect_config.json").read_text())["env"]
    except (OSError, KeyError, TypeError, ValueError):
        return  # no record: the files are checked one by one
    if not isinstance(env, dict):
        return
    keys = ("name", "size")
    if spec.name == "key_to_door" and env.get("name") == "darkroom" and is_goal_free(data_dir):
        keys = ("size",)  # an empty Darkroom is the Key-to-Door grid without key and door (the horizon is checked per file)
    diff = [k for k in keys if k in env and env[k] != getattr(spec, k)]
    if diff:
        raise UserError(f"{data_dir} was collected for env {', '.join(f'{k} {env[k]!r}' for k in diff)}; "
                        f"the config says {', '.join(f'{k} {getattr(spec, k)!r}' for k in diff)}")  # fmt: skip


def grid_symmetries(size: int, moves: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """The 8 symmetries of a `size` x `size` grid about its centre.

    Returns state maps (8, size*size) on state ids r*size+c, action maps (8, n_actions + 1) whose
    last column keeps the start-of-stream token, and the 8 cell maps as functions (r, c) -> (r, c).
    Symmetry 0 is the identity.
    """
    m = size - 1
    cell_maps = [
        lambda r, c: (r, c), lambda r, c: (c, m - r), lambda r, c: (m - r, m - c), lambda r, c: (m - c, r),
        lambda r, c: (m - r, c), lambda r, c: (r, m - c), lambda r, c: (c, r), lambda r, c: (m - c, m - r),
    ]  # fmt: skip
    r, c = np.divmod(np.arange(size * size), size)
    states = np.stack([fr * size + fc for fr, fc in (f(r, c) for f in cell_maps)])
    n_actions = len(moves)
    actions = np.empty((len(cell_maps), n_actions + 1), dtype=np.int64)
    actions[:, n_actions] = n_actions
    for k, f in enumerate(cell_maps):
        for a, (dr, dc) in enumerate(moves):
            image = np.subtract(f(dr, dc), f(0, 0))  # a symmetry is affine: the move maps linearly
            actions[k, a] = next(b for b, mv in enumerate(moves) if (mv == image).all())
    return states, actions, cell_maps


def _map_task(task: dict, cell_map) -> dict:
    return {k: list(cell_map(*v)) for k, v in task.items()}


class HistoryData:
    """All streams of the given tasks: states/actions/rewards `(S, N)` with `N` a multiple of horizon."""

    def __init__(self, states, actions, rewards, horizon: int, n_actions: int, context: int, strides=(1,), symmetries=None, taught=None,
                 min_context: int | None = None):  # fmt: skip
        """symmetries: None, or (state maps (K, n_states), action maps (K, n_actions + 1), allowed (S, K) bool).
        taught: None, or (S, episodes) bool: the stream's learner had already found the goal (loss_mask).
        min_context: None (every window `context` long) or the shortest window length (see the module docstring)."""
        self.states, self.actions, self.rewards = states, actions, rewards
        self.symmetries, self.taught = symmetries, taught
        self.horizon, self.n_actions, self.context = horizon, n_actions, context
        self.strides = np.asarray(strides, dtype=np.int64)
        self.n_streams, n_steps = states.shape
        self.n_episodes = n_steps // horizon
        if (self.strides < 1).any():
            raise UserError(f"episode strides must be >= 1, got {self.strides.tolist()}")
        if min_context is not None and not 1 <= min_context <= context:
            raise UserError(f"min_context must be in [1, {context}] (the context), got {min_context}")
        self.min_context = min_context if min_context is not None and min_context < context else None
        # steps each stride keeps at its worst offset: the longest window it can serve
        self._stride_steps = ((self.n_episodes - self.strides) // self.strides + 1) * horizon
        shortest = self.min_context or context
        if (self._stride_steps < shortest).any() or self._stride_steps.max() < context:
            need = f"windows of {self.min_context} to {context} transitions" if self.min_context else f"context {context}"
            raise UserError(
                f"histories of {self.n_episodes} episodes are too short for {need} at episode strides "
                f"{self.strides.tolist()}: collect more timesteps or lower the context/strides"
            )

    @classmethod
    def from_dir(
        cls,
        data_dir,
        spec,
        tasks: list[dict],
        context: int,
        strides=(1,),
        augment: str = "none",
        loss_mask: str = "none",
        goal_free: bool = True,
        min_context: int | None = None,
    ) -> HistoryData:
        """Histories of `tasks` from one folder written by collect.py, or from several (a list); with
        `goal_free`, also every history of the goal-free folders among them (skipped otherwise)."""
        if augment not in AUGMENTS:
            raise UserError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
        if loss_mask not in LOSS_MASKS:
            raise UserError(f"unknown loss_mask {loss_mask!r}; choose one of {', '.join(LOSS_MASKS)}")
        if augment == "dihedral" and spec.name not in ("darkroom", "key_to_door"):
            raise UserError(f"augment 'dihedral' maps task cells; env {spec.name!r} has none (use augment none)")
        dirs = [Path(d) for d in ([data_dir] if isinstance(data_dir, (str, Path)) else data_dir)]
        for d in dirs:
            check_folder_env(d, spec)
        all_tasks = spec.tasks()
        files = []  # (folder, file, task it must hold; None in a goal-free folder)
        for d in dirs:
            if not is_goal_free(d):
                files += [(d, d / f"task_{all_tasks.index(t):04d}.npz", t) for t in tasks]
            elif goal_free:
                found = sorted(d.glob("task_*.npz"))
                if not found:
                    raise UserError(f"no histories in the goal-free folder {d}: run collect.py --tasks none first")
                files += [(d, f, None) for f in found]
        if not files:
            raise UserError(f"no histories of these tasks in {', '.join(map(str, dirs))} (goal-free folders hold none)")
        states, actions, rewards, file_tasks, rates = [], [], [], [], []
        per_learner = {d: streams_per_learner(d) for d in dirs} if loss_mask == "sibling_taught" else {}
        for data_dir, f, task in files:
            if not f.is_file():
                raise UserError(f"missing learning history {f} for task {json.dumps(task)}: run collect.py first")
            s, a, r = read_history(f, spec, task)
            states.append(spec.state_index(s).astype(np.int16))
            actions.append(a.astype(np.int8))
            rewards.append(r)
            file_tasks.append(task)
            if loss_mask == "sibling_taught":
                rates.append(learner_rate_before(rewards[-1], spec.horizon, per_learner[data_dir]))
        n = min(s.shape[1] for s in states) // spec.horizon * spec.horizon
        cat = lambda xs: np.concatenate([x[:, :n] for x in xs])  # noqa: E731
        symmetries = None
        if augment == "dihedral":
            from env.darkroom import MOVES

            sym_states, sym_actions, cell_maps = grid_symmetries(spec.size, MOVES)
            held = {json.dumps(t) for t in spec.split()[1]}
            per_file = [[t is None or json.dumps(_map_task(t, f)) not in held for f in cell_maps] for t in file_tasks]
            allowed = np.repeat(np.array(per_file), [len(r) for r in rewards], axis=0)  # (streams, 8)
            symmetries = (sym_states, sym_actions, allowed)
        taught = np.concatenate([r[:, : n // spec.horizon] for r in rates]) > SIBLING_SHARE if rates else None
        return cls(cat(states), cat(actions), cat(rewards), spec.horizon, spec.n_actions, context, strides, symmetries, taught, min_context)

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[Tokens, torch.Tensor]:
        """Random windows -> (Tokens with (B, T) fields, target actions (B, T); -100 where the loss is masked)."""
        B, T, H = batch_size, self.context, self.horizon
        stream = rng.integers(self.n_streams, size=B)
        if self.min_context is None:
            length = np.full(B, T)
            stride = self.strides[rng.integers(len(self.strides), size=B)]
        else:  # a length per window, then a stride among those that fit it
            length = rng.integers(self.min_context, T + 1, size=B)
            fits = self._stride_steps[None] >= length[:, None]  # (B, strides)
            stride = self.strides[np.where(fits, rng.random(fits.shape), -1.0).argmax(1)]
        offset = rng.integers(0, stride)  # first kept episode
        n_sub = (self.n_episodes - offset - 1) // stride + 1  # kept episodes
        start = rng.integers(0, n_sub * H - length + 1)  # window start, in kept steps
        j = start[:, None] + np.arange(-1, T)[None]  # (B, T+1), one step of look-back
        src = (offset[:, None] + (j // H) * stride[:, None]) * H + j % H  # step in the stream
        src = np.clip(src, 0, self.states.shape[1] - 1)  # the padding of a short window reads any valid step
        states = self.states[stream[:, None], src[:, 1:]]
        acts = self.actions[stream[:, None], src].astype(np.int64)
        rews = self.rewards[stream[:, None], src]
        first = j[:, :-1] < 0  # the window starts the stream: no previous step
        prev_a = np.where(first, self.n_actions, acts[:, :-1])
        if self.symmetries is not None:  # one allowed symmetry per window, drawn uniformly
            sym_states, sym_actions, allowed = self.symmetries
            k = np.where(allowed[stream], rng.random((B, allowed.shape[1])), -1.0).argmax(1)[:, None]
            states, acts, prev_a = sym_states[k, states], sym_actions[k, acts], sym_actions[k, prev_a]
        prev_r = np.where(first, 0.0, rews[:, :-1])
        target = acts[:, 1:]
        if self.taught is not None:  # no reward visible yet, but the learner already knew the goal
            unseen = np.maximum.accumulate(prev_r, axis=1) <= 0
            target = np.where(unseen & self.taught[stream[:, None], src[:, 1:] // H], -100, target)
        if self.min_context is not None:
            target = np.where(np.arange(T)[None] < length[:, None], target, -100)  # no loss on the padding
        tok = Tokens(
            torch.from_numpy(states.astype(np.int64)),
            torch.from_numpy(prev_a),
            torch.from_numpy(prev_r.astype(np.float32)),
            torch.from_numpy((j[:, 1:] % H).astype(np.int64)),
        )
        return tok, torch.from_numpy(target)
