"""Compressive memory of Infini-attention (paper §2.1.2), the one implementation of it.

A memory rule says how keys and queries are mapped into the memory, how the memory is read and how
a segment is written into it: one :class:`MemoryRule` subclass each, registered by name in
:data:`RULES` (``model.memory_rule``). ``linear`` and ``delta`` are the paper's. ``deltanet`` is a
length-robust variant (not in the paper): unit-norm features, an unnormalised read σ̂(Q)M, and the
delta rule applied token by token inside each segment (DeltaNet's memory, computed exactly with one
triangular solve per segment). Writing what the memory already holds changes nothing, so a
repeated filler leaves the memory at a fixed point however long it runs, where the paper's ``z``
(and, under its delta rule, ``M``) keep growing and a needle's share of the read-out shrinks like
1/length. To add a rule: subclass :class:`MemoryRule` here, decorate it with :func:`register`, and
give the looped reference in ``tests/test_model_equivalence.py`` its equations.

A rule's methods are the plain math, in whatever precision they are given. The module functions
:func:`feature_map`, :func:`retrieve`, :func:`update` and :func:`scan` are what the model calls:
they take σ(Q), σ(K) and V already laid out per key/value head and compute in float32 with autocast
disabled, whatever the caller's precision: ``z`` is a running sum over every token read, which
bf16 stops growing near 766K tokens and fp16 overflows near 57K (docs/design.md §2).
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


class MemoryRule:
    """The paper's linear rule; subclasses change what differs. d_k = d_v = d below."""

    name = "linear"
    reads_norm = True
    """Whether the read divides by σ(Q)z (then z must stay positive: positive features only)."""
    takes_write_strength = False
    """Whether a token's write can be scaled by a learned strength β_t (``memory_write_gate``)."""

    def features(self, x: Tensor) -> Tensor:
        """σ(x) = ELU(x) + 1, strictly positive so σ(q)·z > 0 once anything has been written."""
        return F.elu(x) + 1.0

    def retrieve(self, sigma_q: Tensor, memory: Tensor, norm: Tensor) -> Tensor:
        """A_mem = σ(Q) M / (σ(Q) z); exactly 0 where nothing was written, never NaN.

        sigma_q [..., L, d_k], memory [..., d_k, d_v], norm [..., d_k] -> [..., L, d_v].
        """
        numerator = sigma_q @ memory
        denominator = sigma_q @ norm.unsqueeze(-1)
        written = denominator > 0
        safe = torch.where(written, denominator, torch.ones_like(denominator))
        return torch.where(written, numerator / safe, torch.zeros_like(numerator))

    def written_values(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
                       strength: Tensor | None) -> Tensor:
        """What is added along each key: M_s = M_{s-1} + σ(K)ᵀ · this. Linear: V itself."""
        return values

    def update(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
               strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write one whole segment into memory; returns (M_s, z_s).

        sigma_k [..., N, d_k], values [..., N, d_v], memory [..., d_k, d_v], norm [..., d_k];
        strength [..., N]: β_t per token (None: 1), for rules that take it.
        """
        written = self.written_values(sigma_k, values, memory, norm, strength)
        return memory + sigma_k.transpose(-1, -2) @ written, norm + sigma_k.sum(dim=-2)

    def flops_per_token(self, query_heads: int, kv_heads: int, head_dim: int,
                        segment_len: int) -> int:
        """Matmul FLOPs per token and memory layer: σ(Q)M for every query head, σ(Q)z where
        the rule reads z, σ(K)ᵀV and the z sum for every key/value head."""
        d = head_dim
        retrieve = query_heads * (2 * d * d + (2 * d if self.reads_norm else 0))
        return retrieve + kv_heads * (2 * d * d + d)


RULES: dict[str, MemoryRule] = {}
"""Every memory rule by name: what ``model.memory_rule`` may be."""

R = TypeVar("R", bound=type[MemoryRule])


def register(cls: R) -> R:
    RULES[cls.name] = cls()
    return cls


register(MemoryRule)


@register
class DeltaRule(MemoryRule):
    """The paper's delta rule: write only what the memory does not already return for each key,
    M += σ(K)ᵀ(V − σ(K)M / (σ(K)z))."""

    name = "delta"

    def written_values(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
                       strength: Tensor | None) -> Tensor:
        return values - self.retrieve(sigma_k, memory, norm)

    def flops_per_token(self, query_heads: int, kv_heads: int, head_dim: int,
                        segment_len: int) -> int:
        """+ σ(K)M and σ(K)z, the retrieval the write subtracts."""
        d = head_dim
        return (super().flops_per_token(query_heads, kv_heads, head_dim, segment_len)
                + kv_heads * (2 * d * d + 2 * d))


@register
class DeltaNetRule(MemoryRule):
    """DeltaNet's memory: unit-norm features, an unnormalised read σ̂(Q)M, and the delta rule
    token by token, M_t = M_{t-1} + β_t k_tᵀ(v_t − k_t M_{t-1}), computed for a whole segment at
    once: the written residuals U solve (I + diag(β) tril(K Kᵀ, −1)) U = diag(β)(V − K M_0) (the
    diagonal taken as 1, the upper part ignored), and M_N = M_0 + Kᵀ U. z is kept but not read."""

    name = "deltanet"
    reads_norm = False
    takes_write_strength = True

    def features(self, x: Tensor) -> Tensor:
        """σ(x) scaled to unit norm, which keeps each token's write a projection."""
        mapped = super().features(x)
        return mapped / mapped.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def retrieve(self, sigma_q: Tensor, memory: Tensor, norm: Tensor) -> Tensor:
        return sigma_q @ memory

    def written_values(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
                       strength: Tensor | None) -> Tensor:
        gram, residual = sigma_k @ sigma_k.transpose(-1, -2), values - sigma_k @ memory
        if strength is not None:
            gram, residual = strength[..., None] * gram, strength[..., None] * residual
        return torch.linalg.solve_triangular(gram, residual, upper=False, unitriangular=True)

    def flops_per_token(self, query_heads: int, kv_heads: int, head_dim: int,
                        segment_len: int) -> int:
        """+ σ(K)M_0, the full σ(K)σ(K)ᵀ as computed (2·N·d per token) and the unit-triangular
        solve ((N − 1)·d per token)."""
        d, n = head_dim, segment_len
        return (super().flops_per_token(query_heads, kv_heads, head_dim, segment_len)
                + kv_heads * (2 * d * d + 2 * n * d + (n - 1) * d))


def rule_named(name: str) -> MemoryRule:
    """The registered rule ``name`` (KeyError names the ones there are)."""
    try:
        return RULES[name]
    except KeyError:
        raise KeyError(f"no memory rule {name!r}; registered: {', '.join(RULES)}") from None


def feature_map(x: Tensor, rule: str) -> Tensor:
    """The rule's σ(x), in float32."""
    return rule_named(rule).features(x.float())


@float32
def retrieve(sigma_q: Tensor, memory: Tensor, norm: Tensor, rule: str) -> Tensor:
    """The rule's read of ``memory`` (see :meth:`MemoryRule.retrieve`), in float32."""
    return rule_named(rule).retrieve(sigma_q, memory, norm)


@float32
def update(sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor, rule: str,
           strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The rule's write of one whole segment (see :meth:`MemoryRule.update`), in float32."""
    return rule_named(rule).update(sigma_k, values, memory, norm, strength)


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
