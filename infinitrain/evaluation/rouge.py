"""ROUGE as the paper reports it for BookSum: ROUGE-1/2/L F-measures and their geometric mean.

Scores come from Google's ``rouge-score`` package (stemming on, the usual setting); "overall" is
the geometric mean of the three corpus-level F-measures, the aggregate of SCROLLS and of the
Infini-attention paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class RougeScores:
    """F-measures in percent."""

    rouge1: float
    rouge2: float
    rougeL: float  # the rouge-score package's name

    @property
    def overall(self) -> float:
        """Geometric mean of ROUGE-1, ROUGE-2 and ROUGE-L."""
        return math.prod((self.rouge1, self.rouge2, self.rougeL)) ** (1 / 3)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "overall": self.overall}


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> RougeScores:
    """Corpus ROUGE: each F-measure averaged over the examples.

    An example may have several references; it then scores against the best one per measure
    (``rouge-score``'s ``score_multi``).
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many predictions and references, at least one "
                         f"(got {len(predictions)} and {len(references)})")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        targets = [reference] if isinstance(reference, str) else list(reference)
        scores = scorer.score_multi(targets, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return RougeScores(**{name: 100 * total / len(predictions) for name, total in totals.items()})
