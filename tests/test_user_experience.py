"""What a user sees: output that pipes cleanly, one-line errors, summaries, progress in logs."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, one_line_error, write_run
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.recipe import dump_recipe, load_recipe, parse_recipe, shipped_recipes

INFINITRAIN = Path(sys.executable).with_name("infinitrain")
SMALL = ["model.d_model=64", "model.ffn_dim=128", "model.segment_len=32", "data.window_tokens=64",
         "data.streams=2", "optim.warmup_steps=2", "logging.every_steps=2",
         "checkpoint.every_steps=3"]
VALIDATION = ("data.validation={sources: [{files: [data/pg19-sample/*.parquet]}], "
              "every_steps: 2, windows: 2}")
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


RUN = [*SMALL, VALIDATION, "model.memory_from_layer=1"]
"""The overrides of the `run` fixture's pretraining (layer 0 local: its gate is not logged)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """(run directory, stdout and stderr) of a tiny pretraining run in a child process, whose
    output is not a terminal: what a SLURM log or CI shows."""
    out_dir = tmp_path_factory.mktemp("ux") / "run"
    args = [arg for override in RUN for arg in ("--set", override)]
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
    assert "1 × CPU process" in output and "1 CPU thread each" in output  # OMP_NUM_THREADS=1
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


def test_gates_are_logged_for_the_layers_with_memory_only(run):
    """Layer 0 attends locally (model.memory_from_layer = 1): it has no gate to log."""
    out_dir, _ = run
    columns = set(csv_rows(out_dir)[0])
    assert {"gates/layer_01/mean", "gates/layer_01/min", "gates/layer_01/max"} <= columns
    assert not any(column.startswith("gates/layer_00") for column in columns)


def test_tokens_seen_are_logged(run):
    out_dir, _ = run
    seen = [float(row["tokens_seen"]) for row in csv_rows(out_dir) if row["tokens_seen"]]
    assert seen == [step * TOKENS_PER_STEP for step in (2, 4, 6)]


def test_the_resolved_recipe_is_logged_as_hyperparameters(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out_dir, _ = run
    recipe = load_recipe("tiny", [*RUN, f"checkpoint.out_dir={out_dir}"])[1]
    for logger in ("csv/from-step-00000000", "tensorboard"):
        logged = yaml.safe_load((out_dir / "logs" / logger / "hparams.yaml").read_text())
        assert parse_recipe(logged) == recipe
    # TensorBoard's HPARAMS tab: the recipe's values, and the metrics it shows them against
    events = EventAccumulator(str(out_dir / "logs" / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert [info.name.tag for info in experiment.metric_infos] == ["loss", "val_loss"]
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["optim/lr"].number_value == recipe.optim.lr
    assert session.hparams["data/sources/0/files/0"].string_value == "data/books/austen.jsonl.gz"
    assert session.hparams["model/init"].string_value == "null"


def test_held_out_loss_is_logged_and_summarised(run):
    """Every data.validation.every_steps steps, to every logger, the bar and the summary; it is
    the loss of the checkpoint's weights on the validation windows, memory carried between them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from infinitrain.data import IGNORE_INDEX, build_streams, load_tokenizer
    from infinitrain.inference.loading import load_model

    out_dir, output = run
    rows = [row for row in csv_rows(out_dir) if row.get("val_loss")]
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    losses = [float(row["val_loss"]) for row in rows]
    assert losses[-1] < losses[0]  # the model learns
    loss = losses[-1]
    assert float(rows[-1]["val_perplexity"]) == pytest.approx(math.exp(loss), rel=1e-5)
    events = EventAccumulator(str(out_dir / "logs" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val_loss")] == [2, 4, 6]
    assert events.Scalars("val_loss")[-1].value == pytest.approx(loss, rel=1e-6)
    assert "val loss" in next(line for line in output.splitlines() if line.startswith("step 6/"))
    done = next(line for line in output.splitlines() if line.startswith("Done:"))
    assert f"held-out loss {loss:.4f} at step 6" in done

    # the same number from the final weights, computed here with the full logits
    recipe = load_recipe("tiny", [*SMALL, VALIDATION])[1]
    model = load_model(out_dir / f"step-{STEPS:08d}").model.eval()
    config = recipe.data.stream_config(recipe.model_config.segment_len, recipe.train.seed, 1)
    streams = build_streams(recipe.data.validation.sources, config,
                            load_tokenizer(REPO / "data" / "tokenizer"))
    state, total, count = None, 0.0, 0
    with torch.no_grad():
        for window in itertools.islice(streams, 2):
            logits, state = model(window.input_ids, state, window.reset)
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), window.labels.flatten(), ignore_index=IGNORE_INDEX,
                reduction="sum").item()
            count += int((window.labels != IGNORE_INDEX).sum())
    assert loss == pytest.approx(total / count, rel=1e-4)


def test_validation_every_steps_must_meet_the_logging_interval():
    result = invoke("pretrain", "--recipe", "tiny", "--dry-run", "--set",
                    "data.validation={sources: [{files: [data/books/kjv.jsonl.gz]}], "
                    "every_steps: 15}")
    one_line_error(result, "data.validation.every_steps = 15: must be a multiple of "
                           "logging.every_steps = 10")


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


def test_a_resume_may_change_the_validation_set_but_not_the_training_data(tmp_path: Path):
    from infinitrain.training.checkpoint import ResumeError
    from infinitrain.training.run import check_same_streams

    saved = load_recipe("tiny", SMALL)[1]
    check_same_streams(load_recipe("tiny", [*SMALL, VALIDATION])[1], saved, tmp_path)
    with pytest.raises(ResumeError, match="data differ"):
        check_same_streams(load_recipe("tiny", [*SMALL, VALIDATION, "data.mode=concat"])[1],
                           saved, tmp_path)


def test_a_passkey_source_too_short_for_a_prompt_fails_in_one_line(tmp_path: Path):
    """It was a traceback from deep in the data pipeline."""
    result = invoke("pretrain", "--recipe", "passkey-tiny", "--out-dir", str(tmp_path / "run"),
                    "--set", "data.sources.0.passkey_length_min=80")
    one_line_error(result, "passkey (80–127 tokens): passkey length = 80 tokens: too short")
    assert "raise passkey_length_min" in result.stderr
