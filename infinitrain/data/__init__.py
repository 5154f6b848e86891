"""Data pipeline: tokenizers, dataset sources, document streams for TBPTT, passkey and BookSum."""

from .booksum import BookSumBuilder, BookSumExample, booksum_source, load_booksum
from .build import build_source, build_sources, build_streams
from .documents import Document
from .passkey import PasskeyGenerator, PasskeySample, PasskeySource
from .sources import (
    DatasetSource,
    DataSourceError,
    DocumentSource,
    Skipped,
    SourceConfig,
    load_rows,
    text_source,
)
from .streams import DocumentStreams, StreamConfig
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer
from .window import IGNORE_INDEX, WRITE_UNKNOWN, Window

__all__ = [
    "IGNORE_INDEX", "WRITE_UNKNOWN", "BookSumBuilder", "BookSumExample", "DataSourceError",
    "DatasetSource", "Document", "DocumentSource", "DocumentStreams", "PasskeyGenerator",
    "PasskeySample", "PasskeySource", "Skipped", "SourceConfig", "StreamConfig", "Tokenizer",
    "TokenizerError", "Window", "booksum_source", "build_source", "build_sources", "build_streams",
    "load_booksum", "load_rows", "load_tokenizer", "text_source", "train_tokenizer",
]
