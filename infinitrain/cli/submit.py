"""`infinitrain submit`: a training run as a SLURM batch job.

The job runs the resolved recipe, written next to its script in ``<run dir>/slurm/``, with
``--resume auto``: a requeued job and a re-submitted run both continue from the newest checkpoint.
Every user mistake ends in one ``Error:`` line, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..slurm import SIGNAL_SECONDS
from .output import reported
from .train import OutDirOption, RecipeOption, SetOption, recipe_overrides

stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(stderr=True, soft_wrap=True, highlight=False)


def submit_errors() -> tuple[type[BaseException], ...]:
    """The typed errors of a submission (not `pretrain`'s list: that one imports the trainer,
    seconds a submission does not need)."""
    from ..recipe import RecipeError
    from ..slurm import SubmitError

    return RecipeError, SubmitError


def submit(
    recipe: RecipeOption,
    nodes: Annotated[int | None, typer.Option(
        min=1, help="Nodes (train.num_nodes; default the recipe's).", show_default=False)] = None,
    gpus_per_node: Annotated[int | None, typer.Option(
        min=1, help="GPUs per node, one task each (default the recipe's train.devices; needed "
                    "when that is -1).", show_default=False)] = None,
    cpus_per_task: Annotated[int | None, typer.Option(
        min=1, help="CPUs per task (data loading, OMP threads).", show_default=False)] = None,
    partition: Annotated[str | None, typer.Option(help="SLURM partition.",
                                                  show_default=False)] = None,
    time: Annotated[str | None, typer.Option(
        help="Time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS. The job saves a "
             f"checkpoint and requeues itself {SIGNAL_SECONDS} s before it.",
        show_default=False)] = None,
    account: Annotated[str | None, typer.Option(help="SLURM account.",
                                                show_default=False)] = None,
    qos: Annotated[str | None, typer.Option(help="SLURM quality of service.",
                                            show_default=False)] = None,
    out_dir: OutDirOption = None,
    sets: SetOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the batch script; write and submit nothing.")] = False,
) -> None:
    """Submit a training run to SLURM; submitting the same run again resumes it."""
    from ..recipe import RecipeError, dump_recipe, load_recipe
    from ..slurm import (
        Job,
        check_time_limit,
        find_sbatch,
        fit_recipe,
        render,
        sbatch,
        tasks_per_node,
    )

    with reported(errors=submit_errors()):
        name, loaded = load_recipe(recipe, recipe_overrides(sets, num_nodes=nodes,
                                                            out_dir=out_dir))
        if time is not None:
            check_time_limit(time)
        tasks, gpus = tasks_per_node(loaded, gpus_per_node)
        workdir = Path.cwd()
        job = Job(name=name, run_dir=workdir / (loaded.checkpoint.out_dir or f"runs/{name}"),
                  workdir=workdir, nodes=loaded.train.num_nodes, tasks_per_node=tasks, gpus=gpus,
                  cpus_per_task=cpus_per_task, partition=partition, time=time, account=account,
                  qos=qos)
        script = render(job, sys.executable)
        if dry_run:
            typer.echo(script, nl=False)
            return
        missing = loaded.missing_paths()
        if missing:
            field, path = missing[0]
            raise RecipeError(f"{field}: {path}: no such file or directory (the job reads "
                              f"relative paths from {workdir})")
        executable = find_sbatch()
        job.folder.mkdir(parents=True, exist_ok=True)
        job.recipe_file.write_text(dump_recipe(fit_recipe(loaded, job)))
        job.script.write_text(script)
        job_id = sbatch(executable, job.script)
    stdout.print(f"[bold green]Submitted job {job_id}[/]: {name}, {job.shape}; it continues "
                 f"from the newest checkpoint in {job.run_dir} if there is one")
    stdout.print(f"  script   {job.script}\n"
                 f"  log      tail -f {job.log(job_id)}\n"
                 f"  queue    squeue -j {job_id}\n"
                 f"  details  scontrol show job {job_id}\n"
                 f"  cancel   scancel {job_id}   (submit again to resume)")


def register(app: typer.Typer) -> None:
    """Add this module's command to the root app."""
    app.command("submit")(submit)
