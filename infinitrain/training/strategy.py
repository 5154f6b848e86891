"""From a recipe and the machine to Lightning's accelerator, strategy and precision.

Impossible combinations fail here, before any process starts, with the fix in the message:
DeepSpeed on a CPU nobody asked for, fp16 on a CPU, or a ZeRO layout whose weights, gradients and
optimizer states alone cannot fit the devices.

DeepSpeed and FSDP also run on CPU processes over gloo: a laptop rehearses a cluster's sharded
run (sharding, gathers, checkpoints) with the same code path.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..model import InfiniTransformer, ModelConfig
from ..recipe import DeepSpeedSection, Recipe, RecipeError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

OPTIMIZER_STATE_BYTES = {"adamw": 12, "adafactor": 4}
"""Bytes per parameter of the float32 master copy plus optimizer moments (AdamW: m and v)."""
WEIGHT_BYTES = GRADIENT_BYTES = 2  # bf16
USABLE_FRACTION = 0.9
"""Share of a GPU's memory the model states may take; activations need the rest."""
HOST_GRADIENT_BYTES = 4
"""A CPU process holds float32 gradients besides its optimizer states (whose float32 master copy
is the weights themselves)."""


@dataclass
class Plan:
    """Everything `lightning.Trainer` needs to know about where and how to run."""

    accelerator: str
    """'cpu' or 'gpu'."""
    kind: str
    """'single', 'ddp', 'deepspeed' or 'fsdp'."""
    strategy: Any
    """What Trainer(strategy=...) gets."""
    devices: int
    num_nodes: int
    precision: str
    gradient_clip_val: float | None
    """Lightning's clipping; None under DeepSpeed, whose own config clips."""

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def plan(recipe: Recipe, parameters: int) -> Plan:
    train = recipe.train
    gpus = torch.cuda.device_count()
    accelerator = train.accelerator if train.accelerator != "auto" else "gpu" if gpus else "cpu"
    if accelerator == "gpu" and not gpus:
        raise RecipeError("train.accelerator = gpu: no CUDA GPU is visible here; use cpu or auto")
    if accelerator == "cpu":
        if train.strategy == "deepspeed" and train.accelerator != "cpu":
            raise RecipeError("train.strategy = deepspeed: needs CUDA GPUs and none is visible; "
                              "set train.accelerator=cpu to rehearse it on CPU processes")
        if train.precision == "16-mixed":
            raise RecipeError("train.precision = 16-mixed: fp16 needs a GPU; on a CPU use "
                              "32-true or bf16-mixed")
        if train.devices == -1:
            raise RecipeError("train.devices = -1 means every GPU; on a CPU give the number of "
                              "processes")
    devices = gpus if train.devices == -1 else train.devices
    if accelerator == "gpu" and devices > gpus:
        raise RecipeError(f"train.devices = {devices}: this node has {gpus} GPUs")
    world_size = devices * train.num_nodes
    kind = train.strategy if train.strategy in ("deepspeed", "fsdp") else \
        "ddp" if world_size > 1 or train.strategy == "ddp" else "single"
    clip = recipe.optim.grad_clip or None
    if kind == "deepspeed":
        if accelerator == "gpu":
            check_fits(parameters, recipe.optim.name, train.deepspeed, world_size,
                       torch.cuda.get_device_properties(0).total_memory)
        strategy = deepspeed_strategy(recipe, accelerator)
        clip = None
    elif kind == "fsdp":
        strategy = fsdp_strategy(accelerator, world_size)
    elif kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl")
    else:
        strategy = "auto"
    return Plan(accelerator, kind, strategy, devices, train.num_nodes, train.precision, clip)


