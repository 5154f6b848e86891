"""Fault injection: what a user, a cluster or a bad disk does to a run, and what survives.

Every case ends either in a run that continues correctly or in one ``Error:`` line (exit 2) that
names the problem and the fix, with what is on disk checked: no NaN checkpoint, no run's result
silently replaced, damaged checkpoints detected and skipped, the recorded recipe equal to what ran.
Runs are the tiny recipe through the real CLI, shrunk to seconds (SMALL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_cli import (
    REPO,
    SMALL,
    checkpoint,
    pretrain,
    start_pretrain,
    trained,
    wait_until,
)
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data.passkey import PasskeyGenerator
from infinitrain.recipe import parse_recipe
from infinitrain.training.checkpoint import ResumeError, damage
from infinitrain.training.optim import lr_factor
from infinitrain.training.run import check_same_optimizer


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The recipe's data paths are relative to the repository."""
    monkeypatch.chdir(REPO)


def one_error_line(result, expected: str) -> str:
    """Exit status 2, no traceback, and exactly one ``Error:`` line, which says ``expected``."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    return errors[0]


def all_finite(step_dir: Path) -> bool:
    weights = load_file(str(step_dir / "model.safetensors"))
    return all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())


def staging_left(run: Path) -> list[str]:
    return sorted(path.name for path in run.glob(".tmp-*"))


# -- NaN and inf ---------------------------------------------------------------------------------

def test_a_diverging_run_stops_in_one_line_and_never_saves_nan(tmp_path):
    run = tmp_path / "diverges"
    result = pretrain(run, "--max-steps", "6", overrides=[
        *SMALL, "optim.lr=1e30", "optim.grad_clip=0", "checkpoint.every_steps=1",
        "checkpoint.keep_last=1"])
    line = one_error_line(result, "step 2: non-finite gradient norm")
    assert "train.max_nonfinite_steps = 0" in line and "lower optim.lr" in line
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000001"]  # kept, not pruned
    assert all_finite(checkpoint(run, 1)) and not staging_left(run)


def test_skipped_steps_are_counted_before_the_run_stops(tmp_path):
    result = pretrain(tmp_path / "skips", "--max-steps", "6", overrides=[
        *SMALL, "optim.lr=1e30", "optim.grad_clip=0", "train.max_nonfinite_steps=2"])
    one_error_line(result, "for 3 step(s) in a row (train.max_nonfinite_steps = 2)")
    assert "skipped without an update (2 of train.max_nonfinite_steps = 2)" in result.output


@pytest.mark.parametrize("field", ["optim.lr", "optim.eps"])
def test_an_infinite_optimizer_setting_is_refused_by_the_dry_run(tmp_path, field):
    result = pretrain(tmp_path / "x", "--dry-run", overrides=[*SMALL, f"{field}=.inf"])
    one_error_line(result, f"{field} = inf: expected a finite number")


# -- two runs, one directory ---------------------------------------------------------------------

def test_a_second_run_in_a_busy_out_dir_fails_at_once_and_a_dead_ones_lock_is_taken_over(
        tmp_path):
    run = tmp_path / "shared"
    first = start_pretrain(run, 100, [*SMALL, "checkpoint.every_steps=2"])
    try:
        wait_until(first, lambda: f"pid {first.pid}" in _read(run / ".lock"), 180)
        second = pretrain(run, "--max-steps", "2", overrides=[*SMALL, "train.seed=7"])
        line = one_error_line(second, "in use by another run")
        assert f"pid {first.pid}" in line
        wait_until(first, (checkpoint(run, 2) / "checkpoint.json").exists, 180)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert yaml.safe_load((checkpoint(run, 2) / "recipe.yaml").read_text())["train"]["seed"] == 0
    with pytest.warns(UserWarning, match=f"taking over the lock left by .*pid {first.pid}"):
        trained(run, "--max-steps", "4", "--resume", "auto")
    assert _read(run / ".lock") == ""  # a run that ended names no holder


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# -- damaged checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 3 and 6."""
    out_dir = tmp_path_factory.mktemp("six")
    os.chdir(REPO)
    trained(out_dir, "--max-steps", "6")
    return out_dir


