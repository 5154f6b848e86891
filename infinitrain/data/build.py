"""From recipe configs to document sources and a rank's streams."""

from __future__ import annotations

from collections.abc import Sequence

from .booksum import booksum_source
from .passkey import PasskeyGenerator, PasskeySource, haystack_tokens
from .sources import DataSourceError, DocumentSource, SourceConfig, text_source
from .streams import DocumentStreams, StreamConfig
from .tokenizer import Tokenizer


def build_source(config: SourceConfig, tokenizer: Tokenizer) -> DocumentSource:
    """The source a config describes; loads (or opens for streaming) its dataset now."""
    if config.kind == "passkey":
        haystack = None
        if config.name or config.files:  # real text around the needles, not the filler
            text = text_source(SourceConfig(
                name=config.name, config=config.config, split=config.split, files=config.files,
                text_field=config.text_field, streaming=config.streaming, exclude=config.exclude,
                min_tokens=config.min_tokens), tokenizer)
            haystack = haystack_tokens((document.ids for document in text), tokenizer)
            if len(haystack) == 0:
                raise DataSourceError(f"{config.label}: its name or files hold no text to hide "
                                      "passkeys in")
        generator = PasskeyGenerator(tokenizer, config.key_min, config.key_max,
                                     haystack=haystack)
        lengths = (config.passkey_length_min or config.passkey_length, config.passkey_length)
        return PasskeySource(generator, lengths, config.depth_min, config.depth_max,
                             config.label, config.weight, config.supervise_key_copy)
    if config.kind == "booksum":
        return booksum_source(config, tokenizer)
    return text_source(config, tokenizer)


def build_streams(sources: Sequence[SourceConfig], config: StreamConfig, tokenizer: Tokenizer,
                  rank: int = 0, world_size: int = 1) -> DocumentStreams:
    """One data-parallel rank's streams over a mixture of sources."""
    built = [build_source(source, tokenizer) for source in sources]
    return DocumentStreams(built, config, tokenizer.pad_id, rank, world_size,
                           active=lambda index, step: sources[index].active_at(step))
