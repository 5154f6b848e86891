"""A tokenized document and which of its tokens are prediction targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .window import IGNORE_INDEX


@dataclass(frozen=True)
class Document:
    """Token ids of one document (``BOS … EOS``) and its supervision.

    Supervision is per target token so that tasks can say what is learned: plain text supervises
    every token, a passkey example only the answer, a BookSum example only the summary (the book is
    read into memory without loss).
    """

    ids: Tensor
    """[L] int64 token ids, BOS first and EOS last."""
    target: Tensor | None = None
    """[L] bool: True where token i is a supervised target (predicted from the tokens before it);
    None: every token."""
    writes: Tensor | None = None
    """[L] bool: True where the memory should write token i (the fact a task will ask for, such
    as a passkey's needle), False where it should not; None: the document does not say. What
    ``optim.write_target_until_step`` trains the write gate towards."""

    def __post_init__(self) -> None:
        if self.ids.dim() != 1 or len(self.ids) < 2:
            raise ValueError(f"a document needs at least BOS and EOS, got ids of shape "
                             f"{tuple(self.ids.shape)}")
        for name in ("target", "writes"):
            mask = getattr(self, name)
            if mask is not None and mask.shape != self.ids.shape:
                raise ValueError(f"{name} mask shape {tuple(mask.shape)} does not match ids "
                                 f"shape {tuple(self.ids.shape)}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_ids(cls, ids: Sequence[int] | Tensor) -> Document:
        """A fully supervised document (language modelling)."""
        return cls(torch.as_tensor(ids, dtype=torch.long))

    @classmethod
    def from_parts(cls, parts: Sequence[tuple[Sequence[int] | Tensor, bool]],
                   writes: Tensor | None = None) -> Document:
        """Concatenate ``(ids, supervised)`` parts.

        E.g. ``[(bos + book + prompt, False), (summary + eos, True)]``.
        """
        chunks = [torch.as_tensor(ids, dtype=torch.long) for ids, _ in parts]
        target = torch.cat([torch.full((len(c),), supervised, dtype=torch.bool)
                            for c, (_, supervised) in zip(chunks, parts, strict=True)])
        return cls(torch.cat(chunks), target, writes)

    def labels(self) -> Tensor:
        """[L] next-token labels: ``ids[t+1]`` where that token is a target, IGNORE_INDEX elsewhere.

        The last token (EOS) has no next token inside the document, so it is never supervised.
        """
        labels = torch.full_like(self.ids, IGNORE_INDEX)
        labels[:-1] = self.ids[1:]
        if self.target is not None:
            labels[:-1].masked_fill_(~self.target[1:], IGNORE_INDEX)
        return labels

    @property
    def num_targets(self) -> int:
        """Supervised tokens in this document."""
        return int((self.labels() != IGNORE_INDEX).sum())
