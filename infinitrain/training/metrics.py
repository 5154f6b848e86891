"""Training metrics beyond the loss: throughput, FLOP/s and MFU, peak memory, grad norm, gates.

Gate statistics follow DESIGN.md §2: a healthy model has, in every layer, specialised heads (gate
near 0: local attention; near 1: memory) and mixers (≈ 0.5); gates stuck at 0.5 everywhere mean β
is not learning.
"""

from __future__ import annotations

import resource
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ..data import Window
from ..model import ModelConfig
from .weights import gathered

PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                   ("L40S", 362e12))
"""Dense bf16 peak per GPU by device-name fragment (first match wins): the MFU denominator."""

GATE_NEAR = 0.1
"""A head counts as local-only below sigmoid(β) = 0.1 and as memory-only above 0.9."""


def training_flops_per_token(config: ModelConfig) -> float:
    """Forward + backward FLOPs per token (3 × forward; recomputation not counted, as for MFU)."""
    d, heads, kv, head_dim = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    projections = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * config.ffn_dim
    local_attention = heads * head_dim * config.segment_len  # QKᵀ and AV over N/2 keys on average
    memory = (heads + 2 * kv) * head_dim * head_dim  # retrieve (queries), delta read and write
    per_layer = projections + local_attention + memory
    multiply_adds = config.n_layers * per_layer + d * config.vocab_size
    return 3 * 2 * multiply_adds


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or "16" not in precision:  # bf16 or fp16 tensor cores
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_FLOPS if fragment in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated since the last call, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gate_statistics(gates: Tensor) -> dict[str, float]:
    """Per layer: mean, min, max of sigmoid(β) and the fractions of heads near 0 and near 1."""
    stats = {}
    for layer, values in enumerate(gates):
        prefix = f"gates/layer_{layer:02d}"
        stats |= {f"{prefix}/mean": values.mean().item(), f"{prefix}/min": values.min().item(),
                  f"{prefix}/max": values.max().item(),
                  f"{prefix}/near_0": (values < GATE_NEAR).float().mean().item(),
                  f"{prefix}/near_1": (values > 1 - GATE_NEAR).float().mean().item()}
    return stats


class TrainingMetrics(Callback):
    """Logs throughput, MFU, peak memory, grad norm and gate statistics every ``every`` steps."""

    def __init__(self, config: ModelConfig, every: int, precision: str) -> None:
        self.flops_per_token = training_flops_per_token(config)
        self.every = every
        self.precision = precision
        self.peak_flops: float | None = None
        self.tokens = 0
        self.started = 0.0
        self.logged_step = -1

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.peak_flops = device_peak_flops(module.device, self.precision)
        self.started, self.tokens, self.logged_step = time.perf_counter(), 0, trainer.global_step

    def on_before_optimizer_step(self, trainer: Trainer, module: LightningModule,
                                 optimizer) -> None:
        if (trainer.global_step + 1) % self.every == 0:
            norms = [p.grad.detach().float().norm() for p in module.parameters()
                     if p.grad is not None]
            if norms:  # under DeepSpeed the gradients live in its optimizer: see below
                module.log("grad_norm", torch.stack(norms).norm())

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs,
                           batch: Window, batch_idx: int) -> None:
        self.tokens += batch.num_tokens
        step = trainer.global_step
        if step % self.every or step == self.logged_step:
            return
        elapsed = time.perf_counter() - self.started
        per_device = self.tokens / elapsed
        flops = per_device * self.flops_per_token
        metrics = {"tokens_per_s": per_device * trainer.world_size,
                   "tokens_per_s_per_device": per_device, "tflops_per_device": flops / 1e12,
                   "peak_memory_gb": peak_memory_bytes(module.device) / 2**30}
        if self.peak_flops:
            metrics["mfu"] = flops / self.peak_flops
        engine_norm = getattr(trainer.model, "get_global_grad_norm", None)
        if engine_norm is not None and engine_norm() is not None:
            metrics["grad_norm"] = float(engine_norm())
        gates = [block.attn.gate for block in module.model.layers]
        with gathered(gates):
            metrics |= gate_statistics(module.model.memory_gates())
        module.log("tokens_per_s", metrics.pop("tokens_per_s"), prog_bar=True)
        module.log_dict(metrics)
        self.started, self.tokens, self.logged_step = time.perf_counter(), 0, step
