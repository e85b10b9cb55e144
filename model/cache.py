"""Key/value caches for incremental in-context rollout: a sliding/compacting cache and a streaming one.

    >>> cache = model.new_cache(batch_size=8)                   # capacity = max_context
    >>> logits = model.step(tokens, cache)                       # one new token per environment
    >>> cache = model.new_cache(8, capacity=72, n_sink=4)        # StreamingLLM: 4 sinks + a 68-slot ring

`KVCache` stores keys already rotated by their rotary position, with the head dimensions in pair order
(`model.rope.pair_order`: each rotary pair side by side, as the cached step computes its queries and
keys), so that re-rotating keys at a compaction is one complex product (`rotate_pairs`). Attention is
the same in either order: a key `k` of the model's own layout is `k[..., pair_order(Dh)]` here. Until
it is full, slots fill in order; after that the oldest slot is overwritten (a sliding window), so the
new token attends over exactly the last `capacity` tokens. Compression compacts it with a merge plan
(`apply_plan`). Order of slots does not matter to a single query; `order()` gives the temporal order
when it does (capture, compression).

`StreamingCache` is the rolling cache of StreamingLLM (arXiv 2309.17453) for strategies that only
keep the first `n_sink` tokens and the newest ones: sink slots plus a ring buffer that the newest
token overwrites, so it never compacts. Rotary positions are position-in-cache, as StreamingLLM
assigns them: the newest token and the ring keep their step index (they are contiguous), and the
sinks are placed just before the oldest ring token, i.e. sink j sits `capacity - 1 - j` positions
before the newest token at every step. The sinks' keys are kept as computed and re-rotated once per
step (n_sink rows per layer); nothing else moves. A full forward over the kept tokens at positions
0..capacity-1 therefore sees the same relative distances (test), and no distance exceeds capacity - 1.

Static shape (`static=True`): attention always runs over all `capacity` slots with a validity mask,
so its shapes never change and the keys/values it reads are contiguous (a slice of a larger cache is
not, and the fused CPU kernel then copies it every step). Compressed rollouts use it with capacity =
budget + interval, the most a compressed context ever holds.

Attention scores for scoring strategies (H2O's accumulated attention, arXiv 2306.14048) come one of
two ways. Eager (`eager_scores`, the default on a CPU): the step attends explicitly, which on a CPU
costs about what the fused kernel costs, and adds each layer's weights (B*H, 1, C) to a running sum
with one call; the sum is folded into `scores` when they are read (before a compaction) or before
a slide would drop a key it covers. The weights are computed once, where the lazy way computes them
a second time. Lazy (elsewhere): each step stores its query, and the attention those queries paid
is computed in one batched product when the scores are read or before a slide; the step itself
computes no weights and keeps the fused kernel. Both give the same scores to rounding (test).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from adlens.compression import HistoryMeta, merge_meta
from adlens.errors import ConfigError
from model.rope import rope_cos_sin, rope_pairs, rotate_pairs


def qkv_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-position cos, sin (P, Dh/2) -> complex factors (P, 3, 1, 1, Dh/2) that rotate a step's stacked
    q, k, v (B, 3, H, 1, Dh) in pair order, viewed as complex, in one product: q and k by the position,
    v by 1 + 0i (exactly itself); one in-place product over all three is cheaper than one over a slice."""
    rot = rope_pairs(cos, sin)
    return torch.stack([rot, rot, torch.ones_like(rot)], dim=1)[:, :, None, None]


class MergeLayout(NamedTuple):
    """A merge plan shared by every sequence, laid out for `KVCache._merge_in_place` (all but the weights)."""

    assign: torch.Tensor  # (B, n) the plan it was made for
    n: int
    n_out: int
    keep: torch.Tensor  # (B, n) bool
    tgt: torch.Tensor  # (B, n) output slot of each token (0 for dropped ones)
    members: torch.Tensor  # (m,) kept tokens: the first member of each output slot, then the others
    others: torch.Tensor  # (r,) kept tokens that are not the first of their slot
    a_others: torch.Tensor  # (r,) their output slots
    last: torch.Tensor  # (n_out,) each output slot's newest member
    rows: torch.Tensor  # flat rows of the members in every layer, key/value, sequence and head (`_slot_rows`)
    rot: torch.Tensor  # (m, Dh/2) complex rotation from each member's position to its slot's (`rope_pairs`)