def overwrite_middle(path: Path) -> None:
    """Garbage over 100 bytes in the middle: same size, other content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 100] = b"\xa5" * 100
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


DAMAGE = {
    "overwritten trainer.ckpt": (lambda step: overwrite_middle(step / "trainer.ckpt"),
                                 "trainer.ckpt does not match its checksum"),
    "truncated trainer.ckpt": (lambda step: truncate(step / "trainer.ckpt"),
                               "trainer.ckpt has"),
    "truncated stream state": (lambda step: truncate(step / "streams/rank-00000.safetensors"),
                               "streams/rank-00000.safetensors has"),
    "garbage checkpoint.json": (lambda step: (step / "checkpoint.json").write_bytes(b"\x00{x"),
                                "checkpoint.json: unreadable"),
    "missing recipe.yaml": (lambda step: (step / "recipe.yaml").unlink(),
                            "recipe.yaml is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_continues_from_the_intact_one(
        six_steps, tmp_path, kind):
    run = tmp_path / "damaged"
    shutil.copytree(six_steps, run)
    spoil, reason = DAMAGE[kind]
    spoil(checkpoint(run, 6))
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*step-00000006: .*{reason}"):
        trained(run, "--max-steps", "6", "--resume", "auto")
    assert damage(checkpoint(run, 6)) is None  # written again from step 3, exactly as before
    assert load_file(str(checkpoint(run, 6) / "model.safetensors")).keys() == \
        load_file(str(checkpoint(six_steps, 6) / "model.safetensors")).keys()
    for name, tensor in load_file(str(checkpoint(six_steps, 6) / "model.safetensors")).items():
        assert torch.equal(load_file(str(checkpoint(run, 6) / "model.safetensors"))[name],
                           tensor), name


def test_a_damaged_checkpoint_named_explicitly_or_a_run_without_intact_ones_is_refused(
        six_steps, tmp_path):
    run = tmp_path / "all-damaged"
    shutil.copytree(six_steps, run)
    overwrite_middle(checkpoint(run, 6) / "trainer.ckpt")
    one_error_line(pretrain(run, "--max-steps", "6", "--resume", str(checkpoint(run, 6))),
                   "trainer.ckpt does not match its checksum")
    truncate(checkpoint(run, 3) / "model.safetensors")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        result = pretrain(run, "--max-steps", "6", "--resume", "auto")
    one_error_line(result, "no intact checkpoint to resume from")


def test_eval_and_export_refuse_damaged_weights_in_one_line(six_steps, tmp_path):
    run = tmp_path / "eval"
    shutil.copytree(six_steps, run)
    truncate(checkpoint(run, 6) / "model.safetensors")
    runner = CliRunner()
    one_error_line(runner.invoke(app, ["eval", "passkey", "--model", str(run), "--lengths",
                                       "256", "--samples", "1", "--depths", "0"]),
                   "damaged checkpoint, model.safetensors has")
    one_error_line(runner.invoke(app, ["export", "hf", str(run), str(tmp_path / "hf")]),
                   "damaged checkpoint, model.safetensors has")
    plain = tmp_path / "plain"  # a model directory without a manifest
    shutil.copytree(checkpoint(run, 6), plain, ignore=shutil.ignore_patterns("checkpoint.json"))
    one_error_line(runner.invoke(app, ["export", "hf", str(plain), str(tmp_path / "hf2")]),
                   "model.safetensors: unreadable")


# -- honest resumes ------------------------------------------------------------------------------

def test_a_resume_with_a_changed_learning_rate_is_refused_or_applied_and_recorded(
        six_steps, tmp_path):
    run = tmp_path / "lr"
    shutil.copytree(six_steps, run)
    shutil.rmtree(checkpoint(run, 6))
    changed = [*SMALL, "optim.lr=1e-3"]
    one_error_line(pretrain(run, "--max-steps", "6", "--resume", "auto", overrides=changed),
                   "optim.lr (0.003 → 0.001) differ from the checkpoint's")
    trained(run, "--max-steps", "6", "--resume", "auto", "--apply-optim-changes",
            overrides=changed)
    final = checkpoint(run, 6)
    assert yaml.safe_load((final / "recipe.yaml").read_text())["optim"]["lr"] == 1e-3
    state = torch.load(final / "trainer.ckpt", weights_only=True)
    groups = {g["name"]: g for g in state["optimizer_states"][0]["param_groups"]}
    assert groups["decay"]["initial_lr"] == 1e-3 and groups["gates"]["initial_lr"] == 1e-2
    assert groups["decay"]["lr"] == pytest.approx(1e-3 * lr_factor(6, 2, 300, 0.1))
    assert state["lr_schedulers"][0]["base_lrs"][0] == 1e-3


def test_apply_optim_changes_is_refused_in_one_line_under_deepspeed(six_steps):
    """DeepSpeed's engine keeps the optimizer state where the flag cannot rewrite it."""
    step = checkpoint(six_steps, 6)
    saved = parse_recipe(yaml.safe_load((step / "recipe.yaml").read_text()))
    changed = replace(saved, optim=replace(saved.optim, lr=1e-3))
    check_same_optimizer(changed, saved, step, apply_optim_changes=True, strategy="ddp")
    with pytest.raises(ResumeError, match="cannot rewrite a DeepSpeed optimizer state"):
        check_same_optimizer(changed, saved, step, apply_optim_changes=True,
                             strategy="deepspeed")


