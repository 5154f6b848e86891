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
        safe = torch.where(written, denominator, 1.0)
        return torch.where(written, numerator / safe, 0.0)

    def memories(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
                 reset: Tensor | None = None,
                 strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """M and z before each of S segments and after the last, from the state before the first.

        sigma_k [B, S, H, N, d_k], values [B, S, H, N, d_v], memory [B, H, d_k, d_v],
        norm [B, H, d_k]; reset [B, S] bool empties a stream's memory before that segment;
        strength [B, S, H, N]: β_t per token (None: 1), for rules that take it.
        Returns memories [B, S + 1, H, d_k, d_v] and norms [B, S + 1, H, d_k].

        Linear: M_s = M_{s-1} + σ(K)ᵀV needs no earlier state, so every segment's memory is one
        carried sum (:func:`carried_sums`): no loop over segments at all.
        """
        memories = carried_sums(memory, sigma_k.transpose(-1, -2) @ values, reset)
        return memories, self.norms(sigma_k, norm, reset)

    def norms(self, sigma_k: Tensor, norm: Tensor, reset: Tensor | None) -> Tensor:
        """z before each of S segments and after the last [B, S + 1, H, d_k]: z grows by Σσ(K)
        whatever a rule writes into M, so every rule carries it the same way."""
        return carried_sums(norm, sigma_k.sum(dim=-2), reset)

    def update(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
               strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write one whole segment into memory; returns (M_s, z_s).

        sigma_k [B, H, N, d_k], values [B, H, N, d_v], memory [B, H, d_k, d_v], norm [B, H, d_k];
        strength [B, H, N] or None. :meth:`memories` over one segment.
        """
        memories, norms = self.memories(
            sigma_k[:, None], values[:, None], memory, norm, None,
            None if strength is None else strength[:, None])
        return memories[:, -1].clone(), norms[:, -1].clone()

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

    def memories(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
                 reset: Tensor | None = None,
                 strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What a segment writes depends on the memory before it, so the segments are scanned;
        everything that does not is computed for all of them before the loop (z, which grows
        by Σσ(K) whatever M holds, and each key's 1 / σ(k)z), leaving one matmul, one fused
        multiply-subtract and one matmul-add per segment."""
        norms = self.norms(sigma_k, norm, reset)
        key_norms = sigma_k @ norms[:, :-1, ..., None]
        written = key_norms > 0
        inverse = torch.where(written, 1 / torch.where(written, key_norms, 1.0), 0.0)

        def step(memory: Tensor, keys: Tensor, values: Tensor, inverse: Tensor) -> Tensor:
            residual = torch.addcmul(values, keys @ memory, inverse, value=-1)
            return torch.baddbmm(memory.flatten(0, -3), keys.transpose(-1, -2).flatten(0, -3),
                                 residual.flatten(0, -3)).view_as(memory)

        return scanned(memory, step, reset, sigma_k, values, inverse), norms

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

    def memories(self, sigma_k: Tensor, values: Tensor, memory: Tensor, norm: Tensor,
                 reset: Tensor | None = None,
                 strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The residuals are linear in the memory before the segment: U = T⁻¹diag(β)V −
        T⁻¹diag(β)K · M_0 with T = I + diag(β) tril(KKᵀ, −1). Both solves run for every segment
        at once before the loop (one triangular solve with [V | K] as right-hand side), leaving
        two matmuls per segment."""
        d_v = values.shape[-1]
        gram = sigma_k @ sigma_k.transpose(-1, -2)
        right = torch.cat([values, sigma_k], dim=-1)
        if strength is not None:
            gram, right = strength[..., None] * gram, strength[..., None] * right
        solved = torch.linalg.solve_triangular(gram, right, upper=False, unitriangular=True)
        from_values, from_memory = solved[..., :d_v], solved[..., d_v:]

        def step(memory: Tensor, keys: Tensor, from_values: Tensor,
                 from_memory: Tensor) -> Tensor:
            return memory + keys.transpose(-1, -2) @ (from_values - from_memory @ memory)

        return (scanned(memory, step, reset, sigma_k, from_values, from_memory),
                self.norms(sigma_k, norm, reset))

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
    Returns (A_mem [B, S, H_kv, L_q, d_v], M_S, z_S). The rule computes the states before every
    segment (:meth:`MemoryRule.memories`); every segment's read is then one batched matmul.
    """
    math = rule_named(rule)
    memories, norms = math.memories(sigma_k, values, memory, norm, reset, strength)
    retrieved = math.retrieve(sigma_q, memories[:, :-1], norms[:, :-1])
    # Copies, so that the state carried on does not keep every segment's memory alive.
    return retrieved, memories[:, -1].clone(), norms[:, -1].clone()


def carried_sums(initial: Tensor, increments: Tensor, reset: Tensor | None) -> Tensor:
    """A running sum before each of S segments and after the last: initial [B, ...] plus the
    increments [B, S, ...] of the segments before, where reset [B, S] before a segment erases
    everything added before it. Returns [B, S + 1, ...], every state at once: a cumulative sum
    (the same additions, in the same order, as adding one segment at a time), or with resets a
    masked sum of the items (the initial value, then each increment) each state still holds,
    masked by selection so that a non-finite value a reset erased stays erased."""
    items = torch.cat([initial[:, None], increments], dim=1)
    if reset is None:
        return items.cumsum(dim=1)
    holds = _holds(reset)[(..., *[None] * (initial.dim() - 1))]
    return torch.where(holds, items[:, None], 0.0).sum(dim=2)


def _holds(reset: Tensor) -> Tensor:
    """[B, S + 1, S + 1] bool for reset [B, S]: whether the state before segment s (s = S:
    after the last) still holds item i (i = 0: the initial state; i ≥ 1: what segment i − 1
    wrote); it does when i ≤ s and no reset came at segments i … s."""
    segments = reset.shape[1]
    position = torch.arange(segments + 1, device=reset.device)
    resets = F.pad(reset, (0, 1)).int()
    before = resets.cumsum(dim=1)  # resets at segments 0 … s
    between = before[:, :, None] - before[:, None, :] + resets[:, None, :]  # at i … s
    return (position[:, None] >= position[None, :]) & (between == 0)


def scanned(memory: Tensor, step: Callable[..., Tensor], reset: Tensor | None,
            *per_segment: Tensor) -> Tensor:
    """M before each of S segments and after the last [B, S + 1, ...], from M before the first
    [B, ...] and ``step(M, *segment s of each per_segment tensor) -> M`` writing segment s;
    per_segment tensors are [B, S, ...]; reset [B, S] empties a stream's memory before that
    segment.

    The segments are split off once (``unbind``), not indexed inside the loop: the backward of
    an index is a zero tensor of the whole input with the one segment's gradient in it, S of
    them added up per input, which made the backward quadratic in the window's segments."""
    states = []
    for s, segment in enumerate(zip(*(t.unbind(1) for t in per_segment), strict=True)):
        if reset is not None:
            emptied = reset[:, s].view(-1, *[1] * (memory.dim() - 1))
            memory = torch.where(emptied, 0.0, memory)
        states.append(memory)
        memory = step(memory, *segment)
    states.append(memory)
    return torch.stack(states, dim=1)
