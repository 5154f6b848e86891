"""`infinitrain pretrain`, `infinitrain finetune` and `infinitrain recipes list|show`.

Command-line options are recipe overrides (`--seed` is `--set train.seed=…`), so the recipe saved
with every checkpoint is exactly what ran; `--max-steps` is the one exception: it only says where
this invocation stops. Every user mistake ends in one ``Error:`` line, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..evaluation.options import human_bytes, human_count
from .output import counted, fail, print_yaml, reported

stdout = Console()

recipes_app = typer.Typer(name="recipes", no_args_is_help=True, help="Shipped training recipes.")

RecipeOption = Annotated[str, typer.Option(
    "--recipe", "-r", help="A shipped recipe name (see `infinitrain recipes list`) or a YAML file.",
    show_default=False)]
ResumeOption = Annotated[str | None, typer.Option(
    help="auto: continue from the newest checkpoint in the run directory (start fresh if there "
         "is none); or a step-XXXXXXXX directory or run directory.", show_default=False)]
OutDirOption = Annotated[Path | None, typer.Option(
    help="Run directory for checkpoints and logs (checkpoint.out_dir; default runs/<recipe>).",
    show_default=False)]
MaxStepsOption = Annotated[int | None, typer.Option(
    min=1, help="Stop this invocation at this step and save a checkpoint there. The schedule "
                "stays sized by train.max_steps, so stopping and resuming changes nothing.",
    show_default=False)]
SeedOption = Annotated[int | None, typer.Option(help="train.seed.", show_default=False)]
DevicesOption = Annotated[int | None, typer.Option(
    help="train.devices: processes per node (GPUs, or CPU processes for DDP and DeepSpeed).",
    show_default=False)]
NodesOption = Annotated[int | None, typer.Option(help="train.num_nodes.", show_default=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe field: --set optim.lr=1e-4 (repeatable; values are YAML).",
    show_default=False)]
DryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Print the resolved recipe and the run's size, then exit.")]
ApplyOptimOption = Annotated[bool, typer.Option(
    "--apply-optim-changes", help="With --resume: give the restored optimizer and schedule the "
    "recipe's optim.lr, gate_lr_multiplier, weight_decay, betas and eps where they differ from "
    "the checkpoint's (a resume with changed values is refused without this).")]


def training_errors() -> tuple[type[BaseException], ...]:
    """User mistakes in recipes, data, tokenizers and checkpoints, and runs that cannot go on
    (diverged, locked, disk full): the typed errors a training command reports in one line."""
    from ..data import DataSourceError, TokenizerError
    from ..model import ConfigError
    from ..model_dir import ModelDirError
    from ..recipe import RecipeError
    from ..training.checkpoint import ResumeError
    from ..training.module import NonFiniteError
    from ..training.run_lock import RunLockError
    from ..training.saving import CheckpointWriteError

    return (RecipeError, ConfigError, DataSourceError, TokenizerError, ModelDirError, ResumeError,
            RunLockError, NonFiniteError, CheckpointWriteError)


def recipe_overrides(sets: list[str] | None, **options: object) -> list[str]:
    """Command-line options as recipe overrides, after the --set ones (options win)."""
    fields = {"seed": "train.seed", "devices": "train.devices", "num_nodes": "train.num_nodes",
              "out_dir": "checkpoint.out_dir", "init": "model.init"}
    return [*(sets or []), *(f"{fields[name]}={value}" for name, value in options.items()
                             if value is not None)]


def _run(recipe_ref: str, overrides: list[str], resume: str | None, max_steps: int | None,
         dry_run: bool, need_init: bool, apply_optim_changes: bool) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from ..recipe import RecipeError, dump_recipe, load_recipe
    from ..training.run import summarize, train
    from ..training.strategy import check_host_memory

    with reported(errors=training_errors()):
        name, recipe = load_recipe(recipe_ref, overrides)
        if need_init and recipe.model.init is None:
            raise RecipeError("finetune needs weights to start from: pass --init CHECKPOINT (a "
                              "step-XXXXXXXX directory, a run directory or a model directory)")
        missing = recipe.missing_paths()
        if missing:
            field, path = missing[0]
            raise RecipeError(f"{field}: {path}: no such file or directory (relative paths are "
                              f"read from {Path.cwd()})")
        if max_steps is not None and max_steps > recipe.train.max_steps:
            raise RecipeError(f"--max-steps {max_steps}: beyond train.max_steps = "
                              f"{recipe.train.max_steps}, where the learning-rate schedule ends; "
                              "raise train.max_steps to train longer")
        out_dir = Path(recipe.checkpoint.out_dir or f"runs/{name}")
        if apply_optim_changes and resume is None:
            raise RecipeError("--apply-optim-changes: only with --resume (a new run uses the "
                              "recipe's optim values anyway)")
        if dry_run:
            summary = summarize(recipe)
            check_host_memory(recipe, summary.parameters)
            print_yaml(dump_recipe(recipe))
            _print_summary(name, recipe, summary, out_dir)
            return
        result = train(recipe, name, out_dir, resume=resume, stop_at=max_steps,
                       apply_optim_changes=apply_optim_changes)
    if rank_zero_only.rank == 0:
        _print_result(result, recipe, out_dir)


EVALUATIONS = {"passkey": "eval passkey --model {run} --lengths 1k,4k --samples 10",
               "booksum": "eval booksum --model {run} --data {data}",
               "text": "eval perplexity --model {run} --data {data}"}
"""Source kind → the evaluation the final summary suggests for a run trained on it."""

BUNDLED_EVAL_DATA = {"booksum": "data/booksum-sample/kmfoda-chapters", "text": "data/pg19-sample"}
"""What those evaluations read when the recipe has no held-out files of its own."""


def next_commands(recipe, out_dir: Path) -> list[str]:
    """What to run after training: the task's evaluation (on the held-out files of
    data.validation when the recipe has them), then the Hugging Face export."""
    kind = recipe.data.sources[0].kind
    validation = recipe.data.validation
    held_out = validation.sources[0].files if validation is not None else []
    data = held_out[0] if held_out else BUNDLED_EVAL_DATA.get(kind)
    return [f"infinitrain {EVALUATIONS[kind].format(run=out_dir, data=data)}",
            f"infinitrain export hf {out_dir} hf/{out_dir.name}"]


def _print_result(result, recipe, out_dir: Path) -> None:
    """The final summary: time, steps, tokens, losses, the checkpoint and what to run next."""
    minutes, seconds = divmod(round(result.seconds), 60)
    losses = "" if result.final_loss is None else \
        f"; loss {result.final_loss:.4f} (best {result.best_loss:.4f})"
    if result.validation is not None:
        step, loss = result.validation
        losses += f"; held-out loss {loss:.4f} at step {step:,}"
    stdout.print(f"[bold green]Done:[/] steps {result.start_step:,} → {result.end_step:,} in "
                 f"{minutes} min {seconds:02d} s, {result.tokens:,} tokens{losses}",
                 highlight=False, soft_wrap=True)  # one line in a log too
    if result.write_gate_waiting is not None and result.end_step >= recipe.train.max_steps:
        stdout.print(
            f"[bold yellow]Warning:[/] the write gate never started: the loss's moving average "
            f"ended at {result.write_gate_waiting:.3f}, above optim.write_gate_below_loss = "
            f"{recipe.optim.write_gate_below_loss}, so the memory never learnt what to keep. In "
            "the passkey recipes this means the memory path did not form and retrieval beyond "
            "the last segment will fail; another train.seed forms it (docs/memory-length.md, "
            '"Rounding, tested").', highlight=False, soft_wrap=True)
    if result.checkpoint is None:
        return
    stdout.print(f"[bold green]Checkpoint:[/] {escape(str(result.checkpoint))}", highlight=False)
    stdout.print("Next:", highlight=False)
    for command in next_commands(recipe, out_dir):
        stdout.print(f"  {command}", markup=False, highlight=False, soft_wrap=True)


def _print_summary(name, recipe, summary, out_dir: Path) -> None:
    table = Table(title=f"{name}: run size", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    streams = summary.streams_per_device
    memory = summary.memory_state_bytes_per_stream
    table.add_row("parameters", f"{summary.parameters:,} ({human_count(summary.parameters)})")
    table.add_row("memory state per stream (M, z; fp32)", human_bytes(memory))
    table.add_row(f"memory state per device ({counted(streams, 'stream')})",
                  human_bytes(memory * streams))
    segments = recipe.data.window_tokens // recipe.model_config.segment_len
    table.add_row("window per stream", f"{recipe.data.window_tokens:,} tokens = "
                  f"{counted(segments, 'segment')} × {recipe.model_config.segment_len}")
    table.add_row("tokens per optimizer step (all devices)", f"{summary.tokens_per_step:,}")
    table.add_row("training FLOPs per token", f"{summary.training_flops_per_token:.3g}")
    train = recipe.train
    if train.strategy == "deepspeed":
        from ..training.strategy import model_state_bytes_per_device

        devices = max(train.devices, 1) * train.num_nodes
        per_device = model_state_bytes_per_device(summary.parameters, recipe.optim.name,
                                                  train.deepspeed, devices)
        table.add_row(f"weights, grads, optimizer per GPU (ZeRO-{train.deepspeed.stage}, "
                      f"{devices} GPUs)", human_bytes(per_device))
    table.add_row("steps (schedule length)", f"{recipe.train.max_steps:,}")
    table.add_row("tokens in the run", f"{summary.tokens_per_step * recipe.train.max_steps:,}")
    table.add_row("run directory", str(out_dir))
    stdout.print(table)


def pretrain(
    recipe: RecipeOption,
    resume: ResumeOption = None,
    out_dir: OutDirOption = None,
    max_steps: MaxStepsOption = None,
    seed: SeedOption = None,
    devices: DevicesOption = None,
    num_nodes: NodesOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    apply_optim_changes: ApplyOptimOption = False,
) -> None:
    """Train a model from a recipe (from scratch, or continually from model.init)."""
    overrides = recipe_overrides(sets, seed=seed, devices=devices, num_nodes=num_nodes,
                                 out_dir=out_dir)
    _run(recipe, overrides, resume, max_steps, dry_run, need_init=False,
         apply_optim_changes=apply_optim_changes)


def finetune(
    recipe: RecipeOption,
    init: Annotated[str | None, typer.Option(
        help="Weights to start from: a step-XXXXXXXX checkpoint, a run directory (its latest) or "
             "a model directory (model.init).", show_default=False)] = None,
    resume: ResumeOption = None,
    out_dir: OutDirOption = None,
    max_steps: MaxStepsOption = None,
    seed: SeedOption = None,
    devices: DevicesOption = None,
    num_nodes: NodesOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    apply_optim_changes: ApplyOptimOption = False,
) -> None:
    """Fine-tune trained weights on a recipe's task (fresh optimizer and schedule)."""
    overrides = recipe_overrides(sets, seed=seed, devices=devices, num_nodes=num_nodes,
                                 out_dir=out_dir, init=init)
    _run(recipe, overrides, resume, max_steps, dry_run, need_init=True,
         apply_optim_changes=apply_optim_changes)


