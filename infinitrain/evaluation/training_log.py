"""A run's training curve, read back from the CSV logs its invocations wrote.

Each invocation of ``infinitrain train`` writes ``<run>/logs/csv/from-step-XXXXXXXX/metrics.csv``
(see ``loggers`` in training/run.py), so a run preempted and resumed twice has three files. A
resume restarts from a checkpoint, so whatever an earlier file logged after that step was redone
(or lost) by the later one: the later file wins after the step it starts at (a row's step counts
the optimizer steps done, so the checkpoint's own step belongs to the earlier file).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layout import CSV_DIR, CSV_VERSION_PREFIX, LOG_DIR

CSV_LOGS = LOG_DIR / CSV_DIR

_FOLDER = re.compile(CSV_VERSION_PREFIX + r"(\d+)")
_GATE_MEAN = re.compile(r"gates/(layer_\d+)/mean")


class TrainingLogError(ValueError):
    """A run directory without usable logs."""


def _read_file(path: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of one metrics.csv; rows of the same step are merged."""
    rows: dict[int, dict[str, float]] = {}
    with path.open(newline="") as lines:
        reader = csv.DictReader(lines)
        if reader.fieldnames is None:  # an invocation stopped while the logger wrote its file
            return rows
        if "step" not in reader.fieldnames:
            raise TrainingLogError(f"{path}: has no 'step' column; is it a Lightning CSV log?")
        for row in reader:
            step = row.pop("step")
            if not step.strip():
                continue
            try:  # Lightning leaves a cell empty where that metric was not logged at the step
                values = {name: float(text) for name, text in row.items()
                          if name is not None and text is not None and text.strip()}
                rows.setdefault(int(float(step)), {}).update(values)
            except ValueError as error:
                raise TrainingLogError(f"{path}, line {reader.line_num}: {error}") from None
    return rows


@dataclass
class TrainingLog:
    """Every logged metric of a run as one series per metric, aligned on ``steps``."""

    run: Path
    files: list[Path]
    """The metrics.csv files read, by the step their invocation started from."""
    steps: list[int]
    """Optimizer steps that have at least one logged metric, ascending."""
    metrics: dict[str, list[float]]
    """Metric name → value at each of ``steps``, NaN where it was not logged."""

    @classmethod
    def read(cls, run: str | Path) -> TrainingLog:
        """Merge the run's CSV logs; a missing or empty log is a TrainingLogError naming the fix."""
        run = Path(run)
        if not run.is_dir():
            raise TrainingLogError(f"{run}: no such directory; give the run's out_dir")
        folders = sorted((int(match.group(1)), path.parent)
                         for path in (run / CSV_LOGS).glob("from-step-*/metrics.csv")
                         if (match := _FOLDER.fullmatch(path.parent.name)))
        if not folders:
            raise TrainingLogError(
                f"{run}: no training logs ({run / CSV_LOGS}/from-step-*/metrics.csv); give the "
                "out_dir of a run trained with logging.csv: true (the default), not a checkpoint")
        merged: dict[int, dict[str, float]] = {}
        for start, folder in folders:
            merged = {step: values for step, values in merged.items() if step <= start}
            merged |= _read_file(folder / "metrics.csv")
        files = [folder / "metrics.csv" for _, folder in folders]
        if not any(math.isfinite(values.get("loss", math.nan)) for values in merged.values()):
            raise TrainingLogError(f"{', '.join(map(str, files))}: no loss logged yet (the first "
                                   "row comes after logging.every_steps steps)")
        steps = sorted(merged)
        names = sorted({name for values in merged.values() for name in values})
        metrics = {name: [merged[step].get(name, math.nan) for step in steps] for name in names}
        return cls(run, files, steps, metrics)

    def points(self, *names: str) -> tuple[list[int], list[list[float]]]:
        """(steps, one list per name) at the steps where every named metric was logged."""
        columns = [self.metrics.get(name, [math.nan] * len(self.steps)) for name in names]
        kept = [i for i in range(len(self.steps))
                if all(math.isfinite(column[i]) for column in columns)]
        return [self.steps[i] for i in kept], [[column[i] for i in kept] for column in columns]

    @property
    def gate_layers(self) -> list[str]:
        """Layers with logged gate statistics: layer_00, layer_01, …"""
        return sorted(match.group(1) for name in self.metrics
                      if (match := _GATE_MEAN.fullmatch(name)))

    def gates(self, layer: str) -> tuple[list[int], list[float], list[float], list[float]]:
        """(steps, mean, min, max) of sigmoid(β) over the heads of ``layer``."""
        steps, (mean, low, high) = self.points(*(f"gates/{layer}/{stat}"
                                                 for stat in ("mean", "min", "max")))
        return steps, mean, low, high

    def summary(self) -> dict[str, Any]:
        """Where the run started and ended: loss, and each layer's gates at the last logged step."""
        steps, (loss,) = self.points("loss")
        final_gates = {}
        for layer in self.gate_layers:
            gate_steps, mean, low, high = self.gates(layer)
            if gate_steps:
                final_gates[layer] = {"step": gate_steps[-1], "mean": mean[-1], "min": low[-1],
                                      "max": high[-1]}
        return {"first_step": self.steps[0], "last_step": self.steps[-1],
                "logged_steps": len(self.steps), "invocations": len(self.files),
                "first_loss": {"step": steps[0], "value": loss[0]},
                "last_loss": {"step": steps[-1], "value": loss[-1]},
                "final_gates": final_gates}

    def to_dict(self) -> dict[str, Any]:
        return {"files": [str(f) for f in self.files], "summary": self.summary(),
                "steps": self.steps, "metrics": self.metrics}
