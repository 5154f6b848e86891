"""Saving a memory state after reading a document, and loading it to answer questions later.

A state file is safetensors: the state's tensors plus metadata naming the model configuration it
belongs to (a fingerprint and the full config, so a mismatch can say which fields differ) and how
many tokens were read into it. Its size does not depend on the document's length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..model import ConfigError, InfiniState, ModelConfig
from ..model.config import without_retired
from ..model_dir import match_umask

FORMAT = "infinitrain-state/1"


class StateFileError(ValueError):
    """A state file is unreadable or belongs to a different model; the message says which."""


@dataclass
class SavedState:
    state: InfiniState
    tokens_read: int
    """Tokens read into the state since it was empty."""
    source: str
    """What was read (e.g. the document's path)."""
    model: str
    """The model (e.g. a checkpoint's absolute path, so that it compares from any working
    directory) that read it: same config, other weights reads garbage."""


def config_fingerprint(config: ModelConfig) -> str:
    """A short hash of every field that shapes or interprets the state."""
    canonical = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_differences(saved: dict, config: ModelConfig) -> list[str]:
    """The fields in which a state file's config ``saved`` and ``config`` differ, as "name saved
    vs current"; a field retired since the file was written matches at its old default."""
    with contextlib.suppress(ConfigError):  # a retired field at another value: listed below
        saved = without_retired(saved)
    current = config.to_dict()
    names = [*current, *(name for name in saved if name not in current)]
    return [f"{name} {saved.get(name)!r} vs {current.get(name)!r}" for name in names
            if saved.get(name) != current.get(name)]


def save_state(path: str | Path, state: InfiniState, config: ModelConfig, tokens_read: int,
               source: str = "", model: str = "") -> Path:
    """Write one stream's ``state`` (moved to the CPU) to ``path``."""
    if state.batch_size != 1:
        raise ValueError(f"a state file holds one stream; this state has {state.batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "config_fingerprint": config_fingerprint(config),
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "tokens_read": str(tokens_read),
        "source": source,
        "model": model,
    }
    save_file(state.to("cpu").state_dict(), str(path), metadata=metadata)
    match_umask(path)
    return path


def load_state(path: str | Path, config: ModelConfig,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> SavedState:
    """The state saved at ``path``, checked against the ``config`` of the model about to use it.

    ``dtype`` casts the partial segment's keys/values to the model's dtype; M and z stay float32.
    """
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such state file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise StateFileError(f"{path}: not a safetensors state file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise StateFileError(f"{path}: not an infinitrain state file (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata["config_fingerprint"] != config_fingerprint(config):
        differences = config_differences(json.loads(metadata["model_config"]), config)
        if differences:  # none: the fingerprint counted a field retired since, at its old default
            raise StateFileError(f"{path}: saved by a different model configuration (state vs "
                                 f"model: {', '.join(differences)})")
    state = InfiniState.from_state_dict(tensors)
    if dtype is not None:
        for layer in state.layers:
            for name in ("keys", "values", "context_keys", "context_values"):
                setattr(layer, name, getattr(layer, name).to(dtype))
    return SavedState(state, int(metadata["tokens_read"]), metadata.get("source", ""),
                      metadata.get("model", ""))
