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


def rope_full(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., Dh/2) -> the full-width factors [cos, cos], [-sin, sin] (..., Dh) of `apply_rope_full`."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope_full(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """`apply_rope` by full-width factors from `rope_full`, bit for bit the same: x * [cos, cos] plus x
    with its halves swapped times [-sin, sin]. Four operations over whole rows instead of seven over
    half rows (a chunk, four products, a difference, a sum and a concatenation): on a CPU the cached
    step's rotation at 8 environments takes about half the time."""
    return (x * cos2).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin2))
