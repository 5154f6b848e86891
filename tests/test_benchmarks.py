"""benchmarks/gpu.py on the CPU: its FLOP count by hand and by torch's counter, and a smoke run;
benchmarks/timing.py's turn-taking and benchmarks/peers.py's results."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from infinitrain.model import InfiniTransformer, preset
from infinitrain.model import attention as attention_module
from infinitrain.training.optim import GATE_PARAMETERS

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# tiny: d 128, 2 layers, 4 query / 2 kv heads of 32, FFN 384, vocabulary 4096 (tied), N = 64.
DENSE = 2 * (2 * (128 * 128 + 128 * 64 + 128 * 64 + 128 * 128 + 3 * 128 * 384) + 128 * 4096)
ATTENTION = 2 * (4 * 32 * 65 + 4 * 32 * 65)  # per layer: QKᵀ + AV, 65/2 keys per query on average
RETRIEVE = 4 * (2 * 32 * 32 + 2 * 32)  # σ(Q)M and σ(Q)z per query head
WRITE = 2 * (2 * 32 * 32 + 32)  # σ(K)ᵀV and Σσ(K) per kv head
MEMORY = {
    "linear": 2 * (RETRIEVE + WRITE),
    "delta": 2 * (RETRIEVE + WRITE + 2 * (2 * 32 * 32 + 2 * 32)),  # + σ(K)M, σ(K)z
    # no σ(Q)z; + σ(K)M_0, σ(K)σ(K)ᵀ (64 keys) and the triangular solve (63 rows above, 32 cols)
    "deltanet": 2 * (4 * 2 * 32 * 32 + WRITE + 2 * (2 * 32 * 32 + 2 * 64 * 32 + 63 * 32)),
}


@pytest.mark.parametrize("rule", ["linear", "delta", "deltanet"])
def test_flops_per_token_matches_a_hand_count(gpu: ModuleType, rule: str) -> None:
    config = preset("tiny", memory_rule=rule)
    assert gpu.forward_flops_per_token(config) == {
        "dense": DENSE, "attention": ATTENTION, "memory": MEMORY[rule]}
    assert gpu.flops_per_token(config) == 3 * (DENSE + ATTENTION + MEMORY[rule])
    assert gpu.flops_per_token(config, memory=False) == 3 * (DENSE + ATTENTION)


@pytest.mark.parametrize("rule", ["linear", "delta", "deltanet"])
def test_dense_and_memory_flops_match_torch_flop_counter(gpu: ModuleType, rule: str) -> None:
    """The model's own matmuls, counted by torch, against the formula (local attention stubbed
    out, its count checked by hand above). torch counts neither the Σσ(K) sums nor the
    triangular solve, so those come off."""
    config = preset("tiny", memory_rule=rule)
    model = InfiniTransformer(config)
    tokens = 3 * config.segment_len
    with (mock.patch.object(attention_module, "local_attention", lambda q, *_: q),
          FlopCounterMode(display=False) as counter, torch.no_grad()):
        model(torch.randint(0, config.vocab_size, (1, tokens)))
    per_token = gpu.forward_flops_per_token(config)
    uncounted = config.n_layers * config.n_kv_heads * config.head_dim * (
        1 + (config.segment_len - 1 if rule == "deltanet" else 0))
    assert counter.get_total_flops() == tokens * (
        per_token["dense"] + per_token["memory"] - uncounted)


def test_peak_table_prefers_the_specific_name(gpu: ModuleType) -> None:
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert gpu.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu.peak_bf16_tflops("NVIDIA H200") == 989.5
    assert gpu.peak_bf16_tflops("NVIDIA H200 NVL") == 835.5
    assert gpu.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None  # unknown: no MFU


def test_cpu_smoke_run_writes_the_results_json(gpu: ModuleType, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The script's command line in this process (a subprocess would double the run time, most
    of it importing torch again)."""
    out = tmp_path / "gpu.json"
    code = gpu.main(["--preset", "tiny", "--device", "cpu", "--segments", "1", "--steps", "1",
                     "--warmup", "0", "--prefill-tokens", "256", "512", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "Infini overhead" in printed.out
    results = json.loads(out.read_text())
    assert set(results) == {"args", "device", "model", "training", "prefill", "attention",
                            "memory_precision"}
    assert results["model"]["flops_per_token"] == gpu.flops_per_token(preset("tiny"))
    training = results["training"]
    assert training["tokens_per_step"] == 64
    for variant in ("infini", "local_only"):
        assert training[variant]["tokens_per_s"] > 0
        assert training[variant]["mfu"] is None  # no datasheet peak for a CPU
    assert training["overhead_vs_local_only"] > 0
    assert results["prefill"]["long"]["tokens"] == 512
    assert results["attention"]["sdpa_ops"]  # the SDPA kernel that ran, by name
    assert results["attention"]["flash_attn"] is None
    precision = results["memory_precision"]
    assert set(precision) == {"linear", "delta", "deltanet"}
    assert all(error < 1e-5 for rule in precision.values() for error in rule["fp32"].values())
    assert 1e-4 < precision["delta"]["bf16"]["retrieve"] < 5e-2


def test_a_recipe_model_and_chosen_sections(gpu: ModuleType, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``--recipe`` benchmarks the model a recipe trains (the 1b recipe's is gated deltanet, not
    the preset's delta); ``--sections`` runs those alone; a misspelt section fails in one line."""
    out = tmp_path / "gpu.json"
    code = gpu.main(["--recipe", "passkey-tiny", "--device", "cpu", "--segments",
                     "1", "--steps", "1", "--warmup", "0", "--sections",
                     "training,memory_precision", "--json", str(out)])
    assert code == 0, capsys.readouterr().err[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"args", "device", "model", "training", "memory_precision"}
    assert results["model"]["memory_rule"] == "deltanet"
    assert results["training"]["compiled"] is False
    assert results["training"]["infini"]["first_step_s"] > 0
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--sections", "training,prefil"])
    assert "--sections: unknown prefil" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# benchmarks/timing.py and benchmarks/peers.py

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/<name>.py as a module, with benchmarks/ on sys.path as when run as a script
    (peers.py imports timing.py), registered in sys.modules (its dataclasses look it up)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_interleaved_timing_takes_turns_after_one_warm_up_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    timing = load_benchmark("timing", monkeypatch)
    calls: list[str] = []
    fns = {name: lambda name=name: calls.append(name) for name in "abc"}
    timings = timing.interleaved(fns, rounds=3, steps=2)
    assert calls == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] * 3
    assert {name: [len(steps) for steps in rounds] for name, rounds in timings.items()} == {
        name: [2, 2, 2] for name in "abc"}
    assert all(seconds >= 0 for rounds in timings.values() for steps in rounds
               for seconds in steps)


def test_median_rate_pools_each_rounds_calls_then_takes_the_median(
        monkeypatch: pytest.MonkeyPatch) -> None:
    timing = load_benchmark("timing", monkeypatch)
    assert timing.median_rate([[1.0], [0.5], [2.0]], work_per_call=10) == 10  # 10, 20, 5 per s
    assert timing.median_rate([[1.0, 3.0]], work_per_call=4) == 2  # 8 units in 4 s


def test_a_peer_that_is_not_importable_is_skipped_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    peers = load_benchmark("peers", monkeypatch)
    absent = dataclasses.replace(peers.IMPLS["lucidrains"], package="infinitrain_no_such_peer")
    reason = peers.skip_reason(absent)
    assert reason.startswith("lucidrains: skipped") and "pip install -e '.[peers]'" in reason
    assert peers.skip_reason(peers.IMPLS["llama"]) is None  # transformers is a dependency


def test_the_memory_off_step_is_the_same_model_without_any_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    peers = load_benchmark("peers", monkeypatch)
    shape = peers.SHAPES["4x-tiny"]
    with_memory = InfiniTransformer(peers.benchmarked_config(shape))
    without = InfiniTransformer(peers.benchmarked_config(shape, memory=False))
    assert all(block.attn.has_memory for block in with_memory.layers)
    assert not any(block.attn.has_memory for block in without.layers)
    assert ({name for name, _ in with_memory.named_parameters()
             if name.split(".")[-1] not in GATE_PARAMETERS}  # the memory's only parameters
            == {name for name, _ in without.named_parameters()})


def test_peers_quick_run_reports_medians_and_their_ratios(tmp_path: Path) -> None:
    """The script's own command line in a fresh process (its prefill runs start children of
    their own), with or without the lucidrains package installed."""
    out = tmp_path / "peers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peers.py"), "--quick", "--configs", "tiny:1",
         "--batch", "1", "--prefill-tokens", "512", "--prefill-rounds", "2", "--memory-off",
         "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    lucidrains = importlib.util.find_spec("infini_transformer_pytorch") is not None
    expected = ["infinitrain", "infinitrain-memory-off",
                *(["lucidrains"] if lucidrains else []), "llama"]
    assert results["impls"] == expected
    assert lucidrains or "pip install -e '.[peers]'" in done.stdout
    assert f"{results['threads']} threads" in done.stdout.splitlines()[0]

    (training,) = results["training"]
    assert training["tokens_per_step"] == 64
    rates = training["tokens_per_s"]
    for name in expected:
        assert rates[name] > 0
        assert rates[name] == pytest.approx(statistics.median(
            64 * len(steps) / sum(steps) for steps in training["seconds"][name]))
    assert training["ratios"] == pytest.approx(
        {f"infinitrain/{peer}": rates["infinitrain"] / rates[peer] for peer in expected[1:]})

    streamed = [name for name in expected if name != "infinitrain-memory-off"]  # training only
    (prefill,) = results["prefill"]
    assert prefill["tokens"] == 512 and list(prefill["runs"]) == streamed
    for name in streamed:  # two runs each, in turns: the median tokens/s, the highest peak
        run, runs = prefill["runs"][name], prefill["rounds"][name]
        assert run["tokens_per_s"] > 0 and run["peak_rss_mib"] >= run["rss_before_mib"] > 0
        assert run["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in runs)
        assert run["peak_rss_mib"] == max(r["peak_rss_mib"] for r in runs)
    started = [line.split(": ")[1] for line in done.stderr.splitlines() if "round" in line]
    assert started == [f"{name} …" for name in streamed] * 2
    assert "median of 2 run(s) in turns" in done.stdout
    assert "infinitrain/llama" in done.stdout


def test_peers_without_training_times_nothing_but_prefill(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    peers = load_benchmark("peers", monkeypatch)
    out = tmp_path / "none.json"
    assert peers.main(["--no-training", "--no-prefill", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["training"] == [] and results["prefill"] == []
    with pytest.raises(SystemExit) as refused:  # argparse's one-line error, status 2
        peers.main(["--prefill-rounds", "0"])
    assert refused.value.code == 2


def test_before_after_times_another_checkout_against_this_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This checkout against itself: two packages of the same code, both timed, their ratio
    the quotient of their medians; ``--shape 4x-tiny`` times that shape's windows (segments
    of 128 tokens, batch 4)."""
    out = tmp_path / "before_after.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "before_after.py"), str(REPO), "--shape", "4x-tiny",
         "--rules", "delta", "--segments", "1", "--rounds", "2", "--steps", "1",
         "--json", str(out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    rates = result["tokens_per_s"]
    assert result["shape"] == "4x-tiny"
    timing = load_benchmark("timing", monkeypatch)
    for name in ("before", "after"):
        assert rates[name] == pytest.approx(timing.median_rate(result["seconds"][name], 4 * 128))
    assert result["after_over_before"] == pytest.approx(rates["after"] / rates["before"])
    assert "after/before" in done.stdout and "4x-tiny" in done.stdout


def test_the_matmul_bound_counts_the_matrix_products_of_a_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/matmul_bound.py: the profiled time of a step's matrix products, and nothing
    else (the step's elementwise work is left out)."""
    bound = load_benchmark("matmul_bound", monkeypatch)
    a = torch.randn(256, 256)
    big = torch.randn(2048, 2048)
    only_matmul = bound.matmul_seconds(lambda: a @ a)
    with_elementwise = bound.matmul_seconds(lambda: (a @ a, big.exp(), big.sin()))
    assert only_matmul > 0
    assert with_elementwise < 3 * only_matmul  # exp and sin of 4M values are not counted
