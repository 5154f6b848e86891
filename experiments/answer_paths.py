"""Which path each passkey source of a recipe teaches, for docs/memory-length.md, "Which path a
phase teaches": the share of its prompts whose answer must come through memory, because no copy
of the key lies within the local attention of the question's last token, against the share that
local attention can answer by copying a key in its own segment (the needle's, or its repeat).

    python experiments/answer_paths.py passkey-tiny --samples 1000

The prompts are the source's own (its first epoch at seed 0); local attention reads the
question's own segment and the recipe's ``model.local_overlap`` tokens before it.
"""

from __future__ import annotations

import argparse
from itertools import islice

from infinitrain.data.build import build_sources
from infinitrain.data.passkey import PasskeySample, PasskeySource
from infinitrain.data.tokenizer import load_tokenizer
from infinitrain.recipe import load_recipe


def needs_memory(sample: PasskeySample, segment_len: int, overlap: int) -> bool:
    """Whether no copy of the key lies within the local attention of the question's last token
    (the position that predicts the answer's first token). The needle's second copy of the key
    (``key_copy``) is its last, so no copy is local when that one starts before local attention."""
    last = len(sample.prompt_ids) - 1
    local_start = max(0, last // segment_len * segment_len - overlap)
    return sample.key_copy[0] < local_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a shipped recipe's name or a recipe file")
    parser.add_argument("--samples", type=int, default=1000, help="prompts drawn per source")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE", help="a recipe override, as for pretrain")
    args = parser.parse_args()
    _, recipe = load_recipe(args.recipe, args.overrides)
    model = recipe.model_config
    configs = recipe.data.sources
    sources = build_sources(configs, load_tokenizer(recipe.data.tokenizer))
    print(f"segment {model.segment_len} tokens, local overlap {model.local_overlap}; "
          f"{args.samples} prompts per source")
    for config, source in zip(configs, sources, strict=True):
        if not isinstance(source, PasskeySource):
            continue
        samples = islice(source.samples(rank=0, world_size=1, epoch=0, seed=0), args.samples)
        memory = sum(needs_memory(sample, model.segment_len, model.local_overlap)
                     for sample in samples)
        until = "end" if config.until_step is None else config.until_step - 1
        print(f"{source.label}, steps {config.from_step}–{until}, weight {config.weight:g}: "
              f"memory only {100 * memory / args.samples:.1f}%, "
              f"a key within local attention {100 * (1 - memory / args.samples):.1f}%")


if __name__ == "__main__":
    main()
