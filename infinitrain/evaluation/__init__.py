"""Evaluation of long-context checkpoints: passkey retrieval, perplexity, BookSum ROUGE, gates."""

from .booksum import BookSumResult, BookSumSettings, evaluate_booksum
from .gates import GateReport
from .options import OptionError, parse_depths, parse_lengths, parse_token_count
from .passkey import PasskeyResult, PasskeySettings, evaluate_passkey, first_integer
from .perplexity import DocumentLoss, PerplexityResult, document_loss, evaluate_perplexity
from .rouge import RougeScores, rouge

__all__ = [
    "BookSumResult",
    "BookSumSettings",
    "DocumentLoss",
    "GateReport",
    "OptionError",
    "PasskeyResult",
    "PasskeySettings",
    "PerplexityResult",
    "RougeScores",
    "document_loss",
    "evaluate_booksum",
    "evaluate_passkey",
    "evaluate_perplexity",
    "first_integer",
    "parse_depths",
    "parse_lengths",
    "parse_token_count",
    "rouge",
]
