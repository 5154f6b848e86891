"""What ``--model`` accepts: a model directory, a training checkpoint, or a run's output directory.

Each supported on-disk format is one loader function that returns None when a directory is not in
its format; supporting another (the exported Hugging Face directory) is one more entry in
:data:`LOADERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..export.hf import load_exported
from ..model import InfiniTransformer
from ..model_dir import CONFIG_FILE, ModelDirError, load_model_dir, tokenizer_path

LATEST_POINTER = "latest"
"""File in a training run's out_dir naming its newest checkpoint directory."""


@dataclass
class LoadedModel:
    model: InfiniTransformer
    path: Path
    """The directory the weights came from (a pointer resolved)."""
    tokenizer_dir: Path | None


Loader = Callable[[Path, torch.device, torch.dtype], LoadedModel | None]


def load_infinitrain_dir(path: Path, device: torch.device,
                         dtype: torch.dtype) -> LoadedModel | None:
    """A model directory as written by ``save_model_dir`` (every training checkpoint is one)."""
    if not (path / CONFIG_FILE).is_file():
        return None
    return LoadedModel(load_model_dir(path, device, dtype), path, tokenizer_path(path))


LOADERS: list[Loader] = [load_infinitrain_dir, load_exported]


def resolve_model_path(path: str | Path) -> Path:
    """``path`` itself, or the checkpoint its ``latest`` pointer names."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such directory")
    pointer = path / LATEST_POINTER
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if not target.is_dir():
            raise ModelDirError(f"{pointer} names {target.name!r}, which does not exist")
        return target
    return path


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model at ``path`` (any supported format), in eval mode on ``device``."""
    resolved = resolve_model_path(path)
    for loader in LOADERS:
        loaded = loader(resolved, torch.device(device), dtype)
        if loaded is not None:
            return loaded
    raise ModelDirError(f"{path}: not a model: expected a checkpoint directory with "
                        f"{CONFIG_FILE} (e.g. runs/tiny/step-00000100), a run directory with a "
                        f"'{LATEST_POINTER}' file, or an `infinitrain export hf` directory")
