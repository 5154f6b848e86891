"""The Infini-Transformer. Depends only on torch, so the Hugging Face export ships it verbatim."""

from .config import PRESETS, ConfigError, ModelConfig, preset
from .state import InfiniState, LayerState, kv_cache_nbytes
from .transformer import InfiniTransformer

__all__ = [
    "PRESETS",
    "ConfigError",
    "InfiniState",
    "InfiniTransformer",
    "LayerState",
    "ModelConfig",
    "kv_cache_nbytes",
    "preset",
]
