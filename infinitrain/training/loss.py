"""The training loss: summed next-token cross-entropy over supervised positions, output layer
included, never materialising the logits of a whole window.

The output layer and the cross-entropy are computed together, chunk by chunk, and their gradients
are computed in the same pass (the fused linear cross-entropy of Liger-Kernel): per chunk one
matmul for the logits, one log-softmax, the softmax minus the one-hot written over it in place, and
two matmuls for the gradients of the hidden states and of the output weight. Against
``cross_entropy(head(hidden))`` this skips the log-softmax backward and its zero-filled gradient
buffer, and holds one chunk's logits at a time without recomputing any in the backward, which
only scales the stored gradients by the loss's own gradient (1.19× faster for the output layer +
loss of the ``tiny`` model on a window of 1,024 tokens, on one CPU thread). Each chunk's logits,
log-probabilities and gradients share one buffer, which on a CPU is kept for the next step
(``LOSS_CHUNK_TOKENS`` × vocabulary float32 values: 64 MiB for the bundled 4,096-token
vocabulary): the results are bit-identical, and the ``tiny`` training step 1.02-1.15× faster
at 4 segments per window, 1.18-1.25× at 16.

Where the output weight is sharded and gathered only inside the head's own forward (DeepSpeed
ZeRO-3), the loss calls the head module instead, chunk by chunk, recomputing the logits of every
chunk but the first in the backward. (FSDP2 runs the loss inside the model's forward, where the
root unit's output weight is whole.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE_INDEX

LOSS_CHUNK_TOKENS = 4096
"""Supervised tokens per chunk of the output-layer + cross-entropy computation: 4096 × a 128K
vocabulary is 2 GB of float32 logits, instead of one [B·k·N, vocab] tensor for the whole window."""


def supervised_loss_sum(hidden: Tensor, labels: Tensor, head: nn.Linear) -> Tensor:
    """Summed next-token cross-entropy of ``head(hidden)`` [..., vocab] against ``labels``, over
    the positions whose label is not IGNORE_INDEX.

    Every parameter of the head takes part in the backward even when there is no supervised
    token (a zero gradient): DDP and ZeRO expect a gradient for every parameter on every rank.
    """
    hidden, targets = supervised(hidden, labels)
    if _gathered_only_in_forward(head.weight):
        return _module_loss_sum(hidden, targets, head)
    return _LinearCrossEntropy.apply(hidden, head.weight, targets, torch.is_grad_enabled())


def supervised(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states [n, d] and labels [n] of the positions whose label is not IGNORE_INDEX.
    Where every position is supervised (pretraining), the same rows in the same order as a
    view: selecting them by mask would copy the hidden states, and its backward scatter their
    gradient into a zero tensor of the window's size."""
    mask = labels != IGNORE_INDEX
    if bool(mask.all()):
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    return hidden[mask], labels[mask]


def _gathered_only_in_forward(weight: Tensor) -> bool:
    """Whether ``weight`` is a shard that only the module's own forward makes whole: ZeRO-3
    parameters carry a ``ds_id``."""
    return hasattr(weight, "ds_id")


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden Wᵀ, targets), with the gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor,
                with_gradients: bool) -> Tensor:
        device = hidden.device.type
        # The dtype the head's matmul would run in: autocast's, else the tensors' own.
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else hidden.dtype)
        ctx.dtypes = hidden.dtype, weight.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            total = torch.zeros((), device=hidden.device)
            grad_hidden = torch.empty_like(h) if with_gradients else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_gradients else None
            buffer = _logits_buffer(min(len(targets), LOSS_CHUNK_TOKENS), len(w), dtype,
                                    hidden.device)
            for start in range(0, len(targets), LOSS_CHUNK_TOKENS):
                part = slice(start, start + LOSS_CHUNK_TOKENS)
                target = targets[part, None]
                logits = torch.matmul(h[part], w.T, out=buffer[:len(target)])
                if logits.dtype == torch.float32:
                    log_probs = torch.log_softmax(logits, dim=-1, out=logits)
                else:
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                total -= log_probs.gather(1, target).sum()
                if not with_gradients:
                    continue
                # d loss / d logits = softmax - one-hot, written over the log-probabilities.
                gradient = log_probs.exp_()
                gradient.scatter_add_(1, target, torch.full_like(target, -1, dtype=torch.float32))
                gradient = gradient.to(dtype)
                grad_hidden[part] = gradient @ w
                grad_weight.add_(gradient.T @ h[part])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_total).to(hidden_dtype),
                (grad_weight * grad_total).to(weight_dtype), None, None)


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Room for ``rows`` logits, overwritten in place by their log-probabilities and then by
    their gradients. On a CPU one buffer of a whole chunk serves every step: a fresh one of tens
    of MB comes from the operating system as untouched pages, and faulting them in cost 15-20%
    of the ``tiny`` model's training step (4 streams × 16 segments, one thread). Elsewhere the
    framework's caching allocator already reuses memory."""
    if device.type == "cpu":
        return _cpu_logits_buffer(LOSS_CHUNK_TOKENS, vocab, dtype)[:rows]
    return torch.empty(rows, vocab, dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def _cpu_logits_buffer(chunk_tokens: int, vocab: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(chunk_tokens, vocab, dtype=dtype)


def _module_loss_sum(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    """The loss through ``head``'s forward, for weights gathered only there.

    Chunks beyond the first are recomputed in the backward rather than kept. Every rank runs the
    head the same number of times, forward and backward: the most chunks any rank has, empty ones
    included, and at least one. Each head call gathers its weights from every rank, so a rank with
    fewer supervised tokens would otherwise leave the others waiting forever.
    """
    chunks = _most_chunks_of_any_rank(len(targets), hidden.device)
    if chunks == 1:
        return _cross_entropy_sum(hidden, targets, head)
    return sum(checkpoint(_cross_entropy_sum, hidden[start:start + LOSS_CHUNK_TOKENS],
                          targets[start:start + LOSS_CHUNK_TOKENS], head, use_reentrant=False)
               for start in range(0, chunks * LOSS_CHUNK_TOKENS, LOSS_CHUNK_TOKENS))


def _most_chunks_of_any_rank(tokens: int, device: torch.device) -> int:
    """Loss chunks of ``tokens`` supervised tokens (at least one), the maximum over the ranks
    of a distributed run."""
    chunks = max(1, -(-tokens // LOSS_CHUNK_TOKENS))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return chunks
    most = torch.tensor(chunks, device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most)


def _cross_entropy_sum(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
