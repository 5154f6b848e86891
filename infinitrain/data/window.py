"""The unit of training data: the next window of k segments from each of B document streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a token that is not supervised (padding, prompt, a book's body before its summary)."""
WRITE_UNKNOWN = -1
"""Write target of a token whose document does not say whether the memory should write it."""


@dataclass
class Window:
    input_ids: Tensor
    """[B, k·N] token ids."""
    labels: Tensor
    """[B, k·N] next-token targets, IGNORE_INDEX where not supervised."""
    reset: Tensor
    """[B, k] bool: True where a stream starts a new document at that segment (memory emptied)."""
    position: dict[str, Any] | None = None
    """The data position right after this window (`DocumentStreams.state_dict()`): save the one of
    the last window consumed, since the loader may already have produced the next."""
    write_targets: Tensor | None = None
    """[B, k·N] int8: 1 where the memory should write the token, 0 where it should not,
    WRITE_UNKNOWN where its document does not say (`Document.writes`); None: unknown
    everywhere."""

    @property
    def has_supervision(self) -> bool:
        """False for windows (e.g. the body of a book) that only need reading into memory."""
        return bool((self.labels != IGNORE_INDEX).any())

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Window:
        return Window(self.input_ids.to(device), self.labels.to(device), self.reset.to(device),
                      self.position,
                      None if self.write_targets is None else self.write_targets.to(device))
