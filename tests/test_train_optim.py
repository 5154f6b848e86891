"""Optimizer groups and the learning-rate schedule of the training module."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from infinitrain.model.attention import InfiniAttention
from infinitrain.recipe import load_recipe
from infinitrain.training.module import StreamingLM
from infinitrain.training.optim import lr_factor


def configured(*overrides: str):
    _, recipe = load_recipe("tiny", ["model.d_model=32", "model.ffn_dim=64", *overrides])
    module = StreamingLM(recipe)
    module.configure_model()
    return module, module.configure_optimizers()


def test_gates_get_their_own_lr_and_no_weight_decay():
    module, configured_optim = configured("optim.lr=0.002", "optim.gate_lr_multiplier=100",
                                          "optim.weight_decay=0.05")
    optimizer = configured_optim["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {group["name"]: group for group in optimizer.param_groups}
    gates = [m.gate for m in module.model.modules() if isinstance(m, InfiniAttention)]
    assert [id(p) for p in groups["gates"]["params"]] == [id(p) for p in gates]
    scheduler = configured_optim["lr_scheduler"]["scheduler"]
    base = {name: lr / scheduler.lr_lambdas[0](0) for name, lr in
            zip(groups, scheduler.get_last_lr(), strict=True)}
    assert base == pytest.approx({"decay": 0.002, "no_decay": 0.002, "gates": 0.2})
    assert groups["gates"]["weight_decay"] == groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.05
    named = dict(module.model.named_parameters())
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert no_decay == {id(p) for name, p in named.items() if "norm" in name}
    assert all(p.ndim == 2 for p in groups["decay"]["params"])
    every = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(every) == sorted(id(p) for p in module.model.parameters())  # each exactly once


def test_adafactor_keeps_the_groups():
    _, configured_optim = configured("optim.name=adafactor")
    optimizer = configured_optim["optimizer"]
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "gates"]


def test_write_gates_have_their_own_group_frozen_until_their_step():
    module, configured_optim = configured(
        "model.memory_rule=deltanet", "model.memory_write_gate=true", "optim.warmup_steps=2",
        "optim.write_gate_from_step=5")
    optimizer, scheduler = configured_optim["optimizer"], configured_optim["lr_scheduler"]
    groups = {group["name"]: group for group in optimizer.param_groups}
    writes = [p for m in module.model.modules() if isinstance(m, InfiniAttention)
              for p in (m.write_weight, m.write_bias)]
    assert [id(p) for p in groups["write_gates"]["params"]] == [id(p) for p in writes]
    lrs = []
    for _ in range(7):
        lrs.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        scheduler["scheduler"].step()
    assert all(step["write_gates"] == 0 and step["gates"] > 0 for step in lrs[:5])
    assert lrs[5]["write_gates"] == lrs[5]["gates"] > 0


@pytest.mark.parametrize(("multiplier", "expected"), [(None, 10.0), (1.0, 1.0)])
def test_the_write_gates_learn_at_their_own_multiplier_if_given(multiplier, expected):
    setting = [] if multiplier is None else [f"optim.write_gate_lr_multiplier={multiplier}"]
    _, configured_optim = configured(
        "model.memory_rule=deltanet", "model.memory_write_gate=true", "optim.lr=0.002",
        "optim.gate_lr_multiplier=10", *setting)
    groups = {group["name"]: group for group in configured_optim["optimizer"].param_groups}
    assert groups["write_gates"]["initial_lr"] == pytest.approx(0.002 * expected)
    assert groups["gates"]["initial_lr"] == pytest.approx(0.02)


def test_schedule_warms_up_then_decays_to_the_floor_at_the_recipe_length():
    factors = [lr_factor(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
               for step in range(130)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[110] == factors[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))


def test_the_write_gate_schedule_waits_for_its_step_and_the_loss_average():
    from infinitrain.recipe import OptimSection
    from infinitrain.training.write_gate import WriteGateSchedule

    gate = WriteGateSchedule(OptimSection(write_gate_from_step=5, write_gate_below_loss=1.0,
                                          write_penalty=0.5))
    assert not gate.trains(10) and gate.penalty_weight(10) == 0.0  # threshold not met yet
    assert not gate.observe(2.0, step=1)
    assert not gate.observe(0.1, step=2)  # average 1.81: one low loss is not enough
    starts = [step for step in range(3, 40) if gate.observe(0.1, step)]
    assert starts == [gate.start] and gate.start >= 5  # never before write_gate_from_step
    assert gate.loss_average < 1.0
    assert gate.trains(gate.start) and not gate.trains(4)  # never before from_step
    assert gate.penalty_weight(gate.start) == 0.5
    restored = WriteGateSchedule(OptimSection(write_gate_from_step=5, write_gate_below_loss=1.0))
    restored.load_state_dict(gate.state_dict())
    assert (restored.start, restored.loss_average) == (gate.start, gate.loss_average)
    assert WriteGateSchedule(OptimSection(write_gate_from_step=3)).trains(3)  # no threshold


def test_write_targets_train_the_gate_from_step_0_then_the_schedule_takes_over():
    """optim.write_target_until_step: the gate trains towards the data's targets from step 0,
    weighted by write_penalty; from that step on it trains only as write_gate_from_step and
    write_gate_below_loss say."""
    from infinitrain.recipe import OptimSection
    from infinitrain.training.write_gate import WriteGateSchedule

    gate = WriteGateSchedule(OptimSection(write_target_until_step=100, write_gate_from_step=300,
                                          write_penalty=0.5))
    assert [gate.targets(step) for step in (0, 99, 100)] == [True, True, False]
    assert [gate.trains(step) for step in (0, 99, 100, 299, 300)] == [
        True, True, False, False, True]
    assert gate.penalty_weight(0) == gate.penalty_weight(300) == 0.5
    assert gate.penalty_weight(100) == 0.0
