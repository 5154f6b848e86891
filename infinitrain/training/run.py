"""One training invocation: from a validated recipe to checkpoints in the run directory."""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from ..data import Tokenizer, load_tokenizer
from ..evaluation.options import human_bytes, human_count
from ..inference.loading import resolve_model_path
from ..layout import CSV_DIR, LOG_DIR, RECIPE_FILE, TENSORBOARD_DIR, TRAINER_STATE, csv_version
from ..model import InfiniTransformer, ModelConfig
from ..model_dir import tokenizer_path
from ..recipe import LoggingSection, Recipe, RecipeError, parse_recipe
from ..recipe.typed import to_plain
from .checkpoint import (
    ResumeError,
    find_checkpoint,
    newest_checkpoint,
    read_manifest,
)
from .data import StreamData, check_sources
from .flops import flops_per_token
from .metrics import TrainingMetrics
from .module import StreamingLM
from .progress import RunTotals, StepProgressBar, TextProgress, quiet_lightning
from .run_lock import run_lock
from .saving import CheckpointWriter
from .strategy import Plan, check_host_memory, plan, use_threads_per_process
from .validation import Validation
from .weights import check_init


@dataclass
class RunSummary:
    """What `--dry-run` prints: the run's size without building or loading anything real."""

    parameters: int
    memory_state_bytes_per_stream: int
    streams_per_device: int
    tokens_per_step: int
    training_flops_per_token: float


@dataclass
class TrainResult:
    """What one invocation did, for the final summary."""

    checkpoint: Path | None
    """The newest checkpoint in the run directory."""
    seconds: float
    start_step: int
    end_step: int
    tokens: int
    """Tokens read by this invocation, all devices together."""
    final_loss: float | None
    best_loss: float | None
    validation: tuple[int, float] | None
    """(step, held-out loss) of the last evaluation of data.validation."""
    write_gate_waiting: float | None = None
    """The training loss's moving average, when the write gate still waits for it to fall below
    optim.write_gate_below_loss at the end (else None)."""


def meta_model(config: ModelConfig) -> InfiniTransformer:
    """The model's structure without memory (parameter counting, memory-state sizing)."""
    with torch.device("meta"):
        return InfiniTransformer(config)


def summarize(recipe: Recipe) -> RunSummary:
    model = meta_model(recipe.model_config)
    return RunSummary(
        parameters=sum(p.numel() for p in model.parameters()),
        memory_state_bytes_per_stream=model.config.memory_state_bytes,
        streams_per_device=recipe.data.streams,
        tokens_per_step=recipe.tokens_per_step,
        training_flops_per_token=flops_per_token(recipe.model_config),
    )


def resolve_tokenizer(recipe: Recipe) -> Tokenizer:
    """The recipe's tokenizer, else the one saved with model.init; it must fit the vocabulary."""
    path = recipe.data.tokenizer
    if path is None and recipe.model.init is not None:
        path = tokenizer_path(resolve_model_path(recipe.model.init))
    if path is None:
        raise RecipeError("data.tokenizer = null: set it to a tokenizer directory (e.g. a "
                          "Llama-3 tokenizer), or set model.init to a model directory that has one")
    tokenizer = load_tokenizer(path)
    vocab = recipe.model_config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise RecipeError(f"data.tokenizer = {path}: has {tokenizer.vocab_size} token ids, more "
                          f"than model.vocab_size = {vocab}")
    return tokenizer


