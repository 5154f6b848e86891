"""Hugging Face causal-LM wrapper around the core Infini-Transformer.

`infinitrain export hf` copies this file verbatim next to the core model files, which it imports
with relative imports: the exported model runs the very code infinitrain trains, not a second
implementation. Load it with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

``generate()`` carries the model's recurrent state as its cache (``cache`` in current transformers,
``past_key_values`` in older 5.x releases; both are accepted): a prompt of any length is read in
one call (whole segments in parallel, each folded into the compressive memory), then every decoding
step feeds only the new token. The state's size does not depend on how many tokens were read, so
decoding memory stays bounded at any context length.

Padding: an ``attention_mask`` with zeros (left padding for generation, right padding for scoring)
is honoured exactly. A padded position is neither attended to nor written into memory, and each row
reads only its own tokens, so its segments start where its text starts, as if it were alone. Rows
that have read the same number of tokens run as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import InfiniAttention
from .configuration_infini import InfiniConfig
from .state import InfiniState
from .transformer import InfiniTransformer

_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")
"""The output field that carries the cache in the installed transformers (renamed in 5.x)."""


@dataclass
class RowGroup:
    """Rows of the batch that have read the same number of real (unpadded) tokens: their states
    are at the same position within a segment, so they run as one batch."""

    rows: Tensor
    """Their batch indices, ascending."""
    read: int
    state: InfiniState | None
    """None before they have read anything."""


class InfiniCache:
    """The recurrent state as ``generate()`` carries it, updated in place by every forward.

    Not a transformers ``Cache``: it holds each layer's compressive memory plus the keys/values of
    the current partial segment, never the whole context. ``get_seq_length`` (columns read, padding
    included) is what ``generate`` uses to feed only the tokens the state has not seen: pass the one
    ``generate(..., return_dict_in_generate=True)`` returns back with a longer sequence to continue
    without re-reading.
    """

    is_compileable = False  # read by generate(): no static-cache compilation, no rollback
    is_croppable = False

    def __init__(self) -> None:
        self.groups: list[RowGroup] = []
        self.seen_tokens = 0

    @property
    def is_linear(self) -> list[bool]:
        """Not a pure linear-attention (SSM) state: it also holds the partial segment's keys and
        values. For such a cache generate() feeds only the tokens past ``get_seq_length``."""
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def state_of(self, row: int) -> InfiniState | None:
        """The state of one row of the batch, as if it had been read alone (batch size 1)."""
        for group in self.groups:
            position = (group.rows == row).nonzero()
            if len(position):
                return None if group.state is None else group.state.select(position[0])
        raise IndexError(f"row {row} is not in this cache's batch")

    def read(self, model: InfiniTransformer, input_ids: Tensor,
             attention_mask: Tensor | None) -> Tensor:
        """Advance every row by its real tokens of ``input_ids`` [B, T]; returns the final hidden
        states [B, T, d_model], zero at padded positions.

        attention_mask [B, T] (or longer: its last T columns) is 1 on real tokens.
        """
        batch, length = input_ids.shape
        real = None
        if attention_mask is not None:
            new_columns = attention_mask[:, attention_mask.shape[1] - length:]
            real = None if bool(new_columns.all()) else new_columns.bool()
        counts = real.sum(1) if real is not None else input_ids.new_full((batch,), length)
        if not self.groups:
            self.groups = [RowGroup(torch.arange(batch, device=input_ids.device), 0, None)]
        def zeros() -> Tensor:
            return model.embed_tokens.weight.new_zeros(batch, length, model.config.d_model)

        hidden = None  # one unpadded group: its output, uncopied
        if real is not None or len(self.groups) > 1:
            hidden = zeros()
        groups = []
        for group in self.groups:
            group_counts = counts[group.rows]
            for count in group_counts.unique().tolist():
                member = group_counts == count
                rows = group.rows[member]
                state = group.state
                if state is not None and not bool(member.all()):
                    state = state.select(member)
                if count:
                    place = _positions(rows, real, batch, length)
                    out, state = model.hidden_states(input_ids[place].view(len(rows), count),
                                                     state)
                    if hidden is None:
                        hidden = out
                    else:
                        hidden[place] = out.reshape(-1, out.shape[-1]).to(hidden.dtype)
                groups.append(RowGroup(rows, group.read + count, state))
        self.groups = _merged(groups)
        self.seen_tokens += length
        return zeros() if hidden is None else hidden  # None: no tokens at all

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Follow beam search's choice of surviving beams: new row j continues old row
        beam_idx[j]."""
        beam_idx = beam_idx.to(device=self.groups[0].rows.device, dtype=torch.long)
        old_group = torch.empty_like(beam_idx)
        old_position = torch.empty_like(beam_idx)
        for index, group in enumerate(self.groups):
            old_group[group.rows] = index
            old_position[group.rows] = torch.arange(len(group.rows), device=beam_idx.device)
        groups = []
        for index, group in enumerate(self.groups):
            rows = (old_group[beam_idx] == index).nonzero().flatten()
            if len(rows):
                state = group.state
                if state is not None:
                    state = state.select(old_position[beam_idx[rows]])
                groups.append(RowGroup(rows, group.read, state))
        self.groups = groups


def _positions(rows: Tensor, real: Tensor | None, batch: int, length: int) -> Tensor:
    """bool [B, T]: the real tokens of ``rows``, in row-major order."""
    place = torch.zeros(batch, length, dtype=torch.bool, device=rows.device)
    place[rows] = True if real is None else real[rows]
    return place


def _merged(groups: list[RowGroup]) -> list[RowGroup]:
    """Join the groups that have read equally many tokens back into one batch."""
    by_read: dict[int, list[RowGroup]] = {}
    for group in groups:
        by_read.setdefault(group.read, []).append(group)
    merged = []
    for read, same in by_read.items():
        if len(same) == 1:
            merged.append(same[0])
            continue
        rows = torch.cat([group.rows for group in same])
        order = rows.argsort()
        state = None
        if same[0].state is not None:
            state = InfiniState.concat([group.state for group in same]).select(order)
        merged.append(RowGroup(rows[order], read, state))
    return merged


class InfiniForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = InfiniConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]  # noqa: RUF012 - transformers' convention
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: InfiniConfig) -> None:
        super().__init__(config)
        self.model = InfiniTransformer(config.core_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state rides in an InfiniCache; a DynamicCache would grow with context

    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if isinstance(module, InfiniAttention) and module.has_memory:
            # from_pretrained builds the model on the meta device: set β where the file lacks it.
            init.constant_(module.gate, self.config.gate_init)
            if self.config.memory_write_gate:
                init.zeros_(module.write_weight)
                init.constant_(module.write_bias, self.config.write_gate_init)

    def forward(self, input_ids: Tensor, cache: InfiniCache | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                past_key_values: InfiniCache | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Read ``input_ids`` [B, T] on from the cache (empty if None).

        ``cache`` and ``past_key_values`` are the same argument under the names of newer and
        older transformers releases. Positions where ``attention_mask`` is 0 get zero logits.
        """
        cache = cache if cache is not None else past_key_values
        cache = cache if cache is not None else InfiniCache()
        hidden = cache.read(self.model, input_ids, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        if use_cache is False:
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
