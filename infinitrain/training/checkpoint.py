"""A run directory's checkpoints: layout, crash-safe publishing, finding one to resume from.

    out_dir/
      latest                  name of the newest complete checkpoint (replaced atomically)
      step-00000100/          one complete checkpoint
        trainer.ckpt          Lightning state: weights, optimizer, scheduler, loops (a directory
                              of shards under DeepSpeed)
        streams/rank-00000.safetensors   that rank's stream memory states + data position
        recipe.yaml           the resolved recipe
        model_config.json, model.safetensors, tokenizer/   the inference model directory
        checkpoint.json       manifest, written last
      .tmp-step-00000200/     a checkpoint being written

A checkpoint is written under a temporary name and renamed into place only once complete, so a
crash mid-save never leaves a ``step-*`` directory that is not whole: every ``step-*`` directory
is resumable, and ``--resume auto`` takes the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from ..inference.loading import LATEST_POINTER
from ..model import InfiniState

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
TRAINER_STATE = "trainer.ckpt"
STREAMS_DIR = "streams"
RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "checkpoint.json"


class ResumeError(RuntimeError):
    """A checkpoint cannot continue this run exactly; the message says why and what to do."""


@dataclass
class Manifest:
    """What a checkpoint holds, checked before resuming from it."""

    step: int
    world_size: int
    streams_per_rank: int
    window_tokens: int
    strategy: str
    threads: int | None = None
    """Intra-op CPU threads per process (None in checkpoints written before it was recorded)."""

    def check_compatible(self, world_size: int, streams_per_rank: int, window_tokens: int,
                         where: Path) -> None:
        """Refuse to resume where the streams could not continue exactly (never restart them)."""
        saved = (self.world_size, self.streams_per_rank, self.window_tokens)
        if saved != (world_size, streams_per_rank, window_tokens):
            raise ResumeError(
                f"{where}: saved by {self.world_size} processes × {self.streams_per_rank} streams "
                f"with {self.window_tokens}-token windows; this run has {world_size} × "
                f"{streams_per_rank} with {window_tokens}: every stream's memory and data "
                "position belongs to one rank, so resume with the same devices × num_nodes, "
                "data.streams and data.window_tokens (or start a new run from its weights with "
                "`infinitrain finetune --init`)")


    def thread_notice(self, threads: int) -> str | None:
        """Why a resume at another thread count is not bit-exact, or None at the same count.

        CPU kernels split their reductions by thread, so results differ at ~1e-6 between thread
        counts: the resumed run is a valid continuation, not the straight run's exact twin.
        """
        if self.threads is None or self.threads == threads:
            return None
        return (f"resuming at {threads} intra-op threads per process; the checkpoint was written "
                f"at {self.threads}: the run continues correctly, but not bit-identical to an "
                f"uninterrupted one (set OMP_NUM_THREADS={self.threads} for that)")


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ResumeError(f"{directory}: not a training checkpoint (no {MANIFEST_FILE}); pass a "
                          "step-XXXXXXXX directory or a run directory")
    return Manifest(**json.loads(path.read_text()))


def rank_file(directory: Path, rank: int) -> Path:
    return directory / STREAMS_DIR / f"rank-{rank:05d}.safetensors"


def save_rank_streams(directory: Path, rank: int, state: InfiniState,
                      position: dict[str, Any]) -> None:
    """One rank's stream memory states (exact tensors) and data position."""
    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state.to("cpu").state_dict(), str(path),
              metadata={"rank": str(rank), "position": json.dumps(position)})


def load_rank_streams(directory: Path, rank: int) -> tuple[InfiniState, dict[str, Any]]:
    path = rank_file(directory, rank)
    if not path.is_file():
        raise ResumeError(f"{directory}: has no stream state for rank {rank} ({path.name})")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        position = json.loads(handle.metadata()["position"])
    return InfiniState.from_state_dict(tensors), position


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [path for path in out_dir.iterdir()
             if path.name.startswith(STEP_PREFIX) and (path / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda path: path.name)


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names or, if that is missing (a crash between the rename and the
    pointer update), the newest complete one."""
    pointer = out_dir / LATEST_POINTER
    if pointer.is_file():
        named = out_dir / pointer.read_text().strip()
        if (named / MANIFEST_FILE).is_file():
            return named
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def find_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: 'auto' (the newest in out_dir; None if there is none
    yet), a step-XXXXXXXX directory, or a run directory (its newest)."""
    if resume == "auto":
        return newest_checkpoint(out_dir)
    path = Path(resume)
    if (path / MANIFEST_FILE).is_file():
        return path
    found = newest_checkpoint(path)
    if found is None:
        raise ResumeError(f"--resume {resume}: neither a checkpoint (step-XXXXXXXX with "
                          f"{MANIFEST_FILE}) nor a run directory holding one")
    return found


def staging_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"{TMP_PREFIX}{step:08d}"


def clear_staging(out_dir: Path) -> None:
    """Remove checkpoints a crash left half-written."""
    for path in out_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, out_dir: Path, step: int, keep_last: int) -> Path:
    """Rename a fully written checkpoint into place, point ``latest`` at it, drop old ones."""
    final = out_dir / step_name(step)
    if final.exists():  # re-saving a step after resuming from an older checkpoint
        replaced = out_dir / f"{TMP_PREFIX}replaced-{step:08d}"
        os.replace(final, replaced)
        os.replace(staged, final)
        shutil.rmtree(replaced)
    else:
        os.replace(staged, final)
    _fsync_dir(out_dir)
    pointer = out_dir / f"{LATEST_POINTER}.tmp"
    with open(pointer, "w") as handle:
        handle.write(final.name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer, out_dir / LATEST_POINTER)
    _fsync_dir(out_dir)
    # Only checkpoints up to this one: newer ones left by a run resumed from further back are the
    # user's to delete.
    earlier = [path for path in complete_checkpoints(out_dir) if path.name <= final.name]
    for old in earlier[:-keep_last]:
        shutil.rmtree(old)
    return final


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry itself must reach the disk)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
