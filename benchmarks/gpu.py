"""GPU benchmark of an Infini-Transformer preset: every GPU figure of the README in one run.

1. Training throughput: one window of k segments per stream, bf16 autocast, activation
   checkpointing, AdamW step included: tokens/s, TFLOP/s, MFU (see :func:`flops_per_token`),
   peak memory.
2. The same model and step without the memory, in the same run: the Infini overhead ratio.
3. Streaming prefill of a short vs a long prompt (32K vs 1M tokens): time and peak memory ratios.
4. Local attention: flash-attn vs SDPA in bf16 (max abs diff), and which SDPA kernel runs.
5. Memory retrieve/update in fp32 vs bf16 inputs: error against a float64 reference.

    PYTHONPATH=. python3 benchmarks/gpu.py --json $OUT/gpu.json          # H100 / H200
    PYTHONPATH=. python3 benchmarks/gpu.py --recipe recipes/1b.yaml --sections training --compile
    python benchmarks/gpu.py --preset tiny --device cpu --json smoke.json   # CPU smoke check

Needs only torch and the repository (not an installed package); ``--recipe`` also needs the
data pipeline's dependencies, which the recipe module imports. Prints one results block;
``--json`` writes the same figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from infinitrain.inference.stream import DEFAULT_WINDOW_SEGMENTS, prefill
from infinitrain.model import InfiniTransformer, ModelConfig, preset
from infinitrain.model import attention as attention_module
from infinitrain.model import memory as memory_module
from infinitrain.training.flops import (
    flops_per_token,
    forward_flops_per_token,
    peak_bf16_tflops,
)
from infinitrain.training.loss import supervised_loss_sum

LOSS_CHUNK_TOKENS = 4096
"""As infinitrain/training/module.py: the output layer and cross-entropy run 4096 tokens at a
time, recomputed in the backward, so a 128K vocabulary never holds a whole window's logits."""

GiB = 2**30


