"""A model directory: the inference-ready form of a model, shared by training and evaluation.

Every training checkpoint ``step-XXXXXXXX/`` contains one (besides optimizer and trainer state),
so ``--model`` of every evaluation command accepts a checkpoint directory as it is:

    model_config.json    ModelConfig fields
    model.safetensors    float32 weights (tied weights stored once)
    tokenizer/           tokenizer files (optional)

A checkpoint written with ``checkpoint.consolidate: final`` before the end of training has no
``model.safetensors``: its weights are read from the trainer state (``consolidate.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .consolidate import trainer_state_weights
from .integrity import ManifestError, problem, read_manifest_json
from .layout import MANIFEST_FILE, MODEL_CONFIG_FILE, TOKENIZER_DIR, TRAINER_STATE, WEIGHTS_FILE
from .model import InfiniTransformer, ModelConfig


class ModelDirError(FileNotFoundError):
    """A path that should be a model directory is not one; the message says what is missing."""


def save_model_dir(model: InfiniTransformer, out_dir: str | Path,
                   tokenizer_dir: str | Path | None = None) -> Path:
    out = save_model_config(model.config, out_dir)
    weights = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(out / WEIGHTS_FILE))
    match_umask(out / WEIGHTS_FILE)
    target = out / TOKENIZER_DIR
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != target.resolve():
        shutil.copytree(tokenizer_dir, target, dirs_exist_ok=True)
    return out


def save_model_config(config: ModelConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def current_umask() -> int:
    """The process's umask: reading it means setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: Path) -> None:
    """Give ``path`` the mode ``open()`` would have given it: safetensors writes through a private
    temporary file (0600), leaving the weights unreadable to the group or a serving account while
    every other file beside them is readable."""
    path.chmod(0o666 & ~current_umask())


def load_model_config(path: str | Path) -> ModelConfig:
    config_file = Path(path) / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise ModelDirError(f"{path}: not a model directory (no {MODEL_CONFIG_FILE}); pass a "
                            "training checkpoint directory such as runs/tiny/step-00000100")
    return ModelConfig.from_dict(json.loads(config_file.read_text()))


def load_model_dir(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> InfiniTransformer:
    """The model stored at ``path``, in eval mode."""
    config = load_model_config(path)
    weights = load_weights(Path(path))
    model = InfiniTransformer(config)
    if config.tie_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights)
    return model.to(device=device, dtype=dtype).eval()


def load_weights(path: Path) -> dict[str, Tensor]:
    """The float32 weights of the model directory ``path``: its ``model.safetensors``, or those
    of its trainer state in a checkpoint whose weights were not consolidated when it was saved."""
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        return unconsolidated_weights(path)
    check_listed_files(path, [MODEL_CONFIG_FILE, WEIGHTS_FILE])
    try:
        return load_file(str(weights_file))
    except SafetensorError as error:
        raise ModelDirError(f"{weights_file}: unreadable ({error}); the file is truncated or "
                            "corrupt") from None


def unconsolidated_weights(path: Path) -> dict[str, Tensor]:
    """The weights of a checkpoint saved without ``model.safetensors`` (``checkpoint.consolidate:
    final``), gathered from its trainer state once its files are checked against the manifest."""
    if not (path / MANIFEST_FILE).is_file() or not (path / TRAINER_STATE).exists():
        raise ModelDirError(f"{path}: has {MODEL_CONFIG_FILE} but no {WEIGHTS_FILE}")
    check_listed_files(path, [MODEL_CONFIG_FILE, TRAINER_STATE])
    try:
        strategy = read_manifest_json(path)["strategy"]
        return trainer_state_weights(path, strategy)
    except (KeyError, ManifestError, OSError, RuntimeError) as error:
        raise ModelDirError(f"{path}: its weights cannot be read from {TRAINER_STATE} ({error}); "
                            "use another checkpoint of the run") from None


def check_listed_files(path: Path, names: list[str]) -> None:
    """Refuse a training checkpoint whose model files differ from what its manifest lists (a
    plain model directory has no manifest and is read as it is)."""
    if not (path / MANIFEST_FILE).is_file():
        return
    try:
        files = read_manifest_json(path).get("files")
    except ManifestError as error:
        raise ModelDirError(str(error)) from None
    found = None if files is None else problem(path, files, names)
    if found is not None:
        raise ModelDirError(f"{path}: damaged checkpoint, {found}; use another checkpoint of "
                            "the run")


def tokenizer_path(path: str | Path) -> Path | None:
    candidate = Path(path) / TOKENIZER_DIR
    return candidate if candidate.is_dir() else None
