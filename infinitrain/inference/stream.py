"""Streaming a token sequence of any length through the model, window by window.

A window is k whole segments (k trades speed for memory: activations scale with k·N, never with the
sequence). Windows start on segment boundaries, so each call runs the parallel whole-segment path;
the result does not depend on k because the model carries everything across calls in its state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import InfiniState, InfiniTransformer

DEFAULT_WINDOW_SEGMENTS = 4
"""Segments per prefill window: a few, so matmuls are large but activations stay small."""

ProgressFn = Callable[[int], None]
"""Called with the number of tokens a window just consumed."""


def window_slices(length: int, partial_len: int, segment_len: int,
                  window_segments: int) -> Iterator[slice]:
    """Slices of ``length`` tokens into windows of ``window_segments`` segments.

    ``partial_len`` tokens of the current segment are already in the state, so the first window is
    shortened by that much and every later window starts on a segment boundary.
    """
    if window_segments < 1:
        raise ValueError(f"window_segments = {window_segments}: must be ≥ 1")
    span = window_segments * segment_len
    start, end = 0, span - partial_len % segment_len
    while start < length:
        yield slice(start, min(end, length))
        start, end = end, end + span


@dataclass
class WindowOutput:
    tokens: slice
    """Which of the input positions this window covered."""
    logits: Tensor
    """[B, L, V] logits for the window's last ``logits_to_keep`` positions (all if 0)."""
    state: InfiniState
    """The state after the window."""


@torch.inference_mode()
def stream(model: InfiniTransformer, input_ids: Tensor, state: InfiniState | None = None, *,
           window_segments: int = DEFAULT_WINDOW_SEGMENTS, use_memory: bool = True,
           empty_memory: bool = False, logits_to_keep: int = 0) -> Iterator[WindowOutput]:
    """Run ``input_ids`` [B, T] through ``model`` window by window, carrying the state.

    ``empty_memory``: every segment reads an emptied memory (one segment per window), the
    ablation of what the memory holds; ``use_memory=False`` instead removes the memory and its
    gate, a model the training never saw."""
    if state is None:
        state = model.empty_state(input_ids.shape[0], input_ids.device)
    for piece in window_slices(input_ids.shape[1], state.partial_len, model.config.segment_len,
                               1 if empty_memory else window_segments):
        if empty_memory:
            state = state.without_memory()
        logits, state = model(input_ids[:, piece], state, use_memory=use_memory,
                              logits_to_keep=logits_to_keep)
        yield WindowOutput(piece, logits, state)


def prefill(model: InfiniTransformer, input_ids: Tensor, state: InfiniState | None = None, *,
            window_segments: int = DEFAULT_WINDOW_SEGMENTS, use_memory: bool = True,
            on_progress: ProgressFn | None = None) -> tuple[Tensor, InfiniState]:
    """Read ``input_ids`` [B, T ≥ 1] into the state; returns (last-position logits [B, V], state).

    Only the last position's logits are computed: reading 1M tokens of a 128K-vocabulary model
    needs no per-token logits.
    """
    if input_ids.shape[1] == 0:
        raise ValueError("nothing to prefill: the token sequence is empty")
    for out in stream(model, input_ids, state, window_segments=window_segments,
                      use_memory=use_memory, logits_to_keep=1):
        if on_progress is not None:
            on_progress(out.tokens.stop - out.tokens.start)
    return out.logits[:, -1], out.state
