"""When the memory's write gate trains: the curriculum of ``optim.write_target_until_step``,
``optim.write_gate_from_step`` and ``optim.write_gate_below_loss``.

Until the gate starts, every token writes at ``model.write_gate_init``'s strength and the gate's
learning rate is 0, so the task's circuit forms as in a model without a gate; a write penalty
before then could close every write while the loss has no reason yet to keep any. With a loss
threshold, the start waits for the training loss's moving average to fall below it, since when
the circuit forms varies between runs by hundreds of steps (docs/memory-length.md,
"Why stage 1 is chaotic"). With write targets, the gate trains from step 0 towards what the data
says to write, and the penalty waits for the targets' phase to end.
"""

from __future__ import annotations

from ..recipe import OptimSection


class WriteGateSchedule:
    """Whether the write gate trains at a step; the state a checkpoint saves and restores."""

    def __init__(self, optim: OptimSection) -> None:
        self.from_step = optim.write_gate_from_step
        self.below_loss = optim.write_gate_below_loss
        self.penalty = optim.write_penalty
        self.targets_until = optim.write_target_until_step
        self.start: int | None = None
        """The step at which the loss threshold was met (None: not yet, or no threshold)."""
        self.loss_average: float | None = None

    @property
    def waits_for_loss(self) -> bool:
        """Whether the start still waits for the loss threshold (what :meth:`observe` is for)."""
        return bool(self.below_loss) and self.start is None

    def targets(self, step: int) -> bool:
        """Whether the gate trains towards the data's write targets at ``step``."""
        return step < self.targets_until

    def trains(self, step: int) -> bool:
        if self.targets(step):
            return True
        if step < self.from_step:
            return False
        return not self.below_loss or self.start is not None

    def penalty_weight(self, step: int) -> float:
        """``optim.write_penalty`` while the gate trains, else 0: before, the penalty would push
        the keys of a warm-started gate that cannot move. During the targets' phase it weighs
        the gate's error against them instead."""
        return self.penalty if self.trains(step) else 0.0

    def observe(self, loss: float, step: int) -> bool:
        """Take the loss of ``step`` (the same on every rank); True if the gate starts now (its
        learning rate opens from the next step)."""
        if not self.waits_for_loss:
            return False
        average = self.loss_average
        # about ten steps (0.1, not 1 - 0.9, which rounds differently and would move the start)
        self.loss_average = loss if average is None else 0.9 * average + 0.1 * loss
        if self.loss_average < self.below_loss and step >= self.from_step:
            self.start = step
            return True
        return False

    def state_dict(self) -> dict:
        return {"start": self.start, "loss_average": self.loss_average}

    def load_state_dict(self, saved: dict) -> None:
        self.start = saved.get("start")
        self.loss_average = saved.get("loss_average")
