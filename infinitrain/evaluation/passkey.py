"""Passkey retrieval (Landmark format, docs/design.md §1) at any length, with bounded memory.

Each prompt is streamed through memory window by window and answered by greedy decoding; the
answer counts when the first integer in the generated text is the key. Peak memory and prefill
speed are measured per length: memory must not grow with the length, since only the compressive
memory and one partial segment are kept. Where a segment boundary falls relative to the question
and the answer matters as much as the length itself, so each length can also be evaluated at
evenly spread end positions within a segment (``offsets``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import product

import numpy as np
from torch import Tensor

from ..data.passkey import FILLER, PasskeyGenerator
from ..data.tokenizer import Tokenizer
from ..inference import DEFAULT_WINDOW_SEGMENTS, GenerationConfig, generate
from ..inference.stream import ProgressFn
from ..model import InfiniTransformer
from .resources import PeakMemory

_INTEGER = re.compile(r"\d+")
PROMPT_CHUNK_WINDOWS = 64
"""Prefill windows per prompt piece: a prompt is made piece by piece as it is read (a 1G-token
prompt would be 8 GB as one tensor), in pieces large enough that making them costs nothing."""


def first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` (how Landmark and the paper score an answer)."""
    match = _INTEGER.search(text)
    return None if match is None else int(match[0])


@dataclass(frozen=True)
class PasskeySettings:
    lengths: tuple[int, ...]
    """Prompt lengths in tokens."""
    depths: tuple[float, ...]
    """Needle depths: 0 = right after the task description, 1 = right before the question."""
    samples: int = 5
    """Prompts (each with its own key) per length and depth."""
    seed: int = 0
    window_segments: int = DEFAULT_WINDOW_SEGMENTS
    use_memory: bool = True
    max_new_tokens: int = 8
    """Enough for a five-digit key however the tokenizer splits digits."""
    key_min: int = 1
    key_max: int = 50_000
    """Keys are drawn uniformly from [key_min, key_max] (Landmark's range by default)."""
    offsets: int = 1
    """End positions per length: a length L is evaluated at L + i·N // offsets tokens for
    i < offsets (N the segment length), ``samples`` prompts each. 1: at L only."""
    filler: str = FILLER
    """The sentences repeated around the needle (Landmark's by default)."""
    haystack: str | None = None
    """Where the real text hidden around the needle comes from (a file or dataset), instead of
    the filler; its tokens are given to :func:`evaluate_passkey`."""

    def __post_init__(self) -> None:
        if self.offsets < 1:
            raise ValueError(f"offsets = {self.offsets}: must be >= 1 (--offsets)")
        if not 0 <= self.key_min <= self.key_max:
            raise ValueError(f"keys in [{self.key_min}, {self.key_max}]: need 0 <= key_min <= "
                             "key_max (--key-min, --key-max)")


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: int
    output: str
    """The generated text."""
    predicted: int | None
    offset: int
    """Tokens added to ``length``: the prompt is length + offset tokens long."""
    end_position: int
    """Where the prompt ends in its last segment: (length + offset) mod N, 0 on a boundary."""

    @property
    def correct(self) -> bool:
        return self.predicted == self.key


@dataclass
class LengthStats:
    prompt_tokens: int
    prefill_seconds: float
    peak_memory_bytes: int
    memory_kind: str
    state_bytes: int
    """Size of the state after a prompt: the memory plus under one segment of keys/values."""

    @property
    def tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")


