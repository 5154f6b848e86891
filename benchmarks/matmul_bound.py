"""How fast infinitrain's training step could be against lucidrains' if all but its matrix
products cost nothing: the ceiling of the training ratio at equal shapes.

Both steps are timed in turns as ``peers.py`` times them, then infinitrain's is profiled for the
time its matrix products take (``aten::mm``/``addmm``/``bmm``/``baddbmm``, plus the local
attention kernel, itself matrix products). A step can be no faster than its own matrix
products, which an eager implementation does not make cheaper at a fixed precision; so
lucidrains' step time divided by infinitrain's matrix-product time bounds the ratio any rewrite
of the rest could reach.

    OMP_NUM_THREADS=1 python benchmarks/matmul_bound.py [--configs tiny:4 4x-tiny:16 ...]

Needs the peer installed (``pip install -e '.[peers]'``).
"""

from __future__ import annotations

import argparse

import torch
from peers import DEFAULT_CONFIGS, IMPLS, SHAPES, parse_config, train_benchmark
from torch.profiler import ProfilerActivity, profile

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
COMPARED = ("infinitrain", "lucidrains")


def matmul_seconds(step, repeats: int = 3) -> float:
    """Self time per step of the matrix products and the attention kernel, from the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    return sum(event.self_cpu_time_total for event in prof.key_averages()
               if event.key in MATMUL_OPS or "scaled_dot_product" in event.key) / repeats / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'config':<12}{'infinitrain ms':>16}{'lucidrains ms':>15}{'ratio':>8}"
          f"{'matmul ms':>11}{'matmul share':>14}{'ceiling':>9}")
    for text in args.configs:
        timed = train_benchmark([IMPLS[name] for name in COMPARED], text, args.batch,
                                args.rounds, steps=2)
        ours, theirs = (timed["tokens_per_step"] / timed["tokens_per_s"][name]
                        for name in COMPARED)
        shape, segments = parse_config(text)
        torch.manual_seed(0)
        step = IMPLS["infinitrain"].train_step(SHAPES[shape], segments, args.batch)
        step()  # warm-up: the profile times steps as the benchmark did, after the first
        matmul = matmul_seconds(step)
        print(f"{text:<12}{ours * 1e3:>16.1f}{theirs * 1e3:>15.1f}{theirs / ours:>7.2f}×"
              f"{matmul * 1e3:>11.1f}{matmul / ours:>14.0%}{theirs / matmul:>8.2f}×", flush=True)


if __name__ == "__main__":
    main()
