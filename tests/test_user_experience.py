"""What a user sees: output that pipes cleanly, one-line errors, summaries, progress in logs."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, one_line_error, write_run
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.recipe import dump_recipe, load_recipe, parse_recipe, shipped_recipes

INFINITRAIN = Path(sys.executable).with_name("infinitrain")
SMALL = ["model.d_model=64", "model.ffn_dim=128", "model.segment_len=32", "data.window_tokens=64",
         "data.streams=2", "optim.warmup_steps=2", "logging.every_steps=2",
         "checkpoint.every_steps=3"]
STEPS = 6
TOKENS_PER_STEP = 64 * 2


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The shipped recipes' data paths are relative to the repository."""
    monkeypatch.chdir(REPO)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_piped_recipes_show_is_the_recipe_file_verbatim():
    """Rich would wrap the long comment lines at 80 columns, breaking the YAML."""
    text = shipped_recipes()["tiny"]
    assert max(len(line) for line in text.splitlines()) > 80  # what rich would wrap
    shown = invoke("recipes", "show", "tiny")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == text
    assert yaml.safe_load(shown.stdout) == yaml.safe_load(text)


def test_piped_resolved_recipe_parses_back_to_the_same_recipe():
    shown = invoke("recipes", "show", "booksum-500k", "--resolved")
    assert shown.exit_code == 0, shown.output
    assert parse_recipe(yaml.safe_load(shown.stdout)) == load_recipe("booksum-500k")[1]
    assert shown.stdout.rstrip("\n") == dump_recipe(load_recipe("booksum-500k")[1]).rstrip("\n")


def test_recipes_copy_writes_the_recipe_with_its_comments(tmp_path: Path):
    target = tmp_path / "my.yaml"
    copied = invoke("recipes", "copy", "tiny", str(target))
    assert copied.exit_code == 0, copied.output
    assert target.read_text(encoding="utf-8") == shipped_recipes()["tiny"]
    assert "# " in target.read_text(encoding="utf-8")
    assert invoke("recipes", "show", str(target)).stdout == shipped_recipes()["tiny"]


