"""Passkey retrieval prompts in the Landmark Attention format (docs/design.md §1), at any length.

Prompts are assembled from token ids, never from a long string: the filler is tokenized once and
tiled, so a 1M-token prompt costs a tensor repeat. The layout is Landmark's ``"\\n".join`` of task,
filler, needle, filler, question; the depth sets how much of the filler goes before the needle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .documents import Document
from .sources import DataSourceError, DocumentSource, Skipped, SourceConfig, text_source
from .tokenizer import Tokenizer

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
NEEDLE_PIECES = ("The pass key is {key}. Remember it.", " {key}", " is the pass key.")
"""The needle in three pieces, tokenized apart (the same ids as the whole sentence) so that the
position of the repeated key is known."""
NEEDLE = "".join(NEEDLE_PIECES)
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
    key_copy: tuple[int, int]
    """[start, end) in ``prompt_ids`` of the needle's second ' {key}', which repeats the first."""

    def to_document(self, eos_id: int, supervise_key_copy: bool = False,
                    supervise_prompt: bool = False) -> Document:
        """A fine-tuning example: the prompt is read; the answer and the EOS that ends it are
        supervised (a model that never learnt to stop runs on into more digits, and the first
        integer of its output is then wrong however well it retrieved).

        ``supervise_key_copy`` also supervises the needle's second copy of the key: copying it
        from the first, a few tokens back, is the copy the answer needs, taught locally on every
        prompt whatever the needle's depth. ``supervise_prompt`` supervises every token of the
        prompt as well (language modelling on it), the key's copy included. The needle's
        tokens are the ones the memory should write (``Document.writes``), the rest not."""
        start, end = self.key_copy if supervise_key_copy else (len(self.prompt_ids),) * 2
        if supervise_prompt:
            start, end = 0, len(self.prompt_ids)
        parts = [(self.prompt_ids[:start], False), (self.prompt_ids[start:end], True),
                 (self.prompt_ids[end:], False), (self.answer_ids, True), ([eos_id], True)]
        writes = torch.zeros(sum(len(ids) for ids, _ in parts), dtype=torch.bool)
        writes[self.needle_offset:self.needle_offset + self.needle_len] = True
        return Document.from_parts(parts, writes)


