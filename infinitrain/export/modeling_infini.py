"""Hugging Face causal-LM wrapper around the core Infini-Transformer.

`infinitrain export hf` copies this file verbatim next to the core model files, which it imports
with relative imports: the exported model runs the very code infinitrain trains, not a second
implementation. Load it with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

``generate()`` carries the model's recurrent state as ``past_key_values``: a prompt of any length
is read in one call (whole segments in parallel, each folded into the compressive memory), then
every decoding step feeds only the new token. The state's size does not depend on how many tokens
were read, so decoding memory stays bounded at any context length.
"""

from __future__ import annotations

from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import InfiniAttention
from .configuration_infini import InfiniConfig
from .state import InfiniState
from .transformer import InfiniTransformer


class InfiniCache:
    """The recurrent state as ``generate()`` carries it, updated in place by every forward.

    Not a transformers ``Cache``: it holds each layer's compressive memory plus the keys/values of
    the current partial segment, never the whole context. ``get_seq_length`` (tokens read) is what
    ``generate`` uses to feed only the tokens the state has not seen: pass the one
    ``generate(..., return_dict_in_generate=True)`` returns back with a longer sequence to continue
    without re-reading.
    """

    is_compileable = False  # both read by generate(): no static-cache compilation, no rollback
    is_croppable = False

    def __init__(self) -> None:
        self.state: InfiniState | None = None
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def advance(self, state: InfiniState, new_tokens: int) -> None:
        self.state = state
        self.seen_tokens += new_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Follow beam search's choice of surviving beams."""
        self.state = self.state.select(beam_idx)


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

    def forward(self, input_ids: Tensor, past_key_values: InfiniCache | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Read ``input_ids`` [B, T] on from ``past_key_values`` (empty if None)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask contains zeros: padding is not supported, because the recurrent "
                "memory would store the padded positions; pass prompts of equal length (batch) "
                "or one prompt at a time"
            )
        cache = past_key_values if past_key_values is not None else InfiniCache()
        logits, state = self.model(input_ids, cache.state, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        if use_cache is False:
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        cache.advance(state, input_ids.shape[1])
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
