"""Llama building blocks: RMSNorm, SwiGLU feed-forward, rotary position embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


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


def rope_frequencies(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """Inverse RoPE frequencies [head_dim / 2] in float32, with Llama-3 scaling when configured.

    Computed per call rather than kept in a buffer: a buffer would follow the model to bf16
    (rounding the angles) and stay empty on a model built on the meta device.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    if config.rope_scale_factor == 1.0:
        return inv_freq
    # Llama-3.1's rule, as transformers' `_compute_llama3_parameters`.
    wavelength = 2 * math.pi / inv_freq
    context = config.rope_original_context
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    scaled = torch.where(wavelength > context / low, inv_freq / config.rope_scale_factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / config.rope_scale_factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate x [..., L, H, d] by ``positions`` [L] (Llama's rotate-half convention)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, :]
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
