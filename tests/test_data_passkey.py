"""Passkey prompts (Landmark format): exact length, one needle at the requested depth, the key."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace

import pytest
import torch
from lightning.pytorch import Trainer

from infinitrain.data import (
    IGNORE_INDEX,
    DataSourceError,
    PasskeyGenerator,
    SourceConfig,
    build_source,
    build_sources,
    build_streams,
)
from infinitrain.data.passkey import FILLER, NEEDLE, QUESTION, TASK
from infinitrain.recipe import load_recipe
from infinitrain.recipe.schema import ValidationSection
from infinitrain.recipe.typed import RecipeError, dataclass_from_plain
from infinitrain.training.data import check_sources
from infinitrain.training.validation import Validation


def occurrences(haystack: torch.Tensor, needle: list[int]) -> list[int]:
    """Start offsets of every occurrence of ``needle`` in ``haystack``."""
    windows = haystack.unfold(0, len(needle), 1)
    return (windows == torch.tensor(needle)).all(dim=1).nonzero().flatten().tolist()


@pytest.mark.parametrize("length", [4096, 32_768, 1_000_000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_one_needle_at_the_requested_depth(data_tokenizer, length, depth):
    tok = data_tokenizer
    generator = PasskeyGenerator(tok)
    sample = generator.sample(length, depth, seed=length + int(depth * 10))
    prompt = sample.prompt_ids
    assert prompt.shape == (length,) and prompt.dtype == torch.long
    assert prompt[0] == tok.bos_id
    needle = tok.encode(NEEDLE.format(key=sample.key))
    assert occurrences(prompt, needle) == [sample.needle_offset]
    assert sample.needle_len == len(needle)
    # depth = share of the filler before the needle, exact to one token
    filler = length - generator.frame_tokens - len(needle)
    before = sample.needle_offset - len(tok.encode(TASK, bos=True)) - 2 * len(tok.encode("\n"))
    assert abs(before - depth * filler) <= 0.5
    # as a fraction of the whole prompt, off by at most the share of its fixed parts
    assert abs(sample.needle_offset / length - depth) <= (length - filler) / length
    assert prompt[-len(tok.encode(QUESTION)):].tolist() == tok.encode(QUESTION)
    assert tok.decode(sample.answer_ids).strip() == str(sample.key)
    assert 1 <= sample.key <= 50_000


def test_prompt_text_is_landmarks_format(data_tokenizer):
    sample = PasskeyGenerator(data_tokenizer).sample(600, 0.5, seed=3)
    text = data_tokenizer.decode(sample.prompt_ids)
    task, before, needle, after, question = text.split("\n")
    assert task == TASK and question == QUESTION
    assert needle == NEEDLE.format(key=sample.key)
    assert text.count(str(sample.key)) == 2 and text.count("The pass key is") == 2
    assert before.startswith(FILLER) and after.startswith(FILLER)
    assert abs(len(before) - len(after)) < 10


def test_bundled_filler_is_the_one_used(data_dir):
    assert (data_dir / "passkey" / "filler.txt").read_text() == FILLER


def test_samples_are_deterministic_by_seed(data_tokenizer):
    generator = PasskeyGenerator(data_tokenizer)
    a, b = generator.sample(2000, 0.4, seed=9), generator.sample(2000, 0.4, seed=9)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and a.key == b.key
    keys = {generator.sample(2000, 0.4, seed=s).key for s in range(20)}
    assert len(keys) > 15


def test_key_range_is_configurable(data_tokenizer):
    generator = PasskeyGenerator(data_tokenizer, key_min=10_000, key_max=99_999)
    for seed in range(10):
        sample = generator.sample(500, 0.5, seed)
        assert len(str(sample.key)) == 5
        assert len(sample.answer_ids) == 6  # ' ' + one token per digit


def test_fine_tuning_documents_supervise_only_the_answer_and_its_end(data_tokenizer):
    tok = data_tokenizer
    sample = PasskeyGenerator(tok).sample(300, 0.2, seed=1)
    document = sample.to_document(tok.eos_id)
    labels = document.labels()
    supervised = labels[labels != IGNORE_INDEX].tolist()
    assert supervised == [*sample.answer_ids, tok.eos_id]
    assert document.num_targets == len(sample.answer_ids) + 1
    # the label of the prompt's last token is the answer's first token
    assert labels[len(sample.prompt_ids) - 1] == sample.answer_ids[0]
    assert document.ids[-1] == tok.eos_id


def test_passkey_source_yields_prompts_of_the_configured_length(data_tokenizer):
    config = SourceConfig(kind="passkey", passkey_length=700, depth_min=0.9, depth_max=1.0,
                          key_min=10, key_max=20)
    source = build_source(config, data_tokenizer)
    docs = list(itertools.islice(source.epoch(rank=0, world_size=1, epoch=0, seed=0), 5))
    again = list(itertools.islice(source.epoch(rank=0, world_size=1, epoch=0, seed=0, start=3), 2))
    assert torch.equal(docs[3].ids, again[0].ids)
    for doc in docs:
        answer = doc.ids[doc.target].tolist()  # the key's tokens and EOS
        assert len(doc) == 700 + len(answer) and answer[-1] == data_tokenizer.eos_id
        assert 10 <= int(data_tokenizer.decode(answer)) <= 20


def test_passkey_lengths_can_vary_within_a_range(data_tokenizer):
    config = SourceConfig(kind="passkey", passkey_length_min=300, passkey_length=363)
    source = build_source(config, data_tokenizer)
    docs = list(itertools.islice(source.epoch(rank=0, world_size=1, epoch=0, seed=0), 40))
    lengths = {len(doc) - doc.num_targets for doc in docs}
    assert min(lengths) >= 300 and max(lengths) <= 363
    assert len(lengths) > 20  # spread over the range, so answers land at every segment offset
    with pytest.raises(ValueError, match="passkey_length_min = 400"):
        SourceConfig(kind="passkey", passkey_length_min=400, passkey_length=363)


def test_a_source_saved_with_the_retired_length_step_at_its_old_default_reads_the_same(
        data_tokenizer):
    """passkey_length_step (removed: lengths are drawn from every length in the range) at its old
    default 1, as every resolved recipe saved before held it: dropped, the same prompts."""
    fields = {"kind": "passkey", "passkey_length_min": 300, "passkey_length": 363}
    old = dataclass_from_plain(SourceConfig, {**fields, "passkey_length_step": 1},
                               "data.sources.0")
    assert old == SourceConfig(**fields) and not hasattr(old, "passkey_length_step")
    docs = itertools.islice(build_source(old, data_tokenizer).epoch(0, 1, 0, seed=0), 5)
    # the lengths the version with the field drew for seed 0: a resumed stream continues exactly
    assert [len(doc) - doc.num_targets for doc in docs] == [347, 300, 324, 345, 317]


@pytest.mark.parametrize("value", [64, 0, None])
def test_the_retired_length_step_at_another_value_fails_in_one_line(value):
    with pytest.raises(RecipeError) as error:
        dataclass_from_plain(SourceConfig, {"kind": "passkey", "passkey_length_step": value},
                             "data.sources.0")
    assert str(error.value) == (
        f"data.sources.0.passkey_length_step = {value!r}: removed (only its old default, 1, is "
        "still accepted); prompt lengths are drawn from every length in [passkey_length_min, "
        "passkey_length]; for prompts that end on segment boundaries, add one passkey source per "
        "such length")


def test_too_short_length_is_refused(data_tokenizer):
    with pytest.raises(ValueError, match="passkey length = 40 tokens: too short"):
        PasskeyGenerator(data_tokenizer).sample(40, 0.5, seed=0)


def test_key_copy_supervision_marks_the_needles_second_key(data_tokenizer):
    sample = PasskeyGenerator(data_tokenizer).sample(300, 0.4, seed=5)
    start, end = sample.key_copy
    assert data_tokenizer.decode(sample.prompt_ids[start:end]) == f" {sample.key}"
    assert sample.needle_offset < start < end < sample.needle_offset + sample.needle_len
    eos = data_tokenizer.eos_id
    plain, copied = sample.to_document(eos), sample.to_document(eos, supervise_key_copy=True)
    assert torch.equal(plain.ids, copied.ids)
    extra = (copied.labels() != -100) & (plain.labels() == -100)
    # the labels at positions start-1 .. end-2 predict the tokens start .. end-1
    assert extra.nonzero().flatten().tolist() == list(range(start - 1, end - 1))
    assert torch.equal(copied.labels()[start - 1:end - 1], sample.prompt_ids[start:end])


def test_the_needle_is_what_a_passkey_document_says_to_write(data_tokenizer):
    """Document.writes: the needle's sentence, nothing before or after it, the answer included."""
    sample = PasskeyGenerator(data_tokenizer).sample(300, 0.4, seed=5)
    document = sample.to_document(data_tokenizer.eos_id, supervise_key_copy=True)
    written = document.writes.nonzero().flatten().tolist()
    assert written == list(range(sample.needle_offset, sample.needle_offset + sample.needle_len))
    assert data_tokenizer.decode(document.ids[document.writes]).strip() == \
        f"The pass key is {sample.key}. Remember it. {sample.key} is the pass key."


