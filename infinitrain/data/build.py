"""From recipe configs to document sources and a rank's streams."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .booksum import booksum_source
from .passkey import PasskeyGenerator, PasskeySource, haystack_text, load_haystack
from .sources import DocumentSource, SourceConfig, text_source
from .streams import DocumentStreams, StreamConfig
from .tokenizer import Tokenizer


def build_source(config: SourceConfig, tokenizer: Tokenizer,
                 haystacks: dict[str, Tensor] | None = None) -> DocumentSource:
    """The source a config describes; loads (or opens for streaming) its dataset now.

    ``haystacks``: the texts passkey sources hide needles in, already tokenized, by
    :func:`haystack_text` (see :func:`build_sources`); filled as texts are loaded.
    """
    if config.kind == "passkey":
        haystack = None  # the filler, unless real text is named
        if config.name or config.files:
            haystack = _haystack(config, tokenizer, {} if haystacks is None else haystacks)
        generator = PasskeyGenerator(tokenizer, config.key_min, config.key_max,
                                     haystack=haystack, distractors=config.distractors)
        lengths = (config.passkey_length_min or config.passkey_length, config.passkey_length)
        return PasskeySource(generator, lengths, config.depth_min, config.depth_max,
                             config.label, config.weight, config.supervise_key_copy,
                             config.supervise_prompt)
    if config.kind == "booksum":
        return booksum_source(config, tokenizer)
    return text_source(config, tokenizer)


def build_sources(configs: Sequence[SourceConfig], tokenizer: Tokenizer,
                  haystacks: dict[str, Tensor] | None = None) -> list[DocumentSource]:
    """The sources of one mixture. Passkey sources that hide needles in the same text share one
    tokenization of it: a recipe with four such sources in the same novels reads them once.
    ``haystacks``: texts an earlier call tokenized (with this tokenizer) to reuse, and to which
    this call adds its own."""
    haystacks = {} if haystacks is None else haystacks
    return [build_source(config, tokenizer, haystacks) for config in configs]


def _haystack(config: SourceConfig, tokenizer: Tokenizer, loaded: dict[str, Tensor]) -> Tensor:
    text = repr(haystack_text(config))
    if text not in loaded:
        loaded[text] = load_haystack(config, tokenizer)
    return loaded[text]


def build_streams(sources: Sequence[SourceConfig], config: StreamConfig, tokenizer: Tokenizer,
                  rank: int = 0, world_size: int = 1,
                  haystacks: dict[str, Tensor] | None = None) -> DocumentStreams:
    """One data-parallel rank's streams over a mixture of sources (``haystacks``: as for
    :func:`build_sources`)."""
    return DocumentStreams(build_sources(sources, tokenizer, haystacks), config, tokenizer.pad_id,
                           rank, world_size,
                           active=lambda index, step: sources[index].active_at(step))
