"""The training step of another checkout of infinitrain against this one, in turns, one process.

What a change to the model or the loss buys, as a paired ratio: the other checkout (e.g. a
worktree of the commit before, ``git worktree add /tmp/before COMMIT``) is imported under another
package name, both steps run on the same tokens and are timed A B A B … (``timing.py``).

    python benchmarks/before_after.py /tmp/before [--shape tiny|4x-tiny]
        [--rules delta deltanet linear] [--segments 4 16] [--rounds 7] [--steps 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from peers import SHAPE_OVERRIDES, SHAPES
from timing import interleaved, median_rate  # benchmarks/ is on sys.path when run as a script

BATCH = 4
BEFORE = "infinitrain_before"
"""The package name the other checkout is imported under."""


def import_checkout(root: Path) -> ModuleType:
    """The ``infinitrain`` package of the checkout at ``root``, as :data:`BEFORE`."""
    package = root / "infinitrain"
    spec = importlib.util.spec_from_file_location(
        BEFORE, package / "__init__.py", submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"{root}: no infinitrain package there")
    module = importlib.util.module_from_spec(spec)
    sys.modules[BEFORE] = module
    spec.loader.exec_module(module)
    return module


def loss_function(package: str) -> Callable:
    """The trainer's loss of ``package``: ``training/loss.py``, or ``training/module.py`` in
    checkouts that predate it."""
    try:
        return importlib.import_module(f"{package}.training.loss").supervised_loss_sum
    except ModuleNotFoundError:
        return importlib.import_module(f"{package}.training.module").supervised_loss_sum


def training_step(package: str, shape: str, rule: str, segments: int) -> Callable[[], None]:
    """One training step of ``package``'s model of ``shape`` on fixed tokens: hidden states,
    the trainer's loss, backward, AdamW."""
    model_module = importlib.import_module(f"{package}.model")
    loss = loss_function(package)
    torch.manual_seed(0)
    model = model_module.InfiniTransformer(
        model_module.preset("tiny", memory_rule=rule, **SHAPE_OVERRIDES[shape]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    length = segments * model.config.segment_len
    ids = torch.randint(0, model.config.vocab_size, (BATCH, length))
    labels = torch.randint(0, model.config.vocab_size, (BATCH, length))

    def step() -> None:
        hidden, _ = model.hidden_states(ids)
        (loss(hidden, labels, model.lm_head) / labels.numel()).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the other checkout's root directory")
    parser.add_argument("--shape", choices=SHAPE_OVERRIDES, default="tiny")
    parser.add_argument("--rules", nargs="+", default=["delta", "deltanet", "linear"])
    parser.add_argument("--segments", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import_checkout(args.before)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.shape}, "
          f"batch {BATCH}; before: {args.before}", flush=True)
    segment_len = SHAPES[args.shape].segment_len
    results = []
    for rule in args.rules:
        for segments in args.segments:
            timings = interleaved({"before": training_step(BEFORE, args.shape, rule, segments),
                                   "after": training_step("infinitrain", args.shape, rule,
                                                          segments)},
                                  rounds=args.rounds, steps=args.steps)
            tokens = BATCH * segments * segment_len
            rates = {name: median_rate(seconds, tokens) for name, seconds in timings.items()}
            ratio = rates["after"] / rates["before"]
            results.append({"shape": args.shape, "rule": rule, "segments": segments,
                            "tokens_per_s": rates, "after_over_before": ratio,
                            "seconds": timings})
            print(f"{rule:>9}, {segments:>2} segments: before {rates['before']:,.0f} tok/s, "
                  f"after {rates['after']:,.0f} tok/s, after/before {ratio:.2f}×", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
