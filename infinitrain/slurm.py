"""SLURM batch scripts for a recipe: the job's shape, rendering the ``slurm/`` templates, sbatch.

Lightning's SLURM environment expects one ``srun`` task per device: ``--ntasks-per-node`` must
equal ``train.devices`` and ``--nodes`` ``train.num_nodes``, or the job stops with a mismatch error
(and without ``srun`` it hangs at "Initializing distributed"). The job's shape is therefore decided
here, once, and written both into the script and into the recipe the job runs.

A job is requeued on preemption or near its time limit: SLURM sends SIGUSR1 to the tasks, the
trainer saves a checkpoint and calls ``scontrol requeue``, and the rerun continues with
``--resume auto``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from .recipe import Recipe

TEMPLATE_PACKAGE = "infinitrain.slurm_templates"
"""The top-level ``slurm/`` directory, packaged (like ``recipes/``) so a wheel install has it."""
SIGNAL_SECONDS = 90
"""SIGUSR1 comes this long before the time limit: enough to save a checkpoint of a large model."""
SLURM_DIR = "slurm"
"""Inside the run directory: the job script, the recipe it runs and the job logs."""
PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
TIME_PATTERN = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


class SubmitError(RuntimeError):
    """A job that cannot be submitted as asked; the message says what to change."""


@dataclass(frozen=True)
class Job:
    """One training run as a SLURM job."""

    name: str
    """The recipe's name (the job is infinitrain-<name>)."""
    run_dir: Path
    """Absolute run directory: checkpoints, logs, and ``slurm/`` with the script."""
    workdir: Path
    """Absolute directory the job runs in, where the recipe's relative paths are read from."""
    nodes: int
    tasks_per_node: int
    """Processes per node: GPUs on a GPU job, DDP processes on a CPU job."""
    gpus: bool
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None

    @property
    def folder(self) -> Path:
        return self.run_dir / SLURM_DIR

    @property
    def script(self) -> Path:
        return self.folder / f"{self.name}.sbatch"

    @property
    def recipe_file(self) -> Path:
        """Named after the recipe: the trainer takes a recipe file's name from its stem."""
        return self.folder / f"{self.name}.yaml"

    @property
    def shape(self) -> str:
        processes = "GPU(s)" if self.gpus else "CPU process(es)"
        return f"{self.nodes} node(s) × {self.tasks_per_node} {processes}"

    def log(self, job_id: str = "%j") -> Path:
        """One log per job id; a requeued job appends to its own."""
        return self.folder / f"{job_id}.log"


def tasks_per_node(recipe: Recipe, gpus_per_node: int | None) -> tuple[int, bool]:
    """(processes per node, whether they drive GPUs): ``train.devices``, checked against the
    GPUs the job asks for. A recipe's devices are never changed silently: they set the global
    batch and which ranks a checkpoint's streams belong to."""
    devices = recipe.train.devices
    if recipe.train.accelerator == "cpu":
        if gpus_per_node is not None:
            raise SubmitError(f"--gpus-per-node {gpus_per_node}: this recipe runs on the CPU "
                              "(train.accelerator = cpu); drop the option or "
                              "--set train.accelerator=gpu")
        if devices == -1:
            raise SubmitError("train.devices = -1 means every GPU; a CPU job needs the number of "
                              "processes per node: --set train.devices=N")
        return devices, False
    if gpus_per_node is None:
        if devices == -1:
            raise SubmitError("train.devices = -1 (every GPU of a node): say how many GPUs the "
                              "nodes have with --gpus-per-node")
        return devices, True
    if devices > gpus_per_node:
        raise SubmitError(f"train.devices = {devices} asks for more GPUs per node than the job "
                          f"gives (--gpus-per-node {gpus_per_node}): pass --gpus-per-node "
                          f"{devices}, or --set train.devices={gpus_per_node} for a smaller run")
    if devices not in (-1, gpus_per_node):
        raise SubmitError(f"train.devices = {devices}, but the job gives {gpus_per_node} GPUs per "
                          f"node and Lightning runs one task per GPU: pass --gpus-per-node "
                          f"{devices}, or --set train.devices={gpus_per_node}")
    return gpus_per_node, True


def fit_recipe(recipe: Recipe, job: Job) -> Recipe:
    """The recipe the job runs: its devices and nodes are the job's, its run directory absolute."""
    train = replace(recipe.train, devices=job.tasks_per_node, num_nodes=job.nodes)
    checkpoint = replace(recipe.checkpoint, out_dir=str(job.run_dir))
    return replace(recipe, train=train, checkpoint=checkpoint)


def time_limit_seconds(value: str) -> int:
    """Seconds in a SLURM time limit; SubmitError for a format sbatch would refuse (like sbatch,
    it takes fields beyond their range: 90 is 90 minutes, 1:70 is 2 min 10 s)."""
    match = TIME_PATTERN.fullmatch(value)
    if match is None:
        raise SubmitError(f"--time {value}: not a SLURM time limit; use {TIME_FORMATS} "
                          "(e.g. 2-00:00:00 for two days)")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    if match[1] is None and match[4] is None:  # MM[:SS]: the fields are minutes and seconds
        hours, minutes, seconds = 0, hours, minutes
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def check_time_limit(value: str) -> None:
    """The limit must leave room for the SIGUSR1 warning (0 is no limit)."""
    seconds = time_limit_seconds(value)
    if 0 < seconds <= SIGNAL_SECONDS:
        raise SubmitError(f"--time {value}: the job is warned {SIGNAL_SECONDS} s before its time "
                          "limit to save a checkpoint; give it more time than that")


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{ name }}`` (a KeyError for a name without a value)."""
    return PLACEHOLDER.sub(lambda match: values[match[1]], template)


def template(name: str) -> str:
    return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def job_options(job: Job) -> list[str]:
    """The #SBATCH lines every job has, after the template's own (shape) lines."""
    options = [("job-name", f"infinitrain-{job.name}"), ("cpus-per-task", job.cpus_per_task),
               ("partition", job.partition), ("time", job.time), ("account", job.account),
               ("qos", job.qos), ("chdir", job.workdir), ("output", job.log()),
               ("open-mode", "append"), ("signal", f"SIGUSR1@{SIGNAL_SECONDS}")]
    lines = [f"#SBATCH --{flag}={value}" for flag, value in options if value is not None]
    return [*lines, "#SBATCH --requeue"]


def render(job: Job, python: str) -> str:
    """The batch script: the GPU or CPU template around the shared launch part."""
    command = [python, "-m", "infinitrain", "pretrain", "--recipe", str(job.recipe_file),
               "--resume", "auto"]
    launch = fill(template("launch.sh"), {"signal_seconds": str(SIGNAL_SECONDS),
                                          "command": shlex.join(command)})
    return fill(template("gpu.sbatch" if job.gpus else "cpu.sbatch"), {
        "title": f"infinitrain submit: recipe {job.name}, {job.shape}, run directory "
                 f"{job.run_dir}",
        "nodes": str(job.nodes),
        "tasks_per_node": str(job.tasks_per_node),
        "job_options": "\n".join(job_options(job)),
        "launch": launch.rstrip("\n"),
    })


def find_sbatch() -> str:
    """sbatch's path, looked up before anything is written."""
    found = shutil.which("sbatch")
    if found is None:
        raise SubmitError("sbatch: not found on PATH; submit from a SLURM login node (or see "
                          "the script with --dry-run)")
    return found


def sbatch(executable: str, script: Path) -> str:
    """Submit the script; returns the job id."""
    result = subprocess.run([executable, "--parsable", str(script)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise SubmitError(f"sbatch {script}: {lines[-1]}")
    return result.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"
