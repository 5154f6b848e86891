"""Llama building blocks: RMSNorm, SwiGLU feed-forward, rotary position embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                           / head_dim)


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate x [..., L, H, d] by ``positions`` [L] (Llama's rotate-half convention).

    Frequencies are computed here, in float32, rather than kept in a buffer: a buffer would follow
    the model to bf16 (rounding the angles) and stay empty on a model built on the meta device.
    """
    inv_freq = rope_frequencies(x.shape[-1], theta, x.device)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, :]
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
