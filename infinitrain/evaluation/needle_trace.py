"""How much of a passkey needle survives in the compressive memory as filler accumulates.

A passkey prompt and its twin, identical except that the needle's tokens are replaced by as many
filler tokens, are streamed side by side (one batch of two) segment by segment. Whatever differs
between their memories after the needle's segment is what the needle left there, so at every
segment boundary, per layer and key/value head:

* needle trace ‖M_with − M_without‖_F / ‖M_with‖_F: the needle's share of the memory. It is
  exactly 0 before the needle is written, and may exceed 1 where the twin's memory points
  elsewhere. Under the paper's ``linear`` rule filler adds to M, so the share falls like
  1/segments; a rule that holds a fact keeps it flat.
* memory size ‖M‖_F and ‖z‖: a read-out σ(Q)M/σ(Q)z whose numerator and denominator grow
  without bound dilutes every fact equally. ``deltanet`` still sums z but never reads it.
* relative change ‖M_s − M_{s−1}‖_F / ‖M_s‖_F over one segment: near 0, with ‖M‖ flat, means
  the memory has reached a fixed point under the repeated filler, so more filler cannot erase more
  of the needle. A memory that grows by the same amount every segment (``linear``) also shows a
  relative change falling like 1/segments, but with ‖M‖ growing like segments.

The head values are averaged over the key/value heads (the mean: every head's memory is read by
its query heads, none alone decides the answer); the largest head's trace is kept beside it, since
one head holding the needle may be enough. Each is then averaged over the samples (keys), aligned
on the segment that completes the needle. The twin shares every token before the needle, and the
two rows of the batch run the same kernels, so the trace before the needle is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.passkey import PasskeyGenerator, PasskeySample
from ..data.tokenizer import Tokenizer
from ..inference.stream import ProgressFn
from ..model import InfiniState, InfiniTransformer
from .passkey import prompt_seed

METRICS = ("trace", "memory_norm", "z_norm", "change")
"""Per-sample values, each [segments, layers, kv heads], in :class:`SampleTrace`."""


def report_points(count: int) -> list[int]:
    """Segments after the needle worth a table row: 0, 1, 4, 16, 64, … below ``count``, and the
    last one (``count - 1``)."""
    points, k = [0], 1
    while k < count:
        points.append(k)
        k *= 4
    if count - 1 not in points and count > 0:
        points.append(count - 1)
    return [p for p in points if p < count]


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (nothing written yet)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


@dataclass
class SampleTrace:
    """One prompt's measurements at every segment boundary, from the first segment on."""

    key: int
    needle_offset: int
    needle_len: int
    first_segment: int
    """Segment holding the needle's first token: boundaries before it have trace exactly 0."""
    needle_segment: int
    """Segment holding its last token: from this boundary on, the whole needle is in memory."""
    trace: Tensor
    """[segments, layers, kv heads] ‖M_with − M_without‖_F / ‖M_with‖_F."""
    memory_norm: Tensor
    """[segments, layers, kv heads] ‖M_with‖_F."""
    z_norm: Tensor
    """[segments, layers, kv heads] ‖z_with‖ (``deltanet`` keeps summing z but never reads it)."""
    change: Tensor
    """[segments, layers, kv heads] ‖M_s − M_{s−1}‖_F / ‖M_s‖_F of the prompt with the needle."""


def _memories(state: InfiniState) -> tuple[Tensor, Tensor]:
    """(M [layers, B, H_kv, d_k, d_v], z [layers, B, H_kv, d_k]) in float64."""
    return (torch.stack([layer.memory for layer in state.layers]).double(),
            torch.stack([layer.norm for layer in state.layers]).double())


def filler_segments(generator: PasskeyGenerator, length: int, segment_len: int) -> int:
    """Whole segments of a ``length``-token prompt that end before the question's line: the ones
    traced. The question's segment is the same in both prompts but is not filler, and a trailing
    partial segment is never written to memory."""
    return (length - len(generator.question) - len(generator.newline)) // segment_len


def checked_sample(generator: PasskeyGenerator, length: int, depth: float, seed: int,
                   segment_len: int) -> PasskeySample:
    """The prompt, or a ValueError if it cannot be traced: too short for the frame, or a needle
    that does not end in a segment of :func:`filler_segments`."""
    sample = generator.sample(length, depth, seed)
    if (sample.needle_offset + sample.needle_len - 1) // segment_len >= \
            filler_segments(generator, length, segment_len):
        raise ValueError(f"needle depth = {depth:g}: at {length} tokens the needle ends in the "
                         f"segment of {segment_len} tokens that holds the question, or a later "
                         "one; no filler follows it there; use a smaller depth")
    return sample