def threads_per_process(processes_per_node: int,
                        environ: Mapping[str, str] = os.environ) -> int | None:
    """Intra-op CPU threads for each of a node's ``processes_per_node`` training processes, or
    None to keep torch's default (every core), the default of a run with one process.

    Several processes that each use every core oversubscribe the CPU: on a 2-core machine two
    torch processes with 2 threads each ran 5-10× slower than with one each. So each gets its
    share of the cores this process may run on (its affinity mask, which a container's or a
    scheduler's CPU set narrows), as torchrun does; ``SLURM_CPUS_PER_TASK`` when SLURM
    allocated CPUs per task (one task per process); and ``OMP_NUM_THREADS`` when the user set
    it (torch follows it by itself)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    if cpus := environ.get("SLURM_CPUS_PER_TASK"):
        return int(cpus)
    if processes_per_node == 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // processes_per_node)


def use_threads_per_process(processes_per_node: int) -> None:
    """Give this process :func:`threads_per_process`, and the processes it starts too (through
    ``OMP_NUM_THREADS``, which Lightning's launcher would otherwise set to its own share)."""
    if (threads := threads_per_process(processes_per_node)) is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def model_state_bytes_per_device(parameters: int, optimizer: str, zero: DeepSpeedSection,
                                 world_size: int) -> float:
    """Weights, gradients and optimizer states one device holds under ZeRO (activations apart)."""
    weights = parameters * WEIGHT_BYTES
    gradients = parameters * GRADIENT_BYTES
    states = parameters * OPTIMIZER_STATE_BYTES[optimizer]
    if zero.offload_optimizer:
        states = 0
    states /= world_size
    if zero.stage >= 2:
        gradients /= world_size
    if zero.stage == 3:
        weights = 0 if zero.offload_parameters else weights / world_size
    return weights + gradients + states


def check_fits(parameters: int, optimizer: str, zero: DeepSpeedSection, world_size: int,
               device_bytes: int) -> None:
    need = model_state_bytes_per_device(parameters, optimizer, zero, world_size)
    if need > USABLE_FRACTION * device_bytes:
        raise RecipeError(
            f"train.deepspeed: {parameters / 1e9:.1f}B parameters need {need / 2**30:.0f} GiB per "
            f"device for weights, gradients and {optimizer} states with ZeRO stage {zero.stage} "
            f"over {world_size} device(s), more than the {device_bytes / 2**30:.0f} GiB a GPU "
            "has: use more devices (train.devices, train.num_nodes) or set "
            "train.deepspeed.offload_optimizer (and offload_parameters at stage 3)")


def runs_on_cpu(recipe: Recipe) -> bool:
    """Whether the recipe trains on this machine's CPU (a DeepSpeed or FSDP recipe dry-run on a
    machine without GPUs is meant for GPUs elsewhere)."""
    train = recipe.train
    if train.accelerator != "auto":
        return train.accelerator == "cpu"
    return not torch.cuda.is_available() and train.strategy not in ("deepspeed", "fsdp")


def host_memory_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_memory(recipe: Recipe, parameters: int) -> None:
    """A CPU run whose processes' weights, gradients and optimizer states alone exceed this
    machine's memory fails here, before anything is allocated, not hours into an allocation."""
    if not runs_on_cpu(recipe):
        return
    processes = max(recipe.train.devices, 1)
    need = parameters * (HOST_GRADIENT_BYTES + OPTIMIZER_STATE_BYTES[recipe.optim.name]) * \
        processes
    have = host_memory_bytes()
    if need > USABLE_FRACTION * have:
        raise RecipeError(
            f"model: {parameters / 1e9:.2f}B parameters need {need / 2**30:,.1f} GiB for "
            f"weights, gradients and {recipe.optim.name} states in {processes} CPU process(es), "
            f"more than this machine's {have / 2**30:,.1f} GiB of memory: choose a smaller model "
            "(model.d_model, model.n_layers, model.vocab_size) or fewer train.devices")


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """DeepSpeed's own config; gradient clipping belongs here (Lightning's does not reach)."""
    zero = recipe.train.deepspeed
    # overlap_comm: stages 2-3 only, where the run decides the accumulation boundary itself
    optimization: dict[str, Any] = {"stage": zero.stage, "overlap_comm": zero.stage >= 2,
                                    "contiguous_gradients": True}
    if zero.offload_optimizer:
        optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_parameters:
        optimization["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": optimization,
        "zero_allow_untested_optimizer": True,  # torch's AdamW/Adafactor: no CUDA op to compile
        # With offload_optimizer, DeepSpeed refuses any optimizer but its own compiled CPU Adam;
        # torch's AdamW/Adafactor step the offloaded float32 states on the CPU just as well
        # (slower than DeepSpeedCPUAdam, but the recipe's optimizer and its parameter groups).
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": recipe.optim.grad_clip,
        "train_micro_batch_size_per_gpu": recipe.data.streams,
        # Every engine.step() is an update: the run, not a micro-step counter, decides when
        # (see deepspeed_strategy_classes).
        "managed_gradient_accumulation": False,
    }


def deepspeed_strategy(recipe: Recipe, accelerator: str = "gpu") -> Any:
    """Lightning's DeepSpeed strategy, corrected (see :func:`deepspeed_strategy_classes`); on
    the CPU, its variant for gloo-connected processes."""
    gpu, cpu = deepspeed_strategy_classes()
    if accelerator == "cpu":
        return cpu(config=deepspeed_config(recipe), process_group_backend="gloo")
    return gpu(config=deepspeed_config(recipe))


@functools.cache
def deepspeed_strategy_classes() -> tuple[type, type]:
    """Subclasses of Lightning's DeepSpeedStrategy for GPUs and for CPU processes (built on first
    use, so that importing this module does not import Lightning).

    Both accumulate gradients as under DDP: Lightning runs the optimizer step once per
    ``accumulate_grad_batches`` windows, and the run skips it where no window since the last one
    had a supervised token. Lightning's DeepSpeed strategy instead calls it after every window
    and lets the engine count micro-steps to find the boundary; a skipped step then went
    uncounted and every later boundary fell one window off. The engine is told not to count
    (``managed_gradient_accumulation: false``), and not to divide each micro-batch's loss by the
    accumulation again: Lightning has.

    The CPU one drops Lightning's three CUDA-only assumptions:

    - ``setup_environment`` refuses any accelerator but CUDA; here DeepSpeed is told to use its
      CPU accelerator instead (on a machine with GPUs it would pick CUDA by itself);
    - ``setup_distributed`` checks CUDA device indices, which CPU devices do not have;
    - ``deepspeed.initialize`` gets the device's index as its rank and fails on None; on the CPU
      each process is its own device, so the local rank stands in.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class ZeroStrategy(DeepSpeedStrategy):
        """DeepSpeed ZeRO whose gradients accumulate as under DDP."""

        @property
        def handles_gradient_accumulation(self) -> bool:
            return False

        @contextlib.contextmanager
        def block_backward_sync(self) -> Iterator[None]:
            """Nothing to block: ZeRO-2/3 reduce each backward's gradients into their shards
            (and refuse ``no_sync``), ZeRO-1 reduces at ``engine.step()``."""
            yield

        def backward(self, closure_loss: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("scale_wrt_gas", False)  # Lightning has divided the loss already
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    class CPUZeroStrategy(ZeroStrategy):
        """DeepSpeed ZeRO over CPU processes connected by gloo."""

        def setup_environment(self) -> None:
            if get_accelerator().device_name() != "cpu":
                set_accelerator(CPU_Accelerator())
            DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own one refuses the CPU

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            engine, optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config,
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
            return engine, optimizer

    return ZeroStrategy, CPUZeroStrategy


def fsdp_strategy(accelerator: str, world_size: int) -> Any:
    """FSDP2 over every process (one data-parallel dimension): Lightning's strategy for
    ``fully_shard`` models, which :func:`shard_model` shards when the training module builds
    them. Each rank saves its own shard of the weights and optimizer states; on the CPU the
    processes talk over gloo, so a laptop rehearses a cluster run."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1,
                                 save_distributed_checkpoint=True,
                                 process_group_backend="gloo" if accelerator == "cpu" else None)


def sharded_model(config: ModelConfig, mesh: DeviceMesh,
                  device: torch.device | str) -> InfiniTransformer:
    """The model built on the meta device, sharded (:func:`shard_model`), then given memory for
    this rank's shards only and initialised there: no rank ever holds the whole model."""
    with torch.device("meta"):
        model = InfiniTransformer(config)
    shard_model(model, mesh)
    model.to_empty(device=device)
    with torch.no_grad():
        model.reset_parameters()
    return model


def shard_model(model: InfiniTransformer, mesh: DeviceMesh) -> None:
    """``fully_shard`` each block, then the model (the root: the embedding, final norm and output
    layer, tied or not), over the mesh's data-parallel dimension. A unit's weights are gathered
    around its forward and freed after, so the training step runs everything, the loss included,
    inside the model's forward (its ``head``). The model may still be on the meta device."""
    from torch.distributed.fsdp import fully_shard

    data_parallel = mesh["data_parallel"]
    for block in model.layers:
        fully_shard(block, mesh=data_parallel)
    fully_shard(model, mesh=data_parallel)
