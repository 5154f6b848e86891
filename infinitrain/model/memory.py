"""Compressive memory of Infini-attention (paper §2.1.2), the one implementation of it.

Rules: ``linear`` and ``delta`` are the paper's. ``deltanet`` is a length-robust variant (not in the
paper): unit-norm features, an unnormalised read σ̂(Q)M, and the delta rule applied token by token
inside each segment (DeltaNet's memory, computed exactly with one triangular solve per segment).
Writing what the memory already holds changes nothing, so a repeated filler leaves the memory at a
fixed point however long it runs, where the paper's ``z`` (and, under its delta rule, ``M``) keep
growing and a needle's share of the read-out shrinks like 1/length.

All functions take σ(Q), σ(K) and V already laid out per key/value head and compute in float32 with
autocast disabled, whatever the caller's precision: ``z`` is a running sum over every token read,
which bf16 stops growing near 766K tokens and fp16 overflows near 57K (docs/design.md §2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

F_ = TypeVar("F_", bound=Callable)


def float32(fn: F_) -> F_:
    """Run ``fn`` with autocast off and every tensor argument in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        args = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def feature_map(x: Tensor, rule: str, features: str = "elu") -> Tensor:
    """σ(x) = ELU(x) + 1, strictly positive so σ(q)·z > 0 once anything has been written;
    scaled to unit norm for ``deltanet``, which keeps each token's write a projection.
    ``features='signed'`` (``deltanet`` only) skips the ELU: x / ‖x‖."""
    mapped = x.float() if features == "signed" else F.elu(x.float()) + 1.0
    if rule == "deltanet":
        return mapped / mapped.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return mapped


@float32
def retrieve(sigma_q: Tensor, memory: Tensor, norm: Tensor, rule: str) -> Tensor:
    """A_mem = σ(Q) M / (σ(Q) z) (σ̂(Q) M for ``deltanet``); exactly 0 where nothing was written,
    never NaN.

    sigma_q [..., L, d_k], memory [..., d_k, d_v], norm [..., d_k] -> [..., L, d_v].
    """
    if rule == "deltanet":
        return sigma_q @ memory
    numerator = sigma_q @ memory
    denominator = sigma_q @ norm.unsqueeze(-1)
    written = denominator > 0
    safe = torch.where(written, denominator, torch.ones_like(denominator))
    return torch.where(written, numerator / safe, torch.zeros_like(numerator))


@float32
def update(sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor, rule: str,
           strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Write one whole segment into memory; returns (M_s, z_s).

    sigma_k [..., N, d_k], values [..., N, d_v], memory [..., d_k, d_v], norm [..., d_k];
    strength [..., N] in (0, 1), ``deltanet`` only: β_t per token (None: 1).
    """
    if rule == "deltanet":
        # Token by token, M_t = M_{t-1} + β_t k_tᵀ(v_t − k_t M_{t-1}). Unrolled, the written
        # residuals U solve (I + diag(β) tril(K Kᵀ, -1)) U = diag(β)(V − K M_0) (the diagonal is
        # taken as 1, the upper part ignored), and M_N = M_0 + Kᵀ U.
        gram, residual = sigma_k @ sigma_k.transpose(-1, -2), values - sigma_k @ memory
        if strength is not None:
            gram, residual = strength[..., None] * gram, strength[..., None] * residual
        values = torch.linalg.solve_triangular(gram, residual, upper=False, unitriangular=True)
    elif rule == "delta":
        values = values - retrieve(sigma_k, memory, norm, rule)
    return memory + sigma_k.transpose(-1, -2) @ values, norm + sigma_k.sum(dim=-2)


@float32
def scan(sigma_q: Tensor, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
         rule: str, reset: Tensor | None = None,
         strength: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Retrieve-then-update over S consecutive whole segments.

    sigma_q [B, S, H_kv, L_q, d_k] (the query heads of a group stacked along L_q),
    sigma_k [B, S, H_kv, N, d_k], values [B, S, H_kv, N, d_v], memory/norm the state before the
    first segment, reset [B, S] bool empties a stream's memory before that segment, strength
    [B, S, H_kv, N] the write strengths (see :func:`update`).
    Returns (A_mem [B, S, H_kv, L_q, d_v], M_S, z_S).
    """
    retrieved = []
    for s in range(sigma_q.shape[1]):
        if reset is not None:
            keep = ~reset[:, s, None, None]
            memory = torch.where(keep[..., None], memory, torch.zeros_like(memory))
            norm = torch.where(keep, norm, torch.zeros_like(norm))
        retrieved.append(retrieve(sigma_q[:, s], memory, norm, rule))
        memory, norm = update(sigma_k[:, s], values[:, s], memory, norm, rule,
                              None if strength is None else strength[:, s])
    return torch.stack(retrieved, dim=1), memory, norm
