"""All environments of a task list stepped in one numpy call, with the VecEnv interface the rollout uses.

    >>> venv = BatchedGridEnv(spec, spec.tasks_for("test"))
    >>> obs = venv.reset()                    # (B, 2) int64
    >>> obs, rewards, dones, infos = venv.step(actions)

Same dynamics as `env.darkroom` (tested trajectory for trajectory against stable-baselines3's
DummyVecEnv): episodes are truncated after `horizon` steps and reset automatically, the final
observation of an episode is in `infos[i]["terminal_observation"]` as in stable-baselines3.
Supports Darkroom, DarkroomPermuted and Key-to-Door.
"""

from __future__ import annotations

import numpy as np

from env.darkroom import MOVES


class BatchedGridEnv:
    def __init__(self, spec, tasks: list[dict]):
        self.spec, self.num_envs = spec, len(tasks)
        for t in tasks:
            spec.make(**t)  # validate
        B, size = self.num_envs, spec.size
        self.start = np.array([size // 2, size // 2], dtype=np.int64)
        self.perm = np.tile(np.arange(len(MOVES)), (B, 1))
        if spec.name == "darkroom":
            self.goal = np.array([t["goal"] for t in tasks], dtype=np.int64)
        elif spec.name == "darkroom_permuted":
            self.goal = np.full((B, 2), size - 1, dtype=np.int64)
            self.perm = np.array([t["perm"] for t in tasks], dtype=np.int64)
        else:
            self.key = np.array([t["key"] for t in tasks], dtype=np.int64)
            self.door = np.array([t["door"] for t in tasks], dtype=np.int64)
        self.pos = np.tile(self.start, (B, 1))
        self.t = 0
        self._rows = np.arange(B)
        self.has_key = np.zeros(B, dtype=bool)
        self.opened = np.zeros(B, dtype=bool)

    def reset(self) -> np.ndarray:
        self.pos = np.tile(self.start, (self.num_envs, 1))
        self.t = 0
        self.has_key[:] = False
        self.opened[:] = False
        return self.pos.copy()

    def step(self, actions):
        a = self.perm[self._rows, np.asarray(actions, dtype=np.int64)]
        pos = self.pos + MOVES[a]
        self.pos = np.minimum(np.maximum(pos, 0, out=pos), self.spec.size - 1, out=pos)  # np.clip, ~4 us cheaper per call
        self.t += 1
        if self.spec.name == "key_to_door":
            at_key = (self.pos == self.key).all(1) & ~self.has_key
            at_door = (self.pos == self.door).all(1) & self.has_key & ~self.opened & ~at_key
            self.has_key |= at_key
            self.opened |= at_door
            rewards = (at_key | at_door).astype(np.float32)
        else:
            rewards = (self.pos == self.goal).all(1).astype(np.float32)
        done = self.t >= self.spec.horizon
        dones = np.full(self.num_envs, done)
        if done:
            infos = [{"terminal_observation": p.copy(), "TimeLimit.truncated": True} for p in self.pos]
            obs = self.reset()
        else:
            infos = [{} for _ in range(self.num_envs)]
            obs = self.pos.copy()
        return obs, rewards, dones, infos

    def close(self) -> None:
        pass