@dataclass
class PasskeyResult:
    settings: PasskeySettings
    trials: list[PasskeyTrial] = field(default_factory=list)
    lengths: dict[int, LengthStats] = field(default_factory=dict)

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float:
        """Exact-match accuracy over the trials at ``length`` and ``depth`` (all if None)."""
        chosen = [t.correct for t in self.trials
                  if length in (None, t.length) and depth in (None, t.depth)]
        return sum(chosen) / len(chosen)

    def _accuracy_by(self, group: Callable[[PasskeyTrial], int],
                     keep: Callable[[PasskeyTrial], bool]) -> dict[int, float]:
        """Exact match of the kept trials per ``group`` value, in ascending order."""
        hits: dict[int, list[bool]] = {}
        for t in filter(keep, self.trials):
            hits.setdefault(group(t), []).append(t.correct)
        return {g: sum(h) / len(h) for g, h in sorted(hits.items())}

    def accuracy_by_end_position(self, depth: float | None = None) -> dict[int, float]:
        """Exact match per end position in the last segment (0: on a boundary), all lengths."""
        return self._accuracy_by(lambda t: t.end_position, lambda t: depth in (None, t.depth))

    def accuracy_by_key_digits(self) -> dict[int, tuple[float, int]]:
        """Exact match and number of trials per number of digits in the key, all lengths and
        depths: where a model retrieves 5-digit keys but not shorter ones, what it lacks is when
        to stop, not the key."""
        hits: dict[int, list[bool]] = {}
        for t in self.trials:
            hits.setdefault(len(str(t.key)), []).append(t.correct)
        return {digits: (sum(h) / len(h), len(h)) for digits, h in sorted(hits.items())}

    def worst_offset(self, length: int) -> tuple[int, float]:
        """The offset added to ``length`` with the lowest accuracy over all depths."""
        by_offset = self._accuracy_by(lambda t: t.offset, lambda t: t.length == length)
        return min(by_offset.items(), key=lambda item: item[1])

    def to_dict(self) -> dict:
        depths = self.settings.depths
        return {
            "accuracy": self.accuracy(),
            "accuracy_by_length": {str(n): {str(d): self.accuracy(n, d) for d in depths}
                                   for n in self.lengths},
            "accuracy_by_end_position": {str(d): self.accuracy_by_end_position(d)
                                         for d in depths},
            "accuracy_by_key_digits": {str(digits): {"accuracy": accuracy, "trials": n}
                                       for digits, (accuracy, n) in
                                       self.accuracy_by_key_digits().items()},
            "lengths": {str(n): {**asdict(s), "tokens_per_second": s.tokens_per_second}
                        for n, s in self.lengths.items()},
            "trials": [{**asdict(t), "correct": t.correct} for t in self.trials],
        }


def prompt_seed(seed: int, length: int, depth_index: int, index: int) -> int:
    """The seed of the ``index``-th prompt at ``length`` and the ``depth_index``-th depth: each
    cell's keys are fixed by the evaluation seed alone, whatever else is evaluated beside it."""
    return int(np.random.default_rng([seed, length, depth_index, index]).integers(2**62))


def length_offsets(settings: PasskeySettings, segment_len: int) -> list[int]:
    """Tokens added to each length: ``settings.offsets`` end positions spread over a segment."""
    return [i * segment_len // settings.offsets for i in range(settings.offsets)]


def evaluate_passkey(model: InfiniTransformer, tokenizer: Tokenizer, settings: PasskeySettings,
                     on_progress: ProgressFn | None = None,
                     haystack: Tensor | None = None) -> PasskeyResult:
    """Every length × offset × depth × sample, shortest length first; ``haystack``: token ids of
    real text to hide the needles in instead of the filler (``settings.haystack`` names it)."""
    if (haystack is None) != (settings.haystack is None):
        raise ValueError("settings.haystack names the haystack's tokens: give both or neither")
    device = model.embed_tokens.weight.device
    segment = model.config.segment_len
    offsets = length_offsets(settings, segment)
    prompts = PasskeyGenerator(tokenizer, settings.key_min, settings.key_max, settings.filler,
                               haystack)
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens,
                              eos_token_id=tokenizer.eos_id,
                              window_segments=settings.window_segments,
                              use_memory=settings.use_memory)
    result = PasskeyResult(settings)
    for length in settings.lengths:
        tokens, seconds = 0, 0.0
        with PeakMemory(device) as peak:
            for offset, (d, depth), i in product(offsets, enumerate(settings.depths),
                                                 range(settings.samples)):
                prompt_length = length + offset
                sample, pieces = prompts.stream(
                    prompt_length, depth, seed=prompt_seed(settings.seed, prompt_length, d, i),
                    chunk_tokens=PROMPT_CHUNK_WINDOWS * settings.window_segments * segment)
                out = generate(model, pieces, None, config, on_progress)
                text = tokenizer.decode(out.tokens)
                result.trials.append(PasskeyTrial(length, depth, sample.key, text,
                                                  first_integer(text), offset,
                                                  prompt_length % segment))
                tokens += out.prompt_tokens
                seconds += out.prefill_seconds
        result.lengths[length] = LengthStats(tokens, seconds, peak.bytes, peak.kind,
                                             out.state.nbytes())
    return result
