"""`infinitrain submit` without a cluster: the rendered scripts line by line, the files it writes,
how it calls sbatch, and its one-line errors. (test_slurm_cluster.py runs the jobs for real.)"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.recipe import load_recipe
from infinitrain.slurm import SubmitError, time_limit_seconds

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The shipped recipes name data paths relative to the repository."""
    monkeypatch.chdir(REPO)


def submit(*args: str):
    return CliRunner().invoke(app, ["submit", *args])


def dry_run(*args: str) -> str:
    result = submit(*args, "--dry-run")
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def srun_line(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def test_multi_node_gpu_script(tmp_path):
    run = tmp_path / "run"
    script = dry_run("--recipe", "8b", "--nodes", "4", "--gpus-per-node", "8",
                     "--cpus-per-task", "12", "--partition", "gpu", "--time", "2-00:00:00",
                     "--account", "proj", "--qos", "high", "--out-dir", str(run))
    assert sbatch_lines(script) == [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --job-name=infinitrain-8b",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        f"#SBATCH --chdir={REPO}",
        f"#SBATCH --output={run}/slurm/%j.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
    ]
    assert srun_line(script) == ["srun", "--kill-on-bad-exit=1", sys.executable, "-m",
                                 "infinitrain", "pretrain", "--recipe", f"{run}/slurm/8b.yaml",
                                 "--resume", "auto"]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ('MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                     "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))",
                     "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
                     "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"):
        assert expected in lines
    # Every #SBATCH line before the first command, or sbatch ignores it; and valid bash.
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(lines.index(line) < first_command for line in sbatch_lines(script))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_single_node_gpu_script_takes_the_recipes_devices():
    script = dry_run("--recipe", "1b")  # train.devices: 8, one node
    assert sbatch_lines(script)[:3] == ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8",
                                        "#SBATCH --gpus-per-node=8"]
    assert "#SBATCH --time" not in script and "#SBATCH --partition" not in script


def test_cpu_script_runs_one_task_per_process():
    script = dry_run("--recipe", "tiny", "--set", "train.devices=2", "--nodes", "2")
    shape = sbatch_lines(script)[:3]
    assert shape == ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2",
                     "#SBATCH --job-name=infinitrain-tiny"]
    assert "gpus" not in script and "NCCL" not in script
    assert srun_line(script)[:3] == ["srun", "--kill-on-bad-exit=1", sys.executable]


def test_submit_writes_the_job_and_prints_how_to_follow_it(tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-args"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" > {calls}\necho "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    run = tmp_path / "run"
    result = submit("--recipe", "8b", "--nodes", "3", "--gpus-per-node", "8",
                    "--out-dir", str(run), "--set", "optim.lr=1e-4")
    assert result.exit_code == 0, result.output
    script = run / "slurm" / "8b.sbatch"
    assert calls.read_text().split() == ["--parsable", str(script)]
    assert script.read_text() == dry_run("--recipe", "8b", "--nodes", "3", "--gpus-per-node",
                                         "8", "--out-dir", str(run))
    for expected in ("Submitted job 4242", f"tail -f {run}/slurm/4242.log", "squeue -j 4242",
                     "scontrol show job 4242"):
        assert expected in result.stdout
    # The job runs the resolved recipe, shaped like the job; its name is the recipe's.
    name, ran = load_recipe(str(run / "slurm" / "8b.yaml"))
    assert (name, ran.train.num_nodes, ran.train.devices) == ("8b", 3, 8)
    assert (ran.optim.lr, ran.checkpoint.out_dir) == (1e-4, str(run))
    assert yaml.safe_load((run / "slurm" / "8b.yaml").read_text())["train"]["strategy"] == \
        "deepspeed"


def error_of(*args: str) -> str:
    result = submit(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_error_when_sbatch_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "sbatch: not found on PATH" in error_of("--recipe", "1b", "--out-dir",
                                                   str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_error_when_sbatch_refuses(tmp_path, monkeypatch):
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert "invalid partition specified: nope" in error_of(
        "--recipe", "1b", "--partition", "nope", "--out-dir", str(tmp_path / "run"))


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", "1b", "--gpus-per-node", "4"],
     "train.devices = 8 asks for more GPUs per node than the job gives (--gpus-per-node 4)"),
    (["--recipe", "1b", "--gpus-per-node", "16"],
     "train.devices = 8, but the job gives 16 GPUs per node"),
    (["--recipe", "1b", "--set", "train.devices=-1"], "--gpus-per-node"),
    (["--recipe", "tiny", "--gpus-per-node", "2"], "train.accelerator = cpu"),
    (["--recipe", "tiny", "--set", "train.devices=-1"], "a CPU job needs the number"),
    (["--recipe", "1b", "--time", "1h"], "--time 1h: not a SLURM time limit"),
    (["--recipe", "1b", "--time", "1"], "warned 90 s before its time limit"),
    (["--recipe", "nope"], "recipe 'nope': not a shipped recipe"),
])
def test_one_line_errors(args, message):
    assert message in error_of(*args, "--dry-run")


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 1800), ("30:15", 1815), ("12:00:00", 43200), ("2-12", 216000),
    ("1-01:30", 91800), ("1-00:00:05", 86405), ("0", 0), ("1:70", 130)])
def test_time_limit_formats(value, seconds):
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("value", ["1h", "1:2:3:4", "1.5", "", "1-2:3:4:5", "2-"])
def test_time_limit_refuses_other_formats(value):
    with pytest.raises(SubmitError):
        time_limit_seconds(value)