class KVCache:
    """Per-layer keys/values `(L, B, H, C, Dh)` plus, per slot, its rotary position `pos (B, C)`,
    the rollout step it came from `src_step (B, C)` (the newest one for merged tokens) and,
    when `track_scores`, the attention it has received, `scores (B, C)` (mean over layers and heads,
    summed over queries: H2O's accumulated score, 2306.14048).

    static       : attend over all slots with a validity mask (fixed shapes) instead of the valid prefix
    eager_scores : scores from the weights the step's attention computes (explicit attention, each
                   layer's weights added up as they are made) instead of lazily from stored queries;
                   None = on a CPU (see the module docstring)
    score_window : queries kept for lazy scores before they are folded into `scores`
    note_queries : (attribute, set before a step) whether this step's query counts towards the scores;
                   a caller that scores from only some queries clears it for the others, which then
                   cost nothing
    track_meta   : also keep, per slot, what its token is in the learning history (`meta`: reward,
                   episode, step within the episode; set by `set_meta`, merged by `merge_meta`), for
                   the strategies that read it (`Compression.needs_meta`)
    """

    def __init__(
        self, n_layer, batch_size, n_head, capacity, head_size, device, dtype,
        track_scores=False, rope_base=10000.0, static=False, score_window=32, track_meta=False, eager_scores=None,
    ):  # fmt: skip
        if capacity < 1:
            raise ConfigError(f"cache capacity must be >= 1, got {capacity}")
        # keys and values in one tensor, so that a step writes both with one copy; each layer's keys
        # (B, H, C, Dh) stay contiguous, as the fused attention kernel wants them
        self.kv = torch.zeros(n_layer, 2, batch_size, n_head, capacity, head_size, device=device, dtype=dtype)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # views (L, B, H, C, Dh)
        # per-layer views, looked up in a list by the step (indexing a tensor costs about a microsecond)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)
        # rotary position and source step of each slot in one tensor, so that a step writes both at once
        self._pos_src = torch.full((2, batch_size, capacity), -1, dtype=torch.long, device=device)
        self.pos, self.src_step = self._pos_src[0], self._pos_src[1]  # views (B, C)
        self.scores = torch.zeros(batch_size, capacity, device=device) if track_scores else None
        self.meta: dict[str, torch.Tensor] | None = None  # field of HistoryMeta -> (B, C)
        if track_meta:
            self.meta = {"reward": torch.zeros(batch_size, capacity, device=device),
                         "episode": torch.zeros(batch_size, capacity, dtype=torch.long, device=device),
                         "step": torch.zeros(batch_size, capacity, dtype=torch.long, device=device)}  # fmt: skip
        self.n_layer, self.capacity, self.head_size, self.rope_base = n_layer, capacity, head_size, rope_base
        self.static = static
        # additive mask (1, 1, 1, C): 0 on valid slots, -inf on empty ones (a float mask spares the fused
        # attention kernel converting a boolean one in every layer of every step)
        self.valid = torch.full((1, 1, 1, capacity), float("-inf"), device=device, dtype=dtype) if static else None
        self.n = 0  # valid slots
        self.n_added = 0  # tokens ever added (= next rotary position, = rollout step)
        self._oldest = 0  # slot overwritten next once full
        self._slot = 0
        self._in_order = True  # slot i holds the i-th oldest token (no slide since the last compaction)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin per position
        self._qkv_rot: torch.Tensor | None = None  # complex factors per position (P, 3, 1, 1, Dh/2), `qkv_rotation`
        if eager_scores is None:
            eager_scores = torch.device(device).type == "cpu"
        self.eager_scores = bool(track_scores and eager_scores)
        self._q = self._acc = None
        if self.eager_scores:  # attention weights summed over the steps and layers since the last fold, per head
            self._acc = torch.zeros(batch_size * n_head, 1, capacity, device=device)  # float32, as `scores`
        elif track_scores:  # queries not yet folded into scores
            self._q = torch.zeros(n_layer, batch_size, n_head, max(1, score_window), head_size, device=device, dtype=dtype)
        self._q_step: list[int] = []  # the rollout step of each pending query
        self._q_window = max(1, score_window)
        self._n_q = 0
        self.note_queries = True
        self._q_now = False  # the current step's query (or with eager scores, its weights) counts
        self._q_dst: tuple[torch.Tensor, ...] = ()  # where it goes, per layer (B, H, Dh): views of `_q`
        self._slot_kv: tuple[torch.Tensor, ...] = ()  # the new token's slot, per layer (2, B, H, Dh): views of `kv`
        self._scratch: torch.Tensor | None = None  # flat work memory for compaction, allocated once
        self._score_buf: torch.Tensor | None = None  # flat work memory for lazy scores
        self._score_group = 1  # layers scored at once
        self._rows: torch.Tensor | None = None  # flat row offsets, see `_row_offsets`
        self._layout: MergeLayout | None = None  # the last in-place merge's layout, see `_merge_layout`
        self._order: tuple | None = None  # ((n_added, n), `order()`) while neither changed, and no compaction since

    def __len__(self) -> int:
        return self.n

    @property
    def full(self) -> bool:
        return self.n == self.capacity

    def rope_at(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, Dh/2) of one rotary position, from a table grown geometrically."""
        table = self._rope
        if table is None or pos >= len(table[0]):
            n = max(2 * pos, 4096)  # same float64 angles as rope_cos_sin(pos)
            table = self._rope = rope_cos_sin(torch.arange(n, device=self.k.device), self.head_size, self.rope_base)
        return table[0][pos : pos + 1], table[1][pos : pos + 1]

    def rotation_at(self, pos: int) -> torch.Tensor:
        """Complex factors (3, 1, 1, Dh/2) that rotate a step's stacked q, k, v (in pair order, viewed as
        complex) in one product: q and k to rotary position `pos`, v left exactly as it is (`qkv_rotation`)."""
        return self._qkv_table(pos)[pos]

    def _qkv_table(self, top: int) -> torch.Tensor:
        """`qkv_rotation` of every integer angle up to at least `top` (P, 3, 1, 1, Dh/2), from the angle
        table; `[:, 0, 0, 0]` is the plain rotation per angle (P, Dh/2), `rope_pairs`."""
        if self._qkv_rot is None or top >= len(self._qkv_rot):
            self.rope_at(max(top, 4095))  # grows the angle table
            self._qkv_rot = qkv_rotation(*self._rope)
        return self._qkv_rot

    def _next_slot(self) -> int:
        if self.n < self.capacity:
            self.n += 1
            if self.valid is not None:
                self.valid.select(3, self.n - 1).fill_(0.0)
            return self.n - 1
        if self._n_q:
            self._flush_scores()  # the slide drops a key that pending queries saw
        slot, self._oldest = self._oldest, (self._oldest + 1) % self.capacity
        self._in_order = False
        return slot

    def advance(self) -> int:
        """Reserve a slot for one new token per sequence; return its rotary position."""
        self._slot = slot = self._next_slot()
        pos = self.n_added
        self.n_added += 1
        self._pos_src.select(2, slot).fill_(pos)  # pos and src_step
        self._slot_kv = self.kv.select(4, slot).unbind(0)  # one view per layer, made once per step
        self._q_now = self.scores is not None and self.note_queries
        if self.scores is not None:
            self.scores.select(1, slot).fill_(0.0)
        if self._q_now:
            if self.eager_scores:
                self._n_q += 1  # weights pending in `_acc`
            else:
                if self._n_q == self._q_window:
                    self._flush_scores()
                self._q_step.append(pos)
                self._q_dst = self._q.select(3, self._n_q).unbind(0)
                self._n_q += 1
        return pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new token's (B, H, 1, Dh) key/value; see `write_kv`."""
        return self.write_kv(layer, torch.stack([k, v], dim=1))

    def write_kv(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new token's key and value, kv (B, 2, H, 1, Dh); return the keys/values to attend over
        (B, H, n or C, Dh) and an additive mask (1, 1, 1, C) of valid slots, or None when all are valid."""
        self._slot_kv[layer].copy_(kv.squeeze(3).transpose(0, 1))
        k, v = self._k_layers[layer], self._v_layers[layer]
        if self.n == self.capacity:
            return k, v, None
        if self.static:
            return k, v, self.valid
        return k[:, :, : self.n], v[:, :, : self.n], None

    @property
    def wants_weights(self) -> bool:
        """Whether this step's attention weights count towards the scores (eager scores): the step then
        attends explicitly and adds them to `weight_sum` (or, while attention is captured, through `add_weights`)."""
        return self._q_now and self.eager_scores

    def weight_sum(self, n: int) -> torch.Tensor:
        """(B*H, 1, n) the pending sum of attention weights over the first n slots (eager scores), to
        which a step's attention adds each layer's weights (`single_query_attention(..., acc=)`)."""
        return self._acc if n == self.capacity else self._acc[:, :, :n]

    def add_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Add one layer's attention weights (B, H, 1, n) over the slots to the pending scores; return them."""
        acc = self.weight_sum(w.shape[-1])
        acc.add_(w.view(acc.shape))
        return w

    def note_query(self, layer: int, q: torch.Tensor) -> None:
        """Keep the new token's rotated query (B, H, 1, Dh) for lazy attention scores."""
        if self._q_now and not self.eager_scores:
            self._q_dst[layer].copy_(q.squeeze(2))

    def _flush_scores(self) -> None:
        """Add the attention the pending queries paid to every valid slot: one batched product for
        several layers at once into reused memory (at most ~8 MB of work memory), masked, a softmax in
        place (the fused kernel: one call instead of the five passes of max, subtraction, exponential,
        sum and division), and summed.

        Query i saw exactly the slots whose token is not newer than it: nothing was dropped or merged
        since it ran (compaction and slides flush first)."""
        if self.eager_scores:
            self._fold_weights()
            return
        m, n = self._n_q, self.n
        q_step = torch.tensor(self._q_step, device=self.k.device)
        self._n_q, self._q_step = 0, []
        if m == 0:
            return
        L, B, H, _, Dh = self.k.shape
        # additive mask (B, 1, m, n): -inf where a key is newer than the query (an in-place add with
        # broadcasting is ~20x cheaper on CPU than `masked_fill_` with a broadcast boolean mask; same values)
        unseen = torch.zeros(B, 1, m, n, device=self.k.device, dtype=self.k.dtype).masked_fill_(
            (self.src_step[:, None, :n] > q_step[:, None])[:, None], float("-inf")
        )
        if self._score_buf is None:
            most = B * H * self._q_window * self.capacity  # one layer's scores at the most queries and slots
            self._score_group = max(1, min(L, 2**21 // most))
            self._score_buf = torch.empty(self._score_group * most, device=self.k.device, dtype=self.k.dtype)
        q = self._q[:, :, :, :m].mul_(1 / math.sqrt(Dh))  # the stored queries are not needed again
        paid = torch.zeros(B, n, device=self.k.device, dtype=self.k.dtype)
        for first in range(0, L, self._score_group):
            g = min(L, first + self._score_group) - first
            logits = self._score_buf[: g * B * H * m * n].view(g, B, H, m, n)
            for i in range(g):  # per layer: a product over several layers at once copies its operands
                torch.matmul(q[first + i], self.k[first + i, :, :, :n].transpose(-2, -1), out=logits[i])
            logits.add_(unseen)
            attn = torch.softmax(logits, -1, out=logits)  # over the keys each query saw
            paid += attn.view(g, B, H * m, n).sum(2).sum(0)  # (B, n)
        self.scores[:, :n] += paid / (H * L)

    def _fold_weights(self) -> None:
        """Eager scores: add the weights pending since the last fold (mean over heads and layers) to
        `scores`, and clear them. Every pending weight is on a slot whose token is still there: a slide
        or a compaction folds first."""
        if self._n_q == 0:
            return
        self._n_q = 0
        B, H = self.scores.shape[0], self._acc.shape[0] // self.scores.shape[0]
        acc = self._acc.view(B, H, self.capacity)
        self.scores += acc.sum(1).div_(H * self.n_layer)
        acc.zero_()

    def observe(self, layer: int, attn: torch.Tensor) -> None:
        """Accumulate attention (B, H, 1, n) that a caller computed itself into per-slot scores."""
        if self.scores is not None:
            self.scores[:, : self.n] += attn[:, :, 0, : self.n].mean(1) / self.n_layer

    def set_meta(self, reward: torch.Tensor, episode: torch.Tensor, step: torch.Tensor) -> None:
        """Record what the newest token is (each (B,)): the reward it carries, its episode, its step."""
        for name, value in zip(("reward", "episode", "step"), (reward, episode, step)):
            self.meta[name][:, self._slot] = value

    def ordered_meta(self) -> HistoryMeta | None:
        """`HistoryMeta` of the valid slots (B, n) in temporal order, or None when not tracked."""
        if self.meta is None:
            return None
        if self._in_order:
            return HistoryMeta(*(self.meta[f][:, : self.n] for f in HistoryMeta._fields))
        idx = self.order()
        return HistoryMeta(*(self.meta[f][:, : self.n].gather(1, idx) for f in HistoryMeta._fields))

    def _merged_meta(self, assign: torch.Tensor, n_out: int) -> HistoryMeta | None:
        """Meta of the slots a plan produces, computed before the plan moves anything."""
        return merge_meta(self.ordered_meta(), assign, n_out) if self.meta is not None else None

    def _write_meta(self, merged: HistoryMeta | None, n_out: int) -> None:
        if merged is not None:
            for f in HistoryMeta._fields:
                self.meta[f][:, :n_out] = getattr(merged, f)

    @property
    def newest_slot(self) -> int:
        return self._slot

    def order(self) -> torch.Tensor:
        """(B, n) slot indices in temporal order, oldest first (kept until a step or compaction: a
        compaction reads it for the scores and again for the plan)."""
        if self._in_order:
            return torch.arange(self.n, device=self.pos.device).expand(self.pos.shape[0], self.n)
        if self._order is None or self._order[0] != (self.n_added, self.n):
            self._order = ((self.n_added, self.n), self.pos[:, : self.n].argsort(dim=1))
        return self._order[1]

    def ordered_scores(self) -> torch.Tensor | None:
        """Accumulated scores (B, n) in temporal order, or None when not tracked."""
        if self.scores is None:
            return None
        self._flush_scores()
        if self._in_order:
            return self.scores[:, : self.n]
        return self.scores[:, : self.n].gather(1, self.order())

    def _take(self, t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(L, B, H, capacity, Dh) at per-sequence slots (B, m) -> (L, B, H, m, Dh).

        Advanced indexing copies whole Dh rows; `gather` with an expanded index is ~1.7x slower on CPU.
        """
        rows = torch.arange(t.shape[1], device=t.device)[:, None]
        return t[:, rows, :, slots].permute(2, 0, 3, 1, 4)  # indexing puts the (B, m) dims first

    def temporal(self) -> dict:
        """Valid slots in temporal order: k, v (L, B, H, n, Dh), pos, src_step, scores (B, n).
        Views of the cache while it is in order (no slide since the last compaction), copies otherwise."""
        n = self.n
        if self._in_order:
            return {"k": self.k[:, :, :, :n], "v": self.v[:, :, :, :n], "pos": self.pos[:, :n],
                    "src_step": self.src_step[:, :n], "scores": self.ordered_scores()}  # fmt: skip
        idx = self.order()
        return {
            "k": self._take(self.k, idx),
            "v": self._take(self.v, idx),
            "pos": self.pos[:, :n].gather(1, idx),
            "src_step": self.src_step[:, :n].gather(1, idx),
            "scores": self.ordered_scores(),
        }

    def apply_plan(self, assign: torch.Tensor, weight: torch.Tensor, n_out: int) -> None:
        """Compact the cache to `n_out` tokens.

        assign : (B, n) long, for each token in temporal order its output slot in [0, n_out), or -1 (dropped)
        weight : (B, n) merge weight of each token inside its output slot (ignored for dropped tokens)

        Output slot j is the weighted mean of its tokens' keys and values, each key first rotated to
        the slot's new position; positions become contiguous, ending at the newest token's.
        Scores of merged tokens add up, so total attention mass is conserved.
        """
        if self.scores is not None:
            self._flush_scores()
        memo = self._layout
        if memo is not None and memo.n == self.n and memo.n_out == n_out and self._in_order and torch.equal(memo.assign, assign):
            merged = self._merged_meta(assign, n_out)  # before anything moves
            self._merge_in_place(memo, weight)  # the plan of the last compaction again (fixed_window, pooling)
            self._write_meta(merged, n_out)
            return
        keep = assign >= 0
        if bool((keep.sum(1) == n_out).all()):  # every slot holds exactly one token: a pure selection
            self._apply_selection(assign, n_out)
        else:
            self._apply_merge(assign, weight, keep, n_out)

    def _buffer(self, *shape: int) -> torch.Tensor:
        """Contiguous work memory of `shape`, at most as large as the cache's keys and values together,
        reused: compaction allocates no large tensor (on a busy machine a fresh 10 MB tensor costs more
        in page faults than the arithmetic on it)."""
        if self._scratch is None:
            self._scratch = torch.empty(self.kv.numel(), device=self.k.device, dtype=self.k.dtype)
        return self._scratch[: math.prod(shape)].view(shape)

    def _rotation(self, delta: torch.Tensor) -> torch.Tensor:
        """Complex factors (..., Dh/2) of integer rotations `delta` (...,) (`rope_pairs`), looked up in a
        table of the same float64 angles as `rope_cos_sin` (one `index_select`, ~3x cheaper on CPU
        than advanced indexing, instead of computing angles); a negative delta is computed directly."""
        lo, hi = (int(x) for x in torch.aminmax(delta))
        if lo < 0:
            return rope_pairs(*rope_cos_sin(delta, self.head_size, self.rope_base))
        table = self._qkv_table(hi)[:, 0, 0, 0]  # (P, Dh/2)
        return table.index_select(0, delta.reshape(-1)).view(*delta.shape, table.shape[-1])

    def _row_offsets(self) -> torch.Tensor:
        """(L*2, B, H): the row of slot 0 of each (layer, key/value, sequence, head) in `kv.view(-1, Dh)`.
        Keys and values move as whole rows of Dh through such flat row indices: one `index_select` or
        `index_copy_` for the whole cache, where advanced indexing over the non-adjacent sequence and
        slot dimensions is ~10x slower on CPU."""
        if self._rows is None:
            L, two, B, H, C, _ = self.kv.shape
            self._rows = (torch.arange(L * two * B * H, device=self.kv.device) * C).view(L * two, B, H)
        return self._rows

    def _slot_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat row indices of slots (m,) in every layer, key/value, sequence and head, in that order
        ((L*2*B*H*m,): a (L, 2, B, H, m, Dh) block once gathered)."""
        return (self._row_offsets().view(-1, 1) + slots).view(-1)

    def _move(self, rows: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy the token in slot `src` to slot `dst` of sequence `rows` (each (m,), dst and src disjoint):
        its keys and values in every layer and head (as flat rows, see `_row_offsets`), and every
        per-slot buffer."""
        base = self._row_offsets()[:, rows]  # (L*2, m, H)
        flat = self.kv.view(-1, self.kv.shape[-1])
        flat.index_copy_(0, (base + dst[:, None]).view(-1), flat.index_select(0, (base + src[:, None]).view(-1)))
        extra = ((self.scores,) if self.scores is not None else ()) + (tuple(self.meta.values()) if self.meta is not None else ())
        C = self.capacity
        d, s_ = rows * C + dst, rows * C + src
        for buf in (self.pos, self.src_step) + extra:
            fb = buf.view(-1)
            fb.index_copy_(0, d, fb.index_select(0, s_))

    def _new_positions(self, n_out: int) -> torch.Tensor:
        """Rotary positions of n_out compacted tokens: contiguous, ending at the newest token's."""
        return self.n_added - n_out + torch.arange(n_out, device=self.pos.device)

    def _finish(self, n_out: int, in_order: bool = True) -> None:
        if in_order:
            self.pos[:, :n_out] = self._new_positions(n_out)
        self.pos[:, n_out:] = -1
        self.src_step[:, n_out:] = -1
        if self.scores is not None:
            self.scores[:, n_out:] = 0.0
        if self.valid is not None:
            self.valid[..., n_out:] = float("-inf")
        self.n, self._oldest, self._in_order, self._order = n_out, 0, in_order, None

    def _apply_merge(self, assign: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, n_out: int) -> None:
        """`apply_plan` in general: every token rotated, weighed and summed into its slot."""
        B, n = assign.shape
        a = assign[0]
        merged = self._merged_meta(assign, n_out)
        if self._in_order and bool((assign == a).all()) and bool((a[keep[0]].diff() >= 0).all()):
            self._layout = self._merge_layout(assign, keep, n_out)
            self._merge_in_place(self._layout, weight)
            self._write_meta(merged, n_out)
            return
        t = self.temporal()
        tgt = assign.clamp(min=0)
        w = torch.where(keep, weight, torch.zeros_like(weight)).to(self.k.dtype)  # (B, n)
        new_pos = self._new_positions(n_out)  # (n_out,)
        cos, sin = rope_cos_sin(new_pos[tgt] - t["pos"], self.head_size, self.rope_base)  # (B, n, Dh/2)
        k_rot = rotate_pairs(t["k"], rope_pairs(cos, sin)[None, :, None])  # (L, B, H, n, Dh)
        L, _, H, _, Dh = k_rot.shape
        idx = tgt.view(1, B, 1, n, 1).expand(L, B, H, n, Dh)
        wk = w.view(1, B, 1, n, 1)
        den = self._denominator(tgt, w, n_out)
        new_k = torch.zeros(L, B, H, n_out, Dh, dtype=self.k.dtype, device=self.k.device).scatter_add_(3, idx, k_rot * wk) / den
        new_v = torch.zeros_like(new_k).scatter_add_(3, idx, t["v"] * wk) / den
        src = torch.where(keep, t["src_step"], torch.full_like(t["src_step"], -1))
        new_src = torch.full((B, n_out), -1, dtype=torch.long, device=src.device).scatter_reduce_(1, tgt, src, "amax")
        if self.scores is not None:
            sc = torch.where(keep, t["scores"], torch.zeros_like(t["scores"]))
            self.scores[:, :n_out] = torch.zeros(B, n_out, device=sc.device).scatter_add_(1, tgt, sc)
        self.k[:, :, :, :n_out] = new_k  # written last: t[...] may be views of the cache
        self.v[:, :, :, :n_out] = new_v
        self.src_step[:, :n_out] = new_src
        self._write_meta(merged, n_out)
        self._finish(n_out)

    @staticmethod
    def _denominator(tgt: torch.Tensor, w: torch.Tensor, n_out: int) -> torch.Tensor:
        den = torch.zeros(tgt.shape[0], n_out, dtype=w.dtype, device=w.device).scatter_add_(1, tgt, w)  # (B, n_out)
        if (den <= 0).any():
            raise ValueError("compression plan leaves an output slot without a token of positive weight")
        return den.view(1, tgt.shape[0], 1, n_out, 1)

    def _merge_layout(self, assign: torch.Tensor, keep: torch.Tensor, n_out: int) -> MergeLayout:
        """What `_merge_in_place` needs of a plan that every sequence shares, on a cache in temporal order
        (so positions are contiguous, ending at the newest token's): everything but the weights, kept
        for the next compaction, which with a fixed-size cache usually brings the same plan."""
        B, n = keep.shape
        a = assign[0]
        first = keep[0].clone()
        first[1:] &= a[1:] != a[:-1]  # slots are contiguous runs of kept tokens
        others = (keep[0] & ~first).nonzero()[:, 0]  # (r,)
        members = torch.cat([first.nonzero()[:, 0], others])  # (m,) = n_out first members, then the others
        last = torch.zeros(n_out, dtype=torch.long, device=a.device).scatter_reduce_(  # each slot's newest member
            0, a.clamp(min=0), torch.where(keep[0], torch.arange(n, device=a.device), torch.zeros_like(a)), "amax"
        )
        # token j sits at position newest - (n - 1 - j) and moves to newest - (n_out - 1 - a_j)
        rot = self._rotation(n - n_out + a[members] - members)  # (m, Dh/2)
        return MergeLayout(assign.clone(), n, n_out, keep, a.clamp(min=0).expand(B, n), members, others, a[others], last,
                           self._slot_rows(members), rot)  # fmt: skip

    def _merge_in_place(self, lay: MergeLayout, weight: torch.Tensor) -> None:
        """`_apply_merge` for a plan shared by every sequence with slots in temporal order (fixed_window,
        pooling: the same groups, per-sequence weights) on a cache in temporal order, laid out by
        `_merge_layout`. Each slot's members are gathered once (the first member of each output slot,
        then the others), rotated to the slot's position and weighed by their share of its weight (both
        in one pass: the weights scale the rotation) straight into the front slots, the first members
        into [0, n_out) and the others just behind; then the others are added into their slots. About
        two passes over the kept keys and values, where rotating, weighing, gathering and normalising
        them one after the other took six; no large temporary tensors. A slot's source step is its
        newest member's (source steps grow along a cache in temporal order)."""
        keep, tgt, n, n_out = lay.keep, lay.tgt, lay.n, lay.n_out
        B = keep.shape[0]
        L, _, H, _, Dh = self.k.shape
        m = len(lay.members)
        w = torch.where(keep, weight, torch.zeros_like(weight)).to(self.k.dtype)  # (B, n)
        den = self._denominator(tgt, w, n_out).view(B, n_out)
        share = w / den.gather(1, tgt)  # (B, n) each token's share of its slot's weight (exactly 1 alone in it)
        wm = share[:, lay.members, None]  # (B, m, 1)
        src = self._buffer(L, 2, B, H, m, Dh)
        flat = self.kv.view(-1, Dh)  # whole rows of Dh, gathered through flat row indices (see `_row_offsets`)
        torch.index_select(flat, 0, lay.rows, out=src.view(-1, Dh))
        torch.mul(src[:, 1], wm.view(1, B, 1, m, 1), out=self.v[:, :, :, :m])
        rotate_pairs(src[:, 0], (lay.rot * wm)[:, None], out=self.k[:, :, :, :m])  # weighed rotation (B, 1, m, Dh/2)
        if m > n_out:
            kv = self.kv
            kv[:, :, :, :, :n_out].index_add_(4, lay.a_others, kv[:, :, :, :, n_out:m])
        self.src_step[:, :n_out] = self.src_step[:, :n].index_select(1, lay.last)
        if self.scores is not None:
            sc = torch.where(keep, self.scores[:, :n], torch.zeros_like(self.scores[:, :n]))
            self.scores[:, :n_out] = torch.zeros(B, n_out, device=sc.device).scatter_add_(1, tgt, sc)
        self._finish(n_out)

    def _apply_selection(self, assign: torch.Tensor, n_out: int) -> None:
        """`apply_plan` for a plan that only drops tokens (the kept ones in their temporal order, as
        `selection_plan` makes them), in place: a kept token in a slot at or past
        `n_out` moves into a dropped token's slot below it (the only data that moves: as many tokens as
        were dropped), then the kept keys are rotated in place to their new positions. Slots are then
        no longer in temporal order (`order()` sorts them)."""
        rank_slot = torch.empty_like(assign).scatter_(1, self.order(), assign)  # (B, n) output slot = rank among the kept, per slot
        keep_slot = rank_slot >= 0
        holes = (~keep_slot[:, :n_out]).nonzero()  # (m, 2) row, slot: dropped below n_out, row-major
        movers = keep_slot[:, n_out:].nonzero()  # (m, 2) row, slot - n_out: kept at or past n_out
        if len(holes):
            rows, dst, src = holes[:, 0], holes[:, 1], movers[:, 1] + n_out  # each row has as many of both
            self._move(rows, dst, src)
            rank_slot[rows, dst] = rank_slot[rows, src]
        new_pos = self.n_added - n_out + rank_slot[:, :n_out]  # (B, n_out)
        k = self.k[:, :, :, :n_out]
        rotate_pairs(k, self._rotation(new_pos - self.pos[:, :n_out])[:, None], out=k)  # in place, (B, 1, n_out, Dh/2) factors
        self.pos[:, :n_out] = new_pos
        # in temporal order if nothing moved on a cache that was (one out of order, its ring wrapped, can
        # keep exactly the tokens below n_out, in the order they are)
        self._finish(n_out, in_order=self._in_order and not len(holes))


class StreamingCache(KVCache):
    """StreamingLLM's rolling cache: the first `n_sink` tokens plus a ring of the newest
    `capacity - n_sink`, which the newest token overwrites; never compacted (see the module docstring
    for the rotary positions). `pos` holds each slot's rollout step (as `src_step`)."""

    def __init__(self, *args, n_sink: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 <= n_sink < self.capacity:
            raise ConfigError(f"n_sink must be in [0, {self.capacity - 1}] (below the capacity), got {n_sink}")
        self.n_sink = n_sink
        self._sink_k: torch.Tensor | None = None  # (L, B, H, n_sink, Dh) sink keys at their own positions

    def _next_slot(self) -> int:
        if self.n < self.capacity:
            return super()._next_slot()
        if self._n_q:
            self._flush_scores()
        self._in_order = False
        return self.n_sink + (self.n_added - self.n_sink) % (self.capacity - self.n_sink)

    def advance(self) -> int:
        pos = super().advance()
        shift = pos - self.capacity + 1  # how far the sinks move (position-in-cache)
        if shift > 0 and self.n_sink:
            if self._sink_k is None:
                self._sink_k = self.k[:, :, :, : self.n_sink].clone()
            rotate_pairs(self._sink_k, self._qkv_table(shift)[shift, 0], out=self.k[:, :, :, : self.n_sink])
        return pos

    def apply_plan(self, assign, weight, n_out):
        raise NotImplementedError("a streaming cache evicts as it goes; it takes no merge plans")