def test_prompt_supervision_marks_every_prompt_token_and_the_answer(data_tokenizer):
    """A passkey source with supervise_prompt yields documents whose every token but the first is
    a target: the prompt as language modelling, then the answer and the EOS."""
    config = SourceConfig(kind="passkey", passkey_length=200, supervise_prompt=True)
    source = build_source(config, data_tokenizer)
    document = next(iter(source.epoch(rank=0, world_size=1, epoch=0, seed=3)))
    labels = document.labels()
    assert torch.equal(labels[:-1], document.ids[1:]) and labels[-1] == -100
    plain = build_source(SourceConfig(kind="passkey", passkey_length=200), data_tokenizer)
    assert torch.equal(next(iter(plain.epoch(rank=0, world_size=1, epoch=0, seed=3))).ids,
                       document.ids)
    with pytest.raises(DataSourceError, match="supervise_prompt = True: only used by kind = "
                                              "'passkey'"):
        SourceConfig(kind="text", files=["x.txt"], supervise_prompt=True)


def test_a_haystack_of_real_text_surrounds_the_needle_and_continues_after_it(data_tokenizer):
    tok = data_tokenizer
    book = torch.arange(10, 1010)  # 1000 distinct token ids stand for a book
    generator = PasskeyGenerator(tok, haystack=book)
    sample = generator.sample(3000, 0.4, seed=7)  # longer than the book: it repeats
    prompt = sample.prompt_ids
    assert len(prompt) == 3000
    needle = tok.encode(NEEDLE.format(key=sample.key))
    assert occurrences(prompt, needle) == [sample.needle_offset]
    head = len(tok.encode(TASK, bos=True)) + len(tok.encode("\n"))
    newline = len(tok.encode("\n"))
    before = prompt[head:sample.needle_offset - newline]
    after_start = sample.needle_offset + sample.needle_len + newline
    after = prompt[after_start:len(prompt) - len(tok.encode(QUESTION)) - newline]
    text = torch.cat([before, after])  # one stretch of the endless book, cut by the needle
    start = int(text[0]) - 10
    assert torch.equal(text, book.repeat(4)[start:start + len(text)])
    assert generator.sample(3000, 0.4, seed=8).prompt_ids[head] != prompt[head]  # random start
    # streamed piece by piece, the same prompt
    _, pieces = generator.stream(3000, 0.4, seed=7, chunk_tokens=100)
    assert torch.equal(torch.cat(list(pieces)), prompt)


