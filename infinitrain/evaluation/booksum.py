"""BookSum: read each book through memory, generate its summary, score it with ROUGE.

The paper's setting: inputs up to 500K tokens, temperature 0.5, top-p 0.95, up to 1024 new tokens
(docs/design.md §1). Books longer than the input budget are truncated by the data pipeline, which
counts what it drops; the results record it per book.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from ..data.booksum import BookSumExample
from ..data.tokenizer import Tokenizer
from ..inference import DEFAULT_WINDOW_SEGMENTS, GenerationConfig, SamplingConfig, generate
from ..inference.stream import ProgressFn
from ..model import InfiniTransformer
from .rouge import RougeScores, rouge


@dataclass(frozen=True)
class BookSumSettings:
    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_p: float = 0.95
    seed: int = 0
    """Book i is sampled with seed + i, so results are reproducible."""
    window_segments: int = DEFAULT_WINDOW_SEGMENTS
    use_memory: bool = True

    def sampling(self, book: int) -> SamplingConfig:
        """The sampler settings of the book at index ``book``."""
        return SamplingConfig(self.temperature, self.top_p, self.seed + book)

    def __post_init__(self) -> None:
        self.sampling(0)  # fails early on an invalid temperature or top_p


@dataclass
class BookSummary:
    title: str
    """The book's name where its row gives one ('' otherwise)."""
    prompt_tokens: int
    book_tokens: int
    dropped_tokens: int
    summary: str
    references: list[str]
    summary_tokens: int
    rouge: RougeScores


@dataclass
class BookSumResult:
    settings: BookSumSettings
    books: list[BookSummary] = field(default_factory=list)

    @property
    def rouge(self) -> RougeScores:
        """Corpus ROUGE over all books."""
        return rouge([b.summary for b in self.books], [b.references for b in self.books])

    def to_dict(self) -> dict:
        return {
            "rouge": self.rouge.to_dict(),
            "books": [{**asdict(b), "rouge": b.rouge.to_dict()} for b in self.books],
        }


def evaluate_booksum(model: InfiniTransformer, tokenizer: Tokenizer,
                     examples: Iterable[BookSumExample], settings: BookSumSettings,
                     on_progress: ProgressFn | None = None) -> BookSumResult:
    result = BookSumResult(settings)
    for i, example in enumerate(examples):
        config = GenerationConfig(settings.max_new_tokens, settings.sampling(i), tokenizer.eos_id,
                                  settings.window_segments, settings.use_memory)
        out = generate(model, example.prompt_ids, None, config, on_progress)
        summary = tokenizer.decode(out.tokens).strip()
        result.books.append(BookSummary(
            title=example.title, prompt_tokens=out.prompt_tokens, book_tokens=example.book_tokens,
            dropped_tokens=example.dropped_tokens, summary=summary,
            references=example.references, summary_tokens=len(out.tokens),
            rouge=rouge([summary], [example.references]),
        ))
    if not result.books:
        raise ValueError("no book with a summary to evaluate")
    return result
