"""`infinitrain pretrain` end to end on the CPU: the loss falls, resuming is exact (also after a
SIGKILL), two DDP processes stream different documents, read-only windows leave the weights alone.

Every run is the tiny recipe through the real CLI, shrunk with --set to seconds per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import one_line_error
from safetensors import safe_open
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data import PasskeyGenerator
from infinitrain.evaluation.training_log import TrainingLog
from infinitrain.model_dir import load_model_dir

REPO = Path(__file__).resolve().parent.parent
INFINITRAIN = Path(sys.executable).with_name("infinitrain")
SMALL = ["model.d_model=64", "model.ffn_dim=128", "model.segment_len=32", "data.window_tokens=64",
         "data.streams=2", "optim.warmup_steps=2", "logging.every_steps=1",
         "logging.tensorboard=false", "checkpoint.every_steps=3", "checkpoint.keep_last=5"]
STEPS = 6


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The recipe's data paths are relative to the repository."""
    monkeypatch.chdir(REPO)


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(out_dir: Path, *args: str, overrides: list[str] = SMALL, threads: int = 1):
    """One in-process run at a fixed thread count: runs compared bit for bit must use the same
    one (CPU results differ at ~1e-6 between thread counts), whatever the environment sets."""
    with intra_op_threads(threads):
        return CliRunner().invoke(app, ["pretrain", "--recipe", "tiny", "--out-dir",
                                        str(out_dir), *args, *sets(overrides)])


def trained(out_dir: Path, *args: str, overrides: list[str] = SMALL, threads: int = 1) -> None:
    result = pretrain(out_dir, *args, overrides=overrides, threads=threads)
    assert result.exit_code == 0, result.output + repr(result.exception)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def losses(out_dir: Path) -> dict[int, float]:
    """Logged loss per optimizer step over every invocation of a run, read back the way
    `infinitrain inspect training` reads it."""
    steps, (loss,) = TrainingLog.read(out_dir).points("loss")
    return dict(zip(steps, loss, strict=True))


def checkpoint(out_dir: Path, step: int) -> Path:
    return out_dir / f"step-{step:08d}"


