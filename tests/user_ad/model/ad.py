"""The AD transformer: nn.TransformerEncoder over transition tokens plus a query-state token."""

import numpy as np
import torch
import torch.nn as nn

from env.darkroom import SIZE


class ADModel(nn.Module):
    def __init__(self, n_transit=240, d_model=64, n_layer=4, n_head=4, n_actions=5):
        super().__init__()
        self.n_transit, self.n_actions = n_transit, n_actions
        self.embed_state = nn.Embedding(SIZE * SIZE, d_model)
        self.embed_transition = nn.Linear(2 * d_model + n_actions + 1, d_model)
        self.pos_embedding = nn.Parameter(torch.randn(1, n_transit + 1, d_model) * 0.02)  # learned absolute positions
        layer = nn.TransformerEncoderLayer(d_model, n_head, 4 * d_model, dropout=0.1, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.pred_action = nn.Linear(d_model, n_actions)

    def state_ids(self, obs):
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.long)
        return obs[..., 0] * SIZE + obs[..., 1]

    def forward(self, states, actions, rewards, next_states, query_states):
        """states/actions/rewards/next_states (B, n) transitions, query_states (B,) -> action logits (B, A)."""
        a = nn.functional.one_hot(actions, self.n_actions).float()
        ctx = self.embed_transition(torch.cat([self.embed_state(states), a, rewards[..., None], self.embed_state(next_states)], -1))
        x = torch.cat([ctx, self.embed_state(query_states)[:, None]], 1)  # (B, n + 1, D)
        x = x + self.pos_embedding[:, : x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.transformer(x, mask=mask, is_causal=True)
        return self.pred_action(h[:, -1])

    @torch.no_grad()
    def evaluate_in_context(self, vec_env, eval_timesteps):
        """Act for eval_timesteps steps in every environment, re-running the last n_transit transitions each step."""
        n_envs = vec_env.num_envs
        obs = vec_env.reset()
        buf = {k: [] for k in ("s", "a", "r", "s2")}
        returns, episode_return = [], np.zeros(n_envs)
        for _ in range(eval_timesteps):
            query = self.state_ids(obs)
            if buf["s"]:
                ctx = [torch.stack(buf[k][-self.n_transit :], 1) for k in ("s", "a", "r", "s2")]
            else:
                ctx = [torch.zeros(n_envs, 0, dtype=torch.long)] * 2 + [torch.zeros(n_envs, 0)] + [torch.zeros(n_envs, 0, dtype=torch.long)]
            logits = self(*ctx, query)
            action = torch.distributions.Categorical(logits=logits).sample()
            next_obs, reward, done, _ = vec_env.step(action.numpy())
            buf["s"].append(query)
            buf["a"].append(action)
            buf["r"].append(torch.as_tensor(reward, dtype=torch.float32))
            buf["s2"].append(self.state_ids(next_obs))  # on done, the VecEnv has reset: s' is the new start
            episode_return += reward
            if done.all():
                returns.append(episode_return.copy())
                episode_return[:] = 0
            obs = next_obs
        return np.stack(returns, 1)  # (n_envs, n_episodes)
