"""The typed recipe: what a training run is, section by section, every field documented.

A recipe YAML maps onto :class:`Recipe`; :func:`infinitrain.recipe.load_recipe` parses and validates
it. Checks that need only the recipe live here; checks that need the machine (devices, memory) live
with the strategy choice in ``infinitrain.training.strategy``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from glob import glob, has_magic
from pathlib import Path
from typing import Any, Literal

from ..data.sources import SourceConfig
from ..data.streams import StreamConfig
from ..model import ConfigError, ModelConfig, preset
from ..model.config import without_retired
from .typed import RecipeError, UnknownFieldError, field_error, from_plain

SEED_LIMIT = 2**32
"""Seeds must be below this: numpy's and Lightning's generators take 32-bit seeds."""

MODEL_SECTION_OWN_FIELDS = ("init", "preset")
"""The keys of ``model:`` that are not ModelConfig fields."""


@dataclass
class ModelSection:
    """A model preset plus any :class:`~infinitrain.model.ModelConfig` field to change.

    In YAML the changed fields sit next to ``preset``: ``model: {preset: 1b, segment_len: 1024}``.
    """

    preset: str = "tiny"
    """Starting shape: tiny (CPU), 1b (Llama-3.2-1B shape) or 8b (Llama-3.1-8B shape)."""
    init: str | None = None
    """Weights to start from: a model or checkpoint directory (e.g. an imported Llama checkpoint for
    continual pretraining, or a pretraining run's step-XXXXXXXX for fine-tuning). Null: random."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that differ from the preset (written flat in YAML, see above)."""

    def config(self) -> ModelConfig:
        return preset(self.preset, **self.overrides)

    @staticmethod
    def plain_fields() -> list[str]:
        """The fields ``model:`` takes in YAML: its own, then every ModelConfig field."""
        return [*MODEL_SECTION_OWN_FIELDS, *typing.get_type_hints(ModelConfig)]

    @classmethod
    def from_plain(cls, value: Any, path: str) -> ModelSection:
        if not isinstance(value, dict):
            raise field_error(path, value, "expected a mapping with preset, init and model fields")
        hints = typing.get_type_hints(ModelConfig)
        overrides = {}
        try:
            kept = without_retired({key: item for key, item in value.items()
                                    if key not in MODEL_SECTION_OWN_FIELDS},
                                   path=path)
        except ConfigError as error:
            raise RecipeError(str(error)) from None
        for key, item in kept.items():
            if key not in hints:
                raise UnknownFieldError(f"{path}.{key}", cls.plain_fields())
            overrides[key] = from_plain(hints[key], item, f"{path}.{key}")
        section = cls(preset=from_plain(str, value.get("preset", cls.preset), f"{path}.preset"),
                      init=from_plain(str | None, value.get("init"), f"{path}.init"),
                      overrides=overrides)
        try:
            section.config()
        except ConfigError as error:
            raise RecipeError(str(error)) from None
        return section

    def to_plain(self) -> dict[str, Any]:
        return {"preset": self.preset, "init": self.init, **self.overrides}


@dataclass
class ValidationSection:
    """Held-out data scored during training: the same windows every time (the streams restart
    from the run's seed), so the numbers compare across steps and between runs."""

    sources: list[SourceConfig]
    """Held-out sources, as in data.sources (text the run never trains on)."""
    every_steps: int = 500
    """Optimizer steps between evaluations; a multiple of logging.every_steps, the steps at
    which metrics reach the loggers."""
    windows: int = 4
    """Windows per stream scored each time, read in order with carried memory as in training,
    without gradients: the cost is bounded, whatever the sources hold."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise field_error("data.validation.sources", self.sources, "list at least one source")
        for name in ("every_steps", "windows"):
            if getattr(self, name) < 1:
                raise field_error(f"data.validation.{name}", getattr(self, name), "must be >= 1")


@dataclass
class DataSection:
    """Where the training tokens come from and how they are cut into windows."""

    sources: list[SourceConfig]
    """One or more sources (hub datasets, local files, passkey, booksum), mixed by weight."""
    tokenizer: str | None = None
    """Directory holding tokenizer.json (or the file). Null: the tokenizer saved with model.init."""
    window_tokens: int = 32_768
    """Tokens of each stream per step: k·N, a multiple of model.segment_len. Backpropagation runs
    through the whole window; memory is carried (detached) from one window to the next."""
    streams: int = 1
    """B: document streams per device (the per-device batch size)."""
    mode: Literal["document", "concat"] = "document"
    """document: one document at a time per stream, memory emptied at each new one; concat:
    documents packed back to back with EOS between them (short-document pretraining)."""
    max_document_tokens: int | None = None
    """document mode: read a longer document as independent pieces of this many tokens (a
    multiple of model.segment_len), the memory emptied at each. The paper trains on fixed-length
    sequences whose memory starts empty; whole books instead show the model an almost empty
    memory only once per book. Null: whole documents."""
    validation: ValidationSection | None = None
    """Held-out loss and perplexity every few steps, in the logs and the final summary. Null:
    none."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise field_error("data.sources", self.sources, "list at least one source")
        for name in ("window_tokens", "streams"):
            if getattr(self, name) < 1:
                raise field_error(f"data.{name}", getattr(self, name), "must be >= 1")

    def stream_config(self, segment_len: int, seed: int, windows_per_step: int) -> StreamConfig:
        return StreamConfig(streams=self.streams, segment_len=segment_len,
                            segments_per_window=self.window_tokens // segment_len,
                            mode=self.mode, seed=seed, windows_per_step=windows_per_step,
                            max_document_tokens=self.max_document_tokens)


@dataclass
class OptimSection:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adafactor"] = "adamw"
    """adamw, or adafactor (the paper's LM runs; factored second moments, less memory)."""
    lr: float = 3e-4
    """Peak learning rate of every parameter but the gates."""
    gate_lr_multiplier: float = 100.0
    """The gates' β learn at lr × this (docs/design.md §2: under the base lr they stay stuck at
    0.5)."""
    write_gate_lr_multiplier: float | None = None
    """The write gates learn at lr × this; None: gate_lr_multiplier, as the mixing gates. The
    write penalty pushes every token's write down at once and Adam moves the gate's bias by
    about its learning rate per step, so this sets how many steps the answer's gradient has to
    keep the writes it needs open before the penalty has closed them."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices; norms, biases and gates never decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (β1, β2); adafactor (no momentum, its own β2 schedule) ignores them."""
    eps: float = 1e-8
    """AdamW's ε (adafactor ignores it)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays from lr to lr × this at train.max_steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping). Under DeepSpeed it goes into the
    DeepSpeed config, where Lightning's clipping does not reach."""
    write_penalty: float = 0.0
    """Weight of the memory's mean write strength in the loss (needs model.memory_write_gate):
    tokens the task does not need, such as filler, are pushed to write nothing, so the memory
    stops changing with length instead of drifting (docs/memory-length.md,
    "The write gate: length stops mattering"). 0: off."""
    write_gate_from_step: int = 0
    """Optimizer step from which the write gate trains (lr 0 before it). Until then every token
    writes at model.write_gate_init's strength, so the task's circuit forms as in a model without
    a gate, and the penalty cannot close every write before the loss has a reason to keep any."""
    write_gate_below_loss: float = 0.0
    """If > 0, the write gate starts training only once the training loss's moving average
    (about 10 steps) is below this as well: when the task's circuit has formed, which varies
    between runs by hundreds of steps (docs/memory-length.md, "Why stage 1 is chaotic").
    0: at write_gate_from_step."""
    write_target_until_step: int = 0
    """Until this optimizer step the write gate trains from step 0 towards what the data says
    the memory should write (a passkey's needle, nothing else), weighted by write_penalty in
    place of the strength it charges; from it on, write_gate_from_step and
    write_gate_below_loss apply. The memory then holds the fact from the first steps instead of
    the fact under every token written after it, so the path that reads it need not wait for a
    lucky trajectory (docs/memory-length.md, "A supervised write gate"). 0: off."""

    def __post_init__(self) -> None:
        for name in ("lr", "gate_lr_multiplier", "eps"):
            if not getattr(self, name) > 0:
                raise field_error(f"optim.{name}", getattr(self, name), "must be > 0")
        if self.write_gate_lr_multiplier is not None and not self.write_gate_lr_multiplier > 0:
            raise field_error("optim.write_gate_lr_multiplier", self.write_gate_lr_multiplier,
                              "must be > 0, or null for optim.gate_lr_multiplier")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "write_penalty",
                     "write_gate_from_step", "write_gate_below_loss", "write_target_until_step"):
            if getattr(self, name) < 0:
                raise field_error(f"optim.{name}", getattr(self, name), "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise field_error("optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise field_error("optim.betas", self.betas, "must be two numbers in [0, 1)")


@dataclass
class DeepSpeedSection:
    """DeepSpeed ZeRO settings (used when train.strategy is deepspeed)."""

    stage: Literal[1, 2, 3] = 3
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (slower, frees GPU memory)."""
    offload_parameters: bool = False
    """Stage 3 only: keep parameters in CPU memory too."""

    def __post_init__(self) -> None:
        if self.offload_parameters and self.stage != 3:
            raise field_error("train.deepspeed.offload_parameters", True,
                              f"needs train.deepspeed.stage 3, not {self.stage}")


@dataclass
class TrainSection:
    """How long, on what, and how the work is split."""

    max_steps: int
    """Length of the run in optimizer steps (one step = one window of every stream, times
    accumulate). Sizes the learning-rate schedule; `--max-steps` only stops an invocation early."""
    accumulate: int = 1
    """Windows whose gradients are summed before one optimizer step (one backward per window)."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "bf16-mixed"
    """Lightning precision. Memory M and z stay float32 whatever this says."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """auto: GPUs when there are any, else the CPU."""
    devices: int = 1
    """Processes per node (GPUs, or CPU processes for DDP, DeepSpeed and FSDP); -1: every GPU
    of the node."""
    num_nodes: int = 1
    """Nodes (under SLURM: the job's node count)."""
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = "auto"
    """auto: one process, or DDP over several; deepspeed: ZeRO (GPUs, or CPU
    processes over gloo with train.accelerator: cpu, to rehearse a cluster run); fsdp: PyTorch
    FSDP2, every block sharded over all processes (GPUs, or CPU processes over gloo)."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """ZeRO stage and offloading."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward: memory for long windows, ~30% time."""
    compile: bool = False
    """torch.compile every block (CPU and GPU). Costs about a minute of compilation when the run
    starts; what it gains depends on the machine (benchmarks/RESULTS.md)."""
    seed: int = 0
    """Seeds the weights' initialisation and the data order (0 to 2**32 - 1: what the random
    number generators accept)."""
    max_nonfinite_steps: int = 0
    """Steps in a row whose loss or gradient norm is NaN or inf that are skipped (no update)
    before the run stops with an error. 0: stop at the first, before anything is saved."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "accumulate", "num_nodes"):
            if getattr(self, name) < 1:
                raise field_error(f"train.{name}", getattr(self, name), "must be >= 1")
        if self.max_nonfinite_steps < 0:
            raise field_error("train.max_nonfinite_steps", self.max_nonfinite_steps,
                              "must be >= 0")
        if not 0 <= self.seed < SEED_LIMIT:
            raise field_error("train.seed", self.seed, f"must be in [0, {SEED_LIMIT - 1}]")
        if self.devices == 0 or self.devices < -1:
            raise field_error("train.devices", self.devices, "must be >= 1, or -1 for every GPU")


@dataclass
class CheckpointSection:
    """Where and how often the run is saved."""

    out_dir: str | None = None
    """Run directory holding step-XXXXXXXX/ checkpoints and logs. Null: runs/<recipe name>."""
    every_steps: int = 500
    """Save every this many optimizer steps (and always where an invocation stops)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    consolidate: Literal["every", "final"] = "every"
    """Which checkpoints hold the inference weights (model.safetensors, float32, whole): 'every'
    one, or only the 'final' one, where training reaches train.max_steps. Under DeepSpeed or FSDP
    each consolidation gathers the whole model to rank 0 while the other ranks wait (minutes for
    8B); with 'final' the other checkpoints keep their weights in the trainer state only, and
    eval, generate and export read them from there, on one process, when asked."""

    def __post_init__(self) -> None:
        for name in ("every_steps", "keep_last"):
            if getattr(self, name) < 1:
                raise field_error(f"checkpoint.{name}", getattr(self, name), "must be >= 1")


@dataclass
class LoggingSection:
    """Metrics: loss, lr, grad norm, tokens/s, TFLOP/s, MFU, peak memory, gate statistics."""

    every_steps: int = 10
    """Log metrics every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to <out_dir>/logs/tensorboard."""
    csv: bool = True
    """Write <out_dir>/logs/csv/from-step-XXXXXXXX/metrics.csv (one file per invocation)."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install infinitrain[wandb])."""
    wandb_project: str = "infinitrain"
    """W&B project name."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise field_error("logging.every_steps", self.every_steps, "must be >= 1")


@dataclass(kw_only=True)
class Recipe:
    """A complete, validated training run description."""

    description: str = ""
    """One line shown by `infinitrain recipes list`."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model's shape and the weights it starts from."""
    data: DataSection
    """Sources, tokenizer, window length and streams."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer, learning rates and schedule."""
    train: TrainSection
    """Run length, precision, devices and strategy."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Run directory, save interval, checkpoints kept."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metric interval and loggers."""

    def __post_init__(self) -> None:
        segment = self.model_config.segment_len
        window = self.data.window_tokens
        if window % segment:
            raise field_error("data.window_tokens", window,
                              f"must be a multiple of model.segment_len = {segment} "
                              "(a window is whole segments)")
        pieces = self.data.max_document_tokens
        if pieces is not None and (pieces <= 0 or pieces % segment or self.data.mode != "document"):
            raise field_error("data.max_document_tokens", pieces,
                              f"must be a positive multiple of model.segment_len = {segment}, "
                              "with data.mode: document (or null: whole documents)")
        for step in sorted({0, *(s.from_step for s in self.data.sources),
                            *(s.until_step or 0 for s in self.data.sources)}):
            if step < self.train.max_steps and not any(s.active_at(step)
                                                       for s in self.data.sources):
                raise RecipeError(f"data.sources: no source is active at step {step}; give some "
                                  f"source from_step <= {step} < until_step, so every step "
                                  "has data")
        if self.optim.write_penalty and not self.model_config.memory_write_gate:
            raise field_error("optim.write_penalty", self.optim.write_penalty,
                              "needs model.memory_write_gate: true (it charges the write gate's "
                              "strength); set that or the penalty to 0")
        if self.optim.write_target_until_step and not self.optim.write_penalty:
            raise field_error("optim.write_target_until_step", self.optim.write_target_until_step,
                              "needs optim.write_penalty > 0 (the weight of the write gate's "
                              "error in the loss) and model.memory_write_gate: true; set them "
                              "or this to 0")
        validation = self.data.validation
        if validation is not None and validation.every_steps % self.logging.every_steps:
            raise field_error("data.validation.every_steps", validation.every_steps,
                              f"must be a multiple of logging.every_steps = "
                              f"{self.logging.every_steps}, the steps whose metrics are logged")
        if self.optim.warmup_steps > self.train.max_steps:
            raise field_error("optim.warmup_steps", self.optim.warmup_steps,
                              f"must be <= train.max_steps = {self.train.max_steps}")

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config()

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all devices and nodes (devices = -1 counts as 1)."""
        processes = max(self.train.devices, 1) * self.train.num_nodes
        return self.data.window_tokens * self.data.streams * processes * self.train.accumulate

    def missing_paths(self) -> list[tuple[str, str]]:
        """(field, path) of local files and directories the recipe names that do not exist."""
        named = [(f"data.sources.{i}.files", pattern) for i, source in enumerate(self.data.sources)
                 for pattern in source.files]
        if self.data.validation is not None:
            named += [(f"data.validation.sources.{i}.files", pattern)
                      for i, source in enumerate(self.data.validation.sources)
                      for pattern in source.files]
        named += [(name, value) for name, value in (("data.tokenizer", self.data.tokenizer),
                                                    ("model.init", self.model.init)) if value]
        return [(name, path) for name, path in named if not _exists(path)]


def _exists(pattern: str) -> bool:
    return bool(glob(pattern, recursive=True)) if has_magic(pattern) else Path(pattern).exists()

