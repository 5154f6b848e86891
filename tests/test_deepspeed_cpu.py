"""DeepSpeed ZeRO-3 and FSDP2 on CPU processes over gloo: a laptop rehearses a cluster run.

The real DeepSpeed, torch and Lightning throughout. Two kinds of test: a model built under
``deepspeed.zero.Init`` or sharded by FSDP2 in two spawned processes (its weights really are
shards there), and `infinitrain pretrain` itself with sharded processes, shrunk to seconds per
run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from safetensors.torch import load_file
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.consolidate import deepspeed_fp32_state_dict, trainer_state_weights
from infinitrain.evaluation.training_log import TrainingLog
from infinitrain.layout import TRAINER_STATE
from infinitrain.model import InfiniTransformer
from infinitrain.model_dir import load_model_dir, save_model_dir
from infinitrain.recipe import RecipeError, load_recipe
from infinitrain.training.strategy import plan

REPO = Path(__file__).resolve().parent.parent
INFINITRAIN = Path(sys.executable).with_name("infinitrain")
VOCAB = 4096
"""The tiny recipe's vocabulary (its bundled tokenizer)."""
SMALL = ["model.d_model=64", "model.ffn_dim=128", "model.segment_len=32", "data.window_tokens=64",
         "data.streams=2", "optim.warmup_steps=2", "logging.every_steps=1",
         "logging.tensorboard=false", "train.strategy=deepspeed", "train.deepspeed.stage=3",
         "train.accelerator=cpu"]
CHAPTERS = ["data.sources=[{kind: booksum, files: "
            "[data/booksum-sample/kmfoda-chapters/test.csv]}]", "data.window_tokens=512",
            "data.streams=1"]
"""BookSum chapters (read, then summarised) of different lengths: at most steps the two ranks
hold different numbers of summary (supervised) tokens."""
RUN_SECONDS = 240
"""Far beyond what a run below takes; a run still going then is deadlocked."""


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def pretrain(out_dir: Path, steps: int, overrides: list[str],
             command: list[str] | None = None, resume: bool = False, devices: int = 2) -> None:
    """Two ZeRO-3 CPU processes (Lightning starts the second) through the CLI, or ``command``;
    ``overrides`` may choose another strategy."""
    command = command or [str(INFINITRAIN)]
    process = subprocess.Popen(
        [*command, "pretrain", "--recipe", "tiny", "--out-dir", str(out_dir),
         "--devices", str(devices),
         "--max-steps", str(steps), *(["--resume", "auto"] if resume else []),
         *sets([*SMALL, f"checkpoint.every_steps={steps}", *overrides])],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)  # its own group: both ranks go if it hangs
    try:
        output = process.communicate(timeout=RUN_SECONDS)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"no end after {RUN_SECONDS} s: the ranks are deadlocked")
    assert process.returncode == 0, output[-5000:]