class PasskeyGenerator:
    """Passkey samples of a given length and depth, deterministic by seed, for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, key_min: int = 1, key_max: int = 50_000,
                 filler: str = FILLER, haystack: Tensor | None = None,
                 distractors: int = 0) -> None:
        """``filler``: the sentences repeated around the needle (Landmark's by default);
        ``haystack``: token ids of real text to use instead, read from a random place for each
        prompt and continued after the needle, endlessly repeated (:func:`haystack_tokens`);
        ``distractors``: numbers other than the key, drawn from the same range, each put as
        ' {number}' at a random place of the filler before or after the needle (the range must
        hold more than one number; SourceConfig checks a recipe's)."""
        self.tokenizer = tokenizer
        self.key_min, self.key_max = key_min, key_max
        self.distractors = distractors
        encode = tokenizer.encode
        self.head = encode(TASK, bos=True)
        self.newline = encode("\n")
        self.question = encode(QUESTION)
        if haystack is not None and len(haystack) == 0:
            raise ValueError("haystack: holds no token")
        self.haystack = haystack
        # Landmark joins filler repetitions with a space: "F F F ..." -> [F][ F][ F]...
        self.filler_first = torch.tensor(encode(filler), dtype=torch.long)
        self.filler_next = torch.tensor(encode(" " + filler), dtype=torch.long)
        self.frame_tokens = len(self.head) + 4 * len(self.newline) + len(self.question)
        """Prompt tokens that are neither filler nor needle."""

    def filler(self, n: int, start: int = 0) -> Tensor:
        """Tokens ``start`` to ``start + n`` of the endlessly repeated filler (or haystack)."""
        if self.haystack is not None:
            # Slices, not a repeat of the whole text: it holds up to millions of tokens and a
            # training prompt a few hundred, so copying it for every prompt slowed training.
            first, pieces = start % len(self.haystack), []
            while True:
                pieces.append(self.haystack[first:first + n])
                n -= len(pieces[-1])
                if n <= 0:
                    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
                first = 0
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
        prompt = torch.cat([p if isinstance(p, Tensor) else self.filler(p[1], p[0])
                            for p in parts])
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

    def _chunks(self, parts: list[Tensor | tuple[int, int]],
                chunk_tokens: int) -> Iterator[Tensor]:
        for part in parts:
            if isinstance(part, Tensor):
                yield part
                continue
            first, n = part
            for start in range(0, n, chunk_tokens):
                yield self.filler(min(chunk_tokens, n - start), first + start)

    def _layout(self, length: int, depth: float,
                seed: int) -> tuple[list[Tensor | tuple[int, int]], dict]:
        """The prompt's parts (token tensors, or (start, n) for filler tokens start to start + n)
        and the fields of its PasskeySample but the prompt. Landmark's filler starts afresh after
        the needle; a haystack's text continues where it stopped."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth = {depth}: must be in [0, 1]")
        rng = np.random.default_rng(seed)
        key = int(rng.integers(self.key_min, self.key_max + 1))
        pieces = [self.tokenizer.encode(piece.format(key=key)) for piece in NEEDLE_PIECES]
        needle = [token for piece in pieces for token in piece]
        numbers = self._distractor_numbers(rng, key)
        distractors = [self.tokenizer.encode(f" {number}") for number in numbers]
        budget = length - self.frame_tokens - len(needle) - sum(map(len, distractors))
        if budget < 0:
            raise ValueError(f"passkey length = {length} tokens: too short, the prompt without "
                             f"filler takes {length - budget} tokens")
        before = round(depth * budget)
        nl = self.newline
        if self.haystack is None:
            text_before, text_after = (0, before), (0, budget - before)
        else:
            start = int(rng.integers(len(self.haystack)))
            text_before, text_after = (start, before), (start + before, budget - before)
        places = np.sort(rng.integers(budget + 1, size=len(distractors)))
        parts = [self.head, nl, *_scatter(text_before, 0, places, distractors, last=False),
                 nl, needle, nl,
                 *_scatter(text_after, before, places, distractors, last=True), nl,
                 self.question]
        needle_offset = len(self.head) + 2 * len(nl) + before + sum(
            len(tokens) for place, tokens in zip(places, distractors, strict=True)
            if place < before)
        copy_start = needle_offset + len(pieces[0])
        return [p if isinstance(p, tuple) else torch.as_tensor(p, dtype=torch.long)
                for p in parts], dict(
            answer_ids=self.tokenizer.encode(f" {key}"), key=key, depth=depth,
            needle_offset=needle_offset, needle_len=len(needle),
            key_copy=(copy_start, copy_start + len(pieces[1])))

    def _distractor_numbers(self, rng: np.random.Generator, key: int) -> list[int]:
        """``distractors`` numbers uniform over the key range less the key (none drawn, and so
        no change to the prompts of a seed, without distractors)."""
        if not self.distractors:
            return []
        numbers = rng.integers(self.key_min, self.key_max, size=self.distractors)
        return [int(n) + (n >= key) for n in numbers]


def _scatter(text: tuple[int, int], first: int, places: np.ndarray, inserts: list[list[int]],
             last: bool) -> list[tuple[int, int] | list[int]]:
    """``text`` = (start, n), the filler's positions ``first`` to ``first + n``, cut before each
    of the ``places`` (sorted filler positions) that fall in it, with that place's tokens between
    the pieces; the ``last`` text also takes the places at its end."""
    start, n = text
    parts: list[tuple[int, int] | list[int]] = []
    done = 0  # tokens of text already placed
    for place, tokens in zip(places, inserts, strict=True):
        cut = int(place) - first
        if 0 <= cut < n or (last and cut == n):
            parts += [(start + done, cut - done), tokens]
            done = cut
    return [*parts, (start + done, n - done)]


def haystack_tokens(documents: Iterable[Tensor], tokenizer: Tokenizer,
                    max_tokens: int = 4_000_000) -> Tensor:
    """Token ids of ``documents`` (their BOS and EOS left out) joined by blank lines, up to
    ``max_tokens``: real text for :class:`PasskeyGenerator` to hide needles in. Prompts longer
    than it repeat it."""
    separator = torch.tensor(tokenizer.encode("\n\n"), dtype=torch.long)
    pieces, total = [], 0
    for ids in documents:
        ids = ids[(ids != tokenizer.bos_id) & (ids != tokenizer.eos_id)]
        pieces += [ids, separator]
        total += len(ids) + len(separator)
        if total >= max_tokens:
            break
    return torch.cat(pieces)[:max_tokens] if pieces else torch.empty(0, dtype=torch.long)


def haystack_text(config: SourceConfig) -> SourceConfig:
    """The plain-text source a passkey ``config`` hides its needles in: the dataset or files it
    names, less what it excludes."""
    return SourceConfig(
        name=config.name, config=config.config, split=config.split, files=config.files,
        text_field=config.text_field, streaming=config.streaming, exclude=config.exclude,
        min_tokens=config.min_tokens)


def load_haystack(config: SourceConfig, tokenizer: Tokenizer) -> Tensor:
    """:func:`haystack_tokens` of :func:`haystack_text`: the text a passkey source trains on, or
    ``eval passkey --haystack``'s. DataSourceError when it holds no text."""
    text = text_source(haystack_text(config), tokenizer)
    haystack = haystack_tokens((document.ids for document in text), tokenizer)
    if len(haystack) == 0:
        raise DataSourceError(f"{config.text_label}: holds no text to hide passkeys in")
    return haystack


class PasskeySource(DocumentSource):
    """Endless passkey fine-tuning documents: lengths uniform in [lengths[0], lengths[1]], depths
    uniform in [depth_min, depth_max]."""

    def __init__(self, generator: PasskeyGenerator, lengths: tuple[int, int], depth_min: float,
                 depth_max: float, label: str, weight: float,
                 supervise_key_copy: bool = False, supervise_prompt: bool = False) -> None:
        super().__init__(label, weight)
        self.supervise_key_copy = supervise_key_copy
        self.supervise_prompt = supervise_prompt
        self.generator = generator
        self.lengths = lengths
        self.depth_min, self.depth_max = depth_min, depth_max
        try:  # fail now if the shortest length cannot hold a prompt
            generator.check_length(lengths[0])
        except ValueError as error:
            raise DataSourceError(f"{label}: {error}; raise passkey_length_min (or "
                                  "passkey_length)") from None

    def samples(self, rank: int, world_size: int, epoch: int, seed: int,
                start: int = 0) -> Iterator[PasskeySample]:
        """The prompts :meth:`epoch` trains on, with where their needle and key lie."""
        position = start
        while True:  # synthetic: an epoch never ends, every position is a fresh sample
            rng = np.random.default_rng([seed, world_size, rank, epoch, position])
            depth = float(rng.uniform(self.depth_min, self.depth_max))
            length = self.lengths[0] + int(rng.integers(self.lengths[1] - self.lengths[0] + 1))
            yield self.generator.sample(length, depth, seed=int(rng.integers(2**62)))
            position += 1

    def epoch(self, rank: int, world_size: int, epoch: int, seed: int,
              start: int = 0) -> Iterator[Document | Skipped]:
        for sample in self.samples(rank, world_size, epoch, seed, start):
            yield sample.to_document(self.generator.tokenizer.eos_id, self.supervise_key_copy,
                                     self.supervise_prompt)
