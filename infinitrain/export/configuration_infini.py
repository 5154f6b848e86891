"""Hugging Face configuration of an exported Infini-Transformer.

`infinitrain export hf` copies this file and ``modeling_infini.py`` verbatim next to the core model
files (``config.py``, ``transformer.py``, …). Its relative imports name those siblings, so it is
imported only from an exported directory, never from inside the infinitrain package.
"""

from __future__ import annotations

from dataclasses import fields

from transformers import PreTrainedConfig

from .config import RETIRED_FIELDS, ModelConfig


class InfiniConfig(PreTrainedConfig):
    """The core ``ModelConfig`` fields, stored flat in config.json under their own names.

    The fields are not redeclared here (the core config is their one definition); the Llama-style
    names other tools read (``hidden_size``, ``num_hidden_layers``, …) are aliases of them.
    """

    model_type = "infini_llama"
    attribute_map = {  # noqa: RUF012 - transformers' convention for this class attribute
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_dim",
        "rms_norm_eps": "norm_eps",
        "tie_embeddings": "tie_word_embeddings",
    }

    def core_config(self) -> ModelConfig:
        """The configuration the core model is built from (a retired field that an older
        config.json holds is checked there: dropped at its old default, refused otherwise)."""
        values = {f.name: getattr(self, f.name) for f in fields(ModelConfig)}
        values |= {name: getattr(self, name) for name in RETIRED_FIELDS if hasattr(self, name)}
        return ModelConfig.from_dict(values)