@torch.no_grad()
def trace_sample(model: InfiniTransformer, generator: PasskeyGenerator, length: int,
                 depth: float, seed: int, on_progress: ProgressFn | None = None) -> SampleTrace:
    """Stream one passkey prompt and its needle-less twin, measuring after every whole segment up
    to the question's (see :func:`filler_segments`).

    Segments are fed one model call each, the only way to see the memory between them; the state
    carries everything, so the memories are those a windowed prefill produces.
    """
    n = model.config.segment_len
    sample = checked_sample(generator, length, depth, seed, n)
    needle = slice(sample.needle_offset, sample.needle_offset + sample.needle_len)
    with_needle = sample.prompt_ids
    without = with_needle.clone()
    without[needle] = generator.filler(sample.needle_len)
    device = model.embed_tokens.weight.device
    ids = torch.stack([with_needle, without]).to(device)
    state = model.empty_state(2, device)
    previous = torch.zeros_like(_memories(state)[0][:, 0])
    rows: dict[str, list[Tensor]] = {name: [] for name in METRICS}
    segments = filler_segments(generator, length, n)
    for s in range(segments):
        _, state = model.hidden_states(ids[:, s * n:(s + 1) * n], state)
        memory, z = _memories(state)  # [layers, 2, H_kv, ...]
        size = memory[:, 0].flatten(-2).norm(dim=-1)
        rows["trace"].append(_ratio((memory[:, 0] - memory[:, 1]).flatten(-2).norm(dim=-1), size))
        rows["memory_norm"].append(size)
        rows["z_norm"].append(z[:, 0].norm(dim=-1))
        rows["change"].append(_ratio((memory[:, 0] - previous).flatten(-2).norm(dim=-1), size))
        previous = memory[:, 0]
        if on_progress is not None:
            on_progress(n)
    if on_progress is not None and length > segments * n:
        on_progress(length - segments * n)  # the question's segment and any partial one, unread
    return SampleTrace(sample.key, sample.needle_offset, sample.needle_len,
                       sample.needle_offset // n, (needle.stop - 1) // n,
                       **{name: torch.stack(values).cpu() for name, values in rows.items()})


@dataclass
class NeedleTraceResult:
    """Per layer, each metric by segments written after the needle's segment (0 = right after the
    needle's segment was written), averaged over samples; see the module docstring."""

    length: int
    depth: float
    segment_len: int
    memory_rule: str
    samples: list[SampleTrace]
    after: list[int]
    """Segments after the needle's segment, 0 … the most any sample has."""
    trace: list[list[float]]
    """[layer][after] needle trace, mean over kv heads and samples."""
    trace_max_head: list[list[float]]
    """[layer][after] needle trace of the kv head that holds most of it, mean over samples."""
    memory_norm: list[list[float]]
    """[layer][after] ‖M‖_F per kv head, mean over heads and samples."""
    z_norm: list[list[float]]
    """[layer][after] ‖z‖ per kv head, mean over heads and samples (unread by ``deltanet``)."""
    change: list[list[float]]
    """[layer][after] relative change of M over that segment, mean over heads and samples."""

    @property
    def n_layers(self) -> int:
        return len(self.trace)

    @classmethod
    def of(cls, samples: list[SampleTrace], length: int, depth: float,
           segment_len: int, memory_rule: str) -> NeedleTraceResult:
        """Align the samples on their needle's segment and average what they have in common."""
        count = max(s.trace.shape[0] - s.needle_segment for s in samples)
        layers = samples[0].trace.shape[1]

        def aligned(values: list[Tensor]) -> list[list[float]]:
            # [samples, after, layers], NaN where a sample has fewer segments after its needle.
            table = np.full((len(samples), count, layers), np.nan)
            for i, (sample, v) in enumerate(zip(samples, values, strict=True)):
                rows = v[sample.needle_segment:].numpy()
                table[i, :len(rows)] = rows
            return np.nanmean(table, axis=0).T.tolist()

        def mean_heads(name: str) -> list[list[float]]:
            return aligned([getattr(s, name).mean(dim=-1) for s in samples])

        return cls(length, depth, segment_len, memory_rule, samples, list(range(count)),
                   trace=mean_heads("trace"),
                   trace_max_head=aligned([s.trace.amax(dim=-1) for s in samples]),
                   memory_norm=mean_heads("memory_norm"), z_norm=mean_heads("z_norm"),
                   change=mean_heads("change"))

    def points(self) -> list[int]:
        """The ``after`` values shown in the table."""
        return report_points(len(self.after))

    def to_dict(self) -> dict:
        return {
            "head_aggregate": "mean over kv heads (trace_max_head: the largest head), then mean "
                              "over samples aligned on the needle's segment",
            "after_segments": self.after,
            "trace": self.trace,
            "trace_max_head": self.trace_max_head,
            "memory_norm": self.memory_norm,
            "z_norm": self.z_norm,
            "change": self.change,
            "samples": [{"key": s.key, "needle_offset": s.needle_offset,
                         "needle_len": s.needle_len, "first_segment": s.first_segment,
                         "needle_segment": s.needle_segment,
                         "trace_before_needle": float(s.trace[:s.first_segment].abs().sum())}
                        for s in self.samples],
        }


def needle_trace(model: InfiniTransformer, tokenizer: Tokenizer, length: int, depth: float,
                 samples: int, seed: int = 0,
                 on_progress: ProgressFn | None = None) -> NeedleTraceResult:
    """Trace ``samples`` needles (one key each) through ``length``-token prompts at ``depth``."""
    generator = PasskeyGenerator(tokenizer)
    # the keys `eval passkey --seed` scores at this length for its first depth
    traces = [trace_sample(model, generator, length, depth, prompt_seed(seed, length, 0, i),
                           on_progress) for i in range(samples)]
    config = model.config
    return NeedleTraceResult.of(traces, length, depth, config.segment_len, config.memory_rule)