# -- the machine ---------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_during_a_checkpoint_fails_in_one_line_and_leaves_no_partial_one(tmp_path):
    with tmpfs(tmp_path / "small", "size=9m") as disk:  # one checkpoint (~6 MB) fits, not two
        run = disk / "run"
        one_error_line(pretrain(run, "--max-steps", "6"), "step 6: cannot write the checkpoint")
        assert sorted(p.name for p in run.glob("step-*")) == ["step-00000003"]
        assert damage(checkpoint(run, 3)) is None and not staging_left(run)


def test_a_read_only_out_dir_fails_in_one_line_before_any_work(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        one_error_line(pretrain(disk / "run", "--max-steps", "2"), "cannot write there")


def test_a_model_too_big_for_this_machine_is_refused_by_the_dry_run(tmp_path):
    one_error_line(pretrain(tmp_path / "x", "--dry-run",
                            overrides=[*SMALL, "model.d_model=10000000"]),
                   "more than this machine's")


# -- recipe and input mistakes -------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**33)])
def test_an_out_of_range_seed_is_refused_by_the_dry_run(tmp_path, seed):
    one_error_line(pretrain(tmp_path / "x", "--dry-run", "--seed", seed), "train.seed")


def test_a_recipe_that_is_not_utf8_or_repeats_a_key_is_refused(tmp_path):
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(("# café\n" + text).encode("latin-1"))
    one_error_line(CliRunner().invoke(app, ["pretrain", "--recipe", str(latin1), "--dry-run"]),
                   "not UTF-8 text")
    twice = tmp_path / "twice.yaml"
    twice.write_text(text.replace("  lr: 3.0e-3\n", "  lr: 3.0e-3\n  lr: 1.0\n"))
    one_error_line(CliRunner().invoke(app, ["pretrain", "--recipe", str(twice), "--dry-run"]),
                   "duplicate key 'lr'")


def test_a_data_file_that_is_not_utf8_is_named_as_such(tmp_path):
    data = tmp_path / "notes.txt"
    data.write_bytes("plain text, then a Latin-1 byte: caf\xe9\n".encode("latin-1") * 50)
    result = pretrain(tmp_path / "run", "--max-steps", "1",
                      overrides=[*SMALL, f"data.sources=[{{files: [{data}]}}]"])
    one_error_line(result, "not UTF-8 text")


def test_import_hf_names_only_the_architectures_the_config_has(tmp_path):
    source = tmp_path / "mistral"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "mistral"}')
    result = CliRunner().invoke(app, ["import", "hf", str(source), str(tmp_path / "out")])
    one_error_line(result, "model_type 'mistral', architectures None")


def test_a_passkey_prompt_of_a_billion_tokens_streams_in_bounded_pieces(data_tokenizer):
    generator = PasskeyGenerator(data_tokenizer)
    sample, pieces = generator.stream(10**9, 0.5, seed=3, chunk_tokens=4096)
    first = [next(pieces) for _ in range(50)]
    assert max(len(piece) for piece in first) <= 4096 and sample.needle_offset > 4 * 10**8
    small, small_pieces = generator.stream(5000, 0.3, seed=4, chunk_tokens=64)
    assert torch.equal(torch.cat(list(small_pieces)),
                       generator.sample(5000, 0.3, seed=4).prompt_ids)
    assert small.key == generator.sample(5000, 0.3, seed=4).key
    generator.check_length(10**9)  # what `eval passkey` checks first, without a prompt
    with pytest.raises(ValueError, match="too short"):
        generator.check_length(10)

