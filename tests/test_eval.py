"""Evaluation commands on a tiny random model: passkey, perplexity, BookSum, generate, gates."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.text import Text
from rouge_score import rouge_scorer
from test_inference import random_model
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data.documents import Document
from infinitrain.data.tokenizer import load_tokenizer
from infinitrain.evaluation.options import (
    OptionError,
    format_accuracy,
    format_tokens,
    parse_depths,
    parse_lengths,
    parse_token_count,
)
from infinitrain.evaluation.passkey import PasskeySettings, evaluate_passkey, first_integer
from infinitrain.evaluation.perplexity import document_loss
from infinitrain.evaluation.resources import process_peak_rss_bytes
from infinitrain.evaluation.rouge import rouge
from infinitrain.evaluation.tables import passkey_table
from infinitrain.inference import Generation
from infinitrain.model_dir import save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
TOKENIZER = DATA / "tokenizer"
SEGMENT = 32
VOCAB = 4096


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny random model with the bundled tokenizer, saved as a run's latest checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    with gzip.open(DATA / "books" / "austen.jsonl.gz", "rt") as lines:
        book = json.loads(next(lines))["text"]
    (root / "book.txt").write_text(book[:200_000])
    (root / "short.txt").write_text(book[:3_000])
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    save_model_dir(model, root / "run" / "step-00000010", tokenizer_dir=TOKENIZER)
    (root / "run" / "latest").write_text("step-00000010")
    return root


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# options and errors


def test_an_accuracy_reads_100_or_0_percent_only_when_exact():
    """959 right of 960 is not 100%, nor 1 of 960 0%: the figures a README quotes."""
    shown = [format_accuracy(k / n) for k, n in ((960, 960), (959, 960), (1, 960), (0, 960),
                                                 (1, 2), (2, 3), (1999, 2000))]
    assert shown == ["100%", "99.9%", "0.1%", "0%", "50%", "67%", "99.95%"]


def test_lengths_and_depths_parse():
    assert parse_lengths("4k,32K,1m,1M,4096") == [4096, 32_768, 1_048_576]
    assert parse_token_count("500k", "--max-input-tokens") == 512_000
    assert parse_depths(" 1, 0,0.5 ") == [0.0, 0.5, 1.0]
    assert [format_tokens(n) for n in (4096, 1 << 20, 5000)] == ["4K", "1M", "5000"]
    for bad in ("1x", "", "4k,,8k", "0", "-4k", "1.5k"):
        with pytest.raises(OptionError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("1.5", "-0.1", "half", ""):
        with pytest.raises(OptionError, match="--depths"):
            parse_depths(bad)


@pytest.mark.parametrize(("args", "expected"), [
    (["eval", "passkey", "--model", "{root}/missing"], "--model {root}/missing: no such directory"),
    (["eval", "passkey", "--model", "{root}"], "--model {root}: not a model"),
    (["eval", "passkey", "--model", "{root}/run", "--lengths", "1x"], "--lengths '1x'"),
    (["eval", "passkey", "--model", "{root}/run", "--lengths", ""], "--lengths ''"),
    (["eval", "passkey", "--model", "{root}/run", "--depths", "0,1.5"], "--depths '1.5'"),
    (["eval", "passkey", "--model", "{root}/run", "--lengths", "64"], "--lengths"),
    (["eval", "passkey", "--model", "{root}/run", "--key-min", "9", "--key-max", "5"],
     "keys in [9, 5]"),
    (["eval", "passkey", "--model", "{root}/run", "--haystack", "{root}/book.txt", "--filler",
      "Hi."], "--haystack and --filler: choose one"),
    (["eval", "passkey", "--model", "{root}/run", "--haystack", "{root}/nothing.txt"],
     "--haystack {root}/nothing.txt: no such file"),
    (["eval", "perplexity", "--model", "{root}/run", "--data", "{root}/empty.jsonl"],
     "--data files: {root}/empty.jsonl: empty file"),
    (["eval", "booksum", "--model", "{root}/run", "--data", "{root}/book.txt",
      "--max-input-tokens", "1x"], "--max-input-tokens '1x'"),
    (["generate", "--model", "{root}/run", "--file", "{root}/empty.jsonl"],
     "--file {root}/empty.jsonl: empty file"),
    (["generate", "--model", "{root}/run", "--prompt", "hi", "--top-p", "0"], "top_p = 0.0"),
    (["generate", "--model", "{root}/run", "--prompt", "hi", "--state", "{root}/book.txt"],
     "--state {root}/book.txt: not a safetensors state file"),
])
def test_bad_inputs_give_one_clear_error_line(workdir, args, expected):
    (workdir / "empty.jsonl").write_text("")
    code, stdout, stderr = cli(*(a.format(root=workdir) for a in args))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert expected.format(root=workdir) in lines[0]
    assert "Traceback" not in stdout + stderr


def test_a_haystack_without_text_is_refused_in_one_line(workdir):
    """A haystack whose rows are all empty cannot hide a needle: one error line after the
    dataset's own progress, no traceback."""
    blank = workdir / "blank.jsonl"
    blank.write_text('{"text": ""}\n')
    code, stdout, stderr = cli("eval", "passkey", "--model", workdir / "run", "--haystack", blank)
    assert code == 2 and "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: --haystack {blank}: holds no text to hide passkeys in"]


