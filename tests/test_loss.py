"""The training loss: the fused output layer + cross-entropy equals the plain computation, in
value and gradients, however it is chunked and in whatever precision it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infinitrain.data import IGNORE_INDEX
from infinitrain.training import loss as training_loss
from infinitrain.training.loss import supervised_loss_sum


def plain_loss_and_grads(hidden, labels, head):
    """cross_entropy(head(hidden)) on the full logits, the definition."""
    expected = F.cross_entropy(head(hidden).float().flatten(0, 1), labels.flatten(),
                               reduction="sum")
    return expected, torch.autograd.grad(expected, [hidden, head.weight])


def example(vocab: int = 50, dim: int = 16):
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(2, 40, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 40))
    labels[0, :25] = IGNORE_INDEX
    return hidden, labels, head


@pytest.mark.parametrize("chunk_tokens", [7, 55, 4096])  # 55 targets: 8 chunks, 1 exact, 1
def test_fused_loss_equals_the_plain_one_in_value_and_gradients(monkeypatch, chunk_tokens):
    hidden, labels, head = example()
    expected, expected_grads = plain_loss_and_grads(hidden, labels, head)
    monkeypatch.setattr(training_loss, "LOSS_CHUNK_TOKENS", chunk_tokens)
    loss = supervised_loss_sum(hidden, labels, head)
    grads = torch.autograd.grad(loss * 3.0, [hidden, head.weight])  # the outer gradient counts
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, 3.0 * want)


def test_the_cpu_logits_buffer_is_reused_and_never_read_beyond_a_call(monkeypatch):
    """On a CPU one chunk-sized buffer serves every call (a fresh one costs page faults each
    step); a call with fewer targets than the last reads none of the last call's rows."""
    monkeypatch.setattr(training_loss, "LOSS_CHUNK_TOKENS", 64)
    hidden, labels, head = example()
    supervised_loss_sum(hidden, labels, head).backward()  # 55 targets fill the buffer
    buffer = training_loss._logits_buffer(10, 50, torch.float32, torch.device("cpu"))
    fewer = labels.clone()
    fewer[1, 10:] = IGNORE_INDEX  # 10 targets
    expected, expected_grads = plain_loss_and_grads(hidden, fewer, head)
    loss = supervised_loss_sum(hidden, fewer, head)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    again = training_loss._logits_buffer(10, 50, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == buffer.data_ptr() and again.shape == (10, 50)


def test_the_head_module_path_for_sharded_weights_equals_the_plain_one(monkeypatch):
    """The path ZeRO-3 and FSDP take (the head's own forward, chunks recomputed)."""
    hidden, labels, head = example()
    expected, expected_grads = plain_loss_and_grads(hidden, labels, head)
    monkeypatch.setattr(training_loss, "LOSS_CHUNK_TOKENS", 7)
    mask = labels != IGNORE_INDEX
    loss = training_loss._module_loss_sum(hidden[mask], labels[mask], head)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_under_bf16_autocast_the_fused_loss_matches_the_autocast_head():
    """The logits come from a bf16 matmul as ``head(hidden)`` would give them under autocast;
    the gradients reach the float32 weight in float32."""
    hidden, labels, head = example(vocab=300, dim=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = plain_loss_and_grads(hidden, labels, head)
        loss = supervised_loss_sum(hidden, labels, head)
        grads = torch.autograd.grad(loss, [hidden, head.weight])
    assert grads[1].dtype == torch.float32 and grads[0].dtype == hidden.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0.02, atol=2e-3)


def test_without_autograd_the_loss_is_the_same_and_keeps_no_gradients():
    hidden, labels, head = example()
    expected, _ = plain_loss_and_grads(hidden, labels, head)
    with torch.no_grad():
        loss = supervised_loss_sum(hidden, labels, head)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)


def test_a_rank_without_targets_still_reaches_every_head_parameter():
    """DDP and ZeRO wait for every parameter's gradient on every rank, zero or not."""
    head = torch.nn.Linear(8, 10, bias=False)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    loss = supervised_loss_sum(hidden, labels, head)
    loss.backward()
    assert loss.item() == 0.0
    assert head.weight.grad is not None and not head.weight.grad.any()


def test_a_fully_supervised_window_is_read_in_place_and_its_loss_equals_the_masked_one():
    """With every position supervised the loss reads the hidden states as they lie (no masked
    copy, whose backward would scatter into a window-sized zero tensor), with the very same
    loss and gradients as selecting them by mask."""
    hidden, labels, head = example()
    labels[0, :25] = 3  # every position supervised
    rows, targets = training_loss.supervised(hidden, labels)
    assert rows.data_ptr() == hidden.data_ptr() and rows.shape == (80, 16)
    assert torch.equal(targets, labels.flatten())
    loss = supervised_loss_sum(hidden, labels, head)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    mask = torch.ones_like(labels, dtype=torch.bool)
    masked = training_loss._LinearCrossEntropy.apply(hidden[mask], head.weight, labels[mask], True)
    masked_grads = torch.autograd.grad(masked, [hidden, head.weight])
    assert torch.equal(loss, masked)
    for got, want in zip(grads, masked_grads, strict=True):
        assert torch.equal(got, want)
    partial = training_loss.supervised(hidden, example()[1])[0]
    assert partial.shape == (55, 16)