def loggers(logging: LoggingSection, out_dir: Path, name: str, start_step: int) -> list[Logger]:
    """TensorBoard appends across invocations; CSV gets one file per invocation, named by the
    step it starts from (Lightning's CSV logger replaces an existing file)."""
    chosen: list[Logger] = []
    if logging.tensorboard:
        chosen.append(TensorBoardLogger(out_dir / LOG_DIR, name=TENSORBOARD_DIR, version="",
                                        default_hp_metric=False))
    if logging.csv:
        chosen.append(CSVLogger(out_dir / LOG_DIR, name=CSV_DIR,
                                version=csv_version(start_step)))
    if logging.wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger

            chosen.append(WandbLogger(project=logging.wandb_project, name=name,
                                      save_dir=str(out_dir)))
        except ModuleNotFoundError:
            raise RecipeError("logging.wandb = true: wandb is not installed "
                              "(pip install 'infinitrain[wandb]')") from None
    return chosen


def flat_hyperparameters(value: object, prefix: str = "") -> dict[str, object]:
    """A plain recipe as TensorBoard's HPARAMS tab takes it: one scalar per leaf, named by its
    path ('optim/lr', 'data/sources/0/kind'); null as the string 'null'."""
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {name: leaf for key, item in items
                for name, leaf in flat_hyperparameters(item, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): "null" if value is None else value}


def log_hyperparameters(loggers: list[Logger], recipe: Recipe) -> None:
    """The resolved recipe to every logger (hparams.yaml, W&B's run config) and to TensorBoard's
    HPARAMS tab, which lists a run only with metrics: it names the loss (and the held-out loss),
    whose values the tab reads from the run's scalars of those names."""
    plain = to_plain(recipe)
    for logger in loggers:
        logger.log_hyperparams(plain)
        if isinstance(logger, TensorBoardLogger) and rank_zero_only.rank == 0:
            from torch.utils.tensorboard.summary import hparams

            metrics = ["loss"] + (["val_loss"] if recipe.data.validation else [])
            writer = logger.experiment._get_file_writer()
            for summary in hparams(flat_hyperparameters(plain), dict.fromkeys(metrics, 0.0)):
                writer.add_summary(summary)