# ----------------------------------------------------------------------------------------------
# Measurement helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones; the device is
    synchronised around each call, so the host clock reads finished work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / GiB


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """Measured bf16 matmul ceiling (random inputs: a datasheet rate is a lead, not a ceiling)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = statistics.median(timed(lambda: a @ b, device, warmup=3, repeats=repeats))
    return 2 * size**3 / seconds / 1e12


# ----------------------------------------------------------------------------------------------
# 1-2. Training throughput with and without the memory


VARIANTS: dict[str, bool] = {"infini": True, "local_only": False}
"""name -> use_memory: the Infini model, and the same model with the memory off, which then does
no memory work at all (the clean baseline of the overhead)."""


def train_benchmark(config: ModelConfig, device: torch.device, batch: int, segments: int,
                    steps: int, warmup: int, rounds: int, peak_tflops: float | None,
                    matmul_ceiling: float, compile: bool = False) -> dict[str, Any]:
    """Time full training steps of each variant, ``rounds`` times in turn (the spread between
    rounds is the noise floor of the comparison). ``compile``: the blocks compiled as under
    ``train.compile``; each variant's first step, timed apart, pays its compilation."""
    with torch.device(device):
        model = InfiniTransformer(config)
    model.activation_checkpointing = True
    if compile:
        model.compile_blocks(dynamic=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    tokens = batch * segments * config.segment_len
    ids = torch.randint(0, config.vocab_size, (batch, segments * config.segment_len),
                        device=device)
    labels = torch.randint(0, config.vocab_size, ids.shape, device=device)
    states: dict[str, Any] = dict.fromkeys(VARIANTS)

    def step(name: str) -> None:
        use_memory = VARIANTS[name]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden, state = model.hidden_states(ids, states[name], use_memory=use_memory)
            loss = supervised_loss_sum(hidden, labels, model.lm_head) / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states[name] = state.detach()  # carried, as in truncated BPTT

    first_step_s = {name: timed(lambda n=name: step(n), device, 0, 1)[0] for name in VARIANTS}
    times: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    peaks: dict[str, int | None] = dict.fromkeys(VARIANTS)
    for _ in range(rounds):
        for name in VARIANTS:
            reset_peak(device)
            times[name].append(timed(lambda n=name: step(n), device, warmup, steps))
            peak = peak_bytes(device)
            peaks[name] = None if peak is None else max(peak, peaks[name] or 0)

    results: dict[str, Any] = {"tokens_per_step": tokens, "compiled": compile}
    for name, use_memory in VARIANTS.items():
        seconds = statistics.median(t for round_times in times[name] for t in round_times)
        round_medians = [statistics.median(r) for r in times[name]]
        tflops = flops_per_token(config, memory=use_memory) * tokens / seconds / 1e12
        results[name] = {
            "step_s": seconds,
            "round_medians_s": round_medians,
            "spread": (max(round_medians) - min(round_medians)) / seconds,
            "tokens_per_s": tokens / seconds,
            "tflops": tflops,
            "mfu": ratio(tflops, peak_tflops),
            "mfu_of_measured_matmul": tflops / matmul_ceiling,
            "peak_gib": gib(peaks[name]),
            "first_step_s": first_step_s[name],
        }
    results["overhead_vs_local_only"] = (results["infini"]["step_s"]
                                         / results["local_only"]["step_s"])
    return results


# ----------------------------------------------------------------------------------------------
# 3. Streaming prefill: short vs long


def prefill_benchmark(config: ModelConfig, device: torch.device,
                      lengths: tuple[int, int]) -> dict[str, Any]:
    """Read each length through ``prefill`` from an empty state, fed from the host ``lengths[0]``
    tokens at a time (as a long document streams in), logits for the last position only."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as `infinitrain eval`
    with torch.device(device):
        model = InfiniTransformer(config)
    model.to(dtype).eval()
    chunk = lengths[0]
    host_ids = torch.randint(0, config.vocab_size, (1, max(lengths)))

    def read(length: int) -> None:
        state = None
        for start in range(0, length, chunk):
            piece = host_ids[:, start:min(start + chunk, length)].to(device)
            _, state = prefill(model, piece, state)

    read(chunk)  # warm-up: the short read once, every shape of the timed reads included
    results: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."),
                               "window_segments": DEFAULT_WINDOW_SEGMENTS,
                               "host_chunk_tokens": chunk}
    for label, length in zip(("short", "long"), lengths, strict=True):
        base = reset_peak(device)
        [seconds] = timed(lambda n=length: read(n), device, warmup=0, repeats=1)
        peak = peak_bytes(device)
        results[label] = {
            "tokens": length, "seconds": seconds, "tokens_per_s": length / seconds,
            "peak_gib": gib(peak),
            "working_gib": None if peak is None else gib(peak - base),
        }
    short, long = results["short"], results["long"]
    results["time_ratio"] = long["seconds"] / short["seconds"]
    results["time_per_token_ratio"] = results["time_ratio"] * short["tokens"] / long["tokens"]
    results["peak_ratio"] = ratio(long["peak_gib"], short["peak_gib"])
    results["working_ratio"] = ratio(long["working_gib"], short["working_gib"])
    return results


# ----------------------------------------------------------------------------------------------
# 4. Local attention kernels


def sdpa_ops(fn: Callable[[], Any]) -> list[str]:
    """The SDPA kernels (aten::_scaled_dot_product_*) that ``fn`` dispatches to, read off the
    profiler rather than predicted from torch's selection rules."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")})


def attention_benchmark(config: ModelConfig, device: torch.device, batch_segments: int,
                        repeats: int) -> dict[str, Any]:
    """flash-attn (when importable) and SDPA on the training shape [B·k, N, H, d] in bf16:
    max abs differences on two segments, forward+backward time on the whole window."""
    n, dh = config.segment_len, config.head_dim
    flash = attention_module.flash_attn_func
    sdpa_only = mock.patch.object(attention_module, "flash_attn_func", None)

    def inputs(b: int) -> list[Tensor]:
        return [torch.randn(b, n, heads, dh, device=device, dtype=torch.bfloat16)
                for heads in (config.n_heads, config.n_kv_heads, config.n_kv_heads)]

    def run(q: Tensor, k: Tensor, v: Tensor, use_flash: bool) -> Tensor:
        with nullcontext() if use_flash else sdpa_only:
            return attention_module.local_attention(q, k, v)

    q, k, v = inputs(2)
    reference = run(q.float(), k.float(), v.float(), use_flash=False)
    sdpa_out = run(q, k, v, use_flash=False)
    results: dict[str, Any] = {
        "shape_q": [batch_segments, n, config.n_heads, dh],
        "shape_kv": [batch_segments, n, config.n_kv_heads, dh],
        "sdpa_ops": sdpa_ops(lambda: run(q, k, v, use_flash=False)),
        "sdpa_max_abs_diff_vs_fp32": (sdpa_out.float() - reference).abs().max().item(),
        "flash_attn": None,
    }

    q, k, v = (t.requires_grad_() for t in inputs(batch_segments))
    grad_out = torch.randn_like(q)
    flops = 3 * config.n_heads * 2 * dh * (n + 1) * n * batch_segments  # fwd+bwd, causal

    def fwd_bwd(use_flash: bool) -> None:
        torch.autograd.grad(run(q, k, v, use_flash), (q, k, v), grad_out)

    implementations = {"sdpa": False} | ({"flash_attn": True} if flash is not None else {})
    for name, use_flash in implementations.items():
        seconds = statistics.median(timed(lambda f=use_flash: fwd_bwd(f), device, warmup=2,
                                          repeats=repeats))
        results[f"{name}_fwd_bwd_ms"] = seconds * 1e3
        results[f"{name}_tflops"] = flops / seconds / 1e12
    if flash is not None:
        q, k, v = inputs(2)
        flash_out = run(q, k, v, use_flash=True).float()
        sdpa_out = run(q, k, v, use_flash=False).float()
        reference = run(q.float(), k.float(), v.float(), use_flash=False)
        results["flash_attn"] = _flash_version()
        results["flash_max_abs_diff_vs_sdpa"] = (flash_out - sdpa_out).abs().max().item()
        results["flash_max_abs_diff_vs_fp32"] = (flash_out - reference).abs().max().item()
    return results


def _flash_version() -> str:
    import flash_attn

    return flash_attn.__version__


# ----------------------------------------------------------------------------------------------
# 5. Memory precision


def memory_precision(config: ModelConfig, device: torch.device) -> dict[str, Any]:
    """max |x − x_fp64| / max |x_fp64| of retrieve and update (M and z), per rule and precision.

    ``fp32`` is the shipped path; ``bf16_matmul`` runs the same math under bf16 autocast with the
    state in float32 (bf16 matmul operands, float32 accumulation into M and z); ``bf16`` gives it
    bf16 tensors throughout, state included. Shapes are one stream of the config: H_kv heads,
    the G query heads of a group stacked; the state first holds four random segments.
    """
    return {rule: _rule_precision(config, device, rule) for rule in memory_module.RULES}


def _rule_precision(config: ModelConfig, device: torch.device, rule: str) -> dict[str, Any]:
    """The rule's own methods are the math without the float32 guarantee of the module functions
    the model calls: what bf16 would cost."""
    n, dh, h_kv = config.segment_len, config.head_dim, config.n_kv_heads
    math = memory_module.rule_named(rule)

    def features(length: int) -> Tensor:
        return memory_module.feature_map(torch.randn(1, h_kv, length, dh, device=device), rule)

    def ops(q: Tensor, k: Tensor, v: Tensor, m: Tensor, z: Tensor) -> tuple[Tensor, ...]:
        return math.retrieve(q, m, z), *math.update(k, v, m, z)

    memory = torch.zeros(1, h_kv, dh, dh, device=device, dtype=torch.float64)
    norm = torch.zeros(1, h_kv, dh, device=device, dtype=torch.float64)
    for _ in range(4):
        memory, norm = math.update(features(n).double(),
                                   torch.randn(1, h_kv, n, dh, device=device).double(),
                                   memory, norm)
    sigma_q = features(config.kv_group_size * n)
    sigma_k = features(n)
    values = torch.randn(1, h_kv, n, dh, device=device)
    tensors = (sigma_q, sigma_k, values, memory.float(), norm.float())

    def bf16_matmul() -> tuple[Tensor, ...]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return ops(*tensors)

    def bf16() -> tuple[Tensor, ...]:
        return ops(*(t.bfloat16() for t in tensors))

    def fp32() -> tuple[Tensor, ...]:
        q, k, v, m, z = tensors
        return memory_module.retrieve(q, m, z, rule), *memory_module.update(k, v, m, z, rule)

    reference = ops(*(t.double() for t in tensors))
    results: dict[str, Any] = {}
    for precision, fn in (("fp32", fp32), ("bf16_matmul", bf16_matmul), ("bf16", bf16)):
        try:
            out = fn()
        except (NotImplementedError, RuntimeError) as exc:  # deltanet: no bf16 triangular solve
            results[precision] = {"unsupported": f"{type(exc).__name__}: {exc}"}
            continue
        results[precision] = {
            name: ((got.double() - ref).abs().max() / ref.abs().max()).item()
            for name, got, ref in zip(("retrieve", "update_M", "update_z"), out, reference,
                                      strict=True)
        }
    return results


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def report(results: dict[str, Any]) -> str:
    """The results block printed at the end of the run."""
    dev, model = results["device"], results["model"]
    lines = [
        "=" * 96,
        f"infinitrain benchmarks/gpu.py | {dev['name']} | torch {dev['torch']} | "
        f"CUDA {dev['cuda'] or '—'} | flash-attn {dev['flash_attn'] or 'not installed'}",
        f"peak bf16 {_fmt(dev['peak_bf16_tflops'], '.1f')} TFLOP/s (datasheet, dense) | measured "
        f"{dev['matmul_size']}³ bf16 matmul {dev['matmul_tflops']:.4g} TFLOP/s | "
        f"fp32 matmul allow_tf32={dev['allow_tf32']}",
        f"model {model['preset']} ({model['memory_rule']}): {model['matmul_params'] / 1e9:.3f}B "
        f"matmul params | window {model['segments']} × {model['segment_len']} tokens × batch "
        f"{model['batch']}",
        "FLOPs/token (train, 3× forward): " + ", ".join(
            f"{k} {3 * v / 1e9:.4g} G" for k, v in model["forward_flops_per_token"].items())
        + f" | total {model['flops_per_token'] / 1e9:.4g} G",
    ]
    train = results.get("training", {})
    if "error" in train:
        lines.append(f"training: FAILED: {train['error']}")
    elif train:
        compiled = ", blocks compiled" if train["compiled"] else ""
        lines.append(f"training (bf16 autocast, activation checkpointing, AdamW{compiled}):")
        lines.append(f"  {'variant':<18}{'step s':>9}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}"
                     f"{'MFU/matmul':>11}{'peak GiB':>10}{'spread':>8}{'first s':>9}")
        for name in VARIANTS:
            r = train[name]
            lines.append(
                f"  {name:<18}{r['step_s']:>9.3f}{r['tokens_per_s']:>12,.0f}{r['tflops']:>11.4g}"
                f"{_fmt(r['mfu'], '.1%'):>7}{r['mfu_of_measured_matmul']:>11.1%}"
                f"{_fmt(r['peak_gib'], '.2f'):>10}{r['spread']:>8.1%}{r['first_step_s']:>9.1f}")
        lines.append(f"  Infini overhead: {train['overhead_vs_local_only']:.3f}× step time vs "
                     "local only")
    pre = results.get("prefill", {})
    if "error" in pre:
        lines.append(f"prefill: FAILED: {pre['error']}")
    elif pre:
        lines.append(f"prefill ({pre['dtype']}, {pre['window_segments']} segments per window, "
                     f"host chunks of {pre['host_chunk_tokens']:,} tokens):")
        for label in ("short", "long"):
            r = pre[label]
            lines.append(f"  {r['tokens']:>10,} tokens: {r['seconds']:8.2f} s "
                         f"({r['tokens_per_s']:,.0f} tok/s), peak {_fmt(r['peak_gib'], '.3f')} "
                         f"GiB (working {_fmt(r['working_gib'], '.3f')} GiB)")
        lines.append(f"  long/short: time {pre['time_ratio']:.2f}× (per token "
                     f"{pre['time_per_token_ratio']:.3f}×), peak memory "
                     f"{_fmt(pre['peak_ratio'], '.3f')}× (working "
                     f"{_fmt(pre['working_ratio'], '.3f')}×)")
    att = results.get("attention", {})
    if "error" in att:
        lines.append(f"attention: FAILED: {att['error']}")
    elif att:
        lines.append(f"attention q {att['shape_q']} kv {att['shape_kv']} bf16, causal:")
        lines.append(f"  SDPA runs {', '.join(att['sdpa_ops']) or '?'}: fwd+bwd "
                     f"{att['sdpa_fwd_bwd_ms']:.2f} ms ({att['sdpa_tflops']:.4g} TFLOP/s); "
                     f"max |sdpa − fp32| {att['sdpa_max_abs_diff_vs_fp32']:.2e}")
        if att["flash_attn"]:
            lines.append(f"  flash-attn {att['flash_attn']}: fwd+bwd "
                         f"{att['flash_attn_fwd_bwd_ms']:.2f} ms "
                         f"({att['flash_attn_tflops']:.4g} TFLOP/s); max |flash − sdpa| "
                         f"{att['flash_max_abs_diff_vs_sdpa']:.2e}, max |flash − fp32| "
                         f"{att['flash_max_abs_diff_vs_fp32']:.2e}")
        else:
            lines.append("  flash-attn not importable: local_attention runs on SDPA")
    prec = results.get("memory_precision", {})
    if "error" in prec:
        lines.append(f"memory precision: FAILED: {prec['error']}")
    elif prec:
        lines.append("memory ops, max |x − fp64| / max |fp64| (retrieve / update M / update z):")
        for rule, by_precision in prec.items():
            cells = "  ".join(
                f"{p} unsupported" if "unsupported" in e
                else f"{p} {e['retrieve']:.1e}/{e['update_M']:.1e}/{e['update_z']:.1e}"
                for p, e in by_precision.items())
            lines.append(f"  {rule:<9} {cells}")
    lines.append("=" * 96)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main


SECTIONS = ("training", "prefill", "attention", "memory_precision")


def device_info(device: torch.device, matmul_size: int) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flash_attn": _flash_version() if attention_module.flash_attn_func is not None else None,
        "peak_bf16_tflops": peak_bf16_tflops(name) if device.type == "cuda" else None,
        "matmul_size": matmul_size,
        "matmul_tflops": matmul_tflops(device, matmul_size),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--recipe", default=None,
                        help="take the model from this recipe (a name or YAML file) instead of "
                             "--preset: its memory rule, write gate and memory layers")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--compile", action="store_true",
                        help="compile the blocks for the training section (train.compile)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1, help="streams per training step")
    parser.add_argument("--segments", type=int, default=None,
                        help="segments per training window (default 16; 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per variant and round (default 5; 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed training steps before each variant's timed ones")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over the training variants, for the spread (default 2; 1 "
                             "on CPU)")
    parser.add_argument("--prefill-tokens", type=int, nargs=2, default=None,
                        metavar=("SHORT", "LONG"),
                        help="prefill lengths (default 32768 1048576; 1024 8192 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.sections = args.sections.split(",")
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(SECTIONS)}")
    gpu = torch.device(args.device).type == "cuda"
    args.segments = args.segments or (16 if gpu else 2)
    args.steps = args.steps or (5 if gpu else 1)
    args.rounds = args.rounds or (2 if gpu else 1)
    args.prefill_tokens = tuple(args.prefill_tokens or ((32_768, 1_048_576) if gpu
                                                        else (1024, 8192)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.recipe:
        from infinitrain.recipe import load_recipe

        config = load_recipe(args.recipe)[1].model_config
    else:
        config = preset(args.preset)
    forward = forward_flops_per_token(config)
    results: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": device_info(device, 8192 if device.type == "cuda" else 256),
        "model": {
            "preset": args.recipe or args.preset, "memory_rule": config.memory_rule,
            "segment_len": config.segment_len, "segments": args.segments, "batch": args.batch,
            "matmul_params": forward["dense"] // 2,
            "forward_flops_per_token": forward,
            "flops_per_token": flops_per_token(config),
            "flops_per_token_local_only": flops_per_token(config, memory=False),
        },
    }
    peak, ceiling = results["device"]["peak_bf16_tflops"], results["device"]["matmul_tflops"]
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "training": lambda: train_benchmark(config, device, args.batch, args.segments,
                                            args.steps, args.warmup, args.rounds, peak,
                                            ceiling, args.compile),
        "prefill": lambda: prefill_benchmark(config, device, args.prefill_tokens),
        "attention": lambda: attention_benchmark(config, device, args.batch * args.segments,
                                                 repeats=2 * args.steps),
        "memory_precision": lambda: memory_precision(config, device),
    }
    failed = False
    for name, run in sections.items():
        if name not in args.sections:
            continue
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # one failing part must not lose the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        release(device)  # the section's model and optimizer are gone with its frame
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
