"""`inspect training`: a run's CSV logs merged across resumes, summarised and plotted."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.evaluation.training_log import TrainingLog, TrainingLogError

COLUMNS = ["epoch", "gates/layer_00/max", "gates/layer_00/mean", "gates/layer_00/min",
           "gates/layer_01/max", "gates/layer_01/mean", "gates/layer_01/min", "grad_norm", "loss",
           "lr", "step", "tokens_per_s"]


def write_metrics(run: Path, start_step: int, rows: list[dict[str, float]]) -> Path:
    """A metrics.csv as Lightning's CSVLogger writes it, cells of unlogged metrics left empty."""
    path = run / "logs" / "csv" / f"from-step-{start_step:08d}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, COLUMNS, restval="")
        writer.writeheader()
        writer.writerows({"epoch": 0, **row} for row in rows)
    return path


def gates(step: int, low: float, mean: float, high: float) -> dict[str, float]:
    return {"step": step} | {f"gates/layer_{layer:02d}/{stat}": value + 0.1 * layer
                             for layer in (0, 1)
                             for stat, value in (("min", low), ("mean", mean), ("max", high))}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Steps 9–29 logged, then resumed from the step-20 checkpoint, which redoes step 29 (and
    never logs step 24 again) and goes on to step 39."""
    run = tmp_path / "run"
    write_metrics(run, 0, [
        {"step": 9, "loss": 2.0, "lr": 1e-3},
        {"step": 19, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.8},
        gates(19, 0.4, 0.5, 0.6),  # a second row for the same step: merged into the first
        {"step": 24, "lr": 1e-3},
        {"step": 29, "loss": 9.9},
    ])
    write_metrics(run, 20, [
        {"step": 29, "loss": 1.2, "lr": 5e-4},
        gates(39, 0.1, 0.3, 0.9) | {"loss": 1.0, "tokens_per_s": 1234.5},
    ])
    return run


def test_resumed_run_merges_with_the_later_file_winning(run: Path):
    log = TrainingLog.read(run)
    assert [f.parent.name for f in log.files] == ["from-step-00000000", "from-step-00000020"]
    assert log.steps == [9, 19, 29, 39]
    assert log.points("loss") == ([9, 19, 29, 39], [[2.0, 1.5, 1.2, 1.0]])
    assert log.points("lr", "grad_norm") == ([19], [[1e-3], [0.8]])
    assert math.isnan(log.metrics["tokens_per_s"][0])
    assert log.gate_layers == ["layer_00", "layer_01"]
    steps, *stats = log.gates("layer_01")  # layer 1 is layer 0 + 0.1
    assert steps == [19, 39]
    assert stats == [pytest.approx(values) for values in ([0.6, 0.4], [0.5, 0.2], [0.7, 1.0])]
    summary = log.summary()
    assert summary["first_loss"] == {"step": 9, "value": 2.0}
    assert summary["last_loss"] == {"step": 39, "value": 1.0}
    assert summary["final_gates"]["layer_00"] == {"step": 39, "mean": 0.3, "min": 0.1,
                                                  "max": 0.9}


def test_run_without_logs_is_an_error_naming_the_fix(tmp_path: Path):
    checkpoint = tmp_path / "run" / "step-00000010"
    checkpoint.mkdir(parents=True)
    for path in (tmp_path / "run", checkpoint):
        with pytest.raises(TrainingLogError, match=r"no training logs .*logging\.csv: true"):
            TrainingLog.read(path)
    with pytest.raises(TrainingLogError, match="no such directory"):
        TrainingLog.read(tmp_path / "missing")
    write_metrics(tmp_path / "run", 0, [{"step": 9, "lr": 1e-3}])
    with pytest.raises(TrainingLogError, match="no loss logged yet"):
        TrainingLog.read(tmp_path / "run")

    result = CliRunner().invoke(app, ["inspect", "training", "--run", str(checkpoint)])
    assert result.exit_code == 2
    assert f"Error: --run {checkpoint}: no training logs" in " ".join(result.stderr.split())


def test_inspect_training_writes_plot_and_json(run: Path, tmp_path: Path):
    plot, results = tmp_path / "out" / "curve.png", tmp_path / "out" / "curve.json"
    result = CliRunner().invoke(app, ["inspect", "training", "--run", str(run), "--plot",
                                      str(plot), "--json", str(results)])
    assert result.exit_code == 0, result.output
    assert "last loss" in result.stdout and "1.0000 at step 39" in result.stdout
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.stat().st_size > 10_000
    written = json.loads(results.read_text())
    assert written["command"] == "inspect training" and written["model"] is None
    assert written["results"]["steps"] == [9, 19, 29, 39]
    assert written["results"]["metrics"]["tokens_per_s"][:3] == [None] * 3  # NaN: strict JSON
