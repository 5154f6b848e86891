"""Strategy choice: impossible combinations fail early, with the fix in the message."""

from __future__ import annotations

import os

import pytest

from infinitrain.recipe import DeepSpeedSection, RecipeError, load_recipe
from infinitrain.training.strategy import check_fits, deepspeed_config, plan, threads_per_process

GIB = 2**30


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.strategy=deepspeed", "train.accelerator=auto"],
     "train.strategy = deepspeed: needs CUDA GPUs"),
    (["train.precision=16-mixed"], "train.precision = 16-mixed: fp16 needs a GPU"),
    (["train.accelerator=gpu"], "no CUDA GPU is visible"),
    (["train.devices=-1"], "train.devices = -1 means every GPU"),
])
def test_impossible_on_a_cpu(overrides, message):
    _, recipe = load_recipe("tiny", overrides)
    with pytest.raises(RecipeError, match=message):
        plan(recipe, parameters=1000)


def test_cpu_processes_use_ddp_over_gloo():
    _, recipe = load_recipe("tiny", ["train.devices=2"])
    chosen = plan(recipe, parameters=1000)
    assert (chosen.kind, chosen.accelerator, chosen.world_size) == ("ddp", "cpu", 2)
    assert chosen.strategy._process_group_backend == "gloo"
    assert chosen.gradient_clip_val == 1.0
    assert plan(load_recipe("tiny")[1], parameters=1000).kind == "single"


def test_cpu_processes_run_fsdp2_over_gloo_on_one_data_parallel_dimension():
    _, recipe = load_recipe("tiny", ["train.strategy=fsdp", "train.devices=2"])
    chosen = plan(recipe, parameters=1000)
    assert (chosen.kind, chosen.accelerator, chosen.world_size) == ("fsdp", "cpu", 2)
    assert chosen.strategy._process_group_backend == "gloo"
    assert (chosen.strategy._data_parallel_size, chosen.strategy._tensor_parallel_size) == (2, 1)


def test_zero3_that_cannot_fit_fails_unless_offloaded_or_spread():
    eight_b, h100 = 8_030_000_000, 80 * GIB
    with pytest.raises(RecipeError, match="offload_optimizer"):
        check_fits(eight_b, "adamw", DeepSpeedSection(stage=3), 1, h100)
    check_fits(eight_b, "adamw", DeepSpeedSection(stage=3), 16, h100)
    check_fits(eight_b, "adamw", DeepSpeedSection(stage=3, offload_optimizer=True,
                                                  offload_parameters=True), 1, h100)
    check_fits(1_240_000_000, "adamw", DeepSpeedSection(stage=3), 1, h100)


def test_gradient_clipping_goes_into_the_deepspeed_config():
    _, recipe = load_recipe("1b", ["optim.grad_clip=0.5", "train.deepspeed.offload_optimizer=true"])
    config = deepspeed_config(recipe)
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["train_micro_batch_size_per_gpu"] == recipe.data.streams


@pytest.mark.parametrize(("environ", "processes", "expected"), [
    ({"OMP_NUM_THREADS": "3"}, 4, None),  # the user's choice, which torch follows by itself
    ({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "6"}, 4, None),
    ({"SLURM_CPUS_PER_TASK": "6"}, 8, 6),  # SLURM allocated these to each task (process)
    ({}, 1, None),  # one process: torch's default, every core
])
def test_threads_per_process_follow_the_user_then_slurm(environ, processes, expected):
    assert threads_per_process(processes, environ) == expected


def test_processes_of_a_node_share_the_cores_they_may_run_on():
    cores = len(os.sched_getaffinity(0))
    assert threads_per_process(2, {}) == max(1, cores // 2)
    assert threads_per_process(4 * cores, {}) == 1
