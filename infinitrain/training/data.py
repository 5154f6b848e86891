"""Each rank's document streams as Lightning's training data, continued from a checkpoint.

The position is restored here, by us, from the checkpoint's per-rank stream file, and never through
Lightning's dataloader-state mechanism (lost on resume when the step count is estimated first,
Lightning #20550).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from ..data import Tokenizer, Window, build_sources, build_streams
from ..recipe import Recipe
from .checkpoint import load_rank_streams


class StreamData(LightningDataModule):
    def __init__(self, recipe: Recipe, tokenizer: Tokenizer, resume_from: Path | None = None,
                 haystacks: dict[str, Tensor] | None = None) -> None:
        """``haystacks``: the passkey texts :func:`check_sources` already tokenized."""
        super().__init__()
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.resume_from = resume_from
        self.haystacks = haystacks

    def train_dataloader(self) -> DataLoader:
        recipe, trainer = self.recipe, self.trainer
        config = recipe.data.stream_config(recipe.model_config.segment_len, recipe.train.seed,
                                           recipe.train.accumulate)
        streams = build_streams(recipe.data.sources, config, self.tokenizer, trainer.global_rank,
                                trainer.world_size, self.haystacks)
        if self.resume_from is not None:
            _, position = load_rank_streams(self.resume_from, trainer.global_rank)
            streams.load_state_dict(position)
        # The streams batch themselves and keep their position in this process.
        return DataLoader(streams, batch_size=None, num_workers=0)

    def transfer_batch_to_device(self, batch: Window, device: torch.device,
                                 dataloader_idx: int) -> Window:
        return batch.to(device)


def check_sources(recipe: Recipe, tokenizer: Tokenizer) -> dict[str, Tensor]:
    """Open every data source now, so that a missing dataset fails before any process starts.
    Returns the passkey haystacks it tokenized, for the training and validation streams to
    reuse (the novels of the passkey recipes take 1.1-1.5 s)."""
    validation = recipe.data.validation
    haystacks: dict[str, Tensor] = {}
    build_sources(recipe.data.sources + (validation.sources if validation else []), tokenizer,
                  haystacks)
    return haystacks
