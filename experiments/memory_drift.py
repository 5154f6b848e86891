"""Reproduces docs/memory-length.md, "What breaks at length: memory drift": does the memory's
drift, not the needle's loss, break passkey retrieval at length? Three checks on a trained model
(a run directory or model directory).

    python experiments/memory_drift.py freeze MODEL --length 4000 --depth 0.97 \
        --freeze 256:3700 --layers 0
    python experiments/memory_drift.py keys MODEL
    python experiments/memory_drift.py writes MODEL --length 1000 --depth 0.5
    python experiments/memory_drift.py writes MODEL --length 4000 --depth 0 \
        --haystack data/pg19-sample
    python experiments/memory_drift.py embeddings MODEL --haystack data/pg19-sample

``freeze`` streams Landmark passkey prompts segment by segment and, between the two token counts
of ``--freeze``, puts the memory of ``--layers`` back to its state at the first count after every
segment, so those layers see no filler accumulate there; it prints exact-match accuracy.
``keys`` prints, per layer and key/value head, how many distinct memory keys the periodic filler
writes and the singular values of their feature matrix (the conditioning of what memory stores).
``writes`` prints, for a model with a write gate, how strongly the filler, the needle and the rest
of one prompt write into each layer's memory (docs/memory-length.md,
"The write gate: length stops mattering"); with ``--haystack`` the needle hides in that text and
the text's tokens that write are listed ("Numbers in the haystack").
``embeddings`` prints how alike the input embeddings are of the haystack's most frequent tokens
that no passkey prompt in the filler contains, against those of the filler's own tokens (mean
pairwise cosine): what a model trained on the filler alone reads a book as (docs/memory-length.md,
"Prose in stage 2").
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from infinitrain.data.passkey import PasskeyGenerator, load_haystack
from infinitrain.data.sources import source_for
from infinitrain.data.tokenizer import load_tokenizer
from infinitrain.evaluation.passkey import first_integer
from infinitrain.inference.loading import load_model


class FrozenStream:
    """Streams tokens through ``model``; while between the two counts of ``window``, puts the
    memory of ``layers`` back to its state at the first count after every call."""

    def __init__(self, model, window: tuple[int, int], layers: list[int]) -> None:
        self.model, self.window, self.layers = model, window, layers
        self.state, self.read, self.frozen = None, 0, {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model(ids, self.state)
        self.read += ids.shape[1]
        if self.window[0] <= self.read < self.window[1]:
            for layer in self.layers:
                memory = self.state.layers[layer]
                kept = self.frozen.setdefault(layer, (memory.memory.clone(), memory.norm.clone()))
                memory.memory, memory.norm = kept
        return logits


def freeze_accuracy(model, tokenizer, length: int, depth: float, window: tuple[int, int],
                    layers: list[int], samples: int) -> float:
    generator, n = PasskeyGenerator(tokenizer), model.config.segment_len
    correct = 0
    for index in range(samples):
        sample = generator.sample(length, depth, seed=1000 + index)
        stream, ids = FrozenStream(model, window, layers), sample.prompt_ids[None]
        while stream.read < ids.shape[1]:  # segment by segment
            logits = stream(ids[:, stream.read:stream.read + n - stream.read % n])
        answer = []
        for _ in range(8):
            token = logits[0, -1].argmax()
            if int(token) == tokenizer.eos_id:
                break
            answer.append(int(token))
            logits = stream(token.view(1, 1))
        correct += first_integer(tokenizer.decode(answer)) == sample.key
    return correct / samples


def raw_keys(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: the raw keys [T, H_kv, d] that ``ids`` [T] writes}, read in one forward."""
    config, keys = model.config, {}
    hooks = [block.attn.k_proj.register_forward_hook(
        lambda module, inputs, out, i=i: keys.setdefault(i, out)) for i, block in
        enumerate(model.layers)]
    model(ids[None])
    for hook in hooks:
        hook.remove()
    return {layer: k[0].view(len(ids), config.n_kv_heads, config.head_dim)
            for layer, k in keys.items()}


def key_conditioning(model, tokenizer) -> None:
    config = model.config
    keys = raw_keys(model, PasskeyGenerator(tokenizer).filler(1200))
    for layer, k in sorted(keys.items()):
        k = k[-600:]
        for head in range(config.n_kv_heads):
            features = model.layers[layer].attn.features(k[:, head])
            distinct = torch.unique(features.round(decimals=4), dim=0)
            values = torch.linalg.svdvals(distinct)
            print(f"layer {layer} kv head {head}: {len(distinct)} distinct keys in "
                  f"{config.head_dim} dims, singular values {values[0]:.2f} … {values[-1]:.4f}, "
                  f"{int((values < 0.05).sum())} below 0.05")


