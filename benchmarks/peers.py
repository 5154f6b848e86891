"""CPU benchmark of infinitrain against peers of the same shape, side by side in one run.

Peers (a peer that is not importable is skipped; ``pip install -e '.[peers]'`` installs them):

- ``lucidrains``: ``infini-transformer-pytorch`` 0.2.1, the best-known open Infini-attention.
- ``llama``: a transformers ``LlamaForCausalLM`` (SDPA), full causal attention, no memory.

1. Training tokens/s: one window of k segments per stream, forward + cross-entropy + backward +
   AdamW step. Steps are timed in turns, infinitrain, lucidrains, llama, infinitrain, … over
   ``--rounds`` rounds after one warm-up step each; medians and infinitrain/peer ratios.
2. Streaming prefill tokens/s and peak RSS (batch 1, inference mode), each (peer, length) in a
   fresh process, so each peak belongs to that run alone; ``--prefill-rounds`` runs of each in
   turns, the median tokens/s.

What each side computes, and where a peer's shape differs from infinitrain's, is in
:data:`IMPLS` and printed at the top of the results.

    python benchmarks/peers.py                                  # default set, ~10 min at 1 thread
    python benchmarks/peers.py --quick                          # smoke run, < 60 s
    python benchmarks/peers.py --configs tiny:16 --no-prefill --json peers.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from timing import interleaved, median_rate  # benchmarks/ is on sys.path when run as a script
from torch import Tensor, nn

from infinitrain.evaluation.resources import process_peak_rss_bytes
from infinitrain.model import InfiniTransformer, ModelConfig, preset

SHAPE_OVERRIDES: dict[str, dict[str, int]] = {
    "tiny": {},
    # d_model, layers and segment length doubled: 3.8M parameters, ~4× tiny's 0.92M.
    "4x-tiny": {"d_model": 256, "n_layers": 4, "ffn_dim": 768, "segment_len": 128},
}
"""Each benchmarked shape as overrides of the ``tiny`` preset (before_after.py builds them with
another checkout's ``preset``)."""
SHAPES: dict[str, ModelConfig] = {name: preset("tiny", **overrides)
                                  for name, overrides in SHAPE_OVERRIDES.items()}
DEFAULT_CONFIGS = ["tiny:4", "tiny:16", "4x-tiny:4", "4x-tiny:16"]
"""SHAPE:SEGMENTS per training window."""

QUICK = {"configs": ["tiny:4"], "rounds": 2, "steps": 1, "prefill_tokens": [2048]}
"""What --quick changes; flags given alongside it still win."""

PREFILL_WINDOW_SEGMENTS = 4
"""Segments per infinitrain prefill call and per Llama KV-cache chunk: infinitrain's default
prefill window (DEFAULT_WINDOW_SEGMENTS of infinitrain/inference/stream.py, not imported: the
inference package pulls the data and export packages into the prefill child, whose RSS counts)."""

LEARNING_RATE = 1e-5
"""Small, so that no random-init model drifts to inf/NaN (which runs at other speeds) mid-run."""

MiB = 2**20


# ----------------------------------------------------------------------------------------------
# The implementations: a training step and a streaming prefill each


def random_tokens(config: ModelConfig, batch: int, length: int) -> Tensor:
    return torch.randint(0, config.vocab_size, (batch, length))


def adamw_step(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def benchmarked_config(config: ModelConfig, memory: bool = True) -> ModelConfig:
    """``config``, or with ``memory`` False the same model with no layer's memory."""
    return config if memory else config.with_updates(memory_from_layer=config.n_layers)


def infinitrain_train_step(config: ModelConfig, segments: int, batch: int,
                           compiled: bool = False, memory: bool = True) -> Callable[[], None]:
    """The trainer's own step (infinitrain/training/module.py): hidden states, then the fused
    output layer + summed cross-entropy, chunked so that a window's full logits never exist;
    ``compiled``: with train.compile (the untimed warm-up step compiles); ``memory`` False:
    no layer has a memory (local attention only), to show what the memory costs."""
    from infinitrain.training.loss import supervised_loss_sum

    model = InfiniTransformer(benchmarked_config(config, memory)).train()
    if compiled:
        model.compile_blocks(dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    ids = random_tokens(config, batch, segments * config.segment_len)
    labels = random_tokens(config, batch, segments * config.segment_len)

    def step() -> None:
        hidden, _ = model.hidden_states(ids)
        (supervised_loss_sum(hidden, labels, model.lm_head) / labels.numel()).backward()
        adamw_step(optimizer)

    return step


def infinitrain_streamer(config: ModelConfig, window_segments: int,
                         max_tokens: int) -> Callable[[Tensor], None]:
    model = InfiniTransformer(config).eval()
    window = window_segments * config.segment_len

    def stream(ids: Tensor) -> None:
        state = None
        for chunk in ids.split(window, dim=1):
            _, state = model(chunk, state, logits_to_keep=1)

    return stream


def lucidrains_model(config: ModelConfig) -> nn.Module:
    """Its closest model to ``config``: its attention has no GQA (every query head has its own
    key/value head and memory) and its GEGLU feed-forward is sized by a multiple of d_model."""
    from infini_transformer_pytorch import InfiniTransformer as LucidrainsTransformer

    ff_mult = 1.5 * config.ffn_dim / config.d_model  # its inner width is int(mult · d · 2/3)
    model = LucidrainsTransformer(
        num_tokens=config.vocab_size, dim=config.d_model, depth=config.n_layers,
        dim_head=config.head_dim, heads=config.n_heads, ff_mult=ff_mult,
        use_mem_delta_rule=config.memory_rule == "delta")
    inner = model.layers[0][1].proj_out.in_features
    if inner != config.ffn_dim:
        raise ValueError(f"lucidrains FFN width {inner} != {config.ffn_dim}")
    return model


def lucidrains_train_step(config: ModelConfig, segments: int, batch: int) -> Callable[[], None]:
    """Its wrapper's training path: segment by segment, memories carried with their gradient
    through the whole window (detached only at its end), one backward."""
    from infini_transformer_pytorch import InfiniTransformerWrapper

    wrapper = InfiniTransformerWrapper(lucidrains_model(config), segment_length=config.segment_len,
                                       detach_mems_every_num_segments=segments)
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=LEARNING_RATE)
    sequence = random_tokens(config, batch, segments * config.segment_len + 1)  # + next token

    def step() -> None:
        wrapper(sequence, backward=True)  # runs the backward itself
        adamw_step(optimizer)

    return step


def lucidrains_streamer(config: ModelConfig, window_segments: int,
                        max_tokens: int) -> Callable[[Tensor], None]:
    """One segment per call, as its wrapper's training and generation do: a longer input would be
    one segment to it (full causal attention over it, one memory write)."""
    model = lucidrains_model(config).eval()

    def stream(ids: Tensor) -> None:
        memories = None
        for segment in ids.split(config.segment_len, dim=1):
            _, _, memories = model(segment, past_memories=memories, return_new_memories=True)

    return stream


def llama_model(config: ModelConfig, max_positions: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std, max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attn_implementation="sdpa")
    return LlamaForCausalLM(llama_config)


def llama_train_step(config: ModelConfig, segments: int, batch: int) -> Callable[[], None]:
    """transformers' own loss path: full logits of the window, shifted labels, mean CE."""
    model = llama_model(config, segments * config.segment_len).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    ids = random_tokens(config, batch, segments * config.segment_len)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        adamw_step(optimizer)

    return step


def llama_streamer(config: ModelConfig, window_segments: int,
                   max_tokens: int) -> Callable[[Tensor], None]:
    """Chunks of infinitrain's window length into one growing KV cache, last logits only."""
    from transformers import DynamicCache

    model = llama_model(config, max_tokens).eval()
    chunk_len = window_segments * config.segment_len
    # transformers 5.24 renamed ``past_key_values`` to ``cache``; the pinned range has both.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"

    def stream(ids: Tensor) -> None:
        cache = DynamicCache(config=model.config)  # filled in place by each call
        for chunk in ids.split(chunk_len, dim=1):
            model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{cache_arg: cache})

    return stream


@dataclass(frozen=True)
class Impl:
    name: str
    package: str | None
    """Import name of the package it needs beyond the project's dependencies, and its PyPI name."""
    pypi: str | None
    computes: str
    """What its training step and prefill compute, and where its shape differs."""
    train_step: Callable[[ModelConfig, int, int], Callable[[], None]]
    """(shape, segments, batch) -> one training step on fixed random tokens."""
    streamer: Callable[[ModelConfig, int, int], Callable[[Tensor], None]] | None
    """(shape, window segments, most tokens) -> prefill of [1, T] ids from an empty state;
    None: training only."""


IMPLS: dict[str, Impl] = {impl.name: impl for impl in (
    Impl("infinitrain", None, None,
         "train: model.hidden_states(window) from an empty state + supervised_loss_sum (fused "
         "output layer + summed CE in chunks, no full logits) + backward + AdamW. prefill: "
         "model(window of k segments, "
         "state, logits_to_keep=1).",
         infinitrain_train_step, infinitrain_streamer),
    Impl("infinitrain-compiled", None, None,
         "train: as infinitrain, with train.compile (torch.compile of every block; --compile "
         "only).",
         functools.partial(infinitrain_train_step, compiled=True), None),
    Impl("infinitrain-memory-off", None, None,
         "train: as infinitrain, with no layer's memory (model.memory_from_layer = n_layers: "
         "local attention only); its ratio is what the memory costs (--memory-off only).",
         functools.partial(infinitrain_train_step, memory=False), None),
    Impl("lucidrains", "infini_transformer_pytorch", "infini-transformer-pytorch",
         "train: InfiniTransformerWrapper(window, backward=True), segment by segment, delta rule, "
         "memories kept differentiable over the window (detach_mems_every_num_segments = k), "
         "full logits + CE per segment, + AdamW. prefill: one segment per call, memories "
         "carried, full logits of the segment. Shape: no GQA (kv heads = heads, so 2x the K/V "
         "projections and memories of a 2-kv-head shape), GEGLU FFN with biases (ff_mult chosen "
         "for the same inner width), untied embeddings, output layer with bias, einsum attention.",
         lucidrains_train_step, lucidrains_streamer),
    Impl("llama", None, None,
         "train: LlamaForCausalLM(window, labels=window), SDPA, full causal attention over the "
         "whole window, no memory, full logits + mean CE, + AdamW. prefill: chunks of k segments "
         "into a growing DynamicCache, logits_to_keep=1. Shape: equal (GQA, SwiGLU, tied).",
         llama_train_step, llama_streamer),
)}


def skip_reason(impl: Impl) -> str | None:
    """None if ``impl`` can run here, else the one line that says how to install it."""
    if impl.package is None:
        return None
    try:
        importlib.import_module(impl.package)
    except ImportError as error:
        return (f"{impl.name}: skipped ({error}); install the peers with "
                "`pip install -e '.[peers]'`")
    return None


# ----------------------------------------------------------------------------------------------
# 1. Training throughput


def parse_config(text: str) -> tuple[str, int]:
    """'SHAPE:SEGMENTS' -> (shape name, segments per window)."""
    shape, _, segments = text.partition(":")
    if shape not in SHAPES or not segments.isdigit() or int(segments) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SHAPE:SEGMENTS, SHAPE one of {', '.join(SHAPES)}")
    return shape, int(segments)


def ratios(rates: dict[str, float]) -> dict[str, float]:
    """infinitrain/peer of each peer's rate (above 1: infinitrain is faster)."""
    return {f"infinitrain/{name}": rates["infinitrain"] / rate
            for name, rate in rates.items() if name != "infinitrain"}


def train_benchmark(impls: list[Impl], config_text: str, batch: int, rounds: int,
                    steps: int) -> dict[str, Any]:
    shape_name, segments = parse_config(config_text)
    config = SHAPES[shape_name]
    steps_by_impl = {}
    for impl in impls:
        torch.manual_seed(0)
        steps_by_impl[impl.name] = impl.train_step(config, segments, batch)
    timings = interleaved(steps_by_impl, rounds=rounds, steps=steps)
    tokens = batch * segments * config.segment_len
    rates = {name: median_rate(seconds, tokens) for name, seconds in timings.items()}
    return {"config": config_text, "shape": shape_name, "segments": segments, "batch": batch,
            "tokens_per_step": tokens, "seconds": timings, "tokens_per_s": rates,
            "ratios": ratios(rates)}


# ----------------------------------------------------------------------------------------------
# 2. Streaming prefill, each run in a fresh process


def prefill_child(impl_name: str, shape_name: str, tokens: int, window_segments: int) -> dict:
    """Inside the child: stream ``tokens`` tokens after a one-window warm-up stream."""
    config = SHAPES[shape_name]
    torch.manual_seed(0)
    stream = IMPLS[impl_name].streamer(config, window_segments, tokens)
    ids = random_tokens(config, 1, tokens)
    with torch.inference_mode():
        stream(ids[:, :window_segments * config.segment_len])
        before = process_peak_rss_bytes()
        start = time.perf_counter()
        stream(ids)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mib": process_peak_rss_bytes() / MiB, "rss_before_mib": before / MiB}


def prefill_run(impl: Impl, shape_name: str, tokens: int, window_segments: int) -> dict:
    """One (impl, length) prefill in a fresh process: the peak RSS is that run's alone."""
    command = [sys.executable, __file__, "--prefill-child", impl.name, shape_name, str(tokens),
               "--prefill-window", str(window_segments)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last_lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": last_lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def prefill_benchmark(impls: list[Impl], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per length, each impl in turn, ``--prefill-rounds`` times (tokens/s: the median run;
    peak RSS: the highest); Llama above --llama-max-prefill is skipped (its attention over the
    KV cache grows with the square of the length: 256K takes many minutes)."""
    results = []
    for tokens in args.prefill_tokens:
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.prefill_rounds):
            for impl in impls:
                if impl.streamer is None:
                    continue
                if impl.name == "llama" and tokens > args.llama_max_prefill:
                    runs[impl.name] = [{"skipped": "above --llama-max-prefill "
                                                   f"{args.llama_max_prefill}"}]
                    continue
                print(f"prefill {tokens:,} tokens, round {round_ + 1}: {impl.name} …",
                      file=sys.stderr, flush=True)
                runs.setdefault(impl.name, []).append(
                    prefill_run(impl, args.prefill_shape, tokens, args.prefill_window))
        summary = {name: combined(rounds) for name, rounds in runs.items()}
        rates = {name: run["tokens_per_s"] for name, run in summary.items()
                 if "tokens_per_s" in run}
        results.append({"tokens": tokens, "runs": summary, "rounds": runs,
                        "ratios": ratios(rates) if "infinitrain" in rates else {}})
    return results


def combined(rounds: list[dict]) -> dict:
    """One (impl, length)'s runs as one: the median tokens/s and the highest peak RSS; the first
    skip or failure if any run had one."""
    timed = [run for run in rounds if "tokens_per_s" in run]
    if len(timed) < len(rounds):
        return next(run for run in rounds if "tokens_per_s" not in run)
    return {"tokens_per_s": statistics.median(run["tokens_per_s"] for run in timed),
            "peak_rss_mib": max(run["peak_rss_mib"] for run in timed),
            "rss_before_mib": max(run["rss_before_mib"] for run in timed)}


# ----------------------------------------------------------------------------------------------
# Report


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("transformers", "infini-transformer-pytorch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def report_training(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    names = list(results[0]["tokens_per_s"])
    peers = [f"infinitrain/{name}" for name in names if name != "infinitrain"]
    lines = [f"training tokens/s (median of {args.rounds} rounds × {args.steps} steps, "
             "interleaved; forward + CE + backward + AdamW):",
             f"  {'config':<11}{'batch×tokens':>13}" + "".join(f"{n:>{_width(n)}}" for n in names)
             + "".join(f"{p:>{_width(p)}}" for p in peers)]
    for result in results:
        shape = f"{result['batch']}×{result['tokens_per_step'] // result['batch']}"
        lines.append(f"  {result['config']:<11}{shape:>13}"
                     + "".join(f"{result['tokens_per_s'][n]:>{_width(n)},.0f}" for n in names)
                     + "".join(f"{result['ratios'][p]:>{_width(p) - 1}.2f}×" for p in peers))
    return lines


def _width(column: str) -> int:
    """A column's width: its name's and two spaces, at least 13."""
    return max(13, len(column) + 2)


def describe_run(run: dict[str, Any]) -> str:
    if "tokens_per_s" in run:
        return (f"{run['tokens_per_s']:>9,.0f} tok/s, peak RSS {run['peak_rss_mib']:,.0f} MiB "
                f"({run['rss_before_mib']:,.0f} before)")
    return f"skipped ({run['skipped']})" if "skipped" in run else f"failed: {run['error']}"


def report_prefill(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [f"streaming prefill ({args.prefill_shape}, batch 1, inference mode, one fresh "
             f"process per run, window {args.prefill_window} segments, median of "
             f"{args.prefill_rounds} run(s) in turns):"]
    for result in results:
        lines.append(f"  {result['tokens'] // 1024}K tokens:")
        lines.extend(f"    {name:<12}{describe_run(run)}" for name, run in result["runs"].items())
        lines.extend(f"    tok/s {pair} {value:.2f}×" for pair, value in result["ratios"].items())
    return lines


def header(versions: dict[str, str | None], threads: int, skipped: list[str]) -> str:
    """Printed before any timing: the versions and threads the figures belong to, and what
    will not run."""
    named = ", ".join(f"{name} {v}" for name, v in versions.items() if v)
    return "\n".join([f"{named}; {threads} threads", *skipped])


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["what each side computes:"]
    lines += [textwrap.fill(f"{impl.name}: {impl.computes}", width=100, initial_indent="  ",
                            subsequent_indent="    ")
              for impl in IMPLS.values() if impl.name in results["impls"]]
    if results["training"]:
        lines += report_training(results["training"], args)
    if results["prefill"]:
        lines += report_prefill(results["prefill"], args)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="SHAPE:SEGMENTS",
                        help=f"training windows, shapes {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="streams per training step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per impl and round")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[16_384, 65_536, 262_144])
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--prefill-rounds", type=int, default=1,
                        help="prefill runs per impl and length, in turns (tok/s: the median)")
    parser.add_argument("--prefill-shape", choices=SHAPES, default="tiny")
    parser.add_argument("--prefill-window", type=int, default=PREFILL_WINDOW_SEGMENTS,
                        help="segments per infinitrain call and per Llama cache chunk")
    parser.add_argument("--llama-max-prefill", type=int, default=65_536,
                        help="longest Llama prefill (tokens); longer lengths are skipped")
    parser.add_argument("--compile", action="store_true",
                        help="also time infinitrain's training step with train.compile")
    parser.add_argument("--memory-off", action="store_true",
                        help="also time infinitrain's training step without any memory (local "
                             "attention only): what the memory costs, side by side")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny:4, 2 rounds of 1 step, prefill 2K tokens")
    parser.add_argument("--json", type=Path, help="also write every raw timing here")
    parser.add_argument("--prefill-child", nargs=3, metavar=("IMPL", "SHAPE", "TOKENS"),
                        help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    for text in args.configs:
        parse_config(text)  # fail before any timing
    if args.prefill_rounds < 1:
        parser.error(f"--prefill-rounds {args.prefill_rounds}: must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefill_child:
        impl_name, shape_name, tokens = args.prefill_child
        print(json.dumps(prefill_child(impl_name, shape_name, int(tokens), args.prefill_window)))
        return 0
    opted_out = {"infinitrain-compiled": not args.compile,
                 "infinitrain-memory-off": not args.memory_off}
    chosen = {name: impl for name, impl in IMPLS.items() if not opted_out.get(name)}
    reasons = {name: skip_reason(impl) for name, impl in chosen.items()}
    impls = [impl for name, impl in chosen.items() if reasons[name] is None]
    versions, skipped = package_versions(), [reason for reason in reasons.values() if reason]
    print(header(versions, torch.get_num_threads(), skipped), flush=True)
    training = []
    for config_text in [] if args.no_training else args.configs:
        print(f"training {config_text} …", file=sys.stderr, flush=True)
        training.append(train_benchmark(impls, config_text, args.batch, args.rounds, args.steps))
    results = {"versions": versions, "threads": torch.get_num_threads(),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "impls": [impl.name for impl in impls],
               "skipped": skipped,
               "training": training,
               "prefill": [] if args.no_prefill else prefill_benchmark(impls, args)}
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
