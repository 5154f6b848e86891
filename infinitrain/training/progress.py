"""Progress display: a rich bar in a terminal, one plain line per log interval elsewhere (SLURM
logs, CI), both counting optimizer steps towards where this invocation stops."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_module

SHOWN = {"loss": ("loss", "{:.4f}"), "val_loss": ("val loss", "{:.4f}"), "lr": ("lr", "{:.2e}"),
         "tokens_per_s": ("tok/s", "{:,.0f}")}
"""Metric → (label, format) of the plain progress line."""


def shown_metrics(metrics: dict) -> dict[str, str]:
    return {label: template.format(float(metrics[name]))
            for name, (label, template) in SHOWN.items() if name in metrics}


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{label} {text}" for label, text in shown_metrics(metrics).items())


class StepProgressBar(RichProgressBar):
    """Rich bar over the windows of this invocation (the streams never end an epoch)."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps * self.trainer.accumulate_grad_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "training"

    def get_metrics(self, trainer: Trainer, module: LightningModule) -> dict[str, str]:
        return shown_metrics(trainer.progress_bar_metrics)


class TextProgress(Callback):
    """One line per log interval on rank 0, for output that is not a terminal."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.printed_step = -1

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.printed_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self.printed_step and (step % self.every == 0 or step == trainer.max_steps):
            self.printed_step = step
            rank_zero_info(f"step {step}/{trainer.max_steps}  "
                           f"{format_metrics(trainer.progress_bar_metrics)}")


LIGHTNING_NOISE = ("GPU available:", "TPU available:", "💡 Tip:", "`Trainer.fit` stopped:",
                   "Restoring states from the checkpoint", "Restored all states")
"""Lightning's rank-zero info lines that a run replaces with its own start banner and final
summary (the `Trainer.fit` one would also land on the progress bar's line)."""


def drop_lightning_noise(record: logging.LogRecord) -> bool:
    """A logging filter: False for the lines of LIGHTNING_NOISE."""
    return not str(record.msg).startswith(LIGHTNING_NOISE)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Filter LIGHTNING_NOISE out of Lightning's rank-zero logger while a run lasts."""
    rank_zero_module.log.addFilter(drop_lightning_noise)
    try:
        yield
    finally:
        rank_zero_module.log.removeFilter(drop_lightning_noise)


class RunTotals(Callback):
    """What the final summary reports: time, steps, last and best logged loss."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.start_step = 0
        self.end_step = 0
        self.final_loss: float | None = None
        self.best_loss: float | None = None

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.start_step = self.end_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.end_step = trainer.global_step
        loss = trainer.callback_metrics.get("loss")
        if loss is not None:
            self.final_loss = float(loss)
            self.best_loss = self.final_loss if self.best_loss is None else \
                min(self.best_loss, self.final_loss)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
