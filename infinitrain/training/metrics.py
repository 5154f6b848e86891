"""Training metrics beyond the loss: throughput, FLOP/s and MFU, peak memory, grad norm, gates.

Gate statistics follow docs/design.md §2: a healthy model has, in every layer, specialised heads
(gate near 0: local attention; near 1: memory) and mixers (≈ 0.5); gates stuck at 0.5 everywhere
mean β is not learning.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ..data import Window
from ..evaluation.resources import process_peak_rss_bytes
from ..model import ModelConfig
from .flops import flops_per_token, peak_bf16_tflops
from .module import gradient_norm
from .weights import gathered

GATE_NEAR = 0.1
"""A head counts as local-only below sigmoid(β) = 0.1 and as memory-only above 0.9."""


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or "16" not in precision:  # bf16 or fp16 tensor cores
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated since the last call, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return process_peak_rss_bytes()


def gate_statistics(gates: Tensor, first_layer: int = 0) -> dict[str, float]:
    """Per layer with memory (``gates``: the model's :meth:`memory_gates`, whose first row is
    layer ``first_layer``): mean, min, max of sigmoid(β) and the fractions of heads near 0 and
    near 1."""
    stats = {}
    for layer, values in enumerate(gates, first_layer):
        prefix = f"gates/layer_{layer:02d}"
        stats |= {f"{prefix}/mean": values.mean().item(), f"{prefix}/min": values.min().item(),
                  f"{prefix}/max": values.max().item(),
                  f"{prefix}/near_0": (values < GATE_NEAR).float().mean().item(),
                  f"{prefix}/near_1": (values > 1 - GATE_NEAR).float().mean().item()}
    return stats


class TrainingMetrics(Callback):
    """Logs throughput, tokens seen, MFU, peak memory, grad norm and gate statistics every
    ``every`` steps."""

    def __init__(self, config: ModelConfig, every: int, precision: str,
                 tokens_per_step: int) -> None:
        self.flops_per_token = flops_per_token(config)
        self.tokens_per_step = tokens_per_step
        self.every = every
        self.precision = precision
        self.peak_flops: float | None = None
        self.tokens = 0
        self.started = 0.0
        self.logged_step = -1

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.peak_flops = device_peak_flops(module.device, self.precision)
        self.started, self.tokens, self.logged_step = time.perf_counter(), 0, trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, batch: Window,
                             batch_idx: int) -> None:
        """Forget what earlier windows logged. Lightning keeps every logged value and writes
        it again at each logging step until it is logged anew, so a step without an update
        would repeat the last loss and gradient norm as its own."""
        trainer._results.reset(metrics=False)

    def on_before_optimizer_step(self, trainer: Trainer, module: LightningModule,
                                 optimizer) -> None:
        if (trainer.global_step + 1) % self.every == 0:
            norm = gradient_norm(module)
            if norm is not None:  # under DeepSpeed the gradients live in its optimizer: see below
                module.log("grad_norm", norm)

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs,
                           batch: Window, batch_idx: int) -> None:
        self.tokens += batch.num_tokens
        step = trainer.global_step
        # Every logger's x-axis: optimizer steps done, as the progress and checkpoint names count
        # (Lightning's default is the steps done before this one, one less).
        module.log("step", float(step))
        if step % self.every or step == self.logged_step:
            return
        elapsed = time.perf_counter() - self.started
        per_device = self.tokens / elapsed
        flops = per_device * self.flops_per_token
        metrics = {"tokens_per_s": per_device * trainer.world_size,
                   "tokens_seen": float(step * self.tokens_per_step),  # over every invocation
                   "tokens_per_s_per_device": per_device, "tflops_per_device": flops / 1e12,
                   "peak_memory_gb": peak_memory_bytes(module.device) / 2**30}
        if self.peak_flops:
            metrics["mfu"] = flops / self.peak_flops
        engine_norm = getattr(trainer.model, "get_global_grad_norm", None)
        updated = getattr(module, "updated_step", None) == step - 1
        if engine_norm is not None and updated and engine_norm() is not None:
            metrics["grad_norm"] = float(engine_norm())  # the engine keeps the last update's
        gates = [block.attn.gate for block in module.model.layers if block.attn.has_memory]
        with gathered(gates):
            metrics |= gate_statistics(module.model.memory_gates(),
                                       module.model.config.memory_from_layer)
        module.log("tokens_per_s", metrics.pop("tokens_per_s"), prog_bar=True)
        module.log_dict(metrics)
        self.started, self.tokens, self.logged_step = time.perf_counter(), 0, step
