"""The laptop BookSum recipe: bundled chapters split by whole books, then pretrain → finetune
booksum-tiny → eval booksum through the real CLI, shrunk to a few steps."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

# Lightning adds a log handler bound to the stderr of the moment it is first imported: here, not
# inside the first CliRunner, whose stderr is closed by the time the second command logs.
import lightning.pytorch  # noqa: F401
import pytest
import torch
import yaml
from helpers import REPO
from safetensors.torch import load_file
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data.booksum import load_booksum
from infinitrain.data.sources import SourceConfig
from infinitrain.model import InfiniTransformer
from infinitrain.recipe import dump_recipe, load_recipe, parse_recipe, shipped_recipes

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = REPO / "data" / "booksum-tiny"
TRAIN, EVAL = DATA / "train.csv", DATA / "eval.csv"
SAMPLE = REPO / "data" / "booksum-sample" / "kmfoda-chapters" / "test.csv"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The recipe's data paths are relative to the repository."""
    monkeypatch.chdir(REPO)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def title(row: dict[str, str]) -> str:
    """'Pride and Prejudice' of book_id 'Pride and Prejudice.chapter 12'."""
    book, chapter = row["book_id"].rsplit(".chapter ", 1)
    assert chapter == row["summary_id"].removeprefix("chapter ")
    return book


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# the data


def test_train_and_eval_hold_different_books_in_the_kmfoda_layout():
    train, evaluation = rows(TRAIN), rows(EVAL)
    train_books, eval_books = {title(r) for r in train}, {title(r) for r in evaluation}
    assert not train_books & eval_books, f"books on both sides: {train_books & eval_books}"
    assert len(train_books) >= 2 and eval_books
    assert 16 <= len(train) <= 24 and 4 <= len(evaluation) <= 6
    with SAMPLE.open(newline="", encoding="utf-8") as file:
        columns = next(csv.reader(file))
    with gzip.open(REPO / "data" / "books" / "austen.jsonl.gz", "rt", encoding="utf-8") as lines:
        novels = {book["title"]: book["text"] for book in map(json.loads, lines)}
    for row in train + evaluation:
        assert list(row) == columns
        number = row["summary_id"].removeprefix("chapter ")
        assert re.fullmatch(rf"(CHAPTER|Chapter) {number}", row["chapter"].split("\n", 1)[0])
        assert row["chapter"] in novels[title(row)]  # verbatim from the bundled novel
        assert int(row["chapter_length"]) == len(row["chapter"].split()) > 500
        summary = row["summary_text"]
        assert 80 <= int(row["summary_length"]) == len(summary.split()) <= 150
        assert json.loads(row["summary"])["summary"] == summary
    assert len({r["book_id"] for r in train + evaluation}) == len(train) + len(evaluation)


@pytest.mark.parametrize("path", [TRAIN, EVAL], ids=["train", "eval"])
def test_the_booksum_loader_reads_every_row_whole_with_its_title(path, data_tokenizer):
    _, recipe = load_recipe("booksum-tiny")
    budget = recipe.data.sources[0].max_input_tokens
    examples = list(load_booksum(SourceConfig(kind="booksum", files=[str(path)],
                                              max_input_tokens=budget), data_tokenizer))
    expected = rows(path)
    assert [e.title for e in examples] == [r["book_id"] for r in expected]
    assert [e.references for e in examples] == [[r["summary_text"]] for r in expected]
    assert all(e.dropped_tokens == 0 for e in examples)  # no chapter exceeds the recipe's budget
    assert all(900 < e.book_tokens < 4_000 for e in examples)  # minutes on a CPU


def test_the_recipe_finetunes_tiny_on_the_train_file_and_names_its_commands():
    text = shipped_recipes()["booksum-tiny"]
    _, recipe = load_recipe("booksum-tiny")
    (source,) = recipe.data.sources
    assert (source.kind, source.files) == ("booksum", ["data/booksum-tiny/train.csv"])
    (held_out,) = recipe.data.validation.sources
    assert (held_out.kind, held_out.files) == ("booksum", ["data/booksum-tiny/eval.csv"])
    assert recipe.model.preset == "tiny" and recipe.data.tokenizer is None
    assert recipe.train.accelerator == "cpu"
    assert recipe.data.window_tokens % recipe.model_config.segment_len == 0
    with torch.device("meta"):
        assert sum(p.numel() for p in InfiniTransformer(recipe.model_config).parameters()) < 2e6
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe
    for command in ("infinitrain pretrain --recipe tiny",
                    "infinitrain finetune --recipe booksum-tiny --init runs/tiny",
                    "infinitrain eval booksum --model runs/booksum-tiny "
                    "--data data/booksum-tiny/eval.csv"):
        assert command in text
    assert invoke("finetune", "--recipe", "booksum-tiny").exit_code == 2  # needs --init


# ---------------------------------------------------------------------------------------------
# end to end


def test_pretrain_finetune_and_eval_name_the_held_out_chapters(tmp_path):
    tiny, tuned, report = tmp_path / "tiny", tmp_path / "booksum-tiny", tmp_path / "booksum.json"
    done = invoke("pretrain", "--recipe", "tiny", "--out-dir", tiny, "--max-steps", 2)
    assert done.exit_code == 0, done.output
    # 6 windows of 512 tokens: every stream's first chapter (< 3K tokens) reaches its summary
    done = invoke("finetune", "--recipe", "booksum-tiny", "--init", tiny, "--out-dir", tuned,
                  "--max-steps", 6, "--set", "logging.every_steps=1",
                  "--set", "data.validation.every_steps=3")
    assert done.exit_code == 0, done.output
    assert "Logging error" not in done.output
    summary = next(line for line in done.output.splitlines() if line.startswith("Done:"))
    assert "loss" in summary and "held-out loss" in summary and "at step 6" in summary
    # the next command evaluates the held-out book of data.validation
    assert f"infinitrain eval booksum --model {tuned} --data data/booksum-tiny/eval.csv" in \
        done.output
    start = load_file(str(tiny / "step-00000002" / "model.safetensors"))
    end = load_file(str(tuned / "step-00000006" / "model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[name], end[name]) for name in start)  # summaries trained

    done = invoke("eval", "booksum", "--model", tuned, "--data", EVAL, "--max-new-tokens", 8,
                  "--json", report)
    assert done.exit_code == 0, done.output
    assert "BookSum ROUGE" in done.stdout and "R-1" in done.stdout and "overall" in done.stdout
    assert "Persuasion" in done.stdout and "#0" not in done.stdout  # books by name
    results = json.loads(report.read_text())["results"]
    assert [book["title"] for book in results["books"]] == [r["book_id"] for r in rows(EVAL)]
    for book in results["books"]:
        assert 1 <= book["summary_tokens"] <= 8 and book["dropped_tokens"] == 0
        assert book["references"] == [next(r["summary_text"] for r in rows(EVAL)
                                           if r["book_id"] == book["title"])]
        assert all(0 <= book["rouge"][name] <= 100 for name in ("rouge1", "rouge2", "rougeL"))
    assert set(results["rouge"]) >= {"rouge1", "rouge2", "rougeL", "overall"}