def losses(out_dir: Path) -> dict[int, float]:
    steps, (loss,) = TrainingLog.read(out_dir).points("loss")
    return dict(zip(steps, loss, strict=True))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _zero3_rank(rank: int, world_size: int, port: int, function: Callable[[], Any],
                results: Any) -> None:
    """One process of a gloo world whose DeepSpeed runs on the CPU; rank 0 reports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    set_accelerator(CPU_Accelerator())
    deepspeed.init_distributed("gloo")
    result = function()
    torch.distributed.barrier()  # no rank ends while the other still talks to it
    if rank == 0:
        results.put(result)
        results.close()
        results.join_thread()  # in the pipe before the process ends
    # About one run in fifteen, the interpreter's teardown aborted a rank whose work was done
    # ("terminate called without an active exception": a native thread of the distributed
    # libraries still joinable at exit; destroying the process group first did not prevent it).
    # Nothing is left to tear down, so end here; an error in ``function`` still ends the process
    # with a non-zero code above.
    os._exit(0)


def in_zero3_processes(function: Callable[[], Any], world_size: int = 2) -> Any:
    """``function()`` (module-level, so that spawned processes find it) in ``world_size``
    processes joined by gloo; rank 0's return value."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_zero3_rank,
                                 args=(rank, world_size, port, function, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        for _ in range(240):  # a failing process fails the test at once, not after minutes
            with contextlib.suppress(queue.Empty):
                result = results.get(timeout=0.5)
                break
            assert not any(process.exitcode for process in processes), "a rank failed"
        else:
            raise TimeoutError("the ZeRO-3 processes did not finish in 2 minutes")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    return result


def build_sharded_model(kind: str) -> dict[str, Any]:
    """A tiny model with a write gate built as ZeRO-3 or FSDP2 builds it, then the shapes of its
    parameters' local parts, its optimizer's groups (parameter names) and its gathered initial
    weights."""
    import deepspeed
    from torch.distributed.device_mesh import init_device_mesh

    from infinitrain.model import InfiniTransformer, preset
    from infinitrain.recipe import OptimSection
    from infinitrain.training.optim import build_optimizer
    from infinitrain.training.strategy import sharded_model

    config = preset("tiny", vocab_size=256, d_model=32, ffn_dim=64, memory_rule="deltanet",
                    memory_write_gate=True)
    if kind == "zero3":
        zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
        with deepspeed.zero.Init(config_dict_or_path=zero3):
            model = InfiniTransformer(config)
    else:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        model = sharded_model(config, mesh, "cpu")
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    optimizer = build_optimizer(model, OptimSection(weight_decay=0.1))
    groups = {group["name"]: (group["weight_decay"], sorted(names[id(p)] for p in group["params"]))
              for group in optimizer.param_groups}
    # Lists: tensors would cross to the parent through shared memory of a finished process.
    if kind == "zero3":
        shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            weights = {name: parameter.tolist() for name, parameter in model.named_parameters()}
    else:
        shapes = {name: tuple(parameter.to_local().shape)
                  for name, parameter in model.named_parameters()}
        weights = {name: parameter.full_tensor().tolist()
                   for name, parameter in model.named_parameters()}
    return {"config": config, "groups": groups, "shapes": shapes, "weights": weights}


LOCAL_EMBEDDING_SHAPE = {"zero3": (0,), "fsdp2": (128, 32)}
"""What each rank's model code holds of the 256 × 32 embedding outside a forward: nothing under
ZeRO-3 (a placeholder), half of its rows under FSDP2."""


@pytest.fixture(scope="module", params=["zero3", "fsdp2"])
def sharded_model(request) -> dict[str, Any]:
    return {"kind": request.param,
            **in_zero3_processes(functools.partial(build_sharded_model, request.param))}


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The recipe's data paths are relative to the repository."""
    monkeypatch.chdir(REPO)


def test_deepspeed_on_a_cpu_runs_zero_over_gloo_processes():
    _, recipe = load_recipe("tiny", ["train.strategy=deepspeed", "train.devices=2"])
    chosen = plan(recipe, parameters=1000)
    assert (chosen.kind, chosen.accelerator, chosen.world_size) == ("deepspeed", "cpu", 2)
    assert chosen.strategy._process_group_backend == "gloo"
    assert chosen.strategy.config["zero_optimization"]["stage"] == 3
    assert chosen.gradient_clip_val is None  # DeepSpeed's config clips


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU here")
def test_deepspeed_without_gpus_asks_for_the_cpu_explicitly():
    _, recipe = load_recipe("tiny", ["train.strategy=deepspeed", "train.accelerator=auto"])
    with pytest.raises(RecipeError, match=r"set train\.accelerator=cpu to rehearse"):
        plan(recipe, parameters=1000)


def test_sharded_parameters_are_shards_yet_start_from_the_configured_init(sharded_model):
    config = sharded_model["config"]
    weights = {name: torch.tensor(values) for name, values in sharded_model["weights"].items()}
    assert sharded_model["shapes"]["embed_tokens.weight"] == \
        LOCAL_EMBEDDING_SHAPE[sharded_model["kind"]]
    matrices = [name for name in weights if name.endswith("_proj.weight")]
    assert len(matrices) == 7 * config.n_layers
    for name in ["embed_tokens.weight", *matrices]:
        std = weights[name].std().item()
        assert abs(std - config.init_std) < 0.2 * config.init_std, (name, std)
    for name, weight in weights.items():
        if name.endswith("norm.weight"):
            assert torch.equal(weight, torch.ones_like(weight)), name
        elif name.endswith("attn.gate"):
            assert torch.all(weight == config.gate_init), name
        elif name.endswith("write_weight"):
            assert not weight.any(), name
        elif name.endswith("write_bias"):
            assert torch.all(weight == config.write_gate_init), name


def test_sharded_parameters_keep_their_weight_decay(sharded_model):
    groups, names = sharded_model["groups"], list(sharded_model["weights"])
    assert set(groups) == {"decay", "no_decay", "gates", "write_gates"}
    assert groups["decay"] == (0.1, sorted(name for name in names if name.endswith("_proj.weight")
                                           or name == "embed_tokens.weight"))
    assert groups["no_decay"] == (0.0, sorted(name for name in names
                                              if name.endswith("norm.weight")))
    assert groups["gates"] == (0.0, sorted(name for name in names if name.endswith("attn.gate")))
    assert groups["write_gates"] == (0.0, sorted(name for name in names
                                                 if ".write_" in name))


def test_ranks_with_different_numbers_of_loss_chunks_do_not_deadlock(tmp_path):
    """16-token loss chunks: a rank with 100 summary tokens runs the output layer (a ZeRO-3
    gather) 7 times, one with none would run it once and leave the other waiting forever."""
    launcher = tmp_path / "launch.py"
    launcher.write_text("import infinitrain.training.loss as loss\n"
                        "loss.LOSS_CHUNK_TOKENS = 16\n"
                        "from infinitrain.cli import app\n"
                        "app(prog_name='infinitrain')\n")
    pretrain(tmp_path / "run", 6, CHAPTERS, command=[sys.executable, str(launcher)])
    assert losses(tmp_path / "run")  # some steps did update


class _SumOfWeight(LightningModule):
    """loss = w: every micro-batch's gradient is exactly 1."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.weight.sum() + 0 * batch.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.weight], lr=0.1)


def _one_accumulated_step(results: Any) -> None:
    """Two micro-batches accumulated into one SGD step by the run's own DeepSpeed strategy (one
    CPU process, Lightning sets up the process group); the weight after it."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import deepspeed
    from lightning.pytorch import Trainer

    _, recipe = load_recipe("tiny", ["train.strategy=deepspeed", "optim.grad_clip=0"])
    chosen = plan(recipe, parameters=4)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=chosen.strategy, max_epochs=1,
                      accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    module = _SumOfWeight()
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1))
    with deepspeed.zero.GatheredParameters([module.weight]):
        results.put(module.weight.detach().tolist())


