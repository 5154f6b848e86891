"""Held-out loss during training (recipe ``data.validation``).

Every ``every_steps`` optimizer steps, each rank reads the first ``windows`` windows of its share of
the validation streams, from empty memories and in order, as training reads its own: the memory is
carried from window to window, so the loss measures what the memory contributes. The streams restart
from the same position each time, so every evaluation scores the same tokens. Without gradients, the
cost is ``windows`` forward passes and the memory one window's activations.
"""

from __future__ import annotations

import math
from itertools import islice

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ..data import IGNORE_INDEX, Tokenizer, build_streams
from ..data.streams import DocumentStreams
from ..recipe import Recipe, RecipeError
from .module import supervised_loss_sum


class Validation(Callback):
    """Logs ``val_loss`` and ``val_perplexity`` (mean over every rank's supervised tokens) and
    keeps the last result for the run's summary."""

    def __init__(self, recipe: Recipe, tokenizer: Tokenizer,
                 haystacks: dict[str, Tensor] | None = None) -> None:
        """``haystacks``: the passkey texts :func:`check_sources` already tokenized."""
        assert recipe.data.validation is not None
        self.recipe = recipe
        self.section = recipe.data.validation
        self.tokenizer = tokenizer
        self.haystacks = haystacks
        self.streams: DocumentStreams | None = None
        self.start: dict | None = None
        """The streams' position before their first window: every evaluation restarts there."""
        self.last: tuple[int, float] | None = None
        """(step, loss) of the latest evaluation."""

    def setup(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        data = self.recipe.data
        config = data.stream_config(self.recipe.model_config.segment_len, self.recipe.train.seed,
                                    windows_per_step=1)
        self.streams = build_streams(self.section.sources, config, self.tokenizer,
                                     trainer.global_rank, trainer.world_size, self.haystacks)
        self.start = self.streams.state_dict()

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # Every micro-batch ends here: score once per optimizer step, never before the first
        # (with train.accumulate, the first micro-batches end at step 0).
        if not step or step % self.section.every_steps or (self.last and self.last[0] == step):
            return
        loss = self.evaluate(trainer, module)
        self.last = (step, loss)
        module.log("val_loss", loss, prog_bar=True)
        module.log("val_perplexity", math.exp(min(loss, 80.0)))

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, module: LightningModule) -> float:
        """Mean next-token loss over the supervised tokens of every rank's windows."""
        self.streams.load_state_dict(self.start)
        was_training = module.model.training
        module.model.eval()
        state = None
        total = torch.zeros(2, dtype=torch.float64, device=module.device)
        for window in islice(self.streams, self.section.windows):
            window = window.to(module.device)
            loss_sum, state = module.model(
                window.input_ids, state, window.reset,
                head=lambda hidden, lm_head, _, labels=window.labels: supervised_loss_sum(
                    hidden, labels, lm_head))
            total[0] += loss_sum.double()
            total[1] += (window.labels != IGNORE_INDEX).sum()
        module.model.train(was_training)
        loss_sum, tokens = trainer.strategy.reduce(total, reduce_op="sum").tolist()
        if tokens == 0:
            raise RecipeError("data.validation: its first windows hold no supervised token; "
                             "raise data.validation.windows or use other sources")
        return loss_sum / tokens
