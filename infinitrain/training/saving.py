"""The callback that writes checkpoints: every N steps, where an invocation stops, and on SIGUSR1.

Every rank takes part: Lightning/DeepSpeed write the trainer state (sharded under ZeRO), each rank
writes its own streams' memory and data position, rank 0 writes the recipe, tokenizer and
inference model directory (its weights only at the end of training under ``checkpoint.consolidate:
final``), then the manifest listing every file's size and checksum, and only then
is the checkpoint renamed into place. Weights that are not finite are never saved, and a save that
fails (a full disk) leaves no half-written directory behind and the earlier checkpoints untouched.

SIGUSR1 (SLURM's ``--signal=USR1@90`` before a time limit or preemption) asks for a checkpoint at
the next step and a clean stop; under SLURM the job is then requeued, and its script's
``--resume auto`` continues from that checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor

from .. import preemption
from ..consolidate import trainer_state_weights
from ..data import Tokenizer
from ..layout import RECIPE_FILE, TOKENIZER_DIR, TRAINER_STATE
from ..model import InfiniTransformer
from ..model_dir import save_model_config, save_model_dir
from ..recipe import Recipe, dump_recipe
from .checkpoint import (
    Manifest,
    clear_staging,
    publish,
    save_rank_streams,
    staging_dir,
    write_manifest,
)
from .module import NonFiniteError, StreamingLM, finite_everywhere
from .weights import model_from_state_dict


class CheckpointWriter(Callback):
    """Saves complete, resumable checkpoints into ``out_dir`` (see ``checkpoint.py``)."""

    def __init__(self, out_dir: Path, recipe: Recipe, tokenizer: Tokenizer, kind: str) -> None:
        self.out_dir = out_dir
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.kind = kind
        self.saved_step = self.seen_step = -1
        self.owner = os.getpid()
        """Rank 0's process id: names this run's staging directories on every rank."""

    def on_train_start(self, trainer: Trainer, module: StreamingLM) -> None:
        self.saved_step = self.seen_step = trainer.global_step  # a resumed run has this one
        self.owner = trainer.strategy.broadcast(self.owner)
        preemption.install()  # where training runs without the CLI; keeps any earlier request

    def on_train_batch_end(self, trainer: Trainer, module: StreamingLM, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        stop = trainer.strategy.reduce_boolean_decision(preemption.requested(), all=False)
        if step == self.seen_step:  # mid-accumulation: only a completed step can be resumed
            return
        self.seen_step = step
        due = step % self.recipe.checkpoint.every_steps == 0 or step >= trainer.max_steps
        if (due or stop) and step != self.saved_step:
            self.save(trainer, module)
        if stop:
            preemption.clear()
            trainer.should_stop = True
            if trainer.is_global_zero:
                rank_zero_info(f"SIGUSR1: stopped at step {step} with a checkpoint")
                requeue_slurm_job()

    def save(self, trainer: Trainer, module: StreamingLM) -> None:
        step, strategy = trainer.global_step, trainer.strategy
        weights_finite = all(bool(torch.isfinite(t).all()) for t in local_weights(module))
        if not finite_everywhere(strategy, weights_finite):
            raise NonFiniteError(f"step {step}: the weights hold NaN or inf, so they were not "
                                 f"saved; the checkpoints in {self.out_dir} are untouched: "
                                 f"{module.remedy()}")
        staged = staging_dir(self.out_dir, step, self.owner)
        try:
            self._write(trainer, module, staged)
        except OSError as error:  # a full disk, a quota, a directory that went read-only
            shutil.rmtree(staged, ignore_errors=True)
            raise CheckpointWriteError(
                f"step {step}: cannot write the checkpoint into {self.out_dir} "
                f"({error.strerror or error}); the earlier checkpoints are untouched: free space "
                "or choose another --out-dir, then resume with --resume auto") from None
        if trainer.is_global_zero:
            publish(staged, self.out_dir, step, self.recipe.checkpoint.keep_last)
        strategy.barrier("checkpoint: published")
        self.saved_step = step

    def _write(self, trainer: Trainer, module: StreamingLM, staged: Path) -> None:
        """Every file of the checkpoint into ``staged``, the manifest last."""
        step, strategy = trainer.global_step, trainer.strategy
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clear_staging(self.out_dir, keep=staged)
            staged.mkdir()
        strategy.barrier("checkpoint: staging directory")
        save_trainer_state(trainer, staged / TRAINER_STATE)
        save_rank_streams(staged, trainer.global_rank, module.streams, module.data_position)
        if self.consolidates(trainer):
            whole = self._whole_model(trainer, module, staged)
            if trainer.is_global_zero:
                save_model_dir(whole, staged)
        elif trainer.is_global_zero:
            save_model_config(self.recipe.model_config, staged)
        if trainer.is_global_zero:
            self.tokenizer.save(staged / TOKENIZER_DIR)
            (staged / RECIPE_FILE).write_text(dump_recipe(self.recipe))
        strategy.barrier("checkpoint: written")  # every rank's files are complete
        if trainer.is_global_zero:
            write_manifest(staged, Manifest(step, trainer.world_size, self.recipe.data.streams,
                                            self.recipe.data.window_tokens, self.kind,
                                            torch.get_num_threads()))

    def consolidates(self, trainer: Trainer) -> bool:
        """Whether this checkpoint gets the inference weights (``checkpoint.consolidate``); the
        others are read from the trainer state by whatever loads them as a model."""
        return (self.recipe.checkpoint.consolidate == "every"
                or trainer.global_step >= trainer.max_steps)

    def _whole_model(self, trainer: Trainer, module: StreamingLM,
                     staged: Path) -> InfiniTransformer | None:
        """The full float32 model on rank 0 (None elsewhere): the live one, or rebuilt when the
        live one is sharded or, under DeepSpeed, a bf16 copy of the master weights. Every rank
        calls it: FSDP2 gathers the shards collectively, to rank 0's CPU memory only."""
        config = self.recipe.model_config
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(module.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            return model_from_state_dict(config, state) if trainer.is_global_zero else None
        if not trainer.is_global_zero:
            return None
        if self.kind == "deepspeed":
            return model_from_state_dict(config, trainer_state_weights(staged, self.kind))
        return module.model


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only); one line says what to do."""


def local_weights(module: StreamingLM) -> list[torch.Tensor]:
    """The parameter values this rank holds (its partition under ZeRO-3, its shard under
    FSDP2)."""
    return [p.to_local() if isinstance(p, DTensor) else getattr(p, "ds_tensor", p).detach()
            for p in module.parameters()]


def save_trainer_state(trainer: Trainer, path: Path) -> None:
    """Lightning's trainer state; torch reports a failed write (a full disk) as a RuntimeError
    without an errno, so that one is turned into the OSError it is."""
    try:
        trainer.save_checkpoint(path, weights_only=False)
    except RuntimeError as error:
        if "file write failed" not in str(error) and "unexpected pos" not in str(error):
            raise
        raise OSError(f"writing {path.name} failed: {str(error).splitlines()[0]}") from error


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (no-op outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    rank_zero_info(f"requeue of SLURM job {job}: "
                   f"{'done' if result.returncode == 0 else result.stderr.strip()}")
