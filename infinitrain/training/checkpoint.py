"""A run directory's checkpoints: layout, crash-safe publishing, finding one to resume from.

    out_dir/
      latest                  name of the newest complete checkpoint (replaced atomically)
      step-00000100/          one complete checkpoint
        trainer.ckpt          Lightning state: weights, optimizer, scheduler, loops (a directory
                              of shards under DeepSpeed)
        streams/rank-00000.safetensors   that rank's stream memory states + data position
        recipe.yaml           the resolved recipe
        model_config.json, model.safetensors, tokenizer/   the inference model directory
        checkpoint.json       manifest with every file's size and SHA-256, written last
      .tmp-step-00000200-12345/   a checkpoint being written by the run whose rank 0 is pid 12345
      .lock                   held by the run writing here (see ``run_lock.py``)

A checkpoint is written under a temporary name, its files fsynced and listed with their checksums
in the manifest, and renamed into place only once complete, so a crash mid-save never leaves a
``step-*`` directory that is not whole. A file damaged afterwards (a bad disk, a stray write, a
copy cut short) no longer matches the manifest: ``--resume auto`` then falls back to the newest
intact checkpoint and says which ones it skipped and why.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..integrity import (
    FileList,
    ManifestError,
    list_files,
    problem,
    read_manifest_json,
)
from ..layout import (
    LATEST_POINTER,
    MANIFEST_FILE,
    STEP_PREFIX,
    STREAMS_DIR,
    TMP_STEP_PREFIX,
    step_name,
)
from ..model import InfiniState
from ..model_dir import match_umask


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
    files: FileList | None = None
    """Every other file of the checkpoint with its size and SHA-256 (None in checkpoints written
    before files were listed: those are resumed unverified)."""

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


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """List (and fsync) every file already in ``directory``, then write the manifest, durably:
    it is the last file of a checkpoint, so its presence means every listed byte is on disk."""
    manifest.files = list_files(directory)
    with open(directory / MANIFEST_FILE, "w") as handle:
        handle.write(json.dumps(asdict(manifest), indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ResumeError(f"{directory}: not a training checkpoint (no {MANIFEST_FILE}); pass a "
                          "step-XXXXXXXX directory or a run directory")
    try:
        return Manifest(**read_manifest_json(directory))
    except ManifestError as error:
        raise ResumeError(str(error)) from None
    except TypeError:  # fields missing or unknown
        raise ResumeError(f"{path}: not a checkpoint manifest of this infinitrain version; the "
                          "checkpoint is damaged or from elsewhere") from None


def damage(directory: Path) -> str | None:
    """Why ``directory`` cannot be resumed as written (None: it is intact): an unreadable
    manifest, or a listed file missing, of another size or with another checksum."""
    try:
        files = read_manifest(directory).files
    except ResumeError as error:
        return str(error)
    return None if files is None else problem(directory, files)


def check_intact(directory: Path) -> None:
    """Refuse a checkpoint named explicitly (--resume step-XXXXXXXX) that is damaged."""
    found = damage(directory)
    if found is not None:
        raise ResumeError(f"{directory}: damaged, {found}; resume from an older checkpoint of "
                          "the run (--resume <run directory> takes the newest intact one)")


def rank_file(directory: Path, rank: int) -> Path:
    return directory / STREAMS_DIR / f"rank-{rank:05d}.safetensors"


def save_rank_streams(directory: Path, rank: int, state: InfiniState,
                      position: dict[str, Any]) -> None:
    """One rank's stream memory states (exact tensors) and data position."""
    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state.to("cpu").state_dict(), str(path),
              metadata={"rank": str(rank), "position": json.dumps(position)})
    match_umask(path)


def load_rank_streams(directory: Path, rank: int) -> tuple[InfiniState, dict[str, Any]]:
    path = rank_file(directory, rank)
    if not path.is_file():
        raise ResumeError(f"{directory}: has no stream state for rank {rank} ({path.name})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            position = json.loads(handle.metadata()["position"])
    except SafetensorError as error:  # a checkpoint without a file list, damaged since
        raise ResumeError(f"{path}: unreadable ({error}); resume from an older checkpoint"
                          ) from None
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
    candidates = resume_candidates(out_dir)
    return candidates[0] if candidates else None


def resume_candidates(out_dir: Path) -> list[Path]:
    """The checkpoints a resume may continue from, best first: the one ``latest`` names (or the
    newest complete one), then the older ones of its timeline, newest first."""
    found = complete_checkpoints(out_dir)
    pointer = out_dir / LATEST_POINTER
    if pointer.is_file():
        named = out_dir / pointer.read_text().strip()
        if named in found:
            found = found[:found.index(named) + 1]
    return found[::-1]


def newest_intact(out_dir: Path) -> Path | None:
    """The best resume candidate that is intact, warning (one line each) about every damaged
    newer one it skips; ResumeError if checkpoints exist but none is intact."""
    candidates = resume_candidates(out_dir)
    for candidate in candidates:
        found = damage(candidate)
        if found is None:
            return candidate
        rank_zero_warn(f"skipping checkpoint {candidate}: {found}")
    if candidates:
        raise ResumeError(f"{out_dir}: no intact checkpoint to resume from (every one is damaged, "
                          "see above); start a new run in another --out-dir")
    return None


def find_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: 'auto' (the newest intact one in out_dir; None if there
    is none yet), a step-XXXXXXXX directory (refused if damaged), or a run directory (its newest
    intact one)."""
    if resume == "auto":
        return newest_intact(out_dir)
    path = Path(resume)
    if (path / MANIFEST_FILE).is_file():
        check_intact(path)
        return path
    found = newest_intact(path)
    if found is None:
        raise ResumeError(f"--resume {resume}: neither a checkpoint (step-XXXXXXXX with "
                          f"{MANIFEST_FILE}) nor a run directory holding one")
    return found


def staging_dir(out_dir: Path, step: int, owner: int) -> Path:
    """Where the run whose rank 0 is process ``owner`` writes checkpoint ``step``: per process,
    so that no two runs ever write into, or clear, the same directory."""
    return out_dir / f"{TMP_STEP_PREFIX}{step:08d}-{owner}"


def clear_staging(out_dir: Path, keep: Path) -> None:
    """Remove checkpoints a crash left half-written, except ``keep``.

    Only called while holding the run lock (``run_lock.py``): every run writing into out_dir
    holds it, so any other staging directory belongs to a process that is no longer running.
    """
    for path in out_dir.glob(f"{TMP_STEP_PREFIX}*"):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, out_dir: Path, step: int, keep_last: int) -> Path:
    """Rename a fully written checkpoint into place, point ``latest`` at it, drop old ones."""
    final = out_dir / step_name(step)
    if final.exists():  # re-saving a step after resuming from an older checkpoint
        replaced = out_dir / f"{TMP_STEP_PREFIX}replaced-{step:08d}"
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
