"""The Algorithm Distillation transformer (Laskin et al. 2022, arXiv 2210.14215).

    >>> from model.ad import ADConfig, ADTransformer
    >>> model = ADTransformer(ADConfig(n_states=81, n_actions=5, horizon=20, max_context=240))

One token per environment step. Token `t` carries the state `s_t` the agent is in, the action
`a_{t-1}` and reward `r_{t-1}` that led there, and the step's index within its episode; the model
predicts `a_t` at every position (per-position loss: T predictions per forward pass).

Positions are rotary (RoPE) and only relative distances enter attention. During rollout a key is
rotated by its absolute step index when it enters the cache; a window that slides is then exactly a
window of relative positions 0..T-1. When compression drops or merges cached tokens, the kept tokens
are given new contiguous positions ending at the newest one (position-in-cache, as StreamingLLM
2309.17453 does) by rotating their keys by the difference, so distances never exceed what training saw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from adlens.errors import ConfigError
from model.cache import KVCache, StreamingCache
from model.rope import apply_rope, as_pairs, pair_order, rope_cos_sin


MAX_CONTEXT = 1_000_000  # transitions; no AD model here comes near it, a corrupt or mistyped value does


@dataclass
class ADConfig:
    """Network hyper-parameters (stored in every checkpoint as plain data).

    n_states    : number of discrete states (grid cells)
    n_actions   : number of actions; `n_actions` itself is the "no previous action" id
    horizon     : episode length; the within-episode step is embedded
    max_context : transitions the model attends over (the window length T)
    n_layer, n_head, d_model : transformer size; d_model / n_head must be even (rotary pairs)
    dropout     : dropout on embeddings, attention and residual branches (training only)
    attn_dropout: dropout on the attention weights if not None (else `dropout`); 0 keeps the fused
                  attention kernel in training, which on a CPU is 5-10x faster than the
                  explicit weights that attention dropout needs
    rope_base   : rotary frequency base
    grid_size   : > 0: states are cells of a grid_size x grid_size grid and are embedded as
                  row + column embeddings (shared across cells of a row or column, which lets
                  "go to where the reward was" carry over to goals never seen in training);
                  0: one embedding per state id
    """

    n_states: int = 81
    n_actions: int = 5
    horizon: int = 20
    max_context: int = 240
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    dropout: float = 0.1
    attn_dropout: float | None = None
    rope_base: float = 10000.0
    grid_size: int = 0

    def __post_init__(self):
        for name in ("n_states", "n_actions", "horizon", "max_context", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.max_context > MAX_CONTEXT:  # caches and masks are allocated at this size
            raise ConfigError(f"model max_context must be at most {MAX_CONTEXT:,}, got {self.max_context:,}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ConfigError(f"d_model/n_head must be an even integer, got {self.d_model}/{self.n_head}")
        if self.grid_size and self.grid_size**2 != self.n_states:
            raise ConfigError(f"grid_size**2 must equal n_states, got {self.grid_size}**2 != {self.n_states}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError(f"attn_dropout must be in [0, 1) or None, got {self.attn_dropout}")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ADConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)


class Tokens(NamedTuple):
    """The model's input, every field `(B, T)`."""

    states: torch.Tensor  # long, state id s_t
    prev_actions: torch.Tensor  # long, a_{t-1}; n_actions = none
    prev_rewards: torch.Tensor  # float, r_{t-1}
    timesteps: torch.Tensor  # long, step index within the episode


class StepParams(NamedTuple):
    """The parameters of the cached step (`ADTransformer.step_params`)."""

    embed: tuple  # row, column (grid) or state embedding, action, time embedding, reward weight and bias
    blocks: tuple  # per block: (the block, its `step_params()`)
    ln_f: tuple  # final layer norm: weight, bias, eps
    head: tuple  # action head: weight, bias


# The cached step's attention on a CPU with one thread: from this many (sequence, head) rows and this
# many slots on, the explicit `single_query_attention` is as fast as the fused kernel or faster (the
# whole step 0.99-1.10x at 32 environments and 4 heads, 1.07-1.18x at 64-256); with fewer rows it is
# slower, over 24 slots or fewer its batched products take 2-9x longer, and with two threads the
# fused kernel, which splits its rows across them, is as fast (`python benchmarks/step_attention.py`;
# EXPERIMENTS.md, "Single-query attention without the fused kernel").
EXPLICIT_ATTENTION_ROWS, EXPLICIT_ATTENTION_SLOTS = 128, 32