# ---------------------------------------------------------------------------------------------
# passkey


def test_first_integer_scores_like_landmark():
    assert first_integer(" 12345. Remember it") == 12345
    assert first_integer("The key is 0042 or 7") == 42
    assert first_integer("no digits") is None


def test_passkey_pipeline_scores_an_oracle_perfectly(workdir, monkeypatch):
    """A stand-in model that reads the needle back gets 100%; one that answers 1 gets 0%."""
    tokenizer = load_tokenizer(TOKENIZER)
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)

    def oracle(model, pieces, state, config, on_progress=None):
        prompt_ids = torch.cat(list(pieces))  # the prompt arrives piece by piece
        text = tokenizer.decode(prompt_ids)
        key = text.split("The pass key is ")[1].split(".")[0]
        assert text.endswith("What is the pass key? The pass key is")
        answer = tokenizer.encode(f" {key}. Remember it.")
        return Generation(answer, model.empty_state(1), len(prompt_ids), False, 1.0, 0.1)

    monkeypatch.setattr("infinitrain.evaluation.passkey.generate", oracle)
    settings = PasskeySettings(lengths=(512, 1024), depths=(0.0, 0.5, 1.0), samples=2)
    result = evaluate_passkey(model, tokenizer, settings)
    assert result.accuracy() == 1.0 and len(result.trials) == 12
    assert len({t.key for t in result.trials}) > 6  # every prompt its own key

    def always_one(model, prompt_ids, state, config, on_progress=None):
        return Generation(tokenizer.encode(" 1"), model.empty_state(1), 1, False, 1.0, 0.1)

    monkeypatch.setattr("infinitrain.evaluation.passkey.generate", always_one)
    assert evaluate_passkey(model, tokenizer, settings).accuracy() == 0.0


def test_passkey_offsets_find_the_end_position_a_model_fails_at(workdir, monkeypatch):
    """--offsets spreads each length over a segment's end positions; a stand-in model that fails
    only where the prompt ends 8 tokens into a segment is found there, and only there."""
    tokenizer = load_tokenizer(TOKENIZER)
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    lengths_seen = []

    def fails_at_8(model, pieces, state, config, on_progress=None):
        prompt_ids = torch.cat(list(pieces))
        lengths_seen.append(len(prompt_ids))
        key = tokenizer.decode(prompt_ids).split("The pass key is ")[1].split(".")[0]
        answer = " 1" if len(prompt_ids) % SEGMENT == 8 else f" {key}"
        return Generation(tokenizer.encode(answer), model.empty_state(1), len(prompt_ids), False,
                          1.0, 0.1)

    monkeypatch.setattr("infinitrain.evaluation.passkey.generate", fails_at_8)
    settings = PasskeySettings(lengths=(512, 1000), depths=(0.0, 1.0), samples=2, offsets=4)
    result = evaluate_passkey(model, tokenizer, settings)
    assert sorted(set(lengths_seen)) == [512, 520, 528, 536, 1000, 1008, 1016, 1024]
    assert len(result.trials) == 2 * 4 * 2 * 2
    assert result.accuracy_by_end_position(1.0) == {0: 1.0, 8: 0.0, 16: 1.0, 24: 1.0}
    assert result.accuracy(512) == 0.75 and result.accuracy(1000) == 0.75
    assert result.worst_offset(512) == (8, 0.0) and result.worst_offset(1000) == (0, 0.0)
    assert result.to_dict()["accuracy_by_end_position"]["0.0"][8] == 0.0
    with pytest.raises(ValueError, match="offsets = 0"):
        PasskeySettings(lengths=(512,), depths=(0.0,), offsets=0)


