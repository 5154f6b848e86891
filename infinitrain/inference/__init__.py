"""Streaming inference: read any number of tokens through memory, generate, save and load states."""

from .generate import Generation, GenerationConfig, generate
from .loading import LOADERS, LoadedModel, load_model, resolve_model_path
from .sampling import Sampler, SamplingConfig
from .state_io import SavedState, StateFileError, config_fingerprint, load_state, save_state
from .stream import DEFAULT_WINDOW_SEGMENTS, WindowOutput, prefill, stream, window_slices

__all__ = [
    "DEFAULT_WINDOW_SEGMENTS",
    "LOADERS",
    "Generation",
    "GenerationConfig",
    "LoadedModel",
    "Sampler",
    "SamplingConfig",
    "SavedState",
    "StateFileError",
    "WindowOutput",
    "config_fingerprint",
    "generate",
    "load_model",
    "load_state",
    "prefill",
    "resolve_model_path",
    "save_state",
    "stream",
    "window_slices",
]