def write_strengths(model, tokenizer, length: int, depth: float, haystack: str | None) -> None:
    """Mean write strength β and the share of tokens writing at all (β > 0), per layer with a
    write gate, over the filler, the needle and the rest (task, question) of one prompt. With
    ``haystack`` the needle hides in that text, and the text's tokens that write are listed: a
    book's own numbers, written over the key (docs/memory-length.md, "Numbers in the haystack")."""
    text = None if haystack is None else load_haystack(source_for(haystack, split="test"),
                                                       tokenizer)
    generator = PasskeyGenerator(tokenizer, haystack=text)
    sample = generator.sample(length, depth, seed=1000)
    needle = torch.zeros(length, dtype=torch.bool)
    needle[sample.needle_offset:sample.needle_offset + sample.needle_len] = True
    if text is None:
        filler = torch.isin(sample.prompt_ids, generator.filler(100)) & ~needle
    else:  # the positions between the task and the question, less the needle's line
        newline = len(generator.newline)
        filler = torch.zeros(length, dtype=torch.bool)
        filler[len(generator.head) + newline:length - newline - len(generator.question)] = True
        filler[sample.needle_offset - newline:
               sample.needle_offset + sample.needle_len + newline] = False
    name = "filler" if text is None else "text"
    parts = {name: filler, "needle": needle, "task+question": ~filler & ~needle}
    for layer, k in sorted(raw_keys(model, sample.prompt_ids).items()):
        if not model.layers[layer].attn.has_memory:
            continue
        strength = model.layers[layer].attn.write_strength(k)
        if strength is None:
            continue
        for head in range(strength.shape[1]):
            writing = Counter(tokenizer.decode([token]) for token in
                              sample.prompt_ids[filler & (strength[:, head] > 0)].tolist())
            print(f"layer {layer} kv head {head}: " + ", ".join(
                f"{part} β {strength[mask, head].mean():.4f} "
                f"({(strength[mask, head] > 0).float().mean():.0%} writing)"
                for part, mask in parts.items()) + (
                f"; {name} tokens writing: {dict(writing.most_common(8))}" if text is not None
                else ""))


def embedding_similarity(model, tokenizer, haystack: str, tokens: int = 300) -> None:
    """Mean pairwise cosine of the input embeddings of the ``tokens`` most frequent tokens in the
    first 20,000 of ``haystack`` that a filler prompt lacks, and of the filler prompt's tokens."""
    filler = set(PasskeyGenerator(tokenizer).sample(4000, 0.5, seed=1000).prompt_ids.tolist())
    text = load_haystack(source_for(haystack, split="test"), tokenizer)[:20_000]
    counts = torch.bincount(text, minlength=model.config.vocab_size)
    unseen = [t for t in counts.argsort(descending=True).tolist()
              if t not in filler and counts[t] > 0][:tokens]
    weight = torch.nn.functional.normalize(model.embed_tokens.weight, dim=1)
    for name, ids in ((f"{len(unseen)} haystack tokens the filler lacks", unseen),
                      (f"{len(filler)} filler-prompt tokens", sorted(filler))):
        rows = weight[ids]
        cosine = (rows @ rows.T).sum().sub(len(ids)) / (len(ids) * (len(ids) - 1))
        print(f"{name}: mean pairwise cosine {cosine:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["freeze", "keys", "writes", "embeddings"])
    parser.add_argument("model")
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--depth", type=float, default=0.97)
    parser.add_argument("--freeze", default="0:0", help="FROM:TO tokens; 0:0 freezes nothing")
    parser.add_argument("--layers", default="0", help="comma-separated layer indices")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--haystack", default=None,
                        help="writes: hide the needle in this text; embeddings: the text whose "
                             "tokens to compare (default data/pg19-sample); as eval passkey's")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, "cpu")
    model, tokenizer = loaded.model.eval(), load_tokenizer(loaded.tokenizer_dir or "data/tokenizer")
    if args.check == "keys":
        key_conditioning(model, tokenizer)
        return
    if args.check == "writes":
        write_strengths(model, tokenizer, args.length, args.depth, args.haystack)
        return
    if args.check == "embeddings":
        embedding_similarity(model, tokenizer, args.haystack or "data/pg19-sample")
        return
    start, stop = (int(x) for x in args.freeze.split(":"))
    layers = [int(x) for x in args.layers.split(",")]
    accuracy = freeze_accuracy(model, tokenizer, args.length, args.depth, (start, stop), layers,
                               args.samples)
    print(f"{args.length} tokens, depth {args.depth}, layers {layers} frozen over "
          f"[{start}, {stop}): {accuracy:.0%}")


if __name__ == "__main__":
    main()
