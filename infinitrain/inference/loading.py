"""What ``--model`` accepts: a model directory, a training checkpoint, a run's output directory,
or a Hugging Face export.

Each supported on-disk format is one loader function here that returns None when a directory is
not in its format; supporting another is one more entry in :data:`LOADERS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.tokenizer import Tokenizer, load_tokenizer
from ..export.hf import HF_WEIGHTS_FILE, HF_WEIGHTS_INDEX, WEIGHT_PREFIX, export_config
from ..layout import LATEST_POINTER, MODEL_CONFIG_FILE
from ..model import InfiniTransformer, ModelConfig
from ..model.config import RETIRED_FIELDS
from ..model_dir import ModelDirError, load_model_dir, tokenizer_path


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
    if not (path / MODEL_CONFIG_FILE).is_file():
        return None
    return LoadedModel(load_model_dir(path, device, dtype), path, tokenizer_path(path))


def load_exported(path: Path, device: torch.device,
                  dtype: torch.dtype) -> LoadedModel | None:
    """An ``infinitrain export hf`` directory as the core model, or None when ``path`` is not
    one. No transformers and no remote code involved."""
    values = export_config(path)
    if values is None:
        return None
    names = {*(field.name for field in fields(ModelConfig)), *RETIRED_FIELDS}  # from_dict checks
    core = {name: value for name, value in values.items() if name in names}
    core.setdefault("tie_embeddings", values.get("tie_word_embeddings", False))  # re-saved
    model = InfiniTransformer(ModelConfig.from_dict(core))
    weights = {name.removeprefix(WEIGHT_PREFIX): tensor
               for file in _export_weight_files(path) for name, tensor in load_file(file).items()}
    if model.config.tie_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights)
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), path, path)


def _export_weight_files(path: Path) -> list[Path]:
    index = path / HF_WEIGHTS_INDEX
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"]
                                                   .values()))]
    return [path / HF_WEIGHTS_FILE]


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
                        f"{MODEL_CONFIG_FILE} (e.g. runs/tiny/step-00000100), a run directory "
                        f"with a '{LATEST_POINTER}' file, or an `infinitrain export hf` directory")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The computation dtypes a user can name (the memory M, z stays float32 whatever is chosen)."""


def choose_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU) or a device this machine has; ValueError else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r}: CUDA is not available on this machine")
    return device


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' (bf16 on GPU, fp32 on CPU) or one of :data:`DTYPES`; ValueError else."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"{name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_with_tokenizer(path: str | Path, device: torch.device,
                        dtype: torch.dtype) -> tuple[LoadedModel, Tokenizer]:
    """The model at ``path`` and the tokenizer it was trained with, which must fit its
    vocabulary (ModelDirError otherwise)."""
    loaded = load_model(path, device, dtype)
    if loaded.tokenizer_dir is None:
        raise ModelDirError(f"{path}: has no tokenizer/ directory; evaluation needs the "
                            "tokenizer the model was trained with")
    tokenizer = load_tokenizer(loaded.tokenizer_dir)
    if tokenizer.vocab_size > loaded.model.config.vocab_size:
        raise ModelDirError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                            f"vocabulary only {loaded.model.config.vocab_size}")
    return loaded, tokenizer
