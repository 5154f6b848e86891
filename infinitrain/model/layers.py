"""Llama building blocks: RMSNorm, SwiGLU feed-forward, rotary position embedding."""

from __future__ import annotations

import functools
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


def rope_tables(config: ModelConfig, device: torch.device, first: int,
                stop: int) -> tuple[Tensor, Tensor]:
    """cos and sin [stop − first, 1, head_dim] of RoPE positions first … stop − 1, in float32.

    Every position a segment uses lies in −W … N − 1 (W = local_overlap, the context before the
    segment's first token), so one table per model shape and device serves every call: cached,
    rather than recomputed by each attention layer for its queries and again for its keys.
    Inside a compiled graph the table is computed in it, where the compiler folds it.
    """
    build = _rope_table if torch.compiler.is_compiling() else _cached_rope_table
    cos, sin = build(config, torch.device(device))
    rows = slice(first + config.local_overlap, stop + config.local_overlap)
    return cos[rows, None], sin[rows, None]


def _rope_table(config: ModelConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin [W + N, head_dim] of positions −W … N − 1. Built outside inference mode and
    autograd, so that a table first made while generating can serve training too."""
    with torch.inference_mode(False), torch.no_grad():
        positions = torch.arange(-config.local_overlap, config.segment_len, device=device,
                                 dtype=torch.float32)
        angles = positions[:, None] * rope_frequencies(config, device)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


_cached_rope_table = functools.lru_cache(maxsize=16)(_rope_table)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., L, H, d] by the angles of :func:`rope_tables` (Llama's rotate-half
    convention), in float32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
