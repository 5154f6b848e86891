"""FLOPs of a training token and the GPUs' peak rates: the numerator and denominator of MFU.

One count serves the trainer's logged TFLOP/s and MFU and ``benchmarks/gpu.py``.
"""

from __future__ import annotations

from ..model import ModelConfig
from ..model.memory import rule_named

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # Dense bf16 tensor-core rates from NVIDIA's datasheets (the "with sparsity" figure halved).
    # Matched in order against torch.cuda.get_device_name(), so the specific names come first.
    ("H200 NVL", 835.5),
    ("H200", 989.5),      # SXM: "NVIDIA H200"
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),      # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s of a known GPU, else None (no MFU is printed)."""
    return next((rate for key, rate in PEAK_BF16_TFLOPS if key in device_name), None)


def forward_flops_per_token(config: ModelConfig) -> dict[str, int]:
    """Forward FLOPs per token, by part, for a window of whole segments (2 FLOPs per multiply-add).

    dense     = 2 · P, P = the weights of every matmul: per layer q, k, v, o and the three SwiGLU
                projections, plus the output layer d·V once (the embedding is a lookup; tied or
                not, the vocabulary matrix is multiplied once per token).
    attention = layers · 2 · H_q · d_head · (N + 1): causal softmax attention inside a segment of
                N tokens; a query sees (N + 1)/2 keys on average, and QKᵀ and AV each cost
                2 · d_head per key and head. (The full-square convention, 4 · N · d_head · H_q,
                counts the masked half too and would inflate MFU by the attention share.)
    memory    = memory layers · the rule's matmul terms (``MemoryRule.flops_per_token`` in
                model/memory.py, with d_k = d_v = d_head), e.g. the paper's linear rule:
                σ(Q)M and σ(Q)z for every query head, H_q · (2·d_k·d_v + 2·d_k), then
                σ(K)ᵀV and z += Σσ(K) for every key/value head, H_kv · (2·d_k·d_v + d_k).

    Element-wise work (norms, RoPE, softmax, feature maps, gates) is not counted: it moves bytes
    rather than doing matmul work, as in every MFU convention.
    """
    d, v, n = config.d_model, config.vocab_size, config.segment_len
    h_q, h_kv, dh = config.n_heads, config.n_kv_heads, config.head_dim
    per_layer = 2 * d * h_q * dh + 2 * d * h_kv * dh + 3 * d * config.ffn_dim
    dense = 2 * (config.n_layers * per_layer + d * v)
    attention = config.n_layers * 2 * h_q * dh * (n + 1)
    memory = rule_named(config.memory_rule).flops_per_token(h_q, h_kv, dh, n)
    return {"dense": dense, "attention": attention, "memory": config.memory_layers * memory}


def flops_per_token(config: ModelConfig, memory: bool = True) -> int:
    """Model FLOPs of one training token: 3 × forward (the backward costs twice the forward).

    The dense part is the familiar 6 · params · tokens. Recomputation under activation
    checkpointing is not counted (MFU, not hardware utilisation). ``memory=False``: the local
    attention-only model, the baseline of the overhead ratio.
    """
    parts = forward_flops_per_token(config)
    if not memory:
        parts.pop("memory")
    return 3 * sum(parts.values())
