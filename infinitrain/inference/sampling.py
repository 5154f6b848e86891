"""Choosing the next token: greedy, or temperature with nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 is greedy decoding; the paper's BookSum setting is 0.5."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p (paper: 0.95)."""
    seed: int | None = None
    """Seeds the sampler's own generator, so a sampled output is reproducible."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature = {self.temperature}: must be ≥ 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks next tokens from logits; holds the seeded random generator of one generation."""

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.generator = None
        if not config.greedy:
            self.generator = torch.Generator(device=device)
            if config.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(config.seed)

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [B, V] -> token ids [B]."""
        if self.config.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.config.temperature, dim=-1)
        if self.config.top_p < 1:
            probs = nucleus(probs, self.config.top_p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the top-p nucleus (the most likely token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
