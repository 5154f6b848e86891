"""Token-level perplexity over whole long documents, streamed window by window through memory.

Besides the overall figure, the loss is kept per segment position (segment 0 = the document's first
N tokens): with a working memory the loss falls later in a book, because more of it has been read;
two ablations show the difference: the memory emptied before every segment (same gates, nothing
retrieved: what the memory's content adds) and the memory disabled (memory and gate removed, local
attention alone: a model the training never saw, so its loss also counts the missing gate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F

from ..data.documents import Document
from ..data.window import IGNORE_INDEX
from ..inference import DEFAULT_WINDOW_SEGMENTS, stream
from ..inference.stream import ProgressFn
from ..model import InfiniTransformer

MEMORY_MODES = {"on": "", "empty": "empty memory", "off": "no memory"}
"""How a document is scored, and how tables name it: 'on', the model as trained; 'empty', the
memory emptied before every segment; 'off', memory and gate removed (local attention alone)."""


@dataclass
class DocumentLoss:
    name: str
    segment_nll: list[float]
    """Summed negative log-likelihood (nats) of the targets in each segment."""
    segment_tokens: list[int]
    """Targets in each segment."""

    @property
    def tokens(self) -> int:
        return sum(self.segment_tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.segment_nll) / self.tokens)


@torch.inference_mode()
def document_loss(model: InfiniTransformer, document: Document, name: str = "", *,
                  window_segments: int = DEFAULT_WINDOW_SEGMENTS, memory: str = "on",
                  on_progress: ProgressFn | None = None) -> DocumentLoss:
    """Stream one document from an empty memory and sum its loss per segment; ``memory`` is one
    of :data:`MEMORY_MODES`."""
    device = model.embed_tokens.weight.device
    ids, labels = document.ids.to(device), document.labels().to(device)
    n = model.config.segment_len
    segments = -(-len(ids) // n)
    nll = torch.zeros(segments, device=device, dtype=torch.float64)
    count = torch.zeros(segments, device=device, dtype=torch.long)
    for out in stream(model, ids[None], window_segments=window_segments,
                      use_memory=memory != "off", empty_memory=memory == "empty"):
        targets = labels[out.tokens]
        losses = F.cross_entropy(out.logits[0].float(), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")
        segment = torch.arange(out.tokens.start, out.tokens.stop, device=device) // n
        nll.index_add_(0, segment, losses.double())
        count.index_add_(0, segment, (targets != IGNORE_INDEX).long())
        if on_progress is not None:
            on_progress(out.tokens.stop - out.tokens.start)
    return DocumentLoss(name, nll.tolist(), count.tolist())


def doubling_ranges(length: int, first: int) -> list[range]:
    """Token positions 0..length-1 cut at first, 2·first, 4·first, …: rows for a curve whose
    interesting changes (how much has been read) are multiplicative."""
    edges = [0]
    while edges[-1] < length:
        edges.append(min(length, max(first, 2 * edges[-1])))
    return [range(a, b) for a, b in pairwise(edges)]


def position_ranges(results: list[PerplexityResult]) -> list[range]:
    """The doubling token ranges by which ``results`` (possibly of models with different segment
    lengths) are compared: cut on every model's segment boundaries, out to the longest document."""
    first = math.lcm(*(r.segment_len for r in results))
    return doubling_ranges(max(r.longest for r in results), first)


@dataclass
class PerplexityResult:
    memory: str
    """One of :data:`MEMORY_MODES`."""
    segment_len: int
    """N of the model scored: segment i holds tokens [i·N, (i+1)·N) of each document."""
    model: str = ""
    """Which model, when several are compared (empty: the only one)."""
    documents: list[DocumentLoss] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How tables and plots name this result: the model, and how its memory was scored."""
        parts = [self.model, MEMORY_MODES[self.memory]]
        return ", ".join(filter(None, parts)) or "memory"

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.documents)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(sum(d.segment_nll) for d in self.documents) / self.tokens)

    @property
    def longest(self) -> int:
        """Tokens of the longest document (positions reach up to it)."""
        return max(len(d.segment_nll) for d in self.documents) * self.segment_len

    def segment_curve(self) -> list[float]:
        """Mean loss (nats/token) at each segment position, over the documents that reach it."""
        return self.range_losses([range(i * self.segment_len, (i + 1) * self.segment_len)
                                  for i in range(self.longest // self.segment_len)])

    def range_losses(self, ranges: list[range]) -> list[float]:
        """Mean loss (nats/token) over the tokens at these positions, over all documents; every
        range starts and ends on a segment boundary (or at the longest document's end)."""
        n = self.segment_len
        losses = []
        for positions in ranges:
            if positions.start % n or (positions.stop % n and positions.stop < self.longest):
                raise ValueError(f"positions {positions.start}–{positions.stop}: not on this "
                                 f"model's segment boundaries (N = {n})")
            segments = range(positions.start // n, -(-positions.stop // n))
            nll = sum(d.segment_nll[i] for d in self.documents for i in segments
                      if i < len(d.segment_nll))
            count = sum(d.segment_tokens[i] for d in self.documents for i in segments
                        if i < len(d.segment_tokens))
            losses.append(nll / count if count else math.nan)
        return losses

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "memory": self.memory,
            "segment_len": self.segment_len,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "segment_loss": self.segment_curve(),
            "documents": [{"name": d.name, "tokens": d.tokens, "perplexity": d.perplexity,
                           "segment_loss": [loss / count if count else None for loss, count
                                            in zip(d.segment_nll, d.segment_tokens, strict=True)],
                           "segment_tokens": d.segment_tokens}
                          for d in self.documents],
        }


def evaluate_perplexity(model: InfiniTransformer, documents: Iterable[tuple[str, Document]], *,
                        window_segments: int = DEFAULT_WINDOW_SEGMENTS,
                        ablations: tuple[str, ...] = (), name: str = "",
                        on_progress: ProgressFn | None = None) -> list[PerplexityResult]:
    """Perplexity of the model, and of its ``ablations`` (``"empty"``, ``"off"``: see
    :data:`MEMORY_MODES`) on the same documents; ``name`` labels the results when several models
    are compared."""
    n = model.config.segment_len
    results = [PerplexityResult(memory, n, name) for memory in ("on", *ablations)]
    for document_name, document in documents:
        if document.num_targets == 0:
            continue
        for result in results:
            result.documents.append(document_loss(
                model, document, document_name, window_segments=window_segments,
                memory=result.memory, on_progress=on_progress))
    if not results[0].documents:
        raise ValueError("no document with at least one target token to score")
    return results
