"""The model on a CUDA device, where one is present (skipped elsewhere).

The memory has one code path, checked against the paper's equations on the CPU
(tests/test_model_equivalence.py), but a GPU runs other kernels: SDPA's fused attention, cuBLAS,
Triton under ``torch.compile``, bf16 autocast. Here the same model is checked again on the device:
equal to the CPU in float32, independent of chunking in float32 and in bf16, equal when compiled,
and with its memory kept in float32 under autocast. Each bf16 tolerance is shown to separate
right from wrong in the same test: a stream that loses its memory at a chunk boundary lands far
outside it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_model_equivalence import MODEL_RULES, chunked_forward, randomise_gates, small_config

from infinitrain.model import InfiniTransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
SEGMENTS = 6
BF16_TOLERANCE = 2e-2
"""Of the largest value: bf16 keeps 8 bits, and chunking changes the shapes of the matmuls (on a
CPU the chunked reads are bit-equal; a read that forgets at chunk boundaries is 0.15-0.5 off)."""
SPLITS = ([1] * 6, [2, 3, 1], None)
"""Chunk sizes in segments; None: 2N + 3, 2N, 2N − 3 tokens (chunks that cut segments)."""


def splits(n: int) -> list[list[int]]:
    return [[s * n for s in sizes] if sizes else [2 * n + 3, 2 * n, 2 * n - 3]
            for sizes in SPLITS]


def model_and_stream(rule: str, device: torch.device) -> tuple[InfiniTransformer, torch.Tensor,
                                                                torch.Tensor]:
    torch.manual_seed(1)
    model = InfiniTransformer(small_config(rule))
    randomise_gates(model)
    n = model.config.segment_len
    ids = torch.randint(0, 97, (3, SEGMENTS * n))
    reset = torch.zeros(3, SEGMENTS, dtype=torch.bool)
    reset[0, 2] = reset[2, 4] = True
    return model.to(device), ids.to(device), reset.to(device)


def run(model: InfiniTransformer, ids: torch.Tensor, reset: torch.Tensor, sizes: list[int],
        autocast: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """(logits, every layer's M and z, gradients) of a chunked read, in float32 on the CPU."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, state = chunked_forward(model, ids, sizes, reset)
    logits.float().square().mean().backward()
    memory = [t.cpu() for layer in state.layers for t in (layer.memory, layer.norm)]
    grads = {k: p.grad.float().cpu() for k, p in model.named_parameters()}
    return logits.detach().float().cpu(), memory, grads


def max_relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rule", MODEL_RULES)
def test_float32_on_cuda_equals_the_cpu(rule: str) -> None:
    """Logits, state and gradients of a whole window, and of the window read in chunks."""
    model, ids, reset = model_and_stream(rule, torch.device("cpu"))
    n = model.config.segment_len
    expected = run(model, ids, reset, [SEGMENTS * n])
    on_cuda = copy.deepcopy(model).to(CUDA)
    for sizes in ([SEGMENTS * n], *splits(n)):
        logits, memory, grads = run(on_cuda, ids.to(CUDA), reset.to(CUDA), sizes)
        assert max_relative(logits, expected[0]) <= 1e-5, sizes
        for ours, theirs in zip(memory, expected[1], strict=True):
            assert max_relative(ours, theirs) <= 1e-5, sizes
        for name, grad in grads.items():
            assert max_relative(grad, expected[2][name]) <= 1e-4, (name, sizes)


@pytest.mark.parametrize("rule", MODEL_RULES)
def test_bf16_autocast_on_cuda_is_chunk_invariant(rule: str) -> None:
    """bf16 rounds each chunk's matmuls (their shapes differ with the chunking), so equality is
    to a bf16 tolerance; the memory itself stays float32. A read that drops the state at every
    chunk boundary is checked to fall well outside the same tolerance."""
    model, ids, reset = model_and_stream(rule, CUDA)
    n = model.config.segment_len
    full_logits, full_memory, _ = run(model, ids, reset, [SEGMENTS * n], autocast=True)
    for sizes in splits(n):
        logits, memory, _ = run(model, ids, reset, sizes, autocast=True)
        assert max_relative(logits, full_logits) <= BF16_TOLERANCE, sizes
        for ours, theirs in zip(memory, full_memory, strict=True):
            assert max_relative(ours, theirs) <= BF16_TOLERANCE, sizes

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        forgetful = torch.cat([model(ids[:, start:start + 2 * n])[0]
                               for start in range(0, SEGMENTS * n, 2 * n)], dim=1)
    assert max_relative(forgetful.float().cpu(), full_logits) > 5 * BF16_TOLERANCE


def test_memory_stays_float32_under_bf16_autocast_on_cuda() -> None:
    model, ids, reset = model_and_stream("deltanet-clamp", CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, state = model(ids, reset=reset)
    assert logits.dtype == torch.bfloat16
    assert all(layer.memory.dtype == torch.float32 and layer.norm.dtype == torch.float32
               for layer in state.layers)
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("rule", ["delta", "deltanet-clamp"])
def test_compiled_blocks_on_cuda_train_as_eager_does(rule: str) -> None:
    """``train.compile`` on a GPU (inductor's Triton kernels): the same logits, state and
    gradients as eager, in float32."""
    model, ids, reset = model_and_stream(rule, CUDA)
    n = model.config.segment_len
    expected = run(model, ids, reset, [2 * n] * 3)
    compiled = copy.deepcopy(model)
    compiled.compile_blocks(dynamic=False)
    logits, memory, grads = run(compiled, ids, reset, [2 * n] * 3)
    assert max_relative(logits, expected[0]) <= 1e-5
    for ours, theirs in zip(memory, expected[1], strict=True):
        assert max_relative(ours, theirs) <= 1e-5
    for name, grad in grads.items():
        assert max_relative(grad, expected[2][name]) <= 1e-4, name
