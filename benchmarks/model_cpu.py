"""CPU benchmark of the core model, printed as ratios measured side by side in one run.

1. Throughput: a window of k segments in one call (all segments' local attention batched) vs the
   same tokens fed one segment per call, forward+backward and forward-only, each with the
   trainer's loss (the fused output layer + cross-entropy), so that both read the logits alike and
   what differs is the model's own work. After a warm-up call of each, the two take turns for
   --repeats rounds (benchmarks/timing.py); medians over rounds.
2. Bounded memory: peak RSS of a streaming forward over 16K vs 256K tokens, each in a fresh process.

    python benchmarks/model_cpu.py [--preset tiny] [--segments 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from timing import interleaved, median_rate  # benchmarks/ is on sys.path when run as a script

from infinitrain.model import InfiniTransformer, preset
from infinitrain.training.loss import supervised_loss_sum


def throughput(model: InfiniTransformer, batch: int, segments: int, repeats: int) -> dict:
    n = model.config.segment_len
    ids = torch.randint(0, model.config.vocab_size, (batch, segments * n))
    targets = torch.randint(0, model.config.vocab_size, (batch, segments * n))

    def loss(hidden, labels):  # summed, so both variants backpropagate the same gradient
        return supervised_loss_sum(hidden, labels, model.lm_head)

    def window(backward: bool):
        hidden, _ = model.hidden_states(ids)
        total = loss(hidden, targets)
        if backward:
            total.backward()

    def per_segment(backward: bool):
        state, total = None, 0.0
        for s in range(segments):
            hidden, state = model.hidden_states(ids[:, s * n:(s + 1) * n], state)
            total = total + loss(hidden, targets[:, s * n:(s + 1) * n])
        if backward:
            total.backward()

    results = {}
    for label, backward in (("forward+backward", True), ("forward", False)):
        context = torch.enable_grad() if backward else torch.inference_mode()
        with context:
            timings = interleaved({"parallel": lambda b=backward: window(b),
                                   "serial": lambda b=backward: per_segment(b)}, rounds=repeats)
        results[label] = (median_rate(timings["parallel"], ids.numel()),
                          median_rate(timings["serial"], ids.numel()))
    return results


def stream_peak_rss(preset_name: str, tokens: int, window_segments: int) -> int:
    """Run in a child process: stream ``tokens`` through the model, return peak RSS in KiB."""
    code = (
        "import torch\n"
        "from infinitrain.evaluation.resources import process_peak_rss_bytes\n"
        "from infinitrain.model import InfiniTransformer, preset\n"
        f"model = InfiniTransformer(preset({preset_name!r})).eval()\n"
        "n = model.config.segment_len\n"
        f"window = {window_segments} * n\n"
        "state = None\n"
        "with torch.inference_mode():\n"
        f"    for _ in range({tokens} // window):\n"
        "        ids = torch.randint(0, model.config.vocab_size, (1, window))\n"
        "        _, state = model(ids, state, logits_to_keep=1)\n"
        "print(process_peak_rss_bytes() // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = InfiniTransformer(preset(args.preset))
    n = model.config.segment_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"window {args.segments} × {n} tokens, batch {args.batch}")
    for label, (parallel, serial) in throughput(model, args.batch, args.segments,
                                                args.repeats).items():
        print(f"{label:>17}: window-parallel {parallel:9,.0f} tok/s | one segment per call "
              f"{serial:9,.0f} tok/s | ratio {parallel / serial:.2f}×")

    short, long = 16_384, 262_144
    rss_short = stream_peak_rss(args.preset, short, args.segments)
    rss_long = stream_peak_rss(args.preset, long, args.segments)
    print(f"streaming peak RSS: {short // 1024}K tokens {rss_short / 1024:.0f} MiB | "
          f"{long // 1024}K tokens {rss_long / 1024:.0f} MiB | ratio {rss_long / rss_short:.3f}×")


if __name__ == "__main__":
    main()
