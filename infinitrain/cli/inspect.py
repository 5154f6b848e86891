"""`infinitrain inspect gates|training|needle-trace`: look inside a checkpoint or a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    PlotOption,
    load_for_command,
    stderr,
    stdout,
    written,
)
from .output import fail, reported
from .progress import progress

inspect_app = typer.Typer(name="inspect", no_args_is_help=True,
                          help="Look inside a checkpoint or a training run.")


# ----------------------------------------------------------------------------------------------
# infinitrain inspect gates


@inspect_app.command("gates")
def gates(
    model: ModelOption,
    plot: PlotOption = None,
    json_path: JsonOption = None,
) -> None:
    """Memory gates sigmoid(β) per layer and head: specialised vs mixer heads (paper Fig. 3)."""
    from ..evaluation.gates import GateReport
    from ..evaluation.plots import heatmap
    from ..evaluation.report import write_json
    from ..evaluation.tables import gates_table

    loaded, _ = load_for_command(model, "cpu", "fp32", need_tokenizer=False)
    report = GateReport.of(loaded.model)
    if not report.gates:
        fail(f"{model}: no layer has memory (model.memory_from_layer = "
             f"{report.first_layer} = n_layers), so there are no gates to inspect")
    stdout.print(gates_table(report))
    if plot is not None:
        heatmap(report.gates, plot, title="Memory gate sigmoid(β) per head",
                row_labels=[str(layer) for layer in report.layers],
                col_labels=[str(h) for h in range(len(report.gates[0]))],
                row_title="layer", col_title="query head", cmap="coolwarm")
        written("plot", plot)
    if json_path is not None:
        write_json(json_path, "inspect gates", loaded, {}, report.to_dict())
        written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain inspect training


@inspect_app.command("training")
def training(
    run: Annotated[Path, typer.Option(
        "--run", help="A run's out_dir: the folder holding logs/ and the step-XXXXXXXX/ "
        "checkpoints.", show_default=False)],
    plot: PlotOption = None,
    json_path: JsonOption = None,
) -> None:
    """A run's training curve from its CSV logs: loss and each layer's memory gates vs step."""
    from ..evaluation.plots import training_curves
    from ..evaluation.report import write_json
    from ..evaluation.tables import training_table
    from ..evaluation.training_log import TrainingLog

    with reported("--run"):
        log = TrainingLog.read(run)
    stdout.print(training_table(log))
    if plot is not None:
        steps, (loss,) = log.points("loss")
        training_curves(steps, loss, {layer.replace("_", " "): log.gates(layer)
                                      for layer in log.gate_layers},
                        plot, title=f"Training loss, {run.resolve().name}")
        written("plot", plot)
    if json_path is not None:
        write_json(json_path, "inspect training", None, {"run": str(run)}, log.to_dict())
        written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain inspect needle-trace


@inspect_app.command("needle-trace")
def needle_trace(
    model: ModelOption,
    length: Annotated[str, typer.Option(help="Prompt length in tokens: 4096, 16k, 1M, …")]
        = "16k",
    depth: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Needle depth in [0, 1]: 0 = start of the filler, 1 = its end.")]
        = 0.0,
    samples: Annotated[int, typer.Option(min=1, help="Prompts (keys) to average over.")] = 3,
    seed: Annotated[int, typer.Option(
        help="Seed of the keys: the keys `eval passkey --seed` draws at this length for its "
             "first depth.")] = 0,
    plot: PlotOption = None,
    json_path: JsonOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """How much of a passkey needle the memory still holds as filler accumulates, per layer.

    Compares the memory M of each prompt with that of a twin without the needle, segment by segment.
    """
    from ..data.passkey import PasskeyGenerator
    from ..evaluation.needle_trace import checked_sample
    from ..evaluation.needle_trace import needle_trace as run_trace
    from ..evaluation.options import format_tokens, parse_token_count
    from ..evaluation.plots import loglog_panels
    from ..evaluation.report import write_json
    from ..evaluation.tables import needle_trace_table

    with reported():
        tokens = parse_token_count(length, "--length")
    loaded, tokenizer = load_for_command(model, device, dtype)
    segment_len = loaded.model.config.segment_len
    prompts = PasskeyGenerator(tokenizer)
    with reported("--length"):  # the prompt must hold the task, needle and question
        prompts.sample(tokens, depth, seed=0)
    with reported("--depth"):
        checked_sample(prompts, tokens, depth, 0, segment_len)
    # reported: another key's needle may be a token longer
    with progress(stderr, "needle and twin", tokens * samples) as advance, reported("--depth"):
        result = run_trace(loaded.model, tokenizer, tokens, depth, samples, seed,
                           on_progress=advance)
    stdout.print(needle_trace_table(result))
    if plot is not None:
        def lines(values: list[list[float]]) -> dict[str, tuple[list[int], list[float]]]:
            return {f"layer {i}": (result.after, row) for i, row in enumerate(values)}

        loglog_panels({"needle trace ‖ΔM‖/‖M‖": lines(result.trace),
                       "change of M per segment": lines(result.change)}, plot,
                      title=f"Needle in memory, {result.memory_rule} rule, "
                            f"{format_tokens(tokens)} tokens, depth {depth:g} "
                            f"({loaded.path.parent.name}/{loaded.path.name})",
                      xlabel=f"segments after the needle's ({segment_len} tokens each)")
        written("plot", plot)
    if json_path is not None:
        write_json(json_path, "inspect needle-trace", loaded,
                   {"length": tokens, "depth": depth, "samples": samples, "seed": seed},
                   result.to_dict())
        written("results", json_path)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(inspect_app)
