"""Llama-style decoder whose every attention layer is Infini-attention."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from .attention import InfiniAttention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .state import InfiniState, LayerState


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = InfiniAttention(config, has_memory=index >= config.memory_from_layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_dim)

    def forward(self, x: Tensor, state: LayerState, reset: Tensor | None, use_memory: bool,
                keep_last: int = 0,
                write_targets: Tensor | None = None) -> tuple[Tensor, LayerState, Tensor | None]:
        """(output, new state, the attention's write cost or None). ``keep_last`` n > 0: the
        output of the last n positions only, the feed-forward run for those alone (the state
        depends on none of it: the last block of a prefill that keeps the last logits)."""
        attended, state, write_cost = self.attn(self.attn_norm(x), state, reset, use_memory,
                                                write_targets)
        x = x + attended
        if keep_last:
            x = x[:, -keep_last:]
        return x + self.mlp(self.mlp_norm(x)), state, write_cost


OutputHead = Callable[[Tensor, nn.Linear, Tensor | None], Any]
"""What :meth:`InfiniTransformer.forward` applies instead of the output layer, if given."""


class InfiniTransformer(nn.Module):
    """``forward(input_ids, state, reset) -> (logits, new_state)`` over any number of tokens.

    Whole segments in the chunk are processed in parallel; a trailing partial segment is kept in
    the state and completed by the next call, so training, streaming prefill and token-by-token
    decoding all run the same code.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, index) for index in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The configured initial values, also when built under DeepSpeed ZeRO-3's
        ``zero.Init``: each submodule's weights are sharded as soon as that submodule is built,
        so writing into them here would write into empty placeholders and keep PyTorch's default
        init (std 1 embeddings). Each module's weights are gathered whole for the write, one
        module at a time (never the whole model), and rank 0's values are kept everywhere."""
        for module in self.modules():
            with _whole(module.parameters(recurse=False)):
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=self.config.init_std)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
                elif isinstance(module, InfiniAttention) and module.has_memory:
                    nn.init.constant_(module.gate, self.config.gate_init)
                    if self.config.memory_write_gate:
                        nn.init.zeros_(module.write_weight)
                        nn.init.constant_(module.write_bias, self.config.write_gate_init)

    def freeze_write_gates(self, frozen: bool) -> None:
        """Give the write gates' weights a zero gradient (``frozen``) or their real one. Zero,
        not none: under DDP the optimizer would skip a parameter without a gradient, where
        DeepSpeed's and FSDP's flat, sharded gradients have no "none" to give, and the two would
        then clip, and build Adam's moments, differently. A zero gradient leaves the moments at
        zero and counts nothing in the gradient norm under every strategy."""
        for module in self.modules():
            if isinstance(module, InfiniAttention) and module.has_memory \
                    and self.config.memory_write_gate:
                module.write_gate_frozen = frozen

    def compile_blocks(self, dynamic: bool | None = None) -> None:
        """``torch.compile`` every block in place (parameter names, and so checkpoints, stay
        as they are): its attention, memory scan and MLP become fused kernels, on the CPU
        (inductor's C++ backend: needs a C++ compiler) as on GPUs. Per block, as torchtitan
        does, so the graph is one layer's; the embedding, output layer and loss stay eager.
        The first call compiles (tens of seconds per graph on a CPU).

        ``dynamic``: None (reading and generating) compiles once more with symbolic sizes when
        the shapes change (a partial segment, one token at a time); False (training, whose
        windows all have one shape) never uses symbolic sizes. Compiled code is kept per
        block *class* for the whole process, so without False a training run after a streamed
        evaluation in the same process would start symbolic, which inductor (torch 2.13) can
        fail to compile ("ValueRangeError: Invalid ranges")."""
        for block in self.layers:
            block.compile(dynamic=dynamic)

    def empty_state(self, batch_size: int, device: torch.device | str | None = None) -> InfiniState:
        weight = self.embed_tokens.weight
        device = weight.device if device is None else device
        return InfiniState([
            LayerState.empty(batch_size, self.config.n_kv_heads, self.config.head_dim, device,
                             weight.dtype)
            for _ in self.layers
        ])

    def forward(self, input_ids: Tensor, state: InfiniState | None = None,
                reset: Tensor | None = None, use_memory: bool = True,
                logits_to_keep: int = 0, head: OutputHead | None = None,
                write_targets: Tensor | None = None) -> tuple[Any, InfiniState]:
        """Run ``input_ids`` [B, T] on from ``state`` (empty if None).

        reset: bool [B, segments starting in this chunk]; True empties that stream's memory
        before the segment (a new document begins). use_memory=False is the memory-disabled
        baseline: every layer uses local attention alone, and the memory is neither read nor
        written (the state's M and z stay as they were). logits_to_keep: 0 for all positions,
        else the last n only (prefilling 1M tokens needs no 128K-vocabulary logits per token).

        head: instead of the logits, return ``head(hidden, lm_head, write_cost)`` (the final
        hidden states, the output layer, :meth:`hidden_states_and_write_cost`'s write cost):
        a training loss over the supervised positions, computed inside this call, so that a
        wrapper that gathers sharded weights around ``forward`` (FSDP2) keeps the output layer
        whole for it. write_targets [B, T]: the write cost is the write gate's error against
        these (:meth:`InfiniAttention.write_cost`), not its mean strength.
        """
        keep_last = 0 if head is not None else logits_to_keep
        hidden, state, write_cost = self.hidden_states_and_write_cost(
            input_ids, state, reset, use_memory, keep_last, write_targets)
        if head is not None:
            return head(hidden, self.lm_head, write_cost), state
        return self.lm_head(hidden), state

    def hidden_states(self, input_ids: Tensor, state: InfiniState | None = None,
                      reset: Tensor | None = None,
                      use_memory: bool = True) -> tuple[Tensor, InfiniState]:
        """Final normalised hidden states [B, T, d_model]: ``forward`` without the output layer,
        for losses that apply it to supervised positions only."""
        hidden, state, _ = self.hidden_states_and_write_cost(input_ids, state, reset, use_memory)
        return hidden, state

    def hidden_states_and_write_cost(
            self, input_ids: Tensor, state: InfiniState | None = None, reset: Tensor | None = None,
            use_memory: bool = True, keep_last: int = 0,
            write_targets: Tensor | None = None) -> tuple[Tensor, InfiniState, Tensor | None]:
        """:meth:`hidden_states` and, while training with ``memory_write_gate``, the mean
        :meth:`InfiniAttention.write_cost` over the layers with memory, with its graph: what
        ``optim.write_penalty`` adds to the loss. None otherwise.

        ``keep_last`` n > 0: the hidden states of the last n positions only. The memory and the
        state come from every block's keys and values, never from the last block's output, so
        that block's feed-forward runs for those n positions alone: a prefill that keeps one
        logit skips 1 / n_layers of the feed-forward work."""
        batch, length = input_ids.shape
        if state is None:
            state = self.empty_state(batch, input_ids.device)
        if state.batch_size != batch:
            raise ValueError(f"state holds {state.batch_size} streams but input_ids has {batch}")
        if reset is not None:
            starts = _segments_starting(state.partial_len, length, self.config.segment_len)
            if reset.shape != (batch, starts):
                raise ValueError(f"reset has shape {tuple(reset.shape)}; expected ({batch}, "
                                 f"{starts}): one flag per segment starting in this chunk")
        x = self.embed_tokens(input_ids)
        new_layers, costs = [], []
        last = len(self.layers) - 1
        for index, (block, layer_state) in enumerate(zip(self.layers, state.layers, strict=True)):
            keep = keep_last if index == last else 0
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, layer_state, cost = checkpoint(block, x, layer_state, reset, use_memory, keep,
                                                  write_targets, use_reentrant=False)
            else:
                x, layer_state, cost = block(x, layer_state, reset, use_memory, keep,
                                             write_targets)
            new_layers.append(layer_state)
            if cost is not None:
                costs.append(cost)
        write_cost = torch.stack(costs).mean() if costs else None
        return self.norm(x), InfiniState(new_layers), write_cost

    def memory_gates(self) -> Tensor:
        """sigmoid(β) per layer with memory and query head: [n_layers − memory_from_layer,
        n_heads], row i for layer memory_from_layer + i; 1 = memory, 0 = local. The layers below
        ``memory_from_layer`` attend locally and have no gate."""
        gates = [torch.sigmoid(_full(block.attn.gate).detach().float())
                 for block in self.layers if block.attn.has_memory]
        if not gates:  # memory_from_layer = n_layers: a local-attention model
            return self.embed_tokens.weight.new_zeros(0, self.config.n_heads)
        return torch.stack(gates)


def _full(parameter: Tensor) -> Tensor:
    """The whole value of a parameter FSDP2 shards (a DTensor: a collective every rank enters),
    else the parameter itself."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter


@contextlib.contextmanager
def _whole(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """Whole, writable values of ``parameters`` inside the block: under ZeRO-3 (parameters with
    a ``ds_id``) a collective gather every rank enters, whose rank-0 writes are kept on every
    rank; elsewhere nothing to do."""
    sharded = [parameter for parameter in parameters if hasattr(parameter, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0):
        yield


def _segments_starting(partial: int, length: int, segment_len: int) -> int:
    """How many segments begin inside a chunk of ``length`` tokens after ``partial`` cached ones."""
    if partial:
        head = min(length, segment_len - partial)
        length -= head
    return -(-length // segment_len)
