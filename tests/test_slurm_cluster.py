"""`infinitrain submit` against a real SLURM cluster (tests/slurm_cluster.py): a 2-task CPU job
(DDP over gloo, two processes started by srun) trains the tiny recipe; a second one, sent SIGUSR1
mid-run, saves a checkpoint, requeues itself, resumes and ends with the first one's exact weights.

Both jobs run at the same time (the node has room for two), so this module takes about as long
as the preempted job: its two start-ups dominate.
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file
from slurm_cluster import ClusterUnavailable, LocalSlurm
from typer.testing import CliRunner

from infinitrain.cli import app

REPO = Path(__file__).resolve().parent.parent
STEPS = 30
"""Enough that SIGUSR1, sent once the job logs its first step, arrives well before its last."""
SMALL = ["train.devices=2", f"train.max_steps={STEPS}", "data.streams=1", "optim.warmup_steps=2",
         "logging.every_steps=1", "logging.tensorboard=false", "checkpoint.every_steps=10"]
WAIT_SECONDS = 240
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}


@dataclass
class SubmittedRun:
    job_id: str
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.run_dir / "slurm" / f"{self.job_id}.log"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as why:
        pytest.skip(f"SLURM TESTS SKIPPED, NOTHING OF `infinitrain submit` RAN ON A CLUSTER: "
                    f"{why}")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(cluster.config))
            yield cluster
    finally:
        cluster.stop()


def wait_for(condition: Callable[[], bool], what: str, slurm: LocalSlurm, log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text()[-4000:] if log.exists() else "(no job log)"
            pytest.fail(f"no {what} after {WAIT_SECONDS} s\n--- job log\n{text}\n"
                        f"{slurm.logs()}")
        time.sleep(0.2)


def submit(run_dir: Path) -> SubmittedRun:
    args = ["submit", "--recipe", "tiny", "--out-dir", str(run_dir),
            *(arg for override in SMALL for arg in ("--set", override))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return SubmittedRun(re.search(r"Submitted job (\d+)", result.stdout)[1], run_dir)


def finished(slurm: LocalSlurm, run: SubmittedRun) -> dict[str, str]:
    wait_for(lambda: slurm.job(run.job_id)["JobState"] in ENDED, f"end of job {run.job_id}",
             slurm, run.log)
    job = slurm.job(run.job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), run.log.read_text()
    return job


@pytest.fixture(scope="module")
def runs(slurm: LocalSlurm, tmp_path_factory: pytest.TempPathFactory,
         ) -> tuple[SubmittedRun, SubmittedRun]:
    """(uninterrupted, preempted): both submitted at once; the second is sent SIGUSR1, as SLURM
    does before a time limit, once it has trained a step."""
    runs_dir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the recipe's data paths are relative to the repository
        uninterrupted = submit(runs_dir / "uninterrupted")
        preempted = submit(runs_dir / "preempted")
    wait_for(lambda: preempted.log.exists() and f"step 1/{STEPS}" in preempted.log.read_text(),
             "training step in the job to preempt", slurm, preempted.log)
    slurm.run("scancel", "--signal=USR1", preempted.job_id)
    return uninterrupted, preempted


def test_submitted_cpu_job_trains_and_checkpoints(slurm, runs):
    uninterrupted, _ = runs
    job = finished(slurm, uninterrupted)
    assert job["Restarts"] == "0"
    final = uninterrupted.run_dir / f"step-{STEPS:08d}"
    assert (uninterrupted.run_dir / "latest").read_text().strip() == final.name
    manifest = json.loads((final / "checkpoint.json").read_text())
    assert (manifest["step"], manifest["world_size"]) == (STEPS, 2)
    assert sorted(p.name for p in (final / "streams").iterdir()) == [
        "rank-00000.safetensors", "rank-00001.safetensors"]
    with open(uninterrupted.run_dir / "logs/csv/from-step-00000000/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    # logged at the optimizer steps done, as the progress line and the checkpoint names count
    assert [int(row["step"]) for row in rows] == list(range(1, STEPS + 1))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_preempted_job_requeues_resumes_and_matches(slurm, runs):
    uninterrupted, preempted = runs
    job = finished(slurm, preempted)
    assert job["Restarts"] == "1"
    log = preempted.log.read_text()
    assert f"infinitrain: job {preempted.job_id} restart 0 " in log
    assert f"infinitrain: job {preempted.job_id} restart 1 " in log  # SLURM_RESTART_COUNT=1
    stopped = int(re.search(r"SIGUSR1: stopped at step (\d+) with a checkpoint", log)[1])
    assert 0 < stopped < STEPS
    # The rerun started from the SIGUSR1 checkpoint, not from scratch.
    assert sorted(p.name for p in (preempted.run_dir / "logs/csv").iterdir()) == [
        "from-step-00000000", f"from-step-{stopped:08d}"]
    finished(slurm, uninterrupted)
    final = f"step-{STEPS:08d}/model.safetensors"
    expected = load_file(uninterrupted.run_dir / final)
    resumed = load_file(preempted.run_dir / final)
    assert expected.keys() == resumed.keys()
    assert all(resumed[name].equal(expected[name]) for name in expected)
