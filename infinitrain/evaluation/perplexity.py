"""Token-level perplexity over whole long documents, streamed window by window through memory.

Besides the overall figure, the loss is kept per segment position (segment 0 = the document's first
N tokens): with a working memory the loss falls later in a book, because more of it has been read;
the memory-disabled baseline (gate forced to local attention) shows the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.documents import Document
from ..data.window import IGNORE_INDEX
from ..inference import DEFAULT_WINDOW_SEGMENTS, stream
from ..inference.stream import ProgressFn
from ..model import InfiniTransformer


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
                  window_segments: int = DEFAULT_WINDOW_SEGMENTS, use_memory: bool = True,
                  on_progress: ProgressFn | None = None) -> DocumentLoss:
    """Stream one document from an empty memory and sum its loss per segment."""
    device = model.embed_tokens.weight.device
    ids, labels = document.ids.to(device), document.labels().to(device)
    n = model.config.segment_len
    segments = -(-len(ids) // n)
    nll = torch.zeros(segments, device=device, dtype=torch.float64)
    count = torch.zeros(segments, device=device, dtype=torch.long)
    for out in stream(model, ids[None], window_segments=window_segments, use_memory=use_memory):
        targets = labels[out.tokens]
        losses = F.cross_entropy(out.logits[0].float(), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")
        segment = torch.arange(out.tokens.start, out.tokens.stop, device=device) // n
        nll.index_add_(0, segment, losses.double())
        count.index_add_(0, segment, (targets != IGNORE_INDEX).long())
        if on_progress is not None:
            on_progress(out.tokens.stop - out.tokens.start)
    return DocumentLoss(name, nll.tolist(), count.tolist())


@dataclass
class PerplexityResult:
    use_memory: bool
    documents: list[DocumentLoss] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.documents)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(sum(d.segment_nll) for d in self.documents) / self.tokens)

    def segment_curve(self) -> list[float]:
        """Mean loss (nats/token) at each segment position, over the documents that reach it."""
        length = max(len(d.segment_nll) for d in self.documents)
        nll, tokens = [0.0] * length, [0] * length
        for doc in self.documents:
            for i, (loss, count) in enumerate(zip(doc.segment_nll, doc.segment_tokens,
                                                  strict=True)):
                nll[i] += loss
                tokens[i] += count
        return [loss / count if count else math.nan for loss, count in zip(nll, tokens,
                                                                          strict=True)]

    def to_dict(self) -> dict:
        return {
            "use_memory": self.use_memory,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "segment_loss": self.segment_curve(),
            "documents": [{"name": d.name, "tokens": d.tokens, "perplexity": d.perplexity,
                           "segment_loss": [loss / count if count else None for loss, count
                                            in zip(d.segment_nll, d.segment_tokens, strict=True)]}
                          for d in self.documents],
        }


def evaluate_perplexity(model: InfiniTransformer, documents: Iterable[tuple[str, Document]], *,
                        window_segments: int = DEFAULT_WINDOW_SEGMENTS,
                        compare_no_memory: bool = False,
                        on_progress: ProgressFn | None = None) -> list[PerplexityResult]:
    """Perplexity with memory, and optionally of the same model with memory disabled."""
    results = [PerplexityResult(True)] + ([PerplexityResult(False)] if compare_no_memory else [])
    for name, document in documents:
        if document.num_targets == 0:
            continue
        for result in results:
            result.documents.append(document_loss(
                model, document, name, window_segments=window_segments,
                use_memory=result.use_memory, on_progress=on_progress))
    if not results[0].documents:
        raise ValueError("no document with at least one target token to score")
    return results
