"""The batched grid environments as tensors on any device, stepped in place without a host round trip.

    >>> env = TorchGridEnv(spec, spec.tasks_for("test"), device="cuda")
    >>> states = env.reset_()                 # (B,) int64 state ids, on the device
    >>> rewards = env.step_(actions)          # (B,) float32; env.state() is the next observation

Same dynamics as `env.batched.BatchedGridEnv` (tested step for step): the agent moves, the reward is
computed, and an episode that reached the horizon resets to the start cell in the same call, so
`state()` is then the first observation of the next episode. Nothing branches on a value: the step
counter, the key and door flags and the reset are tensors, so a step never waits for the device and
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from env.darkroom import MOVES


class TorchGridEnv:
    def __init__(self, spec, tasks: list[dict], device="cpu"):
        if not tasks:
            raise ValueError("TorchGridEnv needs at least one task")
        for t in tasks:
            spec.make(**t)  # validate
        self.spec, self.num_envs, self.device = spec, len(tasks), torch.device(device)
        B, size = self.num_envs, spec.size
        self.key_to_door = spec.name == "key_to_door"
        self.moves = torch.as_tensor(MOVES, device=self.device)  # (A, 2)
        self.start = torch.full((2,), size // 2, dtype=torch.long, device=self.device)
        perm = [list(range(len(MOVES)))] * B
        if spec.name == "darkroom":
            goal = [t["goal"] for t in tasks]
        elif spec.name == "darkroom_permuted":
            goal, perm = [[size - 1] * 2] * B, [t["perm"] for t in tasks]
        else:
            goal = [t["door"] for t in tasks]
            self.key = torch.tensor([t["key"] for t in tasks], dtype=torch.long, device=self.device)
        self.goal = torch.tensor(goal, dtype=torch.long, device=self.device)  # (B, 2): the goal, or the door
        self.perm = torch.tensor(perm, dtype=torch.long, device=self.device)  # (B, A) action -> move
        self.pos = self.start.repeat(B, 1)
        self.t = torch.zeros((), dtype=torch.long, device=self.device)  # steps into the episode (all alike)
        self.has_key = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.opened = torch.zeros(B, dtype=torch.bool, device=self.device)

    def state(self) -> torch.Tensor:
        """(B,) state ids of the current observations, as `spec.state_index`."""
        return self.pos[:, 0] * self.spec.size + self.pos[:, 1]

    def reset_(self) -> torch.Tensor:
        self.pos.copy_(self.start.expand_as(self.pos))
        self.t.zero_()
        self.has_key.zero_()
        self.opened.zero_()
        return self.state()

    def step_(self, actions: torch.Tensor) -> torch.Tensor:
        """Move every agent by its action (B,) long; return the rewards (B,) float32. Episodes at the
        horizon are reset in place."""
        move = self.moves[self.perm.gather(1, actions.view(-1, 1))[:, 0]]  # (B, 2)
        self.pos.add_(move).clamp_(0, self.spec.size - 1)
        self.t.add_(1)
        if self.key_to_door:
            at_key = (self.pos == self.key).all(1) & ~self.has_key
            at_door = (self.pos == self.goal).all(1) & self.has_key & ~self.opened & ~at_key
            self.has_key.logical_or_(at_key)
            self.opened.logical_or_(at_door)
            rewards = (at_key | at_door).float()
        else:
            rewards = (self.pos == self.goal).all(1).float()
        done = self.t >= self.spec.horizon  # () bool, on the device
        self.pos.copy_(torch.where(done, self.start, self.pos))
        self.t.masked_fill_(done, 0)
        self.has_key.logical_and_(~done)
        self.opened.logical_and_(~done)
        return rewards

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes (to save and restore around warm-up steps)."""
        return [self.pos, self.t, self.has_key, self.opened]
