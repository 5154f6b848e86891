"""Document streams for streaming truncated BPTT (docs/design.md §3).

Each data-parallel rank holds B streams. A window is the next k segments of N tokens of every
stream. In ``document`` mode a stream reads whole documents one after another, each padded to a
segment boundary, and ``reset[b, s]`` marks the segment where a new document starts (its memory
starts empty). In ``concat`` mode documents are packed back to back, EOS-separated, and only the
very first window resets. When a rank's documents run out it reshuffles (seed + epoch) and goes on.

The streams' place in their data is a small dict of integers (`state_dict`), and every window
carries the state right after it in ``Window.position``: Lightning prefetches a batch, so the
trainer saves the position of the last window it consumed, not the iterator's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from .documents import Document
from .sources import DataSourceError, DocumentSource, Skipped
from .window import IGNORE_INDEX, WRITE_UNKNOWN, Window

STATE_VERSION = 1


@dataclass
class StreamConfig:
    """How a rank's documents become TBPTT windows."""

    streams: int = 8
    """B: document streams per data-parallel rank (the per-device batch size)."""
    segment_len: int = 2048
    """N: tokens per segment; must equal the model's segment_len."""
    segments_per_window: int = 16
    """k: segments per window, i.e. per optimizer step (the unrolled BPTT length is k·N)."""
    mode: Literal["document", "concat"] = "document"
    """'document': one document at a time per stream, memory reset at each; 'concat': documents
    packed back to back with EOS separators, memory never reset (short-document pretraining)."""
    seed: int = 0
    """Seed of the document order and of the mixture draws; together with rank and world size it
    fixes every window."""
    windows_per_step: int = 1
    """Windows per optimizer step (gradient accumulation), to place windows in a curriculum."""
    max_document_tokens: int | None = None
    """'document' mode: a longer document is read as independent pieces of this many tokens (a
    multiple of segment_len), the memory emptied at each. None: whole documents."""

    def __post_init__(self) -> None:
        for name in ("streams", "segment_len", "segments_per_window", "windows_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        if self.mode not in ("document", "concat"):
            raise ValueError(f"mode = {self.mode!r}: must be 'document' or 'concat'")
        if self.seed < 0:
            raise ValueError(f"seed = {self.seed!r}: must be >= 0")
        if self.max_document_tokens is not None:
            if self.mode != "document":
                raise ValueError(f"max_document_tokens = {self.max_document_tokens}: only "
                                 "'document' mode empties the memory; remove it or use that mode")
            if self.max_document_tokens <= 0 or self.max_document_tokens % self.segment_len:
                raise ValueError(f"max_document_tokens = {self.max_document_tokens!r}: must be a "
                                 f"positive multiple of segment_len = {self.segment_len}")

    @property
    def window_len(self) -> int:
        """k·N tokens per stream per window."""
        return self.segment_len * self.segments_per_window


class _Lookahead:
    """Runs an iterator up to ``depth`` items ahead in a worker thread.

    The next documents of a source are tokenized while the model trains on the current windows
    (the tokenizer releases the GIL). One worker thread keeps the order, and so determinism.
    """

    def __init__(self, iterator: Iterator[Document | Skipped], worker: ThreadPoolExecutor,
                 depth: int) -> None:
        self.iterator, self.worker = iterator, worker
        self.pending = deque(worker.submit(next, iterator, None) for _ in range(depth))

    def __next__(self) -> Document | Skipped | None:
        """The next item, or None at the end of the epoch."""
        item = self.pending.popleft().result()
        if item is not None:
            self.pending.append(self.worker.submit(next, self.iterator, None))
        return item


@dataclass
class _Cursor:
    """Where a rank is in one source: epoch, position in the epoch's order, documents kept."""

    epoch: int = 0
    position: int = 0
    kept: int = 0
    reader: _Lookahead | None = None
    last_skip: str = ""


@dataclass
class _Slot:
    """One stream's current document: where it came from and how far it has been read."""

    ref: tuple[int, int, int]
    """(source index, epoch, position) of the document, enough to fetch it again."""
    document: Document
    labels: Tensor
    offset: int = 0


class DocumentStreams(IterableDataset):
    """Endless iterator of `Window`s for one data-parallel rank.

    Wrap it in ``DataLoader(streams, batch_size=None, num_workers=0)``: it batches itself, and its
    position lives in this process.
    """

    def __init__(self, sources: Sequence[DocumentSource], config: StreamConfig, pad_id: int,
                 rank: int = 0, world_size: int = 1,
                 active: Callable[[int, int], bool] | None = None) -> None:
        """``active(source_index, step)``: whether a document started at optimizer step ``step``
        may come from that source (a curriculum); None: every source always."""
        if not sources:
            raise DataSourceError("no data sources configured")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: must be in [0, world_size = {world_size})")
        self.sources = list(sources)
        self.config = config
        self.pad_id = pad_id
        self.rank, self.world_size = rank, world_size
        self.active = active
        self.windows = 0
        self.draws = 0
        self.cursors = [_Cursor() for _ in self.sources]
        self.slots: list[_Slot | None] = [None] * config.streams
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def __iter__(self) -> Iterator[Window]:
        return self

    def __next__(self) -> Window:
        config = self.config
        size, length, n = config.streams, config.window_len, config.segment_len
        input_ids = torch.full((size, length), self.pad_id, dtype=torch.long)
        labels = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
        writes = torch.full((size, length), WRITE_UNKNOWN, dtype=torch.int8)
        reset = torch.zeros(size, config.segments_per_window, dtype=torch.bool)
        if config.mode == "concat" and self.windows == 0:
            reset[:, 0] = True
        for b in range(size):
            t = 0
            while t < length:
                slot = self.slots[b]
                if slot is None:
                    slot = self.slots[b] = self._start_document()
                piece = config.max_document_tokens or len(slot.document)
                if config.mode == "document" and slot.offset % piece == 0:
                    reset[b, t // n] = True  # a document (or a piece of one) starts here
                take = min(length - t, len(slot.document) - slot.offset,
                           piece - slot.offset % piece)
                input_ids[b, t:t + take] = slot.document.ids[slot.offset:slot.offset + take]
                labels[b, t:t + take] = slot.labels[slot.offset:slot.offset + take]
                if slot.document.writes is not None:
                    writes[b, t:t + take] = slot.document.writes[slot.offset:slot.offset + take]
                t += take
                slot.offset += take
                if slot.offset == len(slot.document):
                    self.slots[b] = None
                    if config.mode == "document":  # pad to the segment boundary
                        t = math.ceil(t / n) * n
        self.windows += 1
        return Window(input_ids, labels, reset, position=self.state_dict(), write_targets=writes)

    def _draw_source(self) -> int:
        """Which source the next document comes from: a weighted draw over the sources active at
        this step, fixed by (seed, rank, n)."""
        step = self.windows // self.config.windows_per_step
        weights = np.array([source.weight if self.active is None or self.active(i, step) else 0.0
                            for i, source in enumerate(self.sources)])
        if not weights.any():
            raise DataSourceError(f"no data source is active at step {step}: every source's "
                                  "from_step/until_step excludes it")
        if np.count_nonzero(weights) == 1:
            return int(np.flatnonzero(weights)[0])
        rng = np.random.default_rng([self.config.seed, self.rank, self.draws])
        return int(rng.choice(len(self.sources), p=weights / weights.sum()))

    def _start_document(self) -> _Slot:
        index = self._draw_source()
        self.draws += 1
        source, cursor = self.sources[index], self.cursors[index]
        while True:
            if cursor.reader is None:
                documents = source.epoch(self.rank, self.world_size, cursor.epoch,
                                         self.config.seed, cursor.position)
                cursor.reader = _Lookahead(documents, self._worker, self.config.streams)
            item = next(cursor.reader)
            if item is None:  # end of this rank's share: next epoch, reshuffled
                self._check_epoch(index)
                cursor.epoch, cursor.position, cursor.kept, cursor.reader = \
                    cursor.epoch + 1, 0, 0, None
                continue
            ref = (index, cursor.epoch, cursor.position)
            cursor.position += 1
            if isinstance(item, Skipped):
                cursor.last_skip = item.reason
                continue
            cursor.kept += 1
            return _Slot(ref, item, item.labels())

    def _check_epoch(self, index: int) -> None:
        cursor, label = self.cursors[index], self.sources[index].label
        where = f"rank {self.rank} of {self.world_size}"
        if cursor.position == 0:
            raise DataSourceError(f"{label}: no documents for {where} (empty dataset, or fewer "
                                  "documents than ranks)")
        if cursor.kept == 0:
            raise DataSourceError(f"{label}: every one of the {cursor.position} documents of "
                                  f"{where} was skipped ({cursor.last_skip}); lower min_tokens "
                                  "or use longer documents")

    def state_dict(self) -> dict[str, Any]:
        """The streams' exact place in their data: a few integers per source and per stream."""
        config = self.config
        return {
            "version": STATE_VERSION,
            "rank": self.rank, "world_size": self.world_size, "streams": config.streams,
            "segment_len": config.segment_len, "segments_per_window": config.segments_per_window,
            "mode": config.mode, "seed": config.seed, "sources": len(self.sources),
            "max_document_tokens": config.max_document_tokens,
            "windows": self.windows, "draws": self.draws,
            "cursors": [[c.epoch, c.position, c.kept] for c in self.cursors],
            "slots": [None if s is None else [*s.ref, s.offset] for s in self.slots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the window whose position ``state`` is."""
        expected = self.state_dict()
        for key in ("version", "rank", "world_size", "streams", "segment_len",
                    "segments_per_window", "mode", "seed", "sources", "max_document_tokens"):
            if state.get(key) != expected[key]:
                raise ValueError(f"data position saved with {key} = {state.get(key)!r}, this run "
                                 f"has {expected[key]!r}: the streams cannot continue exactly")
        self.windows, self.draws = state["windows"], state["draws"]
        self.cursors = [_Cursor(*cursor) for cursor in state["cursors"]]
        self.slots = [None if s is None else self._fetch(*s) for s in state["slots"]]

    def _fetch(self, index: int, epoch: int, position: int, offset: int) -> _Slot:
        """A stream's document again, from its reference (re-tokenized, not stored)."""
        item = next(self.sources[index].epoch(self.rank, self.world_size, epoch,
                                              self.config.seed, position), None)
        if not isinstance(item, Document) or offset > len(item):
            raise ValueError(f"data position refers to document {position} of epoch {epoch} of "
                             f"{self.sources[index].label}, which is not there any more: has "
                             "the data changed since it was saved?")
        return _Slot((index, epoch, position), item, item.labels(), offset)