def test_passkey_accuracy_by_key_digits_shows_a_model_that_does_not_know_when_to_stop(
        workdir, monkeypatch):
    """A stand-in model that always answers five digits fails exactly the shorter keys."""
    tokenizer = load_tokenizer(TOKENIZER)
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)

    def five_digits(model, pieces, state, config, on_progress=None):
        key = tokenizer.decode(torch.cat(list(pieces))).split("The pass key is ")[1].split(".")[0]
        return Generation(tokenizer.encode(f" {key:0<5}"), model.empty_state(1), 1, False, 1.0,
                          0.1)

    monkeypatch.setattr("infinitrain.evaluation.passkey.generate", five_digits)
    settings = PasskeySettings(lengths=(512,), depths=(0.0, 1.0), samples=8, key_min=5000,
                               key_max=14999)
    result = evaluate_passkey(model, tokenizer, settings)
    by_digits = result.accuracy_by_key_digits()
    fours = sum(len(str(t.key)) == 4 for t in result.trials)
    assert by_digits == {4: (0.0, fours), 5: (1.0, 16 - fours)} and 0 < fours < 16
    assert result.to_dict()["accuracy_by_key_digits"]["4"] == {"accuracy": 0.0, "trials": fours}
    assert f"4: 0% of {fours}" in Text.from_markup(str(passkey_table(result).caption)).plain


