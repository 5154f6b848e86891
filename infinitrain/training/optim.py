"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule.

Four groups: matrices decay; norms and biases do not; the memory gates (β) and the write gates
neither decay nor share the base learning rate (docs/design.md §2: under a small global lr they stay
stuck at sigmoid 0.5). The write gates have a group of their own because they may start training
later (``optim.write_gate_from_step``).
The schedule is a pure function of the optimizer step and the recipe's max_steps, so where an
invocation stops (`--max-steps`) never changes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..model.attention import InfiniAttention
from ..recipe import OptimSection

GATE_PARAMETERS = {"gate": "gates", "write_weight": "write_gates", "write_bias": "write_gates"}
"""Infini-attention's gates and their groups: the memory/local mix β and, with
``memory_write_gate``, the write strength."""


DECAYING = (nn.Linear, nn.Embedding)
"""Modules whose weight (a matrix) decays. Decided by what a parameter is, not by its shape: under
DeepSpeed ZeRO-3 every parameter the optimizer sees is a 1-D shard, matrices included."""


def parameter_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """``decay``, ``no_decay``, ``gates`` and ``write_gates`` groups (those with parameters),
    each tagged with its name."""
    gates = {id(parameter): GATE_PARAMETERS[name] for module in model.modules()
             if isinstance(module, InfiniAttention)
             for name, parameter in module.named_parameters() if name in GATE_PARAMETERS}
    decays = {id(module.weight) for module in model.modules() if isinstance(module, DECAYING)}
    groups = {"decay": [], "no_decay": [], "gates": [], "write_gates": []}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in gates:
            groups[gates[id(parameter)]].append(parameter)
        elif id(parameter) in decays:
            groups["decay"].append(parameter)
        else:  # norm weights and biases
            groups["no_decay"].append(parameter)
    settings = {
        "decay": {"weight_decay": optim.weight_decay, "lr": optim.lr},
        "no_decay": {"weight_decay": 0.0, "lr": optim.lr},
        "gates": {"weight_decay": 0.0, "lr": optim.lr * optim.gate_lr_multiplier},
        "write_gates": {"weight_decay": 0.0, "lr": optim.lr * (
            optim.gate_lr_multiplier if optim.write_gate_lr_multiplier is None
            else optim.write_gate_lr_multiplier)},
    }
    return [{"name": name, "params": params, **settings[name]}
            for name, params in groups.items() if params]


def build_optimizer(model: nn.Module, optim: OptimSection) -> Optimizer:
    groups = parameter_groups(model, optim)
    if optim.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=optim.lr)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Optimizer, optim: OptimSection, max_steps: int,
                    write_gate_trains: Callable[[int], bool]) -> LambdaLR:
    """Per-optimizer-step LambdaLR sized by the recipe, never by the trainer's step estimate; the
    write gates stay at lr 0 at steps where ``write_gate_trains`` says no."""
    def factor(step: int) -> float:
        return lr_factor(step, optim.warmup_steps, max_steps, optim.min_lr_ratio)

    def write_gate_factor(step: int) -> float:
        return factor(step) if write_gate_trains(step) else 0.0

    return LambdaLR(optimizer, [write_gate_factor if group["name"] == "write_gates" else factor
                                for group in optimizer.param_groups])
