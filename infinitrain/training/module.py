"""The LightningModule: streaming truncated BPTT over each rank's document streams.

One training step takes the next window (k segments) of this rank's B streams, runs the model from
the streams' carried memory, backpropagates through the whole window once, and carries the
detached memory on. One backward per optimizer step, always (docs/design.md §3: several backwards
per step lose gradients under DeepSpeed); accumulation over windows is Lightning's
``accumulate_grad_batches``.

A step whose loss or gradient norm is NaN or inf on any rank updates nothing: up to
``train.max_nonfinite_steps`` such steps in a row are skipped with a warning, one more stops the
run with :class:`NonFiniteError` (one line: the step, the quantity, what to try) before a checkpoint
could save what the step would have done.

A window in which no rank has a supervised token (the body of a long book before its summary)
runs without autograd and leaves the weights alone; it still counts as a step of the stream clock
(global step and schedule), so every rank always agrees on where it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from ..data import IGNORE_INDEX, WRITE_UNKNOWN, Window
from ..model import InfiniState, InfiniTransformer
from ..recipe import Recipe
from .checkpoint import load_rank_streams
from .loss import supervised_loss_sum
from .optim import build_optimizer, build_scheduler
from .strategy import sharded_model
from .weights import load_initial_weights
from .write_gate import WriteGateSchedule

OPTIM_HYPERPARAMETERS = ("betas", "eps", "weight_decay")
"""Per-group optimizer settings besides the learning rate that a restored state carries."""


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message names the step, the quantity and what to try."""


def finite_everywhere(strategy, local: bool) -> bool:
    """Whether ``local`` holds on every rank (every rank must take the same decision)."""
    return not strategy.reduce_boolean_decision(not local, all=False)


