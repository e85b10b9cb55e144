import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from env import Darkroom, all_goals
from model import ADModel

HORIZON = 20
MAX_CONTEXT = 241  # 240 transition tokens + the query-state token
HELD_OUT = all_goals()[::10]  # 9 goals never trained on


def load_model(device):
    torch.manual_seed(0)  # a real codebase loads its checkpoint here
    return ADModel(n_transit=MAX_CONTEXT - 1).to(device)


def tasks(split):
    return [list(g) for g in (HELD_OUT if split == "test" else [g for g in all_goals() if g not in HELD_OUT])]


def make_vec_env(tasks):
    return DummyVecEnv([lambda g=g: Darkroom(tuple(g), HORIZON) for g in tasks])


def rollout(model, venv, n_steps):
    return model.evaluate_in_context(venv, n_steps)


def state_to_cell(obs):
    return int(obs[0]), int(obs[1])