def single_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None,
                           hook=None, acc: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One query per sequence and head, q (B, H, 1, Dh), over keys and values (B, H, n, Dh) whose
    (sequence, head) rows merge into one dimension (a cache layer or a slice of its slots), with an
    additive mask (1, 1, 1, n) or None -> (B, H, 1, Dh). Computed explicitly: the scores as one
    batched product (the mask added in the same call), softmax in place, one more product. `hook`
    sees the weights (B, H, 1, n) and may replace them (attention capture); the weights are added
    to `acc` (B*H, 1, n) if given (eager scores, `KVCache.weight_sum`: one call, no hook)."""
    B, H, _, Dh = q.shape
    n = keys.shape[2]
    q3, kT = q.reshape(B * H, 1, Dh), keys.reshape(B * H, n, Dh).transpose(1, 2)
    if mask is None:
        w = torch.bmm(q3, kT).mul_(1 / math.sqrt(Dh))
    else:
        w = torch.baddbmm(mask.reshape(1, 1, n), q3, kT, alpha=1 / math.sqrt(Dh))
    torch.softmax(w, -1, out=w)
    if acc is not None:
        acc.add_(w)
    if hook is not None:
        w = hook(w.view(B, H, 1, n)).reshape(B * H, 1, n)
    return torch.bmm(w, values.reshape(B * H, n, Dh)).view(B, H, 1, Dh)


def explicit_attention(rows: int, slots: int, device: torch.device) -> bool:
    """Whether `step_attention` attends explicitly over this many (sequence, head) rows and slots."""
    return rows >= EXPLICIT_ATTENTION_ROWS and slots >= EXPLICIT_ATTENTION_SLOTS and device.type == "cpu" and torch.get_num_threads() == 1


def step_gelu(u: torch.Tensor) -> torch.Tensor:
    """GELU of the step's up-projection u (B, F). On a CPU through the transposed view, which takes
    PyTorch's own kernel: `F.gelu` hands a contiguous float tensor to oneDNN, whose call costs ~4 us
    more at 8 x 256 values (6.0 vs 1.8 us), and in the step it is never faster (the whole step 1.078x
    at 8 environments, 1.035x at 32, 1.00x at 256-512; EXPERIMENTS.md, "GELU off oneDNN in the step").
    The two round differently by up to ~1e-6. The result is contiguous (the output keeps the input's
    memory order)."""
    return F.gelu(u.t()).t() if u.device.type == "cpu" else F.gelu(u)


def step_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The cached step's attention (arguments as `single_query_attention`): explicit on a CPU with one
    torch thread from `EXPLICIT_ATTENTION_ROWS` (sequence, head) rows and `EXPLICIT_ATTENTION_SLOTS`
    slots on, else the fused kernel."""
    if explicit_attention(q.shape[0] * q.shape[1], keys.shape[2], q.device):
        return single_query_attention(q, keys, values, mask)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class HookPoint(nn.Identity):
    """Named identity that attention weights pass through; forward hooks attach here."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions.

    Fused `scaled_dot_product_attention` by default; while `record` is True (set by
    `model.capture.capture_attention`) the weights are computed explicitly, `(B, H, Tq, Tk)`,
    and routed through `self.hook_weights`. Both paths give the same outputs.
    """

    def __init__(self, cfg: ADConfig):
        super().__init__()
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_weights = HookPoint()
        self.record = False
        self._pairs: tuple | None = None  # see `pair_qkv`

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        return tuple(t.view(B, T, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, Dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Full causal pass over (B, T, D); cos/sin (T, Dh/2) or (B, 1, T, Dh/2)."""
        q, k, v = self._heads(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if not self.record:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            T = q.shape[-2]
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            attn = self.hook_weights(scores.masked_fill(~causal, float("-inf")).softmax(-1))  # (B, H, T, T)
            y = F.dropout(attn, p) @ v
        return self._merge(y)

    def step_params(self) -> tuple:
        """(qkv weight, qkv bias, proj weight, proj bias): what `step` reads, see `ADTransformer.step_params`."""
        return (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias)

    def pair_qkv(self, qkv_w: torch.Tensor, qkv_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The qkv weight and bias with every head's query and key rows in pair order (`pair_order`),
        so that the cached step's queries and keys come out in the cache's layout. Kept, and made
        again when either parameter changes (in place: its version moves; or replaced)."""
        memo = self._pairs
        if memo is None or memo[0] is not qkv_w or memo[1] is not qkv_b or memo[2] != (qkv_w._version, qkv_b._version):
            D, Dh = qkv_w.shape[1], self.head_size
            qk = (torch.arange(0, D, Dh)[:, None] + pair_order(Dh)).view(-1)  # (D,) query rows in pair order
            rows = torch.cat([qk, qk + D, torch.arange(2 * D, 3 * D)]).to(qkv_w.device)
            pairs = (qkv_w.detach().index_select(0, rows), qkv_b.detach().index_select(0, rows))
            memo = self._pairs = (qkv_w, qkv_b, (qkv_w._version, qkv_b._version), pairs)
        return memo[3]

    def step(self, x: torch.Tensor, rot: torch.Tensor, cache, layer: int, w: tuple | None = None) -> torch.Tensor:
        """One new token per sequence, (B, D), attending over the cache (which it joins).

        The per-step hot path: functional calls on parameters resolved once (`w`, from `step_params`),
        q and k in pair order (`pair_qkv`) rotated in place by one complex product over the stacked
        q, k, v with `rot` (3, 1, 1, Dh/2) (`KVCache.rotation_at`: v's factor is 1; four passes and a
        copy in the model's half-split layout), key and value written with one copy, and
        `step_attention` (the fused kernel, or where it is faster the explicit `single_query_attention`,
        which also serves when weights are recorded or summed). Rows are (B, D), not (B, 1, D): a
        linear layer on 2-D input skips the reshapes it makes around 3-D input.
        """
        qkv_w, qkv_b, proj_w, proj_b = w if w is not None else self.step_params()
        B, D = x.shape
        qkv = F.linear(x, *self.pair_qkv(qkv_w, qkv_b)).view(B, 3, self.n_head, 1, self.head_size)
        as_pairs(qkv).mul_(rot)  # q and k rotated in place
        q = qkv[:, 0]  # (B, H, 1, Dh)
        keys, values, mask = cache.write_kv(layer, qkv[:, 1:])  # (B, H, n, Dh) the new token included; mask (1, 1, 1, n)
        cache.note_query(layer, q)  # lazy scores for compression: computed later, from stored queries
        if getattr(cache, "wants_weights", False):  # eager scores: the weights this step computes are summed
            if self.record:  # the weights as the capture hook leaves them
                y = single_query_attention(q, keys, values, mask, lambda w: cache.add_weights(self.hook_weights(w)))
            else:
                y = single_query_attention(q, keys, values, mask, acc=cache.weight_sum(keys.shape[2]))
        elif self.record:
            y = single_query_attention(q, keys, values, mask, self.hook_weights)
        else:
            y = step_attention(q, keys, values, mask)  # (B, H, 1, Dh)
        return F.linear(y.reshape(B, D), proj_w, proj_b)


class Block(nn.Module):
    def __init__(self, cfg: ADConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.ln1(x), cos, sin))
        return x + self.mlp(self.ln2(x))

    def step_params(self) -> tuple:
        """What `step` reads, see `ADTransformer.step_params`."""
        up, down = self.mlp[0], self.mlp[2]
        return (self.ln1.weight, self.ln1.bias, self.ln1.eps, self.ln2.weight, self.ln2.bias, self.ln2.eps,
                up.weight, up.bias, down.weight, down.bias, self.attn, self.attn.step_params())  # fmt: skip

    def step(self, x, rot, cache, layer, w: tuple | None = None):
        """One new token per sequence, x (B, D); see `CausalSelfAttention.step`."""
        ln1_w, ln1_b, eps1, ln2_w, ln2_b, eps2, up_w, up_b, down_w, down_b, attn, attn_w = w if w is not None else self.step_params()
        D = x.shape[-1]
        x = x + attn.step(F.layer_norm(x, (D,), ln1_w, ln1_b, eps1), rot, cache, layer, attn_w)
        h = F.layer_norm(x, (D,), ln2_w, ln2_b, eps2)
        return x + F.linear(step_gelu(F.linear(h, up_w, up_b)), down_w, down_b)


class ADTransformer(nn.Module):
    """Causal transformer over a learning history; action logits at every position."""

    def __init__(self, cfg: ADConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        if cfg.grid_size:
            self.row_emb = nn.Embedding(cfg.grid_size, D)
            self.col_emb = nn.Embedding(cfg.grid_size, D)
        else:
            self.state_emb = nn.Embedding(cfg.n_states, D)
        self.action_emb = nn.Embedding(cfg.n_actions + 1, D)
        self.reward_emb = nn.Linear(1, D)
        self.time_emb = nn.Embedding(cfg.horizon, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.n_actions)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, tok: Tokens) -> torch.Tensor:
        """Tokens (B, T) -> input embeddings (B, T, D)."""
        if self.cfg.grid_size:
            s = self.row_emb(tok.states // self.cfg.grid_size) + self.col_emb(tok.states % self.cfg.grid_size)
        else:
            s = self.state_emb(tok.states)
        x = s + self.action_emb(tok.prev_actions) + self.time_emb(tok.timesteps)
        return self.drop(x + self.reward_emb(tok.prev_rewards.unsqueeze(-1).float()))

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, D) at positions 0..T-1 -> logits (B, T, A)."""
        T = x.shape[1]
        if T > self.cfg.max_context:
            raise ValueError(f"context of {T} tokens exceeds max_context={self.cfg.max_context}")
        cos, sin = rope_cos_sin(torch.arange(T, device=x.device), self.cfg.head_size, self.cfg.rope_base)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.ln_f(x))

    def forward(self, tok: Tokens) -> torch.Tensor:
        """Tokens (B, T) -> action logits (B, T, A) at every position."""
        return self.forward_embeddings(self.embed(tok))

    @torch.no_grad()
    def step(self, tok: Tokens, cache) -> torch.Tensor:
        """Append one token per sequence (fields (B, 1)) to `cache`; return its logits (B, A)."""
        return self.step_embeddings(self._embed_step(tok), cache)

    def _embed_step(self, tok: Tokens) -> torch.Tensor:
        """`embed` in eval mode with functional lookups and one state table (row + column embeddings
        summed once per weight update): the same sums in the same order, fewer small operations."""
        if self.training:  # dropout
            return self.embed(tok)
        row_w, col_w, state_w, action_w, time_w, reward_w, reward_b = self.resolve_step_params().embed
        if self.cfg.grid_size:
            key = (row_w._version, col_w._version, row_w.device)  # in-place updates bump _version
            if getattr(self, "_state_table_key", None) != key:
                s = torch.arange(self.cfg.n_states, device=row_w.device)
                self._state_table = row_w[s // self.cfg.grid_size] + col_w[s % self.cfg.grid_size]  # (n_states, D)
                self._state_table_key = key
            table = self._state_table
        else:
            table = state_w
        x = F.embedding(tok.states, table) + F.embedding(tok.prev_actions, action_w) + F.embedding(tok.timesteps, time_w)
        return x + F.linear(tok.prev_rewards.unsqueeze(-1).float(), reward_w, reward_b)

    def step_params(self) -> StepParams:
        """Every parameter the cached step reads, looked up once. On the CPU an `nn.Module` attribute
        lookup costs 1-5 us, and a step would make about a hundred (0.3 ms of a 2 ms step at 8
        environments). These are the parameter tensors themselves, so in-place updates (an optimizer
        step, `load_state_dict`) are seen; `new_cache` looks them up again, so a parameter replaced by
        another object is seen from the next cache on."""
        grid = bool(self.cfg.grid_size)
        embed = (self.row_emb.weight if grid else None, self.col_emb.weight if grid else None, None if grid else self.state_emb.weight,
                 self.action_emb.weight, self.time_emb.weight, self.reward_emb.weight, self.reward_emb.bias)  # fmt: skip
        return StepParams(embed, tuple((b, b.step_params()) for b in self.blocks), (self.ln_f.weight, self.ln_f.bias, self.ln_f.eps),
                          (self.head.weight, self.head.bias))  # fmt: skip

    def resolve_step_params(self, refresh: bool = False) -> StepParams:
        """`step_params` as looked up by the last `new_cache` (or rollout), or now if never or `refresh`."""
        params = None if refresh else self.__dict__.get("_step_params")
        if params is None:
            params = self._step_params = self.step_params()
        return params

    @torch.no_grad()
    def step_embeddings(self, x: torch.Tensor, cache) -> torch.Tensor:
        return self.step_rotated(x, cache.rotation_at(cache.advance()), cache)

    def step_rotated(self, x: torch.Tensor, rot, cache) -> torch.Tensor:
        """The cached step once the new token's slot is reserved: embeddings x (B, 1, D), its rotation
        `rot` (complex factors (3, 1, 1, Dh/2), `KVCache.rotation_at`) -> logits (B, A). Any cache with `write_kv`
        and `note_query`, keys in pair order (`pair_order`)."""
        params = self.resolve_step_params()
        x = x[:, -1]  # (B, D) through the blocks
        for i, (blk, w) in enumerate(params.blocks):
            x = blk.step(x, rot, cache, i, w)
        (ln_w, ln_b, eps), (head_w, head_b) = params.ln_f, params.head
        return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), head_w, head_b)

    def new_cache(self, batch_size: int, capacity: int | None = None, track_scores: bool = False, static: bool = False,
                  n_sink: int | None = None, score_window: int = 32, track_meta: bool = False,
                  eager_scores: bool | None = None):  # fmt: skip
        """A KV cache for `step`: `KVCache`, or with `n_sink` set a `StreamingCache` (sinks + ring buffer).
        Also looks up the step's parameters again (`step_params`)."""
        self.resolve_step_params(refresh=True)
        p = next(self.parameters())
        args = (self.cfg.n_layer, batch_size, self.cfg.n_head, capacity or self.cfg.max_context, self.cfg.head_size, p.device, p.dtype)
        kw = {"track_scores": track_scores, "rope_base": self.cfg.rope_base, "static": static, "score_window": score_window,
              "track_meta": track_meta, "eager_scores": eager_scores}  # fmt: skip
        if n_sink is not None:
            return StreamingCache(*args, n_sink=n_sink, **kw)
        return KVCache(*args, **kw)
