"""Task families, the seeded train/held-out split, optimal returns and `make_env`.

    >>> from env import get_spec, make_env
    >>> spec = get_spec({"name": "darkroom"})
    >>> train, held_out = spec.split()
    >>> thunk = make_env({"name": "darkroom"}, **held_out[0])   # for DummyVecEnv / SubprocVecEnv

A task is a plain dict of keyword arguments for the environment (`{"goal": [r, c]}`,
`{"perm": [...]}`, `{"key": [r, c], "door": [r, c]}`), so it can be stored in JSON and checkpoints.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np

from adlens.config import section
from adlens.errors import ConfigError, UserError
from env.darkroom import N_ACTIONS, Darkroom, DarkroomPermuted, KeyToDoor

_DEFAULT_HORIZON = {"darkroom": 20, "darkroom_permuted": 20, "key_to_door": 50}
_DEFAULT_HOLDOUT = {"darkroom": 8, "darkroom_permuted": 20, "key_to_door": 50}


@dataclass(frozen=True)
class EnvSpec:
    """Everything the pipeline needs to know about one task family.

    name       : "darkroom" | "darkroom_permuted" | "key_to_door"
    size       : grid side length (the default 9 gives 81 cells)
    horizon    : steps per episode (None = the family's default: 20, 20, 50)
    n_holdout  : tasks held out of training (None = the family's default: 8, 20, 50)
    split_seed : seed of the deterministic train/held-out permutation
    train_tasks: train on only this many of the training tasks (0 = all): a seeded subset, drawn
                 after the held-out tasks are set aside, so the held-out set does not depend on it
                 (Key-to-Door has 6,430 training pairs; collecting them all takes about 60 CPU-hours)
    """

    name: str = "darkroom"
    size: int = 9
    horizon: int | None = None
    n_holdout: int | None = None
    split_seed: int = 0
    train_tasks: int = 0

    def __post_init__(self):
        if self.name not in _DEFAULT_HORIZON:
            raise ConfigError(f"unknown environment {self.name!r}; valid: {', '.join(_DEFAULT_HORIZON)}")
        if self.horizon is None:
            object.__setattr__(self, "horizon", _DEFAULT_HORIZON[self.name])
        if self.n_holdout is None:
            object.__setattr__(self, "n_holdout", _DEFAULT_HOLDOUT[self.name])
        if self.size < 2:
            raise ConfigError(f"env size must be >= 2, got {self.size}")
        if self.horizon < 1:
            raise ConfigError(f"env horizon must be >= 1, got {self.horizon}")
        if not 0 < self.n_holdout < len(self.tasks()):
            raise ConfigError(f"n_holdout must be in [1, {len(self.tasks()) - 1}] for {self.name}, got {self.n_holdout}")
        if not 0 <= self.train_tasks <= len(self.tasks()) - self.n_holdout:
            raise ConfigError(f"train_tasks must be in [0, {len(self.tasks()) - self.n_holdout}] for {self.name}, got {self.train_tasks}")

    # ---- task family -------------------------------------------------------------------------
    @property
    def n_states(self) -> int:
        return self.size * self.size

    @property
    def n_actions(self) -> int:
        return N_ACTIONS

    def tasks(self) -> list[dict]:
        cells = [[r, c] for r in range(self.size) for c in range(self.size)]
        if self.name == "darkroom":
            return [{"goal": g} for g in cells]
        if self.name == "darkroom_permuted":
            return [{"perm": list(p)} for p in itertools.permutations(range(N_ACTIONS))]
        return [{"key": k, "door": d} for k in cells for d in cells if k != d]

    def split(self) -> tuple[list[dict], list[dict]]:
        """(training tasks, held-out tasks): a seeded permutation, disjoint, the same on every machine.
        With `train_tasks` N the training tasks are the first N of the rest in a second seeded order."""
        tasks = self.tasks()
        order = np.random.default_rng(self.split_seed).permutation(len(tasks))
        held = sorted(order[: self.n_holdout].tolist())
        rest = order[self.n_holdout :]
        if self.train_tasks:
            rest = np.random.default_rng([self.split_seed, 1]).permutation(rest)[: self.train_tasks]
        train = sorted(rest.tolist())
        return [tasks[i] for i in train], [tasks[i] for i in held]

    def tasks_for(self, which: str) -> list[dict]:
        train, held = self.split()
        if which not in ("train", "test"):
            raise ConfigError(f"task set must be 'train' or 'test', got {which!r}")
        return train if which == "train" else held

    # ---- per task ----------------------------------------------------------------------------
    def make(self, **task):
        kw = dict(size=self.size, horizon=self.horizon)
        if self.name == "darkroom":
            return Darkroom(goal=task["goal"], **kw)
        if self.name == "darkroom_permuted":
            return DarkroomPermuted(perm=task["perm"], **kw)
        return KeyToDoor(key=task["key"], door=task["door"], **kw)

    def optimal_return(self, task: dict) -> float:
        """Best achievable episode return from the centre start cell."""
        centre = np.array([self.size // 2, self.size // 2])
        if self.name == "key_to_door":
            d1 = max(int(np.abs(np.asarray(task["key"]) - centre).sum()), 1)
            d2 = np.abs(np.asarray(task["door"]) - np.asarray(task["key"])).sum()
            return float(int(d1 <= self.horizon) + int(d1 + d2 <= self.horizon))
        goal = np.array(task["goal"]) if self.name == "darkroom" else np.array([self.size - 1] * 2)
        dist = int(np.abs(goal - centre).sum())
        # reward on every step that ends on the goal: steps max(dist, 1) .. horizon
        return float(max(self.horizon - max(dist, 1) + 1, 0))

    def state_index(self, obs: np.ndarray) -> np.ndarray:
        """(..., 2) observations (row, col) -> (...) integer state ids in [0, n_states)."""
        obs = np.asarray(obs)
        return obs[..., 0] * self.size + obs[..., 1]

    def to_dict(self) -> dict:
        """The spec as a plain dict; train_tasks only when set, so specs saved before it existed compare equal."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train_tasks" or self.train_tasks}


def get_spec(config: dict | EnvSpec) -> EnvSpec:
    """Build an `EnvSpec` from a config dict; unknown keys are errors naming the key."""
    if isinstance(config, EnvSpec):
        return config
    known = {f.name for f in fields(EnvSpec)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown env config key(s) {unknown}; valid: {sorted(known)}")
    return EnvSpec(**config)


class _EnvThunk:
    """Picklable environment factory (SubprocVecEnv sends it to worker processes)."""

    def __init__(self, spec: EnvSpec, task: dict):
        self.spec, self.task = spec, task

    def __call__(self):
        return self.spec.make(**self.task)


def make_env(config: dict | EnvSpec, **task) -> _EnvThunk:
    """A callable that builds one environment for `task`, for stable-baselines3 VecEnvs."""
    spec = get_spec(config)
    spec.make(**task)  # validate the task now, in the caller's process
    return _EnvThunk(spec, task)


ENV_KEYS = ("name", "size", "horizon", "n_holdout", "split_seed", "train_tasks")


def env_section(cfg: dict) -> tuple[dict, dict]:
    """A YAML 'env' section split into the scripts' own keys ({"env": name, "size": n}, to resolve
    with the script's dict) and the rest (horizon, n_holdout, split_seed, train_tasks) for the EnvSpec."""
    sec = section(cfg, "env", ENV_KEYS)
    own = {"env": sec.pop("name")} if "name" in sec else {}
    if "size" in sec:
        own["size"] = sec.pop("size")
    return own, sec


VEC_ENVS = ("batched", "dummy", "subproc")


def make_vec_env(spec: EnvSpec, tasks: list[dict], kind: str = "batched"):
    """One environment per task, in order: batched (all in one numpy call) | dummy | subproc
    (stable-baselines3 VecEnvs). All three give the same trajectories for the same actions."""
    if kind not in VEC_ENVS:
        raise UserError(f"--vec-env must be one of {', '.join(VEC_ENVS)}, got {kind!r}")
    if kind == "batched":
        from env.batched import BatchedGridEnv

        return BatchedGridEnv(spec, tasks)
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    fns = [make_env(spec, **t) for t in tasks]
    return SubprocVecEnv(fns, start_method="spawn") if kind == "subproc" else DummyVecEnv(fns)