def gradient_norm(module: nn.Module) -> Tensor | None:
    """The global L2 norm of the gradients (None where this process holds none, as under
    DeepSpeed, whose engine keeps them). FSDP2's are shards: their norm is reduced over the
    ranks, so every rank must call this."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class StreamingLM(LightningModule):
    """An Infini-Transformer trained on windows of document streams with carried memory."""

    def __init__(self, recipe: Recipe, init: Path | None = None,
                 resume_from: Path | None = None, apply_optim_changes: bool = False) -> None:
        """``init``: weights to start from (not when resuming); ``resume_from``: a checkpoint
        whose stream memories this rank continues from; ``apply_optim_changes``: give the
        restored optimizer and schedule the recipe's optim values instead of the checkpoint's."""
        super().__init__()
        self.recipe = recipe
        self.init = init
        self.resume_from = resume_from
        self.apply_optim_changes = apply_optim_changes
        self.model: InfiniTransformer | None = None
        self.streams: InfiniState | None = None
        """This rank's stream memories after the last consumed window (None: all empty)."""
        self.data_position: dict | None = None
        """The data position right after the last consumed window."""
        self._update_pending = False
        self.updated_step: int | None = None
        """The optimizer step (``global_step`` before it) that last updated the weights."""
        self._step_values: dict[str, list[Tensor]] = {}
        """This optimizer step's per-window values of the logged means (loss, write cost)."""
        self.write_gate = WriteGateSchedule(recipe.optim)
        self.nonfinite_in_a_row = 0
        """Consecutive steps skipped for a non-finite loss or gradient norm."""

    def configure_model(self) -> None:
        # Built here, not in __init__, so that DeepSpeed ZeRO-3 creates it already sharded and
        # FSDP2 (Lightning's device mesh) shards it before any weight exists.
        if self.model is not None:
            return
        if self.device_mesh is None:
            self.model = InfiniTransformer(self.recipe.model_config)
        else:
            self.model = sharded_model(self.recipe.model_config, self.device_mesh, self.device)
        self.model.activation_checkpointing = self.recipe.train.activation_checkpointing
        if self.recipe.train.compile:
            self.model.compile_blocks(dynamic=False)
        if self.init is not None:
            load_initial_weights(self.model, self.init, self.trainer.is_global_zero)

    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.model, self.recipe.optim)
        scheduler = self._schedule(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.resume_from is not None:
            state, position = load_rank_streams(self.resume_from, self.global_rank)
            self.streams, self.data_position = state.to(self.device), position

    def training_step(self, window: Window, batch_idx: int) -> Tensor:
        self.data_position = window.position
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._step_values = {}  # a new optimizer step
        targets = self._supervised_tokens_everywhere(window)
        self.log("supervised_tokens", float(targets))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        if targets == 0:
            with torch.no_grad():
                _, state = self.model(window.input_ids, self.streams, window.reset,
                                      logits_to_keep=1)
            self.streams = state
            self._log_step_means()
            # A leaf: backward touches no parameter, so no strategy communicates or updates.
            return torch.zeros((), device=self.device, requires_grad=True)
        # A frozen gate's zero gradient counts nothing in clipping (its lr is 0 too): until
        # the gate starts, the run is the run without a gate, under every strategy.
        self.model.freeze_write_gates(not self.write_gate.trains(self.global_step))
        targeted = self.write_gate.targets(self.global_step)
        write_targets = window.write_targets
        if targeted and write_targets is None:  # no document says: nothing to learn from
            write_targets = torch.full_like(window.input_ids, WRITE_UNKNOWN, dtype=torch.int8)
        (loss_sum, write_cost), state = self.model(
            window.input_ids, self.streams, window.reset,
            head=lambda hidden, lm_head, cost: (supervised_loss_sum(hidden, window.labels,
                                                                    lm_head), cost),
            write_targets=write_targets if targeted else None)
        self.streams = state.detach()  # the truncation point of truncated BPTT
        # Mean over every supervised token of every rank once DDP averages the gradients.
        loss = loss_sum * (self.trainer.world_size / targets)
        self._update_pending = True
        self._step_values.setdefault("loss", []).append(loss.detach())
        if write_cost is not None:
            self._watch_loss(loss)
            name = "write_error" if targeted else "write_cost"
            self._step_values.setdefault(name, []).append(write_cost.detach())
            loss = loss + self.write_gate.penalty_weight(self.global_step) * write_cost
        self._log_step_means()
        return loss

    def _log_step_means(self) -> None:
        """Log this optimizer step's loss and write cost: the means over its windows with
        supervised tokens so far, so the step's row holds the step's own values (with
        accumulation, every window's), and a step with none holds none."""
        for name, values in self._step_values.items():
            self.log(name, torch.stack(values).mean(), prog_bar=name == "loss",
                     sync_dist=self.trainer.world_size > 1)

    def _schedule(self, optimizer) -> LambdaLR:
        return build_scheduler(optimizer, self.recipe.optim, self.recipe.train.max_steps,
                               self.write_gate.trains)

    def _watch_loss(self, loss: Tensor) -> None:
        """Give the write gate's schedule this step's loss (every rank's mean), when it waits
        for a loss threshold."""
        gate = self.write_gate
        if not gate.waits_for_loss:  # spare every rank the reduction
            return
        value = float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean"))
        if gate.observe(value, self.global_step):
            self.print(f"step {self.global_step}: loss average {gate.loss_average:.3f} < "
                       f"{gate.below_loss}: the write gate starts training")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["write_gate"] = self.write_gate.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.write_gate.load_state_dict(checkpoint.get("write_gate", {}))
        if self.apply_optim_changes:
            self._apply_recipe_optim(checkpoint)

    def _apply_recipe_optim(self, checkpoint: dict) -> None:
        """Rewrite the saved optimizer and scheduler states (before Lightning restores them) with
        the recipe's learning rates, betas, eps and weight decay at the saved step; the moments
        and the step count are kept."""
        fresh = build_optimizer(self.model, self.recipe.optim)
        factors = self._schedule(fresh).lr_lambdas
        scheduler = checkpoint["lr_schedulers"][0]
        bases = [group["initial_lr"] for group in fresh.param_groups]
        lrs = [base * factor(scheduler["last_epoch"]) for base, factor in
               zip(bases, factors, strict=True)]
        saved_groups = checkpoint["optimizer_states"][0]["param_groups"]
        for saved, group, lr in zip(saved_groups, fresh.param_groups, lrs, strict=True):
            saved.update({key: group[key] for key in OPTIM_HYPERPARAMETERS if key in group},
                         initial_lr=group["initial_lr"], lr=lr)
        scheduler.update(base_lrs=bases, _last_lr=lrs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Update the weights only if some window since the last update had supervised tokens."""
        loss = optimizer_closure()
        if self._update_pending and self._finite_step(loss):
            optimizer.step(closure=lambda: loss)
            self.updated_step = self.global_step
        self._update_pending = False

    def _finite_step(self, loss: Tensor) -> bool:
        """Whether this step's loss and gradient norm are finite on every rank; skips the step
        or stops the run (NonFiniteError) when they are not."""
        quantity = self._nonfinite_quantity(loss)
        if finite_everywhere(self.trainer.strategy, quantity is None):
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        step, allowed = self.global_step + 1, self.recipe.train.max_nonfinite_steps
        what = quantity or "loss or gradient norm (on another rank)"
        if self.nonfinite_in_a_row > allowed:
            raise NonFiniteError(
                f"step {step}: non-finite {what} for {self.nonfinite_in_a_row} step(s) in a row "
                f"(train.max_nonfinite_steps = {allowed}); stopped without saving it, the "
                f"checkpoints written before are finite: {self.remedy()}")
        self.print(f"step {step}: non-finite {what}: skipped without an update "
                   f"({self.nonfinite_in_a_row} of train.max_nonfinite_steps = {allowed})")
        return False

    def _nonfinite_quantity(self, loss: Tensor) -> str | None:
        """'loss' or 'gradient norm' if that one is NaN or inf here, else None. Under fp16 the
        gradient norm is not checked: its loss scaler skips overflowing steps by design."""
        if not torch.isfinite(loss.detach()).all():
            return "loss"
        if self.recipe.train.precision == "16-mixed":
            return None
        norm = gradient_norm(self)
        return None if norm is None or torch.isfinite(norm) else "gradient norm"

    def remedy(self) -> str:
        """What to try when training diverges, with this run's values."""
        optim, precision = self.recipe.optim, self.recipe.train.precision
        fixes = [f"lower optim.lr (now {optim.lr:g})",
                 "set optim.grad_clip (e.g. 1.0)" if not optim.grad_clip else
                 f"lower optim.grad_clip (now {optim.grad_clip:g})"]
        if precision != "32-true":
            fixes.append(f"set train.precision 32-true (now {precision})")
        return ", ".join(fixes) + "; then --resume auto from the last checkpoint"

    def _supervised_tokens_everywhere(self, window: Window) -> int:
        """Supervised tokens of this window summed over ranks (the same number on every rank)."""
        local = (window.labels != IGNORE_INDEX).sum()
        return int(self.trainer.strategy.reduce(local, reduce_op="sum"))
