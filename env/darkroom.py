"""Darkroom-style grid worlds for in-context RL (AD, Laskin et al. 2022, arXiv 2210.14215).

    >>> import gymnasium as gym, env  # registers the ids
    >>> e = gym.make("Darkroom-v0", goal=(2, 7))

All three environments share one grid: the agent starts in the centre cell, observes only its own
(row, col), and has 5 actions (0 up, 1 down, 2 left, 3 right, 4 stay). Episodes end by truncation
after `horizon` steps; the goal (or key and door) is invisible, so the reward is the only signal.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from adlens.errors import ConfigError

# (d_row, d_col) of each action: up, down, left, right, stay
MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], dtype=np.int64)
N_ACTIONS = len(MOVES)


class _Grid(gym.Env):
    """Shared grid dynamics; subclasses define the reward."""

    metadata = {"render_modes": []}

    def __init__(self, size: int = 9, horizon: int = 20):
        if size < 2:
            raise ConfigError(f"size must be >= 2, got {size}")
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        self.size, self.horizon = size, horizon
        self.start = np.array([size // 2, size // 2], dtype=np.int64)
        self.observation_space = spaces.MultiDiscrete([size, size])
        self.action_space = spaces.Discrete(N_ACTIONS)
        self.pos = self.start.copy()
        self.t = 0

    def _check_cell(self, name: str, cell) -> np.ndarray:
        cell = np.asarray(cell, dtype=np.int64)
        if cell.shape != (2,) or (cell < 0).any() or (cell >= self.size).any():
            raise ConfigError(f"{name} must be a (row, col) inside a {self.size}x{self.size} grid, got {cell.tolist()}")
        return cell

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos = self.start.copy()
        self.t = 0
        return self.pos.copy(), {}

    def _move(self, action: int) -> None:
        self.pos = np.clip(self.pos + MOVES[self._action_map(int(action))], 0, self.size - 1)
        self.t += 1

    def _action_map(self, action: int) -> int:
        return action


class Darkroom(_Grid):
    """Reward 1 on every step that ends on the invisible goal; `goal=None` is a room without one."""

    def __init__(self, goal=(0, 0), size: int = 9, horizon: int = 20):
        super().__init__(size, horizon)
        self.goal = None if goal is None else self._check_cell("goal", goal)

    def step(self, action):
        self._move(action)
        reward = float(self.goal is not None and (self.pos == self.goal).all())
        return self.pos.copy(), reward, False, self.t >= self.horizon, {}


class DarkroomPermuted(Darkroom):
    """Goal fixed in the far corner; the task is a permutation of the action mapping."""

    def __init__(self, perm=(0, 1, 2, 3, 4), size: int = 9, horizon: int = 20):
        super().__init__(goal=(size - 1, size - 1), size=size, horizon=horizon)
        perm = tuple(int(a) for a in perm)
        if sorted(perm) != list(range(N_ACTIONS)):
            raise ConfigError(f"perm must be a permutation of 0..{N_ACTIONS - 1}, got {perm}")
        self.perm = perm

    def _action_map(self, action: int) -> int:
        return self.perm[action]


class KeyToDoor(_Grid):
    """Dark Key-to-Door: reward 1 on first reaching the key, then 1 on first reaching the door."""

    def __init__(self, key=(0, 0), door=(8, 8), size: int = 9, horizon: int = 50):
        super().__init__(size, horizon)
        self.key = self._check_cell("key", key)
        self.door = self._check_cell("door", door)
        self.has_key = self.opened = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.has_key = self.opened = False
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self._move(action)
        reward = 0.0
        if not self.has_key and (self.pos == self.key).all():
            self.has_key, reward = True, 1.0
        elif self.has_key and not self.opened and (self.pos == self.door).all():
            self.opened, reward = True, 1.0
        return self.pos.copy(), reward, False, self.t >= self.horizon, {}


class ObserveKey(gym.ObservationWrapper):
    """Key-to-Door for a memoryless source learner: (row, col, holds key). Where the way to the key
    and the way to the door cross, a policy of the position alone cannot tell which way to go; the
    flag lets PPO solve the task. Only the learner sees it: collect.py stores (row, col)."""

    def __init__(self, env: KeyToDoor):
        super().__init__(env)
        self.observation_space = spaces.MultiDiscrete([env.size, env.size, 2])

    def observation(self, obs):
        return np.append(obs, int(self.env.unwrapped.has_key))
