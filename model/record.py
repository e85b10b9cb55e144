"""Record an in-context rollout's attention into the capture format (`adlens/capture_file.py`).

    >>> cap = record_rollout(model, spec, task, eval_timesteps=200, seed=0)
    >>> save_capture(cap, "runs/attention/capture.pt")

The rollout is the KV-cached one that `evaluate.py` runs, on one task. At every step the query
token's attention over its whole context is taken from the hooks (exactly what the model used to pick
that step's action) and put in temporal order; at `num_full` steps the full causal (q x k) matrix of a
forward pass over that step's context is recorded too. While the context holds at most
`max_context` tokens, that matrix's last row equals the recorded query row (test).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from env import make_env
from model.ad import Tokens
from adlens.capture import capture_attention
from model.rollout import run_episodes


def default_eval_timesteps(horizon: int) -> int:
    return min(horizon * 10, 500)


def full_steps_for(n_steps: int, num_full: int) -> list[int]:
    """`num_full` steps spread over the run, the last one included."""
    if num_full <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(n_steps / num_full - 1, n_steps - 1, num_full)})


@torch.no_grad()
def record_rollout(
    model, spec, task: dict, eval_timesteps: int, seed: int = 0, greedy: bool = False, num_full: int = 5, progress: bool = True
) -> dict:
    """Run one task in context for ceil(eval_timesteps / horizon) whole episodes and record attention."""
    if eval_timesteps < 1:
        raise ValueError(f"eval_timesteps must be >= 1, got {eval_timesteps}")
    H, T = spec.horizon, model.cfg.max_context
    n_ep = math.ceil(eval_timesteps / H)
    S = n_ep * H
    L, n_head = model.cfg.n_layer, model.cfg.n_head
    query_attn = torch.zeros(S, L, n_head, T, dtype=torch.float16)
    ctx_step = torch.full((S, T), -1, dtype=torch.long)
    context_len = torch.zeros(S, dtype=torch.long)
    per_step = {k: torch.zeros(S, dtype=torch.long) for k in ("state", "action", "episode", "timestep")}
    reward = torch.zeros(S)
    want_full = set(full_steps_for(S, num_full))
    full_steps, full_attn = [], []
    history: list[Tokens] = []

    def on_step(t, tok, actions, rewards, eng):
        cache = eng.cache
        n = len(cache)
        order = cache.order()[0]  # (n,) slots oldest first
        rows = torch.stack([w[-1][0, :, 0] for w in (rec.weights[name] for name in rec.names)])  # (L, H, n) slot order
        query_attn[t, :, :, :n] = rows[:, :, order].to(torch.float16)
        ctx_step[t, :n] = cache.src_step[0, order].cpu()
        context_len[t] = n
        per_step["state"][t] = tok.states[0, 0]
        per_step["action"][t] = actions[0]
        per_step["episode"][t], per_step["timestep"][t] = t // H, t % H
        reward[t] = tok.prev_rewards[0, 0]
        history.append(tok)
        for name in rec.names:  # only the current step is needed: keep memory bounded
            rec.weights[name].clear()
        if t in want_full:
            window = [history[int(s)] for s in ctx_step[t, :n]]
            ctx = Tokens(*[torch.cat([getattr(h, f) for h in window], dim=1) for f in Tokens._fields])
            with capture_attention(model) as full:
                model(ctx)
            full_steps.append(t)
            full_attn.append(full.stacked()[:, 0].float().cpu())  # (L, H, n, n)

    venv = DummyVecEnv([make_env(spec, **task)])
    try:
        with capture_attention(model) as rec:
            out = run_episodes(model, venv, spec, n_ep, engine="kv", greedy=greedy, seed=seed, on_step=on_step, progress=progress)
    finally:
        venv.close()
    return {
        "meta": {
            "env": spec.to_dict(),
            "task": task,
            "seed": seed,
            "greedy": greedy,
            "eval_timesteps": S,
            "max_context": T,
            "horizon": H,
            "n_layer": L,
            "n_head": n_head,
            "layer_names": list(rec.names),
            "grid_size": spec.size,
            "optimal_return": spec.optimal_return(task),
        },
        "query_attn": query_attn,
        "context_len": context_len,
        "ctx_step": ctx_step,
        "reward": reward,
        **per_step,
        "full_steps": torch.tensor(full_steps, dtype=torch.long),
        "full_attn": full_attn,
        "returns": torch.tensor(out["returns"][0], dtype=torch.float32),
    }
