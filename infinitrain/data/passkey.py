"""Passkey retrieval prompts in the Landmark Attention format (docs/design.md §1), at any length.

Prompts are assembled from token ids, never from a long string: the filler is tokenized once and
tiled, so a 1M-token prompt costs a tensor repeat. The layout is Landmark's ``"\\n".join`` of task,
filler, needle, filler, question; the depth sets how much of the filler goes before the needle.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .documents import Document
from .sources import DocumentSource, Skipped
from .tokenizer import Tokenizer

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt and its expected answer."""

    prompt_ids: Tensor
    """[length] int64: BOS, task, filler, needle, filler, question (ends with 'The pass key is')."""
    answer_ids: list[int]
    """Tokens of ' {key}', the continuation a model should generate."""
    key: int
    """The number hidden in the needle; score a generation by its first integer."""
    depth: float
    """Requested depth in [0, 1]: the share of the filler placed before the needle."""
    needle_offset: int
    """Index in ``prompt_ids`` of the needle's first token."""
    needle_len: int
    """Tokens in the needle sentence."""

    def to_document(self, eos_id: int) -> Document:
        """A fine-tuning example: the prompt is read; the answer and the EOS that ends it are
        supervised (a model that never learnt to stop runs on into more digits, and the first
        integer of its output is then wrong however well it retrieved)."""
        return Document.from_parts([(self.prompt_ids, False), (self.answer_ids, True),
                                    ([eos_id], True)])


class PasskeyGenerator:
    """Passkey samples of a given length and depth, deterministic by seed, for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, key_min: int = 1, key_max: int = 50_000,
                 filler: str = FILLER) -> None:
        self.tokenizer = tokenizer
        self.key_min, self.key_max = key_min, key_max
        encode = tokenizer.encode
        self.head = encode(TASK, bos=True)
        self.newline = encode("\n")
        self.question = encode(QUESTION)
        # Landmark joins filler repetitions with a space: "F F F ..." -> [F][ F][ F]...
        self.filler_first = torch.tensor(encode(filler), dtype=torch.long)
        self.filler_next = torch.tensor(encode(" " + filler), dtype=torch.long)
        self.frame_tokens = len(self.head) + 4 * len(self.newline) + len(self.question)
        """Prompt tokens that are neither filler nor needle."""

    def filler(self, n: int, start: int = 0) -> Tensor:
        """Tokens ``start`` to ``start + n`` of the endlessly repeated filler."""
        first, step = len(self.filler_first), len(self.filler_next)
        head = self.filler_first[start:start + n]
        offset = max(start - first, 0)  # into the repeated part
        skip = offset % step
        reps = math.ceil((skip + n - len(head)) / step)
        tail = self.filler_next.repeat(reps)[skip:skip + n - len(head)]
        return torch.cat([head, tail])

    def sample(self, length: int, depth: float, seed: int) -> PasskeySample:
        """A prompt of exactly ``length`` tokens with the needle at ``depth`` (0 start, 1 end)."""
        parts, sample = self._layout(length, depth, seed)
        prompt = torch.cat([self.filler(p) if isinstance(p, int) else p for p in parts])
        return PasskeySample(prompt_ids=prompt, **sample)

    def check_length(self, length: int) -> None:
        """ValueError if ``length`` tokens cannot hold a prompt, found without making one."""
        self._layout(length, 0.0, seed=0)

    def stream(self, length: int, depth: float, seed: int,
               chunk_tokens: int) -> tuple[PasskeySample, Iterator[Tensor]]:
        """The prompt of :meth:`sample` as pieces of at most ``chunk_tokens`` tokens, made as they
        are read: a prompt of any length (a billion tokens would be 8 GB as one tensor) costs one
        chunk of memory. The sample's ``prompt_ids`` is empty."""
        parts, sample = self._layout(length, depth, seed)
        return PasskeySample(prompt_ids=torch.empty(0, dtype=torch.long), **sample), \
            self._chunks(parts, chunk_tokens)

    def _chunks(self, parts: list[Tensor | int], chunk_tokens: int) -> Iterator[Tensor]:
        for part in parts:
            if not isinstance(part, int):
                yield part
                continue
            for start in range(0, part, chunk_tokens):
                yield self.filler(min(chunk_tokens, part - start), start)

    def _layout(self, length: int, depth: float, seed: int) -> tuple[list[Tensor | int], dict]:
        """The prompt's parts (token tensors, or an int n for the first n filler tokens) and the
        fields of its PasskeySample but the prompt."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth = {depth}: must be in [0, 1]")
        key = int(np.random.default_rng(seed).integers(self.key_min, self.key_max + 1))
        needle = self.tokenizer.encode(NEEDLE.format(key=key))
        budget = length - self.frame_tokens - len(needle)
        if budget < 0:
            raise ValueError(f"passkey length = {length} tokens: too short, the prompt without "
                             f"filler takes {length - budget} tokens")
        before = round(depth * budget)
        nl = self.newline
        parts = [self.head, nl, before, nl, needle, nl, budget - before, nl, self.question]
        return [p if isinstance(p, int) else torch.as_tensor(p, dtype=torch.long)
                for p in parts], dict(
            answer_ids=self.tokenizer.encode(f" {key}"), key=key, depth=depth,
            needle_offset=len(self.head) + 2 * len(nl) + before, needle_len=len(needle))


class PasskeySource(DocumentSource):
    """Endless passkey fine-tuning documents: lengths uniform over ``lengths[0]``, + step, … up
    to ``lengths[1]``, depths uniform in [depth_min, depth_max]."""

    def __init__(self, generator: PasskeyGenerator, lengths: tuple[int, int], depth_min: float,
                 depth_max: float, label: str, weight: float, length_step: int = 1) -> None:
        super().__init__(label, weight)
        self.generator = generator
        self.lengths = lengths
        self.length_step = length_step
        self.depth_min, self.depth_max = depth_min, depth_max
        generator.sample(lengths[0], depth_min, seed=0)  # fail now if a length cannot hold a prompt

    def epoch(self, rank: int, world_size: int, epoch: int, seed: int,
              start: int = 0) -> Iterator[Document | Skipped]:
        position = start
        while True:  # synthetic: an epoch never ends, every position is a fresh sample
            rng = np.random.default_rng([seed, world_size, rank, epoch, position])
            depth = float(rng.uniform(self.depth_min, self.depth_max))
            steps = (self.lengths[1] - self.lengths[0]) // self.length_step
            length = self.lengths[0] + self.length_step * int(rng.integers(steps + 1))
            sample = self.generator.sample(length, depth, seed=int(rng.integers(2**62)))
            yield sample.to_document(self.generator.tokenizer.eos_id)
            position += 1