def test_accumulated_gradients_are_averaged_once_under_deepspeed():
    """Lightning divides each micro-batch's loss by train.accumulate; DeepSpeed's engine must
    not divide again (the update would shrink by the accumulation factor)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_one_accumulated_step, args=(results,))
    process.start()
    try:
        weight = results.get(timeout=120)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    # Mean gradient 1 over the two micro-batches, SGD lr 0.1: one step to -0.1.
    assert weight == pytest.approx([-0.1] * 4)


DDP_EQUALITY = ["model.memory_rule=deltanet", "model.memory_write_gate=true",
                "model.write_gate_activation=clamp", "model.write_gate_init=1.0",
                "optim.write_penalty=1.0", "optim.grad_clip=0.05", "optim.eps=1e-6",
                "model.tie_embeddings=false", "model.segment_len=32"]
"""Everything the strategies could do differently at once: BookSum chapters for two processes
(many windows without a summary token on either rank, so steps without an update), the write
gate frozen for the first updates and then training under its penalty, and clipping that binds
(norms of 1-8 clipped to 0.05). Untied embeddings: FSDP shards the embedding and the output
layer apart.

Adam's ε is 1e-6, not 1e-8: a gradient element that is a near-cancelled sum (~1e-9) comes out
30% different when the two strategies sum its terms in another order, and Adam's first step,
lr · g / (|g| + ε), turns that into weights 1.5e-4 apart at ε = 1e-8. At 1e-6 the same
rounding moves a weight by at most ~lr · 1e-3, so what is left to compare is the strategies."""
WINDOWS = 16
"""Per rank: the first summary tokens come in the ninth."""


def trained_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted(run.glob("step-*"))[-1] / "model.safetensors"))


def equality_overrides(accumulate: int, devices: int) -> list[str]:
    """The write gate starts after the first update. One process reads the chapters in another
    order, whose first summary token comes after the run's last window: it reads the novels
    instead, every token supervised."""
    data = CHAPTERS if devices > 1 else []
    return [*DDP_EQUALITY, *data, "data.window_tokens=128", f"train.accumulate={accumulate}",
            f"optim.write_gate_from_step={10 // accumulate}"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Callable[[int, int], tuple[Path, Path]]:
    """(initial weights, DDP run) per accumulation and number of processes, trained once for
    every sharded strategy."""
    runs: dict[tuple[int, int], tuple[Path, Path]] = {}

    def run(accumulate: int, devices: int) -> tuple[Path, Path]:
        if (accumulate, devices) not in runs:
            root = tmp_path_factory.mktemp(f"ddp-accumulate-{accumulate}-devices-{devices}")
            _, recipe = load_recipe("tiny", [*SMALL, *equality_overrides(accumulate, devices)])
            torch.manual_seed(0)
            save_model_dir(InfiniTransformer(recipe.model_config), root / "init")
            pretrain(root / "ddp", WINDOWS // accumulate,
                     [*equality_overrides(accumulate, devices), "train.strategy=ddp",
                      f"model.init={root / 'init'}"], devices=devices)
            runs[accumulate, devices] = root / "init", root / "ddp"
        return runs[accumulate, devices]

    return run


@pytest.mark.parametrize(("strategy", "devices", "accumulate"), [
    ("deepspeed", 2, 1), ("deepspeed", 2, 2), ("fsdp", 2, 1), ("fsdp", 2, 2), ("deepspeed", 1, 2)],
    ids=["zero3", "zero3-accumulate-2", "fsdp2", "fsdp2-accumulate-2",
         "zero3-one-process-accumulate-2"])
def test_sharded_training_ends_at_the_weights_ddp_ends_at(tmp_path, ddp_runs, strategy, devices,
                                                          accumulate):
    """From the same initial weights, ZeRO-3 or FSDP2 processes and as many DDP processes end
    within 1e-5 of each other, step by step with the same losses, gradient norms and gate
    statistics; with accumulation the sharded run stops and continues with --resume auto."""
    init, ddp_run = ddp_runs(accumulate, devices)
    overrides = [*equality_overrides(accumulate, devices), f"train.strategy={strategy}",
                 f"model.init={init}"]
    run, steps = tmp_path / strategy, WINDOWS // accumulate
    if accumulate == 1:
        pretrain(run, steps, overrides, devices=devices)
    else:  # stopped after the first update: torch's distributed checkpoint (FSDP) saves an
        # optimizer without state by stepping it once at lr 0, which moves Adam's step count
        stop = steps * 3 // 4
        pretrain(run, stop, [*overrides, f"checkpoint.every_steps={stop}"], devices=devices)
        pretrain(run, steps, overrides, resume=True, devices=devices)
    sharded, ddp = trained_weights(run), trained_weights(ddp_run)
    assert sharded.keys() == ddp.keys()
    initial = load_file(str(init / "model.safetensors"))
    assert any(not torch.equal(ddp[name], initial[name]) for name in ddp)  # it did train
    assert not torch.equal(ddp["layers.0.attn.write_bias"], initial["layers.0.attn.write_bias"])
    for name in ddp:
        difference = (sharded[name] - ddp[name]).abs().max().item()
        assert difference <= 1e-5, f"{name}: {difference}"
    logs = {name: TrainingLog.read(path) for name, path in (("sharded", run), ("ddp", ddp_run))}
    for log in logs.values():  # the chapters' last steps have no summary token: no loss, no norm
        updated = log.points("grad_norm")[0]
        assert log.points("loss")[0] == updated and updated
        assert (updated[-1] < steps) == (devices > 1)
    for column, relative in (("loss", 1e-5), ("write_cost", 1e-5), ("gates/layer_01/mean", 1e-5),
                             ("grad_norm", 1e-4)):
        expected_steps, (values,) = logs["ddp"].points(column)
        assert (expected_steps, [pytest.approx(values, rel=relative)]) == \
            logs["sharded"].points(column), column


OFFLOAD = ["train.deepspeed.offload_optimizer=true", "train.deepspeed.offload_parameters=true"]
"""DeepSpeed refuses a client optimizer with ZeRO-Offload unless told it may have one."""


@pytest.mark.parametrize(("strategy", "devices", "options"), [
    ("deepspeed", 2, []), ("fsdp", 2, []), ("deepspeed", 1, OFFLOAD)],
    ids=["zero3", "fsdp2", "zero3-one-process-offloaded"])
def test_a_sharded_run_starts_sensibly_resumes_bit_exactly_and_exports(tmp_path, strategy,
                                                                       devices, options):
    """From scratch, the first loss is about ln(vocabulary) (8.3), not 124 (std-1 embeddings),
    and the weights keep about the configured std (0.02). With checkpoint.consolidate: final the
    middle checkpoint holds only the sharded trainer state, yet a run resumed from it is
    bit-identical to the straight one, and it exports: transformers computes its logits. Read
    back on one process, the last checkpoint's shards are the weights its ranks gathered. ZeRO-3
    also in one process, its optimizer state and parameters offloaded to the CPU."""
    overrides = [f"train.strategy={strategy}", "checkpoint.consolidate=final", *options]
    straight = tmp_path / "straight"
    pretrain(straight, 3, [*overrides, "checkpoint.every_steps=2"], devices=devices)
    curve = losses(straight)
    assert sorted(curve) == [1, 2, 3] and curve[1] < math.log(VOCAB) + 1, curve
    final, middle = straight / "step-00000003", straight / "step-00000002"
    weights = load_file(str(final / "model.safetensors"))
    for name in ("embed_tokens.weight", "layers.0.attn.q_proj.weight"):
        assert 0.8 * 0.02 < weights[name].std().item() < 1.2 * 0.02, name
    read_back = trainer_state_weights(final, strategy)
    assert all(torch.equal(read_back[name], weights[name]) for name in weights)
    assert not (middle / "model.safetensors").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(middle, resumed / middle.name)
    pretrain(resumed, 3, overrides, resume=True, devices=devices)
    assert losses(resumed) == {3: curve[3]}
    resumed_weights = load_file(str(resumed / final.name / "model.safetensors"))
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)
    from transformers import AutoModelForCausalLM

    exported = CliRunner().invoke(app, ["export", "hf", str(middle), str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = load_model_dir(middle)(ids)
        assert not torch.allclose(load_model_dir(final)(ids)[0], expected)
        assert torch.allclose(hf_model.eval()(ids).logits, expected, atol=1e-5, rtol=0)


def test_zero2_in_bf16_saves_the_float32_master_weights(tmp_path):
    """Under bf16 even a whole (ZeRO-1/2) live module holds bf16 copies; the model directory
    gets the optimizer's float32 weights."""
    pretrain(tmp_path / "run", 3, ["train.deepspeed.stage=2", "train.precision=bf16-mixed"])
    checkpoint = tmp_path / "run" / "step-00000003"
    weights = load_file(str(checkpoint / "model.safetensors"))
    master = deepspeed_fp32_state_dict(checkpoint / TRAINER_STATE)
    for name, weight in weights.items():
        assert torch.equal(weight, master[f"model.{name}"]), name
    assert any((weight.to(torch.bfloat16).float() != weight).any() for weight in weights.values())
