"""The one generation loop: prefill a prompt through memory, then decode token by token.

Passkey retrieval, BookSum summaries and ``infinitrain generate`` all call :func:`generate`.
Decoding feeds one token per call with the carried state, so besides the compressive memory the
model keeps only the keys/values of the current partial segment (< N tokens) and folds each
completed segment into memory exactly as training does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..model import InfiniState, InfiniTransformer
from .sampling import Sampler, SamplingConfig
from .stream import DEFAULT_WINDOW_SEGMENTS, ProgressFn, prefill


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_id: int | None = None
    """Stop after generating this token (it is included in the output)."""
    window_segments: int = DEFAULT_WINDOW_SEGMENTS
    use_memory: bool = True
    """False runs the memory-disabled baseline (every gate forced to local attention)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}: must be ≥ 1")


@dataclass
class Generation:
    tokens: list[int]
    """The generated token ids (ending with EOS if it stopped there)."""
    state: InfiniState
    """State after the prompt and every generated token: a conversation can continue from it."""
    prompt_tokens: int
    stopped_at_eos: bool
    prefill_seconds: float
    decode_seconds: float


@torch.inference_mode()
def generate(model: InfiniTransformer, prompt_ids: Tensor | list[int] | Iterable[Tensor],
             state: InfiniState | None = None, config: GenerationConfig | None = None,
             on_progress: ProgressFn | None = None) -> Generation:
    """Continue ``state`` (empty if None) with the prompt, then generate one stream's answer.

    The prompt may come in pieces (an iterable of 1-D token tensors, read one at a time), so
    that a prompt longer than memory can hold as one tensor streams in bounded memory.
    """
    config = config or GenerationConfig()
    device = model.embed_tokens.weight.device
    pieces = [prompt_ids] if isinstance(prompt_ids, (Tensor, list)) else prompt_ids
    started = time.perf_counter()
    logits, prompt_tokens = None, 0
    for piece in pieces:
        prompt = torch.as_tensor(piece, dtype=torch.long, device=device).reshape(1, -1)
        if prompt.shape[1] == 0 and logits is not None:
            continue
        logits, state = prefill(model, prompt, state, window_segments=config.window_segments,
                                use_memory=config.use_memory, on_progress=on_progress)
        prompt_tokens += prompt.shape[1]
    if logits is None:
        raise ValueError("nothing to prefill: the prompt has no pieces")
    _synchronize(device)
    prefilled = time.perf_counter()

    sampler = Sampler(config.sampling, device)
    tokens: list[int] = []
    stopped_at_eos = False
    while len(tokens) < config.max_new_tokens and not stopped_at_eos:
        token = sampler(logits)
        tokens.append(int(token))
        stopped_at_eos = tokens[-1] == config.eos_token_id
        step_logits, state = model(token[:, None], state, use_memory=config.use_memory)
        logits = step_logits[:, -1]
    _synchronize(device)
    return Generation(tokens, state, prompt_tokens, stopped_at_eos, prefilled - started,
                      time.perf_counter() - prefilled)


def _synchronize(device: torch.device) -> None:
    """Make wall-clock timings honest on asynchronous devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
