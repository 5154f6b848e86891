"""Checkpoint directories: atomic publishing, pruning, finding the one to resume, mismatches."""

from __future__ import annotations

import pytest
import torch

from infinitrain.layout import step_name
from infinitrain.model import InfiniTransformer, preset
from infinitrain.model_dir import load_model_dir, save_model_dir
from infinitrain.recipe import RecipeError
from infinitrain.training.checkpoint import (
    Manifest,
    ResumeError,
    find_checkpoint,
    publish,
    staging_dir,
    write_manifest,
)
from infinitrain.training.weights import check_init, model_from_state_dict


def staged(out_dir, step: int):
    """A fully written checkpoint waiting to be published."""
    path = staging_dir(out_dir, step, owner=1)
    path.mkdir(parents=True)
    write_manifest(path, Manifest(step, 1, 2, 64, "single"))
    return path


def test_publish_renames_points_latest_and_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30):
        publish(staged(tmp_path, step), tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_name(20), step_name(30)]
    assert (tmp_path / "latest").read_text() == f"{step_name(30)}\n"
    assert find_checkpoint("auto", tmp_path) == tmp_path / step_name(30)


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    publish(staged(tmp_path, 10), tmp_path, 10, keep_last=3)
    crashed = staging_dir(tmp_path, 20, owner=2)
    crashed.mkdir()
    (crashed / "trainer.ckpt").write_bytes(b"truncat")
    assert find_checkpoint("auto", tmp_path) == tmp_path / step_name(10)
    assert find_checkpoint(str(tmp_path), tmp_path) == tmp_path / step_name(10)


def test_latest_pointer_wins_and_falls_back_to_the_newest_complete(tmp_path):
    publish(staged(tmp_path, 10), tmp_path, 10, keep_last=3)
    publish(staged(tmp_path, 20), tmp_path, 20, keep_last=3)
    (tmp_path / "latest").write_text(step_name(10))  # a run resumed from 10 on purpose
    assert find_checkpoint("auto", tmp_path) == tmp_path / step_name(10)
    (tmp_path / "latest").write_text("step-99999999")  # points nowhere: take the newest
    assert find_checkpoint("auto", tmp_path) == tmp_path / step_name(20)


def test_republishing_a_step_and_pruning_never_touch_newer_timelines(tmp_path):
    for step in (10, 20, 30):
        publish(staged(tmp_path, step), tmp_path, step, keep_last=1)
    publish(staged(tmp_path, 20), tmp_path, 20, keep_last=1)  # resumed from an older checkpoint
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_name(20), step_name(30)]
    assert find_checkpoint("auto", tmp_path) == tmp_path / step_name(20)


def test_no_checkpoint_to_resume(tmp_path):
    assert find_checkpoint("auto", tmp_path / "new") is None
    with pytest.raises(ResumeError, match="neither a checkpoint"):
        find_checkpoint(str(tmp_path), tmp_path)


def test_a_different_world_size_is_refused_with_the_reason(tmp_path):
    manifest = Manifest(step=5, world_size=4, streams_per_rank=2, window_tokens=64,
                        strategy="ddp")
    manifest.check_compatible(4, 2, 64, tmp_path)
    with pytest.raises(ResumeError, match=r"by 4 processes × 2 streams .* this run has 2 × 2"):
        manifest.check_compatible(2, 2, 64, tmp_path)


def test_the_model_directory_written_from_a_saved_state_dict_is_the_model(tmp_path):
    """What rank 0 writes as the inference model when the live model is sharded (ZeRO-3, FSDP)."""
    config = preset("tiny", d_model=32, ffn_dim=64)
    torch.manual_seed(0)
    model = InfiniTransformer(config)
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()
             if name != "lm_head.weight"}  # tied: sharded checkpoints may store it once
    save_model_dir(model_from_state_dict(config, saved), tmp_path)
    ids = torch.randint(0, config.vocab_size, (1, 70))
    torch.testing.assert_close(load_model_dir(tmp_path)(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_init_weights_must_have_the_recipes_parameters(tmp_path):
    """A write-gated model has parameters an ungated one lacks: refused before training, by name."""
    config = preset("tiny", d_model=32, ffn_dim=64, memory_rule="deltanet")
    save_model_dir(InfiniTransformer(config), tmp_path)
    assert check_init(tmp_path, config) == tmp_path
    gated = preset("tiny", d_model=32, ffn_dim=64, memory_rule="deltanet", memory_write_gate=True)
    with pytest.raises(RecipeError, match="memory_write_gate False vs True"):
        check_init(tmp_path, gated)
