"""Infini-attention: causal softmax attention inside a segment, compressive memory across segments.

Incoming tokens are cut at segment boundaries given how much of the current segment the state
already holds: an optional head that completes a partial segment, a run of whole segments processed
all at once (the training path), and an optional tail that starts a new partial segment. Every piece
uses the same local attention and the same memory functions, so the output never depends on how a
stream is chunked.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import apply_rope, rope_tables
from .memory import feature_map, retrieve, scan, update
from .state import LayerState

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - exercised only where flash-attn is installed
    flash_attn_func = None


def local_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Causal attention where the L_q queries are the last L_q of the L_k key positions.

    q [b, L_q, H_q, d], k/v [b, L_k, H_kv, d] -> [b, L_q, H_q, d]. Query head h reads key/value
    head h // (H_q / H_kv), the grouping the memory uses too. key_mask [b, L_k] bool hides the
    keys where it is False from every query (an overlap context a reset made stale).
    """
    if (key_mask is None and flash_attn_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        return flash_attn_func(q, k, v, causal=True)  # bottom-right aligned causal mask
    q_len, k_len = q.shape[1], k.shape[1]
    if key_mask is None and q_len == k_len:
        mask, causal = None, True
    elif key_mask is None and q_len == 1:
        mask, causal = None, False
    else:
        key_pos = torch.arange(k_len, device=q.device)
        query_pos = torch.arange(k_len - q_len, k_len, device=q.device)
        mask, causal = key_pos[None, :] <= query_pos[:, None], False
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def with_context(keys: Tensor, values: Tensor, context_keys: Tensor, context_values: Tensor,
                 visible: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Prepend an overlap context [b, w, H_kv, d] to keys/values [b, L, H_kv, d], with the key
    mask to pass to :func:`local_attention` (None when every context key is visible). Without a
    context (w = 0) the inputs come back as they are.

    Compiled, the mask is always built: asking whether every key is visible reads a tensor's
    value, which split a compiled block in two graphs, and with the second one cached by an
    earlier run, torch 2.13 failed at the first step (an impossible shape)."""
    if visible.shape[1] == 0:
        return keys, values, None
    keys = torch.cat([context_keys, keys], dim=1)
    values = torch.cat([context_values, values], dim=1)
    if not torch.compiler.is_compiling() and bool(visible.all()):
        return keys, values, None
    rest = visible.new_ones(visible.shape[0], keys.shape[1] - visible.shape[1])
    return keys, values, torch.cat([visible, rest], dim=1)


def group_queries(x: Tensor, n_kv_heads: int) -> Tensor:
    """[B, S, L, H_q, d] -> [B, S, H_kv, G·L, d]: the G query heads of a group read one memory."""
    b, s, length, h_q, d = x.shape
    group = h_q // n_kv_heads
    x = x.view(b, s, length, n_kv_heads, group, d).permute(0, 1, 3, 4, 2, 5)
    return x.reshape(b, s, n_kv_heads, group * length, d)


def ungroup_queries(x: Tensor, length: int) -> Tensor:
    """Inverse of :func:`group_queries`: [B, S, H_kv, G·L, d] -> [B, S·L, H_q, d]."""
    b, s, h_kv, gl, d = x.shape
    group = gl // length
    x = x.view(b, s, h_kv, group, length, d).permute(0, 1, 4, 2, 3, 5)
    return x.reshape(b, s * length, h_kv * group, d)


def by_kv_head(x: Tensor, segments: int) -> Tensor:
    """[B, S·L, H_kv, d] -> [B, S, H_kv, L, d]."""
    b, t, h, d = x.shape
    return x.view(b, segments, t // segments, h, d).transpose(2, 3)


class InfiniAttention(nn.Module):
    def __init__(self, config: ModelConfig, has_memory: bool = True) -> None:
        super().__init__()
        self.config = config
        self.has_memory = has_memory
        """False: local attention only (below model.memory_from_layer); the state's memory stays
        empty and there is no gate."""
        d, h_q, h_kv = config.head_dim, config.n_heads, config.n_kv_heads
        self.q_proj = nn.Linear(config.d_model, h_q * d, bias=False)
        self.k_proj = nn.Linear(config.d_model, h_kv * d, bias=False)
        self.v_proj = nn.Linear(config.d_model, h_kv * d, bias=False)
        self.o_proj = nn.Linear(h_q * d, config.d_model, bias=False)
        if not has_memory:
            return
        self.gate = nn.Parameter(torch.full((h_q,), float(config.gate_init)))
        """β per query head: sigmoid(β) weighs memory against local attention."""
        if config.memory_write_gate:
            self.write_weight = nn.Parameter(torch.zeros(h_kv, d))
            self.write_bias = nn.Parameter(torch.full((h_kv,), float(config.write_gate_init)))
            """Write strength β_t = sigmoid or clamp of k_t·w + b per key/value head, from the
            token's own key."""
            self.write_gate_frozen = False
            """While True the gate's weights get a zero gradient (the same values): see
            :meth:`InfiniTransformer.freeze_write_gates`."""

    def forward(self, x: Tensor, state: LayerState, reset: Tensor | None = None,
                use_memory: bool = True,
                write_targets: Tensor | None = None) -> tuple[Tensor, LayerState, Tensor | None]:
        """(output, new state, write cost): the cost is :meth:`write_cost` of this chunk's keys
        (against ``write_targets`` [B, T] if given) while training with the write gate, else
        None."""
        b, t, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(b, t, cfg.n_heads, cfg.head_dim)
        k = self.k_proj(x).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        memory = self.has_memory and use_memory  # the memory-disabled baseline skips it all
        cost = (self.write_cost(k, write_targets)
                if self.training and memory and cfg.memory_write_gate else None)

        n = cfg.segment_len
        cached = state.keys.shape[1]
        head = min(t, n - cached) if cached else 0
        whole = (t - head) // n * n

        # reset has one column per segment *starting* in this chunk: the whole ones, then the tail.
        outputs = []
        if head:
            out, state = self._partial(q[:, :head], k[:, :head], v[:, :head], state, None,
                                       memory)
            outputs.append(out)
        if whole:
            piece = slice(head, head + whole)
            seg_reset = None if reset is None else reset[:, : whole // n]
            out, state = self._segments(q[:, piece], k[:, piece], v[:, piece], state, seg_reset,
                                        memory)
            outputs.append(out)
        if head + whole < t:
            tail = slice(head + whole, t)
            tail_reset = None if reset is None else reset[:, whole // n]
            out, state = self._partial(q[:, tail], k[:, tail], v[:, tail], state, tail_reset,
                                       memory)
            outputs.append(out)

        local, retrieved = (joined(parts) for parts in zip(*outputs, strict=True))
        if memory:
            g = torch.sigmoid(self.gate.float())[:, None]
            mixed = g * retrieved + (1 - g) * local  # float32 by promotion, without a copy
        else:
            mixed = local
        return self.o_proj(mixed.to(x.dtype).reshape(b, t, -1)), state, cost

    def features(self, x: Tensor) -> Tensor:
        """σ of queries or keys as this layer's memory reads and writes them."""
        return feature_map(x, self.config.memory_rule)

    def write_logits(self, k: Tensor) -> Tensor:
        """x_t = k_t·w + b [..., H_kv] for raw keys k [..., H_kv, d]."""
        weight, bias = self.write_weight.float(), self.write_bias.float()
        if self.write_gate_frozen:
            weight, bias = weight.detach() + 0 * weight, bias.detach() + 0 * bias
        return (k.float() * weight).sum(-1) + bias

    def write_strength(self, k: Tensor) -> Tensor | None:
        """β_t [..., H_kv] for raw keys k [..., H_kv, d]; None without the write gate."""
        if not self.config.memory_write_gate:
            return None
        logits = self.write_logits(k)
        if self.config.write_gate_activation == "clamp":
            return logits.clamp(0.0, 1.0)
        return torch.sigmoid(logits)

    def write_cost(self, k: Tensor, targets: Tensor | None = None) -> Tensor:
        """Without ``targets``: the mean write strength of keys k before clipping at 1 (sigmoid:
        β; clamp: relu(x)), the quantity ``optim.write_penalty`` charges: it still pushes down a
        token whose clamped β sits at 1, where the clamp passes no gradient.

        With ``targets`` [B, T] (1: write, 0: do not, negative: no target): the gate's mean
        error over the tokens with a target, what ``optim.write_target_until_step`` trains it
        on. Clamp: relu(1 − x) where a token should write and relu(x) where not, 0 once β is
        exactly right; sigmoid: binary cross-entropy."""
        logits = self.write_logits(k)
        clamp = self.config.write_gate_activation == "clamp"
        if targets is None:
            return F.relu(logits).mean() if clamp else torch.sigmoid(logits).mean()
        write = (targets > 0)[..., None].expand_as(logits)
        known = (targets >= 0)[..., None].expand_as(logits)
        if clamp:
            errors = torch.where(write, F.relu(1 - logits), F.relu(logits))
        else:
            errors = F.binary_cross_entropy_with_logits(logits, write.float(), reduction="none")
        return (errors * known).sum() / known.sum().clamp(min=1)

    def _local(self, q: Tensor, keys: Tensor, values: Tensor, context_keys: Tensor,
               context_values: Tensor, visible: Tensor) -> Tensor:
        """Local attention of one piece of every segment: queries q [b, L_q, H_q, d] are the
        last L_q of keys/values [b, L, H_kv, d] (keys before RoPE), which also read the overlap
        context [b, w, H_kv, d] where ``visible`` [b, w]. RoPE positions run from −w (the
        context) to L − 1, so a segment always starts at 0; the context's width is read from it,
        so it is w before the first segment is complete and model.local_overlap after."""
        w, total = context_keys.shape[1], keys.shape[1]
        key_cos, key_sin = rope_tables(self.config, q.device, -w, total)
        query_rows = slice(w + total - q.shape[1], None)
        seen_keys, seen_values, key_mask = with_context(keys, values, context_keys,
                                                        context_values, visible)
        return local_attention(apply_rope(q, key_cos[query_rows], key_sin[query_rows]),
                               apply_rope(seen_keys, key_cos, key_sin), seen_values, key_mask)

    def _segments(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState,
                  reset: Tensor | None,
                  memory: bool) -> tuple[tuple[Tensor, Tensor | None], LayerState]:
        """A run of S whole segments: local attention batched over segments, memory scanned
        (unless ``memory`` is False)."""
        b, t, h_q, d = q.shape
        n, w = self.config.segment_len, self.config.local_overlap
        s = t // n
        keys, values = k.view(b, s, n, -1, d), v.view(b, s, n, -1, d)
        context_keys, context_values, visible = segment_contexts(keys, values, state, reset, w)
        local = self._local(q.reshape(b * s, n, h_q, d), keys.flatten(0, 1), values.flatten(0, 1),
                            context_keys.flatten(0, 1), context_values.flatten(0, 1),
                            visible.flatten(0, 1)).reshape(b, t, h_q, d)
        new_state = closing_segment(state, keys[:, -1], values[:, -1], w)
        if not memory:
            return (local, None), new_state
        rule = self.config.memory_rule
        sigma_q = group_queries(self.features(q).view(b, s, n, h_q, d), k.shape[2])
        strength = self.write_strength(k)
        if strength is not None:
            strength = by_kv_head(strength.unsqueeze(-1), s).squeeze(-1)
        retrieved, matrix, norm = scan(
            sigma_q, by_kv_head(self.features(k), s), by_kv_head(v, s),
            state.memory, state.norm, rule, reset, strength,
        )
        return (local, ungroup_queries(retrieved, n)), replace(new_state, memory=matrix, norm=norm)

    def _partial(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState,
                 reset: Tensor | None,
                 memory: bool) -> tuple[tuple[Tensor, Tensor | None], LayerState]:
        """Tokens within one segment that the state already holds a prefix of (maybe empty).

        Queries attend to the overlap context and the cached prefix; the segment is folded into
        memory once complete (unless ``memory`` is False).
        """
        matrix, norm, visible = state.memory, state.norm, state.context_visible
        if reset is not None:
            matrix = torch.where(reset[:, None, None, None], 0.0, matrix)
            norm = torch.where(reset[:, None, None], 0.0, norm)
            visible = visible & ~reset[:, None]
        keys = torch.cat([state.keys, k], dim=1)
        values = torch.cat([state.values, v], dim=1)
        length = q.shape[1]
        local = self._local(q, keys, values, state.context_keys, state.context_values, visible)
        complete = keys.shape[1] == self.config.segment_len
        retrieved = None
        if memory:
            rule = self.config.memory_rule
            sigma_q = group_queries(self.features(q).unsqueeze(1), k.shape[2])
            retrieved = ungroup_queries(retrieve(sigma_q[:, 0], matrix, norm, rule).unsqueeze(1),
                                        length)
            if complete:
                strength = self.write_strength(keys)
                matrix, norm = update(self.features(keys).transpose(1, 2),
                                      values.transpose(1, 2), matrix, norm, rule,
                                      None if strength is None else strength.transpose(1, 2))
        new_state = LayerState(matrix, norm, keys, values, state.context_keys,
                               state.context_values, visible)
        if complete:
            new_state = replace(closing_segment(new_state, keys, values, self.config.local_overlap),
                                keys=keys[:, :0], values=values[:, :0])
        return (local, retrieved), new_state


def joined(pieces: tuple[Tensor | None, ...]) -> Tensor | None:
    """Consecutive pieces [B, T_i, ...] of one output as one along T (None when they are None:
    no memory was read). A lone piece, the whole-segment training path's, is returned as
    it is rather than copied."""
    if pieces[0] is None:
        return None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def closing_segment(state: LayerState, keys: Tensor, values: Tensor, overlap: int) -> LayerState:
    """``state`` once a segment with these keys/values [B, N, H_kv, d] is complete: its last W
    tokens become the overlap context the next segment reads, visible to every stream."""
    last = slice(keys.shape[1] - overlap, None)
    return replace(state, context_keys=keys[:, last], context_values=values[:, last],
                   context_visible=torch.ones(keys.shape[0], overlap, dtype=torch.bool,
                                              device=keys.device))


def segment_contexts(keys: Tensor, values: Tensor, state: LayerState, reset: Tensor | None,
                     overlap: int) -> tuple[Tensor, Tensor, Tensor]:
    """The overlap context of each of S whole segments: the last W keys/values of the segment
    before it (the state's for the first, left-padded while the stream has read less).

    keys/values [B, S, N, H_kv, d] -> context keys/values [B, S, W, H_kv, d] and visible
    [B, S, W] bool, False on padding and before a reset.
    """
    b, s, n = keys.shape[:3]
    missing = overlap - state.context_keys.shape[1]
    first_keys = F.pad(state.context_keys, (0, 0, 0, 0, missing, 0))
    first_values = F.pad(state.context_values, (0, 0, 0, 0, missing, 0))
    first_visible = F.pad(state.context_visible, (missing, 0), value=False)
    context_keys = torch.cat([first_keys[:, None], keys[:, :-1, n - overlap:]], dim=1)
    context_values = torch.cat([first_values[:, None], values[:, :-1, n - overlap:]], dim=1)
    visible = torch.cat([first_visible[:, None],
                         first_visible.new_ones(b, s - 1, overlap)], dim=1)
    if reset is not None:
        visible = visible & ~reset[:, :, None]
    return context_keys, context_values, visible
