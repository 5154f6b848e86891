"""Tokenizers: the bundled one, training one that transformers loads, Llama-3 style directories."""

from __future__ import annotations

import gzip
import json

import pytest
import tokenizers
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data import TokenizerError, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def austen_sample(data_dir, tmp_path_factory):
    """The first 150K characters of Pride and Prejudice as a .txt file."""
    with gzip.open(data_dir / "books" / "austen.jsonl.gz", "rt", encoding="utf-8") as lines:
        text = [json.loads(line)["text"] for line in lines][1][:150_000]
    path = tmp_path_factory.mktemp("tok") / "pride.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_project_tokenizer(data_tokenizer):
    tok = data_tokenizer
    assert tok.vocab_size == 4096  # the tiny preset's vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "It is a truth universally acknowledged, that a single man in possession of a fortune"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # a real BPE, not bytes
    assert tok.encode(" 40213") == tok.encode(" ") + [tok.encode(d)[0] for d in "40213"]
    # special-token strings inside a text stay text: a document cannot end early
    assert tok.eos_id not in tok.encode("a <|end_of_text|> b")


def test_trained_tokenizer_loads_with_transformers(austen_sample, tmp_path):
    from transformers import AutoTokenizer

    ours = train_tokenizer([austen_sample], vocab_size=400, out_dir=tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(theirs) == ours.vocab_size == 400
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == \
        (ours.bos_id, ours.eos_id, ours.pad_id)
    text = "Mr. Bennet replied that he had not, 1813."
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs(text)["input_ids"] == ours.encode(text, bos=True)  # BOS first, like Llama-3
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(text) == ours.encode(text)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (0, 1, 2)


def _bare_bpe(special: list[str]) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["some text to learn a few merges from"] * 10, trainer)
    return backend


def test_llama3_style_directory_without_pad_pads_with_eos(tmp_path):
    _bare_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]).save(
        str(tmp_path / "tokenizer.json"))
    # as Llama-3-Instruct: tokenizer_config.json names the EOS (over the well-known names)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>", "special": True},
        "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 2)
    assert load_tokenizer(tmp_path, eos_token="<|end_of_text|>").eos_id == 1


def test_tokenizer_without_eos_is_refused(tmp_path):
    _bare_bpe([]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="tokenizer has no EOS token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no tokenizer here"):
        load_tokenizer(tmp_path / "missing")


def test_cli_trains_a_tokenizer(austen_sample, tmp_path):
    runner = CliRunner()
    out = tmp_path / "tok"
    result = runner.invoke(app, ["tokenizer", "train", str(austen_sample), "--vocab-size", "300",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_tokenizer(out).vocab_size == 300
    missing = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "nope.txt"),
                                  "--vocab-size", "300", "--out", str(out)])
    assert missing.exit_code == 2 and "nope.txt: no such file" in missing.output
