"""From recipe configs to document sources and a rank's streams."""

from __future__ import annotations

from collections.abc import Sequence

from .booksum import booksum_source
from .passkey import PasskeyGenerator, PasskeySource, load_haystack
from .sources import DocumentSource, SourceConfig, text_source
from .streams import DocumentStreams, StreamConfig
from .tokenizer import Tokenizer


def build_source(config: SourceConfig, tokenizer: Tokenizer) -> DocumentSource:
    """The source a config describes; loads (or opens for streaming) its dataset now."""
    if config.kind == "passkey":
        haystack = None  # the filler, unless real text is named
        if config.name or config.files:
            haystack = load_haystack(config, tokenizer)
        generator = PasskeyGenerator(tokenizer, config.key_min, config.key_max,
                                     haystack=haystack, distractors=config.distractors)
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