def checkpoint_to_resume(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint to continue from; refuses to start over a run that already has one."""
    if resume is not None:
        return find_checkpoint(resume, out_dir)
    existing = newest_checkpoint(out_dir)
    if existing is not None:
        raise ResumeError(f"{out_dir} already holds checkpoints (newest {existing.name}): pass "
                          "--resume auto to continue that run, or choose another --out-dir")
    return None


RESTORED_OPTIM_FIELDS = ("lr", "gate_lr_multiplier", "weight_decay", "betas", "eps")
"""optim fields whose values the restored state carries: the optimizer's parameter groups (lr,
betas, eps, weight decay) and the scheduler's base learning rates (lr × gate multiplier). A resume
would silently keep the checkpoint's values while the recipe recorded with the next checkpoint
said otherwise. Everything else (schedule shape, train.max_steps, grad_clip, precision, write
gate, logging) is read from the recipe at every step, so a change takes effect as recorded."""


def check_resumable(recipe: Recipe, checkpoint: Path, apply_optim_changes: bool,
                    strategy: str) -> None:
    """Refuse a resume that could not continue exactly or would not do what its recipe says."""
    saved = parse_recipe(yaml.safe_load((checkpoint / RECIPE_FILE).read_text(encoding="utf-8")))
    check_same_streams(recipe, saved, checkpoint)
    check_same_optimizer(recipe, saved, checkpoint, apply_optim_changes, strategy)


def check_same_optimizer(recipe: Recipe, saved: Recipe, checkpoint: Path,
                         apply_optim_changes: bool, strategy: str) -> None:
    """Refuse optim values the restored optimizer and scheduler would override, unless the user
    asks for them to be applied (--apply-optim-changes; not under DeepSpeed, whose engine keeps
    the optimizer state where the flag cannot rewrite it)."""
    if saved.optim.name != recipe.optim.name:
        raise ResumeError(f"{checkpoint}: optim.name {saved.optim.name} → {recipe.optim.name}: "
                          "the saved optimizer state cannot carry over to another optimizer; "
                          "start a new run from its weights (`infinitrain finetune --init`)")
    changed = [f"optim.{name} ({getattr(saved.optim, name)} → {getattr(recipe.optim, name)})"
               for name in RESTORED_OPTIM_FIELDS
               if getattr(saved.optim, name) != getattr(recipe.optim, name)]
    if changed and apply_optim_changes and strategy == "deepspeed":
        raise ResumeError(f"{checkpoint}: {', '.join(changed)} differ from the checkpoint's, and "
                          "--apply-optim-changes cannot rewrite a DeepSpeed optimizer state: "
                          f"resume with its recipe (--recipe {checkpoint / RECIPE_FILE}) or start "
                          "a new run from its weights (`infinitrain finetune --init`)")
    if changed and not apply_optim_changes:
        raise ResumeError(f"{checkpoint}: {', '.join(changed)} differ from the checkpoint's, and "
                          "the restored optimizer and schedule would keep the old values: pass "
                          "--apply-optim-changes to apply the new ones, or resume with its recipe "
                          f"(--recipe {checkpoint / RECIPE_FILE})")


def check_same_streams(recipe: Recipe, saved: Recipe, checkpoint: Path) -> None:
    """Refuse to resume with data, model or seed other than the checkpoint's: its stream
    positions and memories would not mean the same thing."""
    # The validation set is read apart from the training streams: it may change on a resume.
    changed = [name for name, before, now in (
        ("data", replace(saved.data, validation=None), replace(recipe.data, validation=None)),
        ("model", saved.model_config, recipe.model_config),
        ("train.seed", saved.train.seed, recipe.train.seed)) if before != now]
    if changed:
        raise ResumeError(f"{checkpoint}: {' and '.join(changed)} differ from the checkpoint's, so "
                          "its streams cannot continue exactly; resume with its recipe "
                          f"(--recipe {checkpoint / RECIPE_FILE}) or start a new run")


def cluster_plugins() -> list:
    """Under SLURM, Lightning's own requeue checkpoint lacks the stream memories; a run is resumed
    from our checkpoints (`--resume auto`) instead."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def quiet_known_warnings() -> None:
    """Warnings every run would print that need no action."""
    # One process per device feeds its own streams; loader workers would not help.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # A window without supervised tokens steps the schedule without an optimizer update.
    warnings.filterwarnings("ignore", r".*lr_scheduler.step\(\)` before `optimizer.step\(\)`.*")
    # A run started outside srun on a machine that has it (a login node, a workstation).
    warnings.filterwarnings("ignore", ".*The `srun` command is available on your system.*")
    # Lightning 2.6 on torch 2.13 (lightning/pytorch/utilities/_pytree.py).
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def start_banner(recipe: Recipe, summary: RunSummary, name: str, run_plan: Plan, out_dir: Path,
                 start_step: int, stop_at: int) -> str:
    """Our one look at the run before it starts, instead of Lightning's device lines and model
    summary (whose FLOPs column reads 0 for this model)."""
    device = "GPU" if run_plan.accelerator == "gpu" else "CPU process"
    start = f"resuming at step {start_step:,}" if start_step else "from step 0"
    threads = torch.get_num_threads()
    return "\n".join((
        f"{name}: {human_count(summary.parameters)} parameters; memory state "
        f"{human_bytes(summary.memory_state_bytes_per_stream)} per stream × "
        f"{recipe.data.streams} per device",
        f"devices: {run_plan.world_size} × {device} ({run_plan.kind}, {run_plan.precision}), "
        f"{threads} CPU thread{'s' if threads > 1 else ''} each",
        f"steps: {start} to {stop_at:,} (schedule {recipe.train.max_steps:,}), "
        f"{summary.tokens_per_step:,} tokens each",
        f"run directory: {out_dir}"))