@recipes_app.command("list")
def list_recipes() -> None:
    """Shipped recipes and what each one trains."""
    from ..recipe import shipped_recipes
    from ..recipe.loading import parse_yaml

    table = Table(title="Recipes (infinitrain recipes show|copy NAME)")
    table.add_column("name")
    table.add_column("description")
    for name, text in shipped_recipes().items():
        table.add_row(name, str(parse_yaml(text, name).get("description", "")))
    stdout.print(table)


@recipes_app.command("show")
def show_recipe(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML file.", show_default=False)],
    resolved: Annotated[bool, typer.Option(
        help="Print every field with defaults filled in instead of the file.")] = False,
) -> None:
    """Print a recipe: the file with its comments, or fully resolved."""
    from ..recipe import dump_recipe, load_recipe
    from ..recipe.loading import recipe_text

    with reported(errors=training_errors()):
        text = dump_recipe(load_recipe(name)[1]) if resolved else recipe_text(name)[1]
    print_yaml(text)


@recipes_app.command("copy")
def copy_recipe(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML file.", show_default=False)],
    path: Annotated[Path, typer.Argument(help="New YAML file to write.", show_default=False)],
) -> None:
    """Write a recipe, comments included, to a new file to edit and run with --recipe PATH."""
    from ..recipe.loading import recipe_text

    with reported(errors=training_errors()):
        text = recipe_text(name)[1]
    try:
        with path.open("x", encoding="utf-8") as file:  # "x": never overwrite the user's file
            file.write(text)
    except FileExistsError:
        fail(f"{path}: already exists; choose another path or remove it first")
    except OSError as error:
        fail(f"{path}: cannot write ({error.strerror})")
    stdout.print(f"Wrote {path}: edit it, then train with --recipe {path}", markup=False,
                 highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("pretrain")(pretrain)
    app.command("finetune")(finetune)
    app.add_typer(recipes_app)