def test_recipes_copy_refuses_to_overwrite_a_file(tmp_path: Path):
    target = tmp_path / "my.yaml"
    target.write_text("mine\n")
    one_line_error(invoke("recipes", "copy", "tiny", str(target)), "already exists")
    assert target.read_text() == "mine\n"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_an_install_hint_in_brackets_is_printed_as_written(tmp_path: Path):
    """rich markup read `[wandb]` as a tag and printed `pip install 'infinitrain'`."""
    result = invoke("pretrain", "--recipe", "tiny", "--out-dir", str(tmp_path / "run"),
                    "--set", "logging.wandb=true")
    one_line_error(result, "pip install 'infinitrain[wandb]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """(run directory, stdout and stderr) of a tiny pretraining run in a child process, whose
    output is not a terminal: what a SLURM log or CI shows."""
    out_dir = tmp_path_factory.mktemp("ux") / "run"
    args = [arg for override in SMALL for arg in ("--set", override)]
    done = subprocess.run(
        [str(INFINITRAIN), "pretrain", "--recipe", "tiny", "--out-dir", str(out_dir),
         "--max-steps", str(STEPS), *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out_dir, done.stdout + done.stderr


def test_a_run_prints_our_banner_and_summary_not_lightnings_noise(run):
    out_dir, output = run
    for noise in ("GPU available", "TPU available", "litlogger", "FLOPs", "Trainer.fit"):
        assert noise not in output, output
    assert f"run directory: {out_dir}" in output and "parameters" in output
    assert "1 × CPU process" in output
    done = next(line for line in output.splitlines() if line.startswith("Done:"))
    assert f"steps 0 → {STEPS}" in done and f"{STEPS * TOKENS_PER_STEP:,} tokens" in done
    assert "loss" in done and "best" in done
    assert f"Checkpoint: {out_dir / f'step-{STEPS:08d}'}" in output
    assert f"infinitrain eval perplexity --model {out_dir}" in output
    assert f"infinitrain export hf {out_dir}" in output


def csv_rows(out_dir: Path) -> list[dict[str, str]]:
    (path,) = (out_dir / "logs" / "csv").glob("*/metrics.csv")
    with path.open() as file:
        return list(csv.DictReader(file))


def test_logged_steps_are_the_steps_of_the_bar_and_the_checkpoints(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir, output = run
    logged = [int(row["step"]) for row in csv_rows(out_dir) if row["loss"]]
    assert logged == [2, 4, 6]
    assert "step 2/6" in output and (out_dir / f"step-{STEPS:08d}").is_dir()
    events = EventAccumulator(str(out_dir / "logs" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == logged


def test_tokens_seen_are_logged(run):
    out_dir, _ = run
    seen = [float(row["tokens_seen"]) for row in csv_rows(out_dir) if row["tokens_seen"]]
    assert seen == [step * TOKENS_PER_STEP for step in (2, 4, 6)]


def test_the_resolved_recipe_is_logged_as_hyperparameters(run):
    out_dir, _ = run
    recipe = load_recipe("tiny", [*SMALL, f"checkpoint.out_dir={out_dir}"])[1]
    for logger in ("csv/from-step-00000000", "tensorboard"):
        logged = yaml.safe_load((out_dir / "logs" / logger / "hparams.yaml").read_text())
        assert parse_recipe(logged) == recipe


def test_dry_run_counts_read_naturally():
    result = invoke("pretrain", "--recipe", "tiny", "--dry-run", "--set", "data.streams=1")
    assert result.exit_code == 0, result.output
    assert "(918K)" in result.output and "0.00B" not in result.output
    assert "(1 stream)" in result.output


def test_eval_in_a_log_prints_plain_progress_lines(tmp_path: Path):
    """Rich draws no bar into a file: a SLURM log showed nothing for the whole evaluation."""
    write_run(tmp_path / "run")
    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged. " * 200)
    done = subprocess.run(
        [str(INFINITRAIN), "eval", "perplexity", "--model", str(tmp_path / "run"), "--data",
         str(book), "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("scoring:")]
    assert re.fullmatch(r"scoring: 100%  ([\d,]+)/\1 tokens  [\d,]+ tokens/s  ETA 0:00:00", line)
    assert "━" not in done.stderr


def test_weights_are_as_readable_as_the_files_beside_them(tmp_path: Path):
    """safetensors wrote weights and states 0600 through a temporary file, every other file
    was 0644."""
    step = write_run(tmp_path / "run")
    exported = tmp_path / "hf"
    result = invoke("export", "hf", str(step), str(exported))
    assert result.exit_code == 0, result.output
    state, document = tmp_path / "doc.state", tmp_path / "doc.txt"  # written the same way
    document.write_text("It is a truth universally acknowledged.")
    result = invoke("generate", "--model", str(step), "--file", str(document),
                    "--save-state", str(state), "--device", "cpu")
    assert result.exit_code == 0, result.output
    for weights in (step / "model.safetensors", exported / "model.safetensors", state):
        beside = weights.with_name("written-by-open")
        with open(beside, "w"):
            pass
        assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(beside.stat().st_mode)


def test_generate_counts_one_token_in_the_singular(tmp_path: Path):
    """It reported "1 prompt tokens" and "1 new tokens"."""
    write_run(tmp_path / "run")
    result = invoke("generate", "--model", str(tmp_path / "run"), "--prompt", "",
                    "--max-new-tokens", "1", "--device", "cpu")  # the prompt is BOS alone
    assert result.exit_code == 0, result.output
    assert "1 prompt token at" in result.stderr and "1 new token at" in result.stderr


def test_a_state_loads_without_a_false_warning_from_another_directory(tmp_path: Path,
                                                                      monkeypatch):
    """The state stored the model's path as given ("run"), which elsewhere named another model."""
    write_run(tmp_path / "run")
    (tmp_path / "doc.txt").write_text("It is a truth universally acknowledged. " * 20)
    monkeypatch.chdir(tmp_path)
    saved = invoke("generate", "--model", "run", "--file", "doc.txt", "--save-state",
                   "doc.state", "--device", "cpu")
    assert saved.exit_code == 0, saved.output
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = invoke("generate", "--model", "../run", "--state", "../doc.state", "--prompt", "Who?",
                    "--max-new-tokens", "1", "--device", "cpu")
    assert loaded.exit_code == 0, loaded.output
    assert "memory state ../doc.state" in loaded.stderr and "Warning" not in loaded.stderr