def streams(step_dir: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    path = step_dir / "streams" / f"rank-{rank:05d}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        position = json.loads(handle.metadata()["position"])
    return load_file(str(path)), position


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """STEPS steps in one invocation: the reference the interrupted runs must reproduce."""
    out_dir = tmp_path_factory.mktemp("straight")
    os.chdir(REPO)
    trained(out_dir, "--max-steps", str(STEPS))
    return out_dir


def assert_same_end(run: Path, reference: Path) -> None:
    """Bitwise the same weights, stream memories and data position after STEPS steps."""
    final, expected = checkpoint(run, STEPS), checkpoint(reference, STEPS)
    assert_same_tensors(load_file(str(final / "model.safetensors")),
                        load_file(str(expected / "model.safetensors")))
    state, position = streams(final)
    expected_state, expected_position = streams(expected)
    assert_same_tensors(state, expected_state)
    assert position == expected_position and position["windows"] == STEPS


def test_tiny_pretrain_runs_through_the_cli_and_the_loss_falls(tmp_path):
    out_dir = tmp_path / "run"
    trained(out_dir, "--max-steps", "30", overrides=[
        *SMALL, "data.streams=4", "optim.warmup_steps=5", "checkpoint.every_steps=30"])
    curve = losses(out_dir)
    assert len(curve) == 30
    first, last = curve[min(curve)], sum(list(curve.values())[-5:]) / 5
    assert last < first - 1.0, curve
    final = checkpoint(out_dir, 30)
    assert (out_dir / "latest").read_text().strip() == final.name
    for name in ("trainer.ckpt", "recipe.yaml", "model.safetensors", "model_config.json",
                 "tokenizer/tokenizer.json", "streams/rank-00000.safetensors", "checkpoint.json"):
        assert (final / name).exists(), name


def test_the_optimizer_of_a_real_run_gives_gates_their_own_lr_and_no_decay(straight_run):
    state = torch.load(checkpoint(straight_run, STEPS) / "trainer.ckpt", weights_only=True)
    groups = {group["name"]: group for group in state["optimizer_states"][0]["param_groups"]}
    assert set(groups) == {"decay", "no_decay", "gates"}
    assert len(groups["gates"]["params"]) == 2  # one β vector per layer
    assert groups["gates"]["weight_decay"] == groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["gates"]["lr"] == pytest.approx(10 * groups["decay"]["lr"])  # tiny: × 10


def test_a_resume_at_another_thread_count_says_it_is_not_bit_exact(straight_run, tmp_path):
    assert json.loads((checkpoint(straight_run, STEPS) / "checkpoint.json").read_text())[
        "threads"] == 1
    run = tmp_path / "threads"
    shutil.copytree(straight_run, run)
    with pytest.warns(UserWarning, match="written at 1: .* not bit-identical .*OMP_NUM_THREADS=1"):
        trained(run, "--max-steps", str(STEPS + 1), "--resume", "auto", threads=2)


def test_stop_and_resume_equals_a_straight_run(straight_run, tmp_path):
    run = tmp_path / "resumed"
    trained(run, "--max-steps", str(STEPS // 2))
    assert pretrain(run, "--max-steps", str(STEPS)).exit_code == 2  # no --resume: refused
    changed = pretrain(run, "--max-steps", str(STEPS), "--resume", "auto",
                       overrides=[*SMALL, "data.mode=concat"])
    assert changed.exit_code == 2 and "data differ from the checkpoint's" in changed.output
    trained(run, "--max-steps", str(STEPS), "--resume", "auto")
    assert losses(run) == losses(straight_run)
    assert len(losses(run)) == STEPS
    assert_same_end(run, straight_run)


def start_pretrain(run: Path, max_steps: int, overrides: list[str]) -> subprocess.Popen:
    """`infinitrain pretrain --recipe tiny` in a child process (to signal or kill it)."""
    return subprocess.Popen(
        [str(INFINITRAIN), "pretrain", "--recipe", "tiny", "--out-dir", str(run),
         "--max-steps", str(max_steps), *sets(overrides)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until(process: subprocess.Popen, condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` while ``process`` keeps running; fail with its output if it stops."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[0].decode()
        assert time.monotonic() < deadline, f"not reached within {seconds} s"
        time.sleep(0.005)


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(straight_run, tmp_path):
    run = tmp_path / "killed"
    process = start_pretrain(run, 100, [*SMALL, "checkpoint.every_steps=2"])
    wait_until(process, (checkpoint(run, 2) / "checkpoint.json").exists, 180)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    complete = sorted(path.name for path in run.glob("step-*"))
    assert complete and complete[-1] < checkpoint(run, STEPS).name, complete
    trained(run, "--max-steps", str(STEPS), "--resume", "auto")
    assert_same_end(run, straight_run)
    assert not list(run.glob(".tmp-*"))  # a save cut short by the kill is cleared


def test_two_ddp_processes_stream_different_documents(tmp_path):
    """BookSum chapters (read, then summarised) of different lengths on two ranks: steps where no
    rank, one rank or both have summary tokens all go through DDP without a hang."""
    run = tmp_path / "ddp"
    chapters = ["data.sources=[{kind: booksum, files: "
                "[data/booksum-sample/kmfoda-chapters/test.csv]}]", "data.window_tokens=512",
                "data.streams=1", "checkpoint.every_steps=8"]
    subprocess.run(
        [str(INFINITRAIN), "pretrain", "--recipe", "tiny", "--out-dir", str(run), "--devices", "2",
         "--max-steps", "8", *sets([*SMALL, *chapters])],
        cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    final = checkpoint(run, 8)
    assert json.loads((final / "checkpoint.json").read_text())["world_size"] == 2
    (state0, position0), (state1, position1) = streams(final, 0), streams(final, 1)
    assert (position0["rank"], position1["rank"]) == (0, 1)
    assert position0["windows"] == position1["windows"] == 8
    # Same weights on both ranks (DDP), so different memories mean different tokens were read.
    assert not torch.equal(state0["layers.0.memory"], state1["layers.0.memory"])
    assert 0 < len(losses(run)) < 8  # some steps only read (no rank had a summary token)
    result = pretrain(run, "--resume", "auto", "--max-steps", "9", overrides=[*SMALL, *chapters])
    assert result.exit_code == 2 and "saved by 2 processes" in result.output


def test_windows_without_supervised_tokens_leave_the_weights_alone(tmp_path):
    """A 200-token passkey prompt spans four 64-token windows; only the last holds the answer."""
    run = tmp_path / "passkey"
    passkey = ['data.sources=[{kind: passkey, passkey_length: 200}]', "data.streams=1",
               "checkpoint.every_steps=1"]
    trained(run, "--max-steps", "4", overrides=[*SMALL, *passkey])
    weights = [load_file(str(checkpoint(run, step) / "model.safetensors")) for step in (1, 2, 3, 4)]
    assert_same_tensors(weights[0], weights[1])
    assert_same_tensors(weights[0], weights[2])
    assert not torch.equal(weights[2]["embed_tokens.weight"], weights[3]["embed_tokens.weight"])
    memories = [streams(checkpoint(run, step))[0]["layers.0.memory"] for step in (1, 2, 3)]
    assert not torch.equal(memories[0], memories[1]) and not torch.equal(memories[1], memories[2])
    assert sorted(losses(run)) == [4]  # only the answer window (logged at its step, 4) has one


def test_finetune_starts_from_the_init_weights(straight_run, tmp_path):
    init = checkpoint(straight_run, STEPS)
    run = tmp_path / "finetuned"
    result = CliRunner().invoke(app, ["finetune", "--recipe", "tiny", "--init", str(straight_run),
                                      "--out-dir", str(run), "--max-steps", "1",
                                      *sets([*SMALL, "optim.lr=1e-9"])])
    assert result.exit_code == 0, result.output
    start, tuned = (load_file(str(path / "model.safetensors"))
                    for path in (init, checkpoint(run, 1)))
    for name in start:
        torch.testing.assert_close(tuned[name], start[name], rtol=0, atol=1e-6)
    wrong = CliRunner().invoke(app, ["finetune", "--recipe", "tiny", "--init", str(init),
                                     "--out-dir", str(tmp_path / "wrong"), "--dry-run"])
    assert wrong.exit_code == 0  # the dry run does not read weights; the real run checks shapes
    wrong = CliRunner().invoke(app, ["finetune", "--recipe", "tiny", "--init", str(init),
                                     "--out-dir", str(tmp_path / "wrong")])
    assert wrong.exit_code == 2 and "d_model 64 vs 128" in wrong.output, wrong.output


def test_checkpoints_saved_without_their_weights_still_resume_evaluate_and_export(straight_run,
                                                                                   tmp_path):
    """With checkpoint.consolidate: final only the last checkpoint holds model.safetensors; an
    earlier one's weights, read from its trainer state, are the straight run's, `export model`
    writes them for model.init (which refuses the checkpoint itself, naming that command), and a
    run resumed from it ends bit-identical to the straight run."""
    run, middle_step = tmp_path / "final-only", STEPS // 2
    trained(run, "--max-steps", str(STEPS), overrides=[*SMALL, "checkpoint.consolidate=final"])
    middle = checkpoint(run, middle_step)
    assert not (middle / "model.safetensors").exists()
    assert (checkpoint(run, STEPS) / "model.safetensors").is_file()
    expected = load_file(str(checkpoint(straight_run, middle_step) / "model.safetensors"))
    read = load_model_dir(middle).state_dict()
    assert_same_tensors({name: read[name] for name in expected}, expected)
    exported = CliRunner().invoke(app, ["export", "model", str(middle), str(tmp_path / "model")])
    assert exported.exit_code == 0, exported.output
    assert_same_tensors(load_file(str(tmp_path / "model" / "model.safetensors")), expected)
    assert (tmp_path / "model" / "tokenizer" / "tokenizer.json").is_file()
    refused = pretrain(tmp_path / "init", "--max-steps", "1",
                       overrides=[*SMALL, f"model.init={middle}"])
    one_line_error(refused, "infinitrain export model")
    resumed = tmp_path / "resumed"
    shutil.copytree(middle, resumed / middle.name)
    trained(resumed, "--max-steps", str(STEPS), "--resume", "auto")
    assert_same_end(resumed, straight_run)


def test_sigusr1_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    run = tmp_path / "signalled"
    process = start_pretrain(run, 300, [*SMALL, "checkpoint.every_steps=2"])
    wait_until(process, (checkpoint(run, 2) / "checkpoint.json").exists, 180)
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 0, output
    newest = (run / "latest").read_text().strip()
    stopped_at = int(newest.removeprefix("step-"))
    assert 2 < stopped_at < 300 and f"stopped at step {stopped_at}" in output, output


def catches_sigusr1(pid: int) -> bool:
    """Whether process ``pid`` has a SIGUSR1 handler installed (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1)
    return False


def test_sigusr1_is_caught_before_torch_is_imported():
    """SLURM may signal while torch and Lightning are still importing (seconds): the CLI must
    catch SIGUSR1 before those imports, or Python's default action kills the job."""
    probe = (
        "import signal, sys\n"
        "seen = {}\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and 'handler' not in seen:\n"
        "            seen['handler'] = signal.getsignal(signal.SIGUSR1)\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import infinitrain.cli\n"
        "print(seen['handler'] not in (signal.SIG_DFL, None))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env=subprocess_env(), check=True)
    assert result.stdout.strip() == "True"


def test_sigusr1_before_the_first_step_checkpoints_it(tmp_path):
    """A signal that arrives before training starts is kept: a checkpoint at step 1, exit 0."""
    run = tmp_path / "early"
    process = start_pretrain(run, 300, SMALL)
    wait_until(process, lambda: catches_sigusr1(process.pid), 60)
    process.send_signal(signal.SIGUSR1)  # long before training starts
    output = process.communicate(timeout=180)[0].decode()
    assert process.returncode == 0, output
    assert (run / "latest").read_text().strip() == "step-00000001"
    assert "stopped at step 1" in output, output


def test_the_write_gate_trains_from_its_step_and_the_penalty_closes_writes(tmp_path):
    """Until optim.write_gate_from_step every token writes in full (write_gate_init 1 under the
    clamp: the gate's weights do not move); from it on, optim.write_penalty closes the writes the
    loss does not need."""
    run = tmp_path / "penalised"
    gate = ["model.memory_rule=deltanet", "model.memory_write_gate=true",
            "model.write_gate_activation=clamp", "model.write_gate_init=1.0",
            "optim.write_penalty=1.0", "optim.write_gate_from_step=6"]
    trained(run, "--max-steps", "20", overrides=[*SMALL, *gate])
    steps, (cost,) = TrainingLog.read(run).points("write_cost")
    cost = dict(zip(steps, cost, strict=True))
    assert all(cost[step] == 1.0 for step in range(1, 7)), cost  # logged at steps done: 1, 2…
    assert cost[20] < 0.2, cost


def test_the_write_gate_waits_for_the_loss_and_a_resumed_run_remembers_it(tmp_path):
    """optim.write_gate_below_loss: the write gate stays frozen until the loss's moving average
    falls below it; that average is part of the checkpoint, so a run stopped before the gate
    starts and resumed starts it at the same step and ends exactly where a straight run does."""
    gate = [*SMALL, "model.memory_rule=deltanet", "model.memory_write_gate=true",
            "model.write_gate_activation=clamp", "model.write_gate_init=1.0",
            "optim.write_penalty=1.0", "optim.write_gate_below_loss=8.0"]
    straight = tmp_path / "straight"
    trained(straight, "--max-steps", "20", overrides=gate)
    _, (cost,) = TrainingLog.read(straight).points("write_cost")
    start = next(index for index, value in enumerate(cost) if value < 1.0) - 1
    assert 7 <= start <= 15, cost  # the loss starts near 8.3
    assert all(value == 1.0 for value in cost[:start + 1]) and cost[-1] < 0.5, cost
    stopped = tmp_path / "stopped"
    trained(stopped, "--max-steps", "6", overrides=gate)
    trained(stopped, "--resume", "auto", "--max-steps", "20", overrides=gate)
    assert_same_tensors(load_file(str(checkpoint(stopped, 20) / "model.safetensors")),
                        load_file(str(checkpoint(straight, 20) / "model.safetensors")))


def test_write_targets_teach_the_gate_to_write_the_needle_and_nothing_else(tmp_path,
                                                                          data_tokenizer):
    """optim.write_target_until_step on the passkey recipe: from step 0 the gate learns what the
    data says to write. After 80 steps every memory layer's every key/value head writes a new
    prompt's needle at least ten times as strongly as the rest, which it has all but closed,
    where the gate started fully open on every token (init 1)."""
    run = tmp_path / "targeted"
    overrides = ["data.streams=4", "optim.warmup_steps=5", "optim.write_target_until_step=80",
                 "optim.write_gate_below_loss=0", "optim.write_gate_from_step=80",
                 "logging.every_steps=1", "logging.tensorboard=false",
                 "checkpoint.every_steps=80"]
    with intra_op_threads(1):
        result = CliRunner().invoke(app, ["pretrain", "--recipe", "passkey-tiny", "--out-dir",
                                          str(run), "--max-steps", "80", *sets(overrides)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    _, (error,) = TrainingLog.read(run).points("write_error")
    assert error[0] > 0.3 and error[-1] < 0.05, error
    model = load_model_dir(checkpoint(run, 80))
    sample = PasskeyGenerator(data_tokenizer).sample(200, 0.5, seed=1000)
    needle = torch.zeros(200, dtype=torch.bool)
    needle[sample.needle_offset:sample.needle_offset + sample.needle_len] = True
    keys = {}
    hooks = [block.attn.k_proj.register_forward_hook(
        lambda module, inputs, out, i=i: keys.setdefault(i, out)) for i, block in
        enumerate(model.layers)]
    with torch.no_grad():
        model(sample.prompt_ids[None])
    for hook in hooks:
        hook.remove()
    layers = [i for i, block in enumerate(model.layers) if block.attn.has_memory]
    assert layers == [1, 2]
    for i in layers:
        k = keys[i][0].view(200, model.config.n_kv_heads, model.config.head_dim)
        strength = model.layers[i].attn.write_strength(k).detach()
        written, rest = strength[needle].mean(0), strength[~needle].mean(0)
        assert (rest < 0.1).all() and (written > 10 * rest).all(), (i, written, rest)


def test_a_run_whose_write_gate_never_started_says_so_at_the_end(tmp_path):
    """A loss threshold the run never reaches: the gate never trained, which in the passkey
    recipes means the memory path never formed. The summary says so; a run stopped before the
    schedule's end (--max-steps) may still start it, and says nothing."""
    gate = [*SMALL, "model.memory_rule=deltanet", "model.memory_write_gate=true",
            "model.write_gate_activation=clamp", "optim.write_penalty=1.0",
            "optim.write_gate_below_loss=0.001", "train.max_steps=6"]
    stopped = pretrain(tmp_path / "stopped", "--max-steps", "3", overrides=gate)
    assert stopped.exit_code == 0 and "never started" not in stopped.output
    ended = pretrain(tmp_path / "ended", overrides=gate)
    assert ended.exit_code == 0, ended.output
    warning = " ".join(line for line in ended.output.splitlines() if "never started" in line)
    assert "above optim.write_gate_below_loss = 0.001" in warning, ended.output
    started = pretrain(tmp_path / "started", overrides=[*gate, "optim.write_gate_below_loss=50"])
    assert started.exit_code == 0 and "never started" not in started.output


def test_until_the_write_gate_starts_the_run_is_the_run_without_a_gate(tmp_path):
    """write_gate_init 1 under the clamp writes every token fully, and the frozen gate's gradients
    stay out of gradient clipping: every other weight ends where a run without a gate ends."""
    plain = [*SMALL, "model.memory_rule=deltanet", "optim.grad_clip=0.01"]
    gated = [*plain, "model.memory_write_gate=true", "model.write_gate_activation=clamp",
             "model.write_gate_init=1.0", "optim.write_penalty=1.0",
             "optim.write_gate_from_step=100"]
    for name, overrides in (("plain", plain), ("gated", gated)):
        trained(tmp_path / name, "--max-steps", "6", overrides=overrides)
    weights = {name: load_file(str(checkpoint(tmp_path / name, 6) / "model.safetensors"))
               for name in ("plain", "gated")}
    shared = {name: tensor for name, tensor in weights["gated"].items()
              if not name.endswith(("write_weight", "write_bias"))}
    assert shared.keys() == weights["plain"].keys()
    for name, tensor in shared.items():  # up to float rounding (a clipped gate: ~2e-3 apart)
        difference = (tensor - weights["plain"][name]).abs().max()
        assert difference <= 1e-4, f"{name}: {difference}"
    norms = {name: TrainingLog.read(tmp_path / name).points("grad_norm")[1][0]
             for name in ("plain", "gated")}
    assert norms["gated"] == pytest.approx(norms["plain"], rel=1e-5), norms


def test_compiled_training_matches_eager_and_resumes_exactly(straight_run, tmp_path):
    """train.compile: the same losses as eager (up to the compiler's reassociation), and a
    stopped and resumed compiled run is bit-identical to a straight compiled one."""
    compiled = [*SMALL, "train.compile=true"]
    straight = tmp_path / "straight"
    graphs = counters["stats"]["unique_graphs"]
    trained(straight, "--max-steps", str(STEPS), overrides=compiled)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    eager, curve = losses(straight_run), losses(straight)
    assert curve.keys() == eager.keys()
    assert all(abs(curve[step] - eager[step]) < 1e-4 for step in curve), (curve, eager)
    resumed = tmp_path / "resumed"
    trained(resumed, "--max-steps", str(STEPS // 2), overrides=compiled)
    trained(resumed, "--max-steps", str(STEPS), "--resume", "auto", overrides=compiled)
    assert losses(resumed) == curve
    assert_same_end(resumed, straight)
