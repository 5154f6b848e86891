"""A model's whole float32 weights from a training checkpoint's trainer state, on one process.

Writing a checkpoint's inference weights (``model.safetensors``) under DeepSpeed or FSDP2 means
gathering every rank's shard into one float32 copy: for an 8B model ~32 GB pass through rank 0
while every other rank waits. With ``checkpoint.consolidate: final`` only the checkpoint where
training ends pays that; the others keep their weights where training saved them anyway, in the
trainer state, and whatever reads such a checkpoint as a model (evaluation, generation, export)
consolidates them here, later, on one process and without a process group.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from .layout import TRAINER_STATE

MODULE_PREFIX = "model."
"""Where the training module keeps the InfiniTransformer: the prefix of its weights' names in the
trainer state."""


def trainer_state_weights(checkpoint: Path, strategy: str) -> dict[str, Tensor]:
    """The model's float32 weights, named as in the model's own state dict, from the trainer
    state of a checkpoint written under ``strategy`` ('single', 'ddp', 'deepspeed' or 'fsdp')."""
    state = checkpoint / TRAINER_STATE
    if strategy == "deepspeed":
        weights = deepspeed_fp32_state_dict(state)
    elif strategy == "fsdp":
        weights = distributed_checkpoint_weights(state)
    else:  # one file holding the whole state dict; mmap reads the model's tensors, not Adam's
        weights = torch.load(state, map_location="cpu", mmap=True,
                             weights_only=False)["state_dict"]
    return {name.removeprefix(MODULE_PREFIX): tensor.float() for name, tensor in weights.items()
            if name.startswith(MODULE_PREFIX)}


def deepspeed_fp32_state_dict(state: Path) -> dict[str, Tensor]:
    """The whole float32 state dict of a DeepSpeed trainer state's shards: the optimizer's float32
    master weights, at every ZeRO stage. (Under bf16 the live module holds bf16 copies, even
    where it is whole.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(state))


def distributed_checkpoint_weights(state: Path) -> dict[str, Tensor]:
    """The module's tensors of a torch distributed checkpoint (FSDP2's trainer state, a directory
    of every rank's shards): only those are read, not the optimizer's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = dcp.FileSystemReader(state).read_metadata().state_dict_metadata
    prefix = f"state_dict.{MODULE_PREFIX}"
    weights = {name.removeprefix("state_dict."): torch.empty(tuple(entry.size),
                                                               dtype=entry.properties.dtype)
               for name, entry in stored.items()
               if name.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    loaded = {"state_dict": weights}
    with warnings.catch_warnings():  # one process on purpose: no process group is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(loaded, checkpoint_id=state, no_dist=True)
    return loaded["state_dict"]