def test_passkey_command_writes_table_json_and_heatmap(workdir):
    out = workdir / "passkey"
    code, stdout, _ = cli("eval", "passkey", "--model", workdir / "run", "--lengths", "1k,2K",
                          "--depths", "0,1", "--samples", "2", "--key-min", "50001",
                          "--key-max", "99999", "--offsets", "2", "--json", out / "r.json",
                          "--plot", out / "r.png", "--offset-plot", out / "offsets.png")
    assert code == 0
    assert "Passkey retrieval" in stdout and "depth 1" in stdout and "2K" in stdout
    assert "4 prompts per cell over 2 end positions" in stdout and "worst offset" in stdout
    report = json.loads((out / "r.json").read_text())
    assert report["settings"]["lengths"] == [1024, 2048]
    assert report["settings"]["use_memory"] is True
    assert report["model"]["path"].endswith("step-00000010")
    trials = report["results"]["trials"]
    assert len(trials) == 16 and all(t["correct"] == (t["predicted"] == t["key"]) for t in trials)
    assert all(50_001 <= t["key"] <= 99_999 for t in trials)
    assert {(t["offset"], t["end_position"]) for t in trials} == {(0, 0), (SEGMENT // 2,
                                                                           SEGMENT // 2)}
    for stats in report["results"]["lengths"].values():
        assert stats["tokens_per_second"] > 0 and stats["peak_memory_bytes"] > 0
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "offsets.png").read_bytes()[:4] == b"\x89PNG"


def test_passkey_in_a_haystack_of_real_text_or_another_filler(workdir, monkeypatch):
    """--haystack hides each needle in the file's text, --filler repeats other sentences; the
    table and the report say which."""
    book = workdir / "haystack.txt"
    book.write_text("Emma Woodhouse, handsome, clever, and rich, seemed to unite some of the best "
                    "blessings of existence. " * 40)
    prompts = []

    def reads_the_prompt(model, pieces, state, config, on_progress=None):
        prompts.append(torch.cat(list(pieces)))
        return Generation(load_tokenizer(TOKENIZER).encode(" 1"), model.empty_state(1),
                          len(prompts[-1]), False, 1.0, 0.1)

    monkeypatch.setattr("infinitrain.evaluation.passkey.generate", reads_the_prompt)
    out = workdir / "haystack.json"
    code, stdout, _ = cli("eval", "passkey", "--model", workdir / "run", "--lengths", "600",
                          "--depths", "0.5", "--samples", "2", "--haystack", book, "--json", out)
    assert code == 0
    assert f"hidden in {book}" in " ".join(stdout.split())
    assert json.loads(out.read_text())["settings"]["haystack"] == str(book)
    tokenizer = load_tokenizer(TOKENIZER)
    for prompt in prompts:
        text = tokenizer.decode(prompt)
        assert "handsome, clever" in text and "The grass is green" not in text
    code, stdout, _ = cli("eval", "passkey", "--model", workdir / "run", "--lengths", "600",
                          "--depths", "0.5", "--samples", "1", "--filler", "Ships sail at dawn.")
    assert code == 0 and "other filler" in stdout
    assert tokenizer.decode(prompts[-1]).count("Ships sail at dawn.") > 20


def test_no_memory_baseline_equals_closed_gates(workdir):
    """--no-memory must answer exactly like the same model with every gate at 0 (local only)."""
    tokenizer = load_tokenizer(TOKENIZER)
    settings = PasskeySettings(lengths=(256,), depths=(0.0, 1.0), samples=2, max_new_tokens=12)
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    with torch.no_grad():  # large weights: greedy answers then depend on what was read
        for name, param in model.named_parameters():
            if name.endswith("proj.weight") or name == "embed_tokens.weight":
                param.mul_(5)
    baseline = evaluate_passkey(model, tokenizer,
                                PasskeySettings(**{**settings.__dict__, "use_memory": False}))
    with_memory = evaluate_passkey(model, tokenizer, settings)
    with torch.no_grad():
        for block in model.layers:
            block.attn.gate.fill_(-1e4)
    closed = evaluate_passkey(model, tokenizer, settings)
    assert [t.output for t in baseline.trials] == [t.output for t in closed.trials]
    assert [t.output for t in baseline.trials] != [t.output for t in with_memory.trials]


def peak_rss_of_passkey_run(model_dir: Path, length: str, window_segments: int) -> int:
    """Run a passkey evaluation in a fresh process; its peak RSS as the command reports it."""
    out = model_dir / f"rss-{length}-{window_segments}.json"
    subprocess.run(
        [sys.executable, "-c", "from infinitrain.cli import app; app()", "eval", "passkey",
         "--model", str(model_dir), "--lengths", length, "--depths", "0.5", "--samples", "1",
         "--window-segments", str(window_segments), "--device", "cpu", "--json", str(out)],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    (stats,) = json.loads(out.read_text())["results"]["lengths"].values()
    assert stats["memory_kind"] == "process RSS"
    return stats["peak_memory_bytes"]


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """Linux keeps ru_maxrss across exec: a small child of a large parent would look large."""
    ballast = bytearray(600 * 2**20)  # this process now holds 600 MiB more
    code = ("from infinitrain.evaluation.resources import process_peak_rss_bytes\n"
            "print(process_peak_rss_bytes())")
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    assert child < len(ballast), child
    assert process_peak_rss_bytes() > len(ballast)


@pytest.mark.slow
def test_passkey_peak_memory_does_not_grow_with_length(workdir):
    model_dir = workdir / "segment-64"  # longer segments: fewer scan steps, a faster 256K run
    save_model_dir(random_model(vocab_size=VOCAB, segment_len=64), model_dir,
                   tokenizer_dir=TOKENIZER)
    short = peak_rss_of_passkey_run(model_dir, "16k", 16)
    long = peak_rss_of_passkey_run(model_dir, "256k", 16)
    assert long <= 1.10 * short, (short, long)
    # The measurement does see growth: one window over a whole 64K prompt (no streaming). Its
    # activations (~0.2 GiB) stand out against the ~0.5 GiB the imports alone take.
    unstreamed = peak_rss_of_passkey_run(model_dir, "64k", 64 * 1024 // 64)
    assert unstreamed > 1.25 * short, (short, unstreamed)


# ---------------------------------------------------------------------------------------------
# perplexity


def test_streamed_perplexity_equals_a_direct_forward():
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    ids = torch.randint(0, VOCAB, (5 * SEGMENT + 7,))
    loss = document_loss(model, Document.from_ids(ids), window_segments=2)
    with torch.no_grad():
        logits, _ = model(ids[None])
    nll = F.cross_entropy(logits[0, :-1], ids[1:], reduction="none")
    assert loss.tokens == len(ids) - 1
    assert math.isclose(loss.perplexity, math.exp(nll.mean().item()), rel_tol=1e-5)
    per_segment = torch.zeros(6).index_add_(0, torch.arange(len(ids) - 1) // SEGMENT, nll)
    torch.testing.assert_close(torch.tensor(loss.segment_nll, dtype=torch.float32), per_segment,
                               rtol=1e-5, atol=1e-4)


def test_empty_memory_ablation_scores_every_segment_as_if_it_came_first():
    """With the memory emptied before every segment (and no overlap cache), a segment's loss is
    the loss the model gives that segment alone from a fresh state; the gates stay in."""
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    ids = torch.randint(0, VOCAB, (4 * SEGMENT + 5,))
    empty = document_loss(model, Document.from_ids(ids), window_segments=3, memory="empty")
    with_memory = document_loss(model, Document.from_ids(ids), window_segments=3)
    for i in range(len(empty.segment_nll)):
        piece = ids[i * SEGMENT:(i + 1) * SEGMENT + 1]
        with torch.no_grad():
            logits, _ = model(piece[None, :-1])
        alone = F.cross_entropy(logits[0], piece[1:], reduction="sum").item()
        assert math.isclose(empty.segment_nll[i], alone, rel_tol=1e-5), i
    assert empty.segment_nll[0] == with_memory.segment_nll[0]
    assert all(abs(a - b) > 1e-3 for a, b in zip(empty.segment_nll[1:],
                                                  with_memory.segment_nll[1:], strict=True))


def test_perplexity_command_over_a_bundled_book(workdir):
    book = workdir / "book.jsonl"
    book.write_text(json.dumps({"text": (workdir / "book.txt").read_text()[:40_000]}) + "\n")
    out = workdir / "ppl"
    code, stdout, _ = cli("eval", "perplexity", "--model", workdir / "run", "--data", book,
                          "--compare-no-memory", "--compare-empty-memory", "--json",
                          out / "p.json", "--plot",
                          out / "p.png", "--window-segments", "8")
    assert code == 0 and "Perplexity per document" in stdout and "by position" in stdout
    runs = json.loads((out / "p.json").read_text())["results"]["runs"]
    assert [r["memory"] for r in runs] == ["on", "empty", "off"]
    assert "loss (empty memory)" in stdout
    for run in runs:
        assert math.isfinite(run["perplexity"]) and 1 < run["perplexity"] < 10 * VOCAB
        assert len(run["segment_loss"]) == math.ceil((run["tokens"] + 2) / SEGMENT)
        assert all(math.isfinite(v) for v in run["segment_loss"])
        (document,) = run["documents"]  # the per-segment counts re-weigh the losses exactly
        counts = document["segment_tokens"]
        assert sum(counts) == document["tokens"] == run["tokens"]
        mean = sum(loss * n for loss, n in zip(document["segment_loss"], counts, strict=True))
        assert math.isclose(math.exp(mean / sum(counts)), run["perplexity"], rel_tol=1e-9)
    assert len({run["perplexity"] for run in runs}) == 3
    assert (out / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_perplexity_compares_models_of_different_segment_lengths_by_position(workdir):
    """Two models side by side (N = 32 and N = 64): one column each, rows of doubling token
    ranges on both models' segment boundaries, each a token-weighted mean of the model's own
    per-segment losses."""
    book = workdir / "book.jsonl"
    book.write_text(json.dumps({"text": (workdir / "book.txt").read_text()[:20_000]}) + "\n")
    wide = workdir / "wide"
    save_model_dir(random_model(vocab_size=VOCAB, segment_len=2 * SEGMENT), wide,
                   tokenizer_dir=TOKENIZER)
    out = workdir / "compare.json"
    code, stdout, _ = cli("eval", "perplexity", "--model", workdir / "run", "--model", wide,
                          "--data", book, "--json", out, "--plot", workdir / "compare.png")
    assert code == 0 and "loss (run)" in stdout and "loss (wide)" in stdout
    report = json.loads(out.read_text())
    assert [m["path"] for m in report["model"]] == [str(workdir / "run" / "step-00000010"),
                                                     str(wide)]
    runs = report["results"]["runs"]
    assert [(r["model"], r["segment_len"]) for r in runs] == [("run", SEGMENT),
                                                              ("wide", 2 * SEGMENT)]
    tokens = runs[0]["tokens"]
    first_rows = [f"0–{2 * SEGMENT}", f"{2 * SEGMENT}–{4 * SEGMENT}",
                  f"{4 * SEGMENT}–{8 * SEGMENT}"]
    assert all(row in stdout for row in first_rows)
    # The row 64–128 of the N = 32 model is the mean of its segments 2 and 3 (32 targets each).
    curve = runs[0]["segment_loss"]
    expected = f"{(curve[2] + curve[3]) / 2:.3f}"
    row = next(line for line in stdout.splitlines() if first_rows[1] in line)
    assert expected in row, (expected, row)
    assert tokens == runs[1]["tokens"]
    assert (workdir / "compare.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# BookSum and ROUGE


def test_rouge_matches_rouge_score_and_overall_is_the_geometric_mean():
    predictions = ["the cats sat on the mats with a hat", "Elinor and Marianne went to London."]
    references = ["a cat was sitting on the mat", "Marianne and Elinor travelled to London."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {name: 100 * sum(scorer.score(r, p)[name].fmeasure
                                for p, r in zip(predictions, references, strict=True)) / 2
                for name in ("rouge1", "rouge2", "rougeL")}
    scores = rouge(predictions, references)
    for name, value in expected.items():
        assert math.isclose(getattr(scores, name), value, rel_tol=1e-12)
    assert math.isclose(scores.overall, math.prod(expected.values()) ** (1 / 3), rel_tol=1e-12)
    assert math.isclose(rouge(["the same words"], ["the same words"]).overall, 100.0)
    best_of_two = rouge([predictions[0]], [[references[1], references[0]]])
    assert best_of_two.rouge1 == rouge([predictions[0]], [references[0]]).rouge1


def test_booksum_command_reads_books_and_scores_with_rouge(workdir):
    out = workdir / "booksum.json"
    code, stdout, _ = cli("eval", "booksum", "--model", workdir / "run", "--data",
                          DATA / "booksum-sample" / "kmfoda-chapters" / "test.csv",
                          "--max-input-tokens", "2k", "--max-new-tokens", "12", "--max-books",
                          "2", "--json", out)
    assert code == 0 and "BookSum ROUGE" in stdout
    assert "Sense and" in stdout and "#0" not in stdout  # books by name (wrapped at 80 columns)
    report = json.loads(out.read_text())
    assert report["settings"]["temperature"] == 0.5 and report["settings"]["top_p"] == 0.95
    books = report["results"]["books"]
    assert [book["title"] for book in books] == ["Sense and Sensibility.chapter 1",
                                                 "Pride and Prejudice.chapter 1"]
    for book in books:
        assert book["prompt_tokens"] <= 2048 and 1 <= book["summary_tokens"] <= 12
        assert book["book_tokens"] - book["dropped_tokens"] < book["prompt_tokens"]
    overall = rouge([b["summary"] for b in books], [b["references"] for b in books])
    assert report["results"]["rouge"] == pytest.approx(overall.to_dict(), nan_ok=True)


# ---------------------------------------------------------------------------------------------
# generate and inspect gates


def test_generate_answers_from_a_saved_state_like_from_the_document(workdir):
    run, state = workdir / "run", workdir / "book.state"
    code, _, stderr = cli("generate", "--model", run, "--file", workdir / "short.txt",
                          "--save-state", state)
    assert code == 0 and state.is_file() and "memory state" in stderr
    question = ["--prompt", " Who lived at Norland?", "--max-new-tokens", "16", "--temperature",
                "0.7", "--seed", "5"]
    _, from_state, _ = cli("generate", "--model", run, "--state", state, *question)
    _, rereading, _ = cli("generate", "--model", run, "--file", workdir / "short.txt", *question)
    assert from_state == rereading and from_state.strip()
    # The state's size does not depend on how much was read.
    code, _, _ = cli("generate", "--model", run, "--file", workdir / "book.txt", "--save-state",
                     workdir / "long.state", "--window-segments", "16")
    assert code == 0
    long_size, short_size = (workdir / "long.state").stat().st_size, state.stat().st_size
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    one_segment_kv = 2 * model.config.n_layers * model.config.n_kv_heads * SEGMENT * \
        model.config.head_dim * 4
    assert abs(long_size - short_size) < one_segment_kv


def test_inspect_gates_reports_sigmoid_beta(workdir):
    model = random_model(vocab_size=VOCAB, segment_len=SEGMENT)
    with torch.no_grad():
        model.layers[0].attn.gate.copy_(torch.tensor([-6.0, 0.0, 6.0, 0.1]))
    save_model_dir(model, workdir / "gated")
    out = workdir / "gates"
    code, stdout, _ = cli("inspect", "gates", "--model", workdir / "gated", "--json",
                          out / "g.json", "--plot", out / "g.png")
    assert code == 0 and "0.998" in stdout and "0.002" in stdout
    report = json.loads((out / "g.json").read_text())["results"]
    torch.testing.assert_close(torch.tensor(report["gates"]), model.memory_gates())
    assert report["roles"][0] == {"memory": 1, "local": 1, "mixer": 2}
    assert (out / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_gates_reports_only_the_layers_with_memory(workdir):
    """Below model.memory_from_layer a layer has no gate: no row of zeros posing as one."""
    from infinitrain.model import InfiniTransformer, preset

    torch.manual_seed(0)
    model = InfiniTransformer(preset("tiny", vocab_size=VOCAB, d_model=32, n_layers=3,
                                     n_heads=4, n_kv_heads=2, ffn_dim=64, segment_len=SEGMENT,
                                     memory_from_layer=1))
    save_model_dir(model, workdir / "local-first")
    out = workdir / "gates-local-first"
    code, stdout, _ = cli("inspect", "gates", "--model", workdir / "local-first", "--json",
                          out / "g.json", "--plot", out / "g.png")
    assert code == 0, stdout
    report = json.loads((out / "g.json").read_text())["results"]
    assert report["first_layer"] == 1 and len(report["gates"]) == 2
    torch.testing.assert_close(torch.tensor(report["gates"]), model.memory_gates())
    rows = [line.split()[1] for line in stdout.splitlines() if line.startswith("│ ")]
    assert rows == ["1", "2"], stdout


def test_inspect_gates_of_a_model_without_memory_is_one_error_line(workdir):
    from infinitrain.model import InfiniTransformer, preset

    model = InfiniTransformer(preset("tiny", vocab_size=VOCAB, d_model=32, n_layers=2,
                                     n_heads=4, n_kv_heads=2, ffn_dim=64, segment_len=SEGMENT,
                                     memory_from_layer=2))
    assert model.memory_gates().shape == (0, 4)
    save_model_dir(model, workdir / "local-only")
    code, _, stderr = cli("inspect", "gates", "--model", workdir / "local-only")
    assert code == 2 and "no layer has memory" in stderr and "Traceback" not in stderr