def build_trainer(recipe: Recipe, name: str, run_plan: Plan, out_dir: Path, start_step: int,
                  stop_at: int, tokenizer: Tokenizer, observers: list[Callback]) -> Trainer:
    """``observers``: callbacks whose results the caller reads after the run."""
    every = recipe.logging.every_steps
    interactive = sys.stdout.isatty()
    callbacks = [CheckpointWriter(out_dir, recipe, tokenizer, run_plan.kind),
                 TrainingMetrics(recipe.model_config, every, recipe.train.precision,
                                 recipe.tokens_per_step),
                 *observers,
                 StepProgressBar() if interactive else TextProgress(every)]
    return Trainer(
        accelerator=run_plan.accelerator, devices=run_plan.devices,
        num_nodes=run_plan.num_nodes, strategy=run_plan.strategy, precision=run_plan.precision,
        max_steps=stop_at, accumulate_grad_batches=recipe.train.accumulate,
        gradient_clip_val=run_plan.gradient_clip_val,
        logger=loggers(recipe.logging, out_dir, name, start_step), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=interactive, log_every_n_steps=every,
        enable_model_summary=False,
        default_root_dir=out_dir, plugins=cluster_plugins(), use_distributed_sampler=False,
    )


def owning(out_dir: Path) -> contextlib.AbstractContextManager:
    """The run directory's lock, taken by the global rank 0 only (DDP's other processes are
    launched by it, and its lock covers them)."""
    return run_lock(out_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext()


def train(recipe: Recipe, name: str, out_dir: Path, resume: str | None = None,
          stop_at: int | None = None, apply_optim_changes: bool = False) -> TrainResult:
    """Train until ``stop_at`` (default: the recipe's max_steps) and say what was done;
    ``apply_optim_changes``: a resume gives the restored optimizer the recipe's optim values."""
    seed_everything(recipe.train.seed, workers=True, verbose=False)
    quiet_known_warnings()
    summary = summarize(recipe)
    check_host_memory(recipe, summary.parameters)
    with owning(out_dir):
        tokenizer = resolve_tokenizer(recipe)
        haystacks = check_sources(recipe, tokenizer)
        run_plan = plan(recipe, summary.parameters)
        use_threads_per_process(run_plan.devices)
        resume_from = checkpoint_to_resume(resume, out_dir)
        start_step = 0
        if resume_from is not None:
            manifest = read_manifest(resume_from)
            manifest.check_compatible(run_plan.world_size, recipe.data.streams,
                                      recipe.data.window_tokens, resume_from)
            start_step = manifest.step
            check_resumable(recipe, resume_from, apply_optim_changes, run_plan.kind)
            if (notice := manifest.thread_notice(torch.get_num_threads())) is not None:
                rank_zero_warn(notice)
        init = None if resume_from is not None or recipe.model.init is None else \
            check_init(recipe.model.init, recipe.model_config)
        stop_at = stop_at or recipe.train.max_steps
        totals = RunTotals()
        validation = (None if recipe.data.validation is None
                      else Validation(recipe, tokenizer, haystacks))
        module = StreamingLM(recipe, init=init, resume_from=resume_from,
                             apply_optim_changes=apply_optim_changes)
        with quiet_lightning():
            trainer = build_trainer(recipe, name, run_plan, out_dir, start_step, stop_at,
                                    tokenizer, [totals] + ([validation] if validation else []))
            log_hyperparameters(trainer.loggers, recipe)
            rank_zero_info(start_banner(recipe, summary, name, run_plan, out_dir, start_step,
                                        stop_at))
            trainer.fit(module, datamodule=StreamData(recipe, tokenizer, resume_from, haystacks),
                        ckpt_path=None if resume_from is None else resume_from / TRAINER_STATE,
                        weights_only=True)
        return TrainResult(newest_checkpoint(out_dir), totals.seconds, totals.start_step,
                           totals.end_step,
                           (totals.end_step - totals.start_step) * recipe.tokens_per_step,
                           totals.final_loss, totals.best_loss,
                           None if validation is None else validation.last,
                           module.write_gate.loss_average if module.write_gate.waits_for_loss
                           else None)
