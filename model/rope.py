"""Rotary position helpers shared by the AD network and its key/value cache."""

from __future__ import annotations

import torch


def rope_cos_sin(pos: torch.Tensor, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles for integer positions `pos` (...,) -> cos, sin (..., head_size // 2), float32.

    Angles are computed in float64 so that large absolute step indices keep relative angles exact.
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64, device=pos.device) / head_size)
    ang = pos.to(torch.float64).unsqueeze(-1) * inv_freq
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, Dh) by angles cos/sin broadcastable to (..., T, Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def pair_order(head_size: int) -> torch.Tensor:
    """(head_size,) the head dimensions in pair order: each rotary pair (j, j + head_size/2) of
    `apply_rope` side by side, [0, h, 1, h + 1, ...]. A dot product is the same in either order, so
    the cached step keeps its queries and keys in pair order, where a rotation is one complex product."""
    return torch.arange(head_size).view(2, head_size // 2).t().reshape(-1)


def rope_pairs(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos, sin (..., Dh/2) -> complex rotation factors cos + i sin (..., Dh/2) for `rotate_pairs`."""
    return torch.complex(cos, sin)


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """x (..., Dh) in pair order -> its complex view (..., Dh/2): writing one writes the other."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def rotate_pairs(x: torch.Tensor, rot: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_rope` for x (..., Dh) in pair order (`pair_order`), by factors `rope_pairs` broadcastable
    to (..., Dh/2): one complex product (x1 + i x2)(cos + i sin), the same products x1 cos - x2 sin,
    x1 sin + x2 cos (equal to rounding, tested), where the half-split layout takes four passes and a
    copy. In place with `out=x`; `out` may be any tensor of x's shape in pair order."""
    if out is None:
        return torch.view_as_real(as_pairs(x) * rot).flatten(-2)
    torch.mul(as_pairs(x), rot, out=as_pairs(out))
    return out
