"""Moving whole weights in and out of a model that may be sharded (DeepSpeed ZeRO-3).

Under ZeRO-3 every parameter is a partition placeholder outside its module's forward; reading or
writing whole values needs a collective gather. Elsewhere these helpers are plain tensor copies.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..inference.loading import resolve_model_path
from ..layout import WEIGHTS_FILE
from ..model import InfiniTransformer, ModelConfig
from ..model_dir import load_model_config
from ..recipe import RecipeError

SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                "head_dim", "tie_embeddings", "memory_write_gate", "memory_from_layer")
"""ModelConfig fields that decide which weights exist and their shapes; the others (segment
length, memory rule, RoPE base, ...) may change when continuing from a checkpoint, with a warning
(gate_init and write_gate_init only matter for random weights)."""
INIT_ONLY_FIELDS = ("gate_init", "write_gate_init")


def is_partitioned(parameter: Tensor) -> bool:
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def gathered(parameters: Iterable[nn.Parameter],
             modifier_rank: int | None = None) -> Iterator[None]:
    """Whole values of ``parameters`` inside the block (a collective under ZeRO-3: every rank
    must enter it). With ``modifier_rank``, that rank's in-place writes are kept."""
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def check_init(path: str | Path, config: ModelConfig) -> Path:
    """The model directory ``model.init`` names (a run directory: its latest checkpoint), if its
    weights fit ``config``."""
    directory = resolve_model_path(path)
    saved = load_model_config(directory)
    differences = [f"{name} {getattr(saved, name)!r} vs {getattr(config, name)!r}"
                   for name in SHAPE_FIELDS if getattr(saved, name) != getattr(config, name)]
    if differences:
        raise RecipeError(f"model.init = {path}: its weights do not fit the recipe's model "
                          f"(checkpoint vs recipe: {', '.join(differences)})")
    if not (directory / WEIGHTS_FILE).is_file():  # every rank would gather the whole model
        raise RecipeError(f"model.init = {path}: {directory.name} was saved without its model "
                          f"weights (checkpoint.consolidate: final); write them once with "
                          f"`infinitrain export model {directory} DIR` and set model.init=DIR")
    changed = [f"{name} {value!r} → {getattr(config, name)!r}"
               for name, value in saved.to_dict().items()
               if name not in (*SHAPE_FIELDS, *INIT_ONLY_FIELDS) and value != getattr(config, name)]
    if changed:
        warnings.warn(f"model.init = {path}: training with the recipe's {', '.join(changed)}",
                      stacklevel=2)
    return directory


def load_initial_weights(model: InfiniTransformer, directory: Path, is_global_zero: bool) -> None:
    """Copy the weights of a model directory (see :func:`check_init`) into ``model``.

    Under ZeRO-3 rank 0 reads the file one tensor at a time and the gather broadcasts it; under
    FSDP2 every rank reads one tensor at a time and keeps its shard: no process ever holds a
    second full copy of an 8B model.
    """
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
        for name, parameter in model.named_parameters():
            if isinstance(parameter, DTensor):  # FSDP2: every rank keeps its own shard
                whole = weights.get_tensor(name).to(parameter.device, parameter.dtype)
                shard = distribute_tensor(whole, parameter.device_mesh, parameter.placements)
                with torch.no_grad():
                    parameter.to_local().copy_(shard.to_local())
                continue
            with gathered([parameter], modifier_rank=0), torch.no_grad():
                if is_global_zero or not is_partitioned(parameter):
                    parameter.copy_(weights.get_tensor(name))


def model_from_state_dict(config: ModelConfig, state: dict[str, Tensor]) -> InfiniTransformer:
    """A model holding the tensors of ``state`` (named as in the model's own state dict), for
    `save_model_dir` only: nothing is copied or initialised, and non-persistent buffers stay on
    the meta device."""
    weights = dict(state)
    if config.tie_embeddings:
        weights.setdefault("lm_head.weight", weights["embed_tokens.weight"])
    with torch.device("meta"):
        model = InfiniTransformer(config)
    model.load_state_dict(weights, assign=True)
    return model
