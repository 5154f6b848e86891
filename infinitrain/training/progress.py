"""Progress display: a rich bar in a terminal, one plain line per log interval elsewhere (SLURM
logs, CI), both counting optimizer steps towards where this invocation stops."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

SHOWN = {"loss": ("loss", "{:.4f}"), "lr": ("lr", "{:.2e}"), "tokens_per_s": ("tok/s", "{:,.0f}")}
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
