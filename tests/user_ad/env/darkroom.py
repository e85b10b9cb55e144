"""Darkroom: a 9x9 grid, the agent starts in the centre and sees only its position; reward 1 on the goal."""

import gymnasium as gym
import numpy as np

SIZE = 9
MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # stay, up, down, left, right


def all_goals():
    return [(r, c) for r in range(SIZE) for c in range(SIZE)]


class Darkroom(gym.Env):
    def __init__(self, goal, horizon=20):
        self.goal, self.horizon = np.array(goal), horizon
        self.observation_space = gym.spaces.Box(0, SIZE - 1, shape=(2,), dtype=np.int64)
        self.action_space = gym.spaces.Discrete(len(MOVES))

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = np.array([SIZE // 2, SIZE // 2]), 0
        return self.pos.copy(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + MOVES[int(action)], 0, SIZE - 1)
        self.t += 1
        reward = float((self.pos == self.goal).all())
        return self.pos.copy(), reward, False, self.t >= self.horizon, {}