@pytest.mark.parametrize(("start", "n"), [(0, 0), (250, 0), (0, 1000), (990, 10), (990, 11),
                                          (999, 2501), (1000, 5), (3456, 1000), (5, 3000)])
def test_haystack_filler_is_the_endless_text_from_any_place(data_tokenizer, start, n):
    """Stretches that end at, cross, or span the text's end several times."""
    book = torch.arange(10, 1010)
    filler = PasskeyGenerator(data_tokenizer, haystack=book).filler(n, start)
    assert torch.equal(filler, book.repeat(6)[start % 1000:start % 1000 + n])


def test_haystack_tokens_join_documents_without_their_special_tokens(data_tokenizer):
    from infinitrain.data.passkey import haystack_tokens

    tok = data_tokenizer
    documents = [torch.tensor(tok.encode(text, bos=True, eos=True))
                 for text in ("It is a truth.", "Universally acknowledged.")]
    ids = haystack_tokens(documents, tok)
    assert tok.decode(ids) == "It is a truth.\n\nUniversally acknowledged.\n\n"
    assert len(haystack_tokens(documents, tok, max_tokens=3)) == 3


def integers(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", text)]


@pytest.mark.parametrize("haystack", [False, True])
def test_distractor_numbers_other_than_the_key_sit_around_the_needle(data_tokenizer, haystack):
    """Landmark's filler and the digit-free text stand for a book: every number in a prompt but
    the needle's two copies of the key is a distractor, and the prompt keeps its exact length."""
    tok = data_tokenizer
    book = torch.tensor(tok.encode("It is a truth universally acknowledged. " * 40))
    generator = PasskeyGenerator(tok, 1, 99_999, haystack=book if haystack else None,
                                 distractors=5)
    sides = set()
    for seed in range(12):
        sample = generator.sample(700, seed / 11, seed)
        prompt = sample.prompt_ids
        assert len(prompt) == 700
        assert occurrences(prompt, tok.encode(NEEDLE.format(key=sample.key))) == [
            sample.needle_offset]
        before = integers(tok.decode(prompt[:sample.needle_offset]))
        after = integers(tok.decode(prompt[sample.needle_offset + sample.needle_len:]))
        distractors = before + after
        assert len(distractors) == 5 and sample.key not in distractors
        assert all(1 <= number <= 99_999 for number in distractors)
        sides |= {"before"} if before else set()
        sides |= {"after"} if after else set()
        _, pieces = generator.stream(700, seed / 11, seed, chunk_tokens=64)
        assert torch.equal(torch.cat(list(pieces)), prompt)
    assert sides == {"before", "after"}
    plain = PasskeyGenerator(tok, 1, 99_999).sample(700, 0.5, seed=3)
    assert len(integers(tok.decode(plain.prompt_ids))) == 2  # the needle's key, twice


def test_a_passkey_source_passes_its_distractors_on_and_refuses_impossible_ones(data_tokenizer):
    config = SourceConfig(kind="passkey", passkey_length=400, key_min=10, key_max=20,
                          distractors=3)
    document = next(build_source(config, data_tokenizer).epoch(0, 1, 0, seed=0))
    prompt = data_tokenizer.decode(document.ids[~document.target])
    assert len(integers(prompt)) == 2 + 3
    with pytest.raises(ValueError, match="distractors = 3: need >= 0, and key_max > key_min"):
        SourceConfig(kind="passkey", key_min=7, key_max=7, distractors=3)
    with pytest.raises(ValueError, match="distractors = 2: only used by kind = 'passkey'"):
        SourceConfig(kind="text", files=["a.txt"], distractors=2)


def test_passkey_sources_in_the_same_text_share_one_tokenization(data_tokenizer, tmp_path):
    """A recipe hides needles in the same novels from several sources: one read of them."""
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"title": title, "text": f"{title} was a book. " * 40})
                             + "\n" for title in ("Alpha", "Beta")))
    prose = dict(kind="passkey", files=[str(books)], passkey_length=300)
    at_depth, at_start, held_out, filler = build_sources([
        SourceConfig(**prose), SourceConfig(**prose, depth_min=0.0, depth_max=0.0),
        SourceConfig(**prose, exclude={"title": ["Beta"]}),
        SourceConfig(kind="passkey", passkey_length=300)], data_tokenizer)
    assert at_depth.generator.haystack is at_start.generator.haystack
    assert len(held_out.generator.haystack) < len(at_depth.generator.haystack)
    assert "Beta" not in data_tokenizer.decode(held_out.generator.haystack)
    assert filler.generator.haystack is None


def test_a_run_tokenizes_its_novels_once(data_tokenizer):
    """A run opens its sources first to fail before any process starts, then for its training
    and validation streams: the streams take the novels the check tokenized instead of reading
    them again."""
    _, recipe = load_recipe("passkey-tiny")
    in_prose_source = recipe.data.sources[-1]
    recipe = replace(recipe, data=replace(recipe.data, validation=ValidationSection(
        sources=[in_prose_source], every_steps=recipe.logging.every_steps)))
    haystacks = check_sources(recipe, data_tokenizer)
    assert len(haystacks) == 1  # Austen's novels less the two held out, shared by 5 sources
    (novels,) = haystacks.values()
    config = recipe.data.stream_config(recipe.model_config.segment_len, 0, 1)
    streams = build_streams(recipe.data.sources, config, data_tokenizer, haystacks=haystacks)
    in_prose = [source.generator.haystack for source in streams.sources
                if source.generator.haystack is not None]
    assert len(in_prose) == 4
    assert all(haystack is novels for haystack in in_prose)
    validation = Validation(recipe, data_tokenizer, haystacks)
    validation.setup(Trainer(accelerator="cpu", devices=1, logger=False), None, "fit")
    assert validation.streams.sources[0].generator.haystack is novels
