"""Record an in-context rollout's attention into the capture format (`adlens/capture_file.py`).

    >>> cap = record_rollout(model, spec, spec.tasks_for("test"), eval_timesteps=500, seed=0)
    >>> save_capture(cap, "runs/attention/capture.pt")

The rollout is the KV-cached one that `evaluate.py` runs, all tasks in one batched environment. At every step the query
token's attention over its whole context is taken from the hooks (exactly what the model used to pick
that step's action) and put in temporal order; at `num_full` steps the full causal (q x k) matrix of a
forward pass over that step's context is recorded too. While the context holds at most
`max_context` tokens, that matrix's last row equals the recorded query row (test).
"""

from __future__ import annotations

import math

import torch

from adlens.capture import capture_attention
from adlens.capture_file import full_steps_for, representative_task
from adlens.errors import ConfigError
from env import make_vec_env
from model.ad import Tokens
from model.rollout import run_episodes


@torch.no_grad()
def record_rollout(model, spec, tasks: list[dict], eval_timesteps: int, seed: int = 0, greedy: bool = False, num_full: int = 5,
                   full_task: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Run `tasks` in context, one batched rollout, for ceil(eval_timesteps / horizon) whole episodes and
    record attention (capture format v2: a task dimension first). Full matrices are kept for one task:
    `full_task`, or the task with the median return."""
    if eval_timesteps < 1:
        raise ConfigError(f"eval_timesteps must be >= 1, got {eval_timesteps}")
    H, T = spec.horizon, model.cfg.max_context
    N = len(tasks)
    n_ep = math.ceil(eval_timesteps / H)
    S = n_ep * H
    L, n_head = model.cfg.n_layer, model.cfg.n_head
    query_attn = torch.zeros(N, S, L, n_head, T, dtype=torch.float16)
    ctx_step = torch.full((N, S, T), -1, dtype=torch.long)
    context_len = torch.zeros(N, S, dtype=torch.long)
    per_step = {k: torch.zeros(N, S, dtype=torch.long) for k in ("state", "action")}
    reward = torch.zeros(N, S)
    want_full = set(full_steps_for(S, num_full))
    full: dict[int, torch.Tensor] = {}
    history: list[Tokens] = []

    def on_step(t, tok, actions, rewards, eng):
        cache = eng.cache
        n = len(cache)
        order = cache.order()  # (N, n) slots oldest first
        rows = torch.stack([w[-1][:, :, 0] for w in (rec.weights[name] for name in rec.names)])  # (L, N, H, n) slot order
        idx = order[None, :, None, :].expand(L, N, n_head, n)
        query_attn[:, t, :, :, :n] = rows.gather(-1, idx).permute(1, 0, 2, 3).to(torch.float16).cpu()
        ctx_step[:, t, :n] = cache.src_step.gather(1, order).cpu()
        context_len[:, t] = n
        per_step["state"][:, t] = tok.states[:, 0].cpu()
        per_step["action"][:, t] = actions.cpu()
        reward[:, t] = tok.prev_rewards[:, 0].cpu()
        history.append(tok)
        for name in rec.names:  # only the current step is needed: keep memory bounded
            rec.weights[name].clear()
        if t in want_full:  # every task's full matrices at this step; one task's are kept at the end
            window = [history[int(s)] for s in ctx_step[0, t, :n]]  # the same steps for every task
            ctx = Tokens(*[torch.cat([getattr(h, f) for h in window], dim=1) for f in Tokens._fields])
            with capture_attention(model) as fm:
                model(ctx)
            full[t] = fm.stacked().transpose(0, 1).float().cpu()  # (N, L, H, n, n), until one task is kept

    venv = make_vec_env(spec, tasks, "batched")
    try:
        with capture_attention(model) as rec:
            out = run_episodes(model, venv, spec, n_ep, engine="kv", greedy=greedy, seed=seed, on_step=on_step, progress=progress)
    finally:
        venv.close()
    returns = torch.tensor(out["returns"], dtype=torch.float32)  # (N, E)
    keep = representative_task(returns) if full_task is None else full_task
    t_idx = torch.arange(S).expand(N, S)
    return {
        "meta": {
            "env": spec.to_dict(),
            "tasks": list(tasks),
            "task": tasks[keep],
            "seed": seed,
            "greedy": greedy,
            "eval_timesteps": S,
            "max_context": T,
            "horizon": H,
            "n_layer": L,
            "n_head": n_head,
            "layer_names": list(rec.names),
            "grid_size": spec.size,
            "optimal_return": spec.optimal_return(tasks[keep]),
            "optimal_returns": [spec.optimal_return(t) for t in tasks],
            "reward_of_token": "r_t-1",
        },
        "query_attn": query_attn,
        "context_len": context_len,
        "ctx_step": ctx_step,
        "reward": reward,
        **per_step,
        "episode": t_idx // H,
        "timestep": t_idx % H,
        "full_task": keep,
        "full_steps": torch.tensor(sorted(full), dtype=torch.long),
        "full_attn": [full[t][keep].clone() for t in sorted(full)],  # clone: a view would save every task's storage
        "returns": returns,
    }
