"""The scripts in experiments/ keep running as the package changes: each check of
experiments/memory_drift.py runs on a tiny random model and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_run

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "memory_drift.py"


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gated")
    write_run(run, memory_rule="deltanet", memory_write_gate=True,
              write_gate_activation="clamp", write_gate_init=0.5)
    return run


def drift(*args: str | Path) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_writes_reports_every_part_of_a_prompt_per_layer_and_head(gated_run):
    lines = drift("writes", gated_run, "--length", "200", "--depth", "0.5").splitlines()
    assert len(lines) == 2 * 2  # 2 layers × 2 key/value heads, each with a write gate
    assert all("filler β" in line and "needle β" in line and "task+question β" in line
               for line in lines)


def test_writes_in_a_haystack_lists_the_texts_writing_tokens_and_skips_layers_without_memory(
        tmp_path):
    """With memory from layer 1, layer 0 has no memory (and no write gate) to report."""
    run = write_run(tmp_path / "run", n_layers=3, memory_from_layer=1, memory_rule="deltanet",
                    memory_write_gate=True, write_gate_activation="clamp",
                    write_gate_init=0.5).parent
    book = tmp_path / "book.txt"
    book.write_text("In 1811 the ship sailed with 42 men and came back in 1813. " * 20)
    lines = drift("writes", run, "--length", "300", "--depth", "0.5", "--haystack",
                  book).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"layer {layer} kv head {head}" for layer in (1, 2) for head in (0, 1)]
    assert all("text β" in line and "needle β" in line and "text tokens writing: {" in line
               for line in lines)
    assert any("'1'" in line or "'2'" in line or "' '" in line for line in lines)


def test_keys_reports_the_conditioning_of_what_the_filler_writes(gated_run):
    lines = drift("keys", gated_run).splitlines()
    assert len(lines) == 2 * 2 and all("distinct keys" in line for line in lines)


def test_freeze_scores_prompts_with_a_frozen_layer(gated_run):
    out = drift("freeze", gated_run, "--length", "200", "--depth", "0.5", "--freeze", "64:128",
                "--layers", "0", "--samples", "2")
    assert "200 tokens, depth 0.5, layers [0] frozen over [64, 128)" in out


def test_embeddings_compares_the_haystack_tokens_the_filler_lacks_with_the_filler_s(gated_run):
    lines = drift("embeddings", gated_run, "--haystack", "data/pg19-sample").splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "300 haystack tokens the filler lacks", f"{lines[1].split()[0]} filler-prompt tokens"]
    assert all(-1 <= float(line.rsplit(" ", 1)[1]) <= 1 for line in lines)


def _in_held_out_prose(sources: list) -> list:
    """The sources repeated in Austen's novels, the two in data/pg19-sample held out."""
    from dataclasses import replace

    return [replace(source, files=["data/books/austen.jsonl.gz"],
                    exclude={"title": ["Northanger Abbey", "Persuasion"]}) for source in sources]


def test_the_shipped_stage_1_repeats_its_four_late_sources_in_held_out_prose():
    """From step 1500 the stage-1 recipe trains each late filler source again in Austen's
    novels, the two that evaluation reads held out: the report's prose figures rest on it."""
    from infinitrain.recipe import load_recipe

    _, stage_1 = load_recipe("passkey-tiny")
    late = [source for source in stage_1.data.sources
            if source.from_step == 1500 and not source.files]
    assert len(late) == 4
    assert stage_1.data.sources[-4:] == _in_held_out_prose(late)
    assert stage_1.model_config.memory_from_layer == 1


def test_the_shipped_stage_1_supervises_every_prompt_token_of_its_first_phase_only():
    """The first phase's 2-segment prompts are language-modelled whole, so the copy forms early
    whatever the rounding (with the answer alone, seed 3 at two threads never formed it); later
    phases supervise the answer and the key's copy, as the report's figures assume."""
    from infinitrain.recipe import load_recipe

    _, stage_1 = load_recipe("passkey-tiny")
    first, *later = stage_1.data.sources
    assert first.until_step == 800 and first.supervise_prompt
    assert not any(source.supervise_prompt for source in later)
    assert all(source.supervise_key_copy for source in later)


def test_without_digits_copies_a_haystack_less_its_digits(tmp_path):
    import json

    book = tmp_path / "book.txt"
    book.write_text("Chapter 7. In 1811 the ship sailed.")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "without_digits.py"),
                             str(book), str(out)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"text": "Chapter . In  the ship sailed."}]
    assert "5 digits removed" in result.stdout


def test_the_shipped_stage_2_is_the_prose_stage_2_with_numbers_in_prose_and_4_digit_keys():
    """The stage-2 recipe stays the prose experiment's stage 2 plus one distractor in each prose
    source, a filler and a prose source of 4-digit keys, and the write gate training from step 0:
    the report's steps from one to the other keep describing the recipe."""
    from dataclasses import replace

    from infinitrain.recipe import load_recipe

    _, prose = load_recipe(str(REPO / "experiments" / "passkey-tiny-overlap-prose.yaml"))
    _, numbers = load_recipe("passkey-tiny-overlap")
    assert numbers.model_config == prose.model_config
    assert numbers.train == prose.train
    assert numbers.optim == replace(prose.optim, write_gate_below_loss=0.0)
    filler, in_books = prose.data.sources[:4], prose.data.sources[4:]
    assert numbers.data.sources[:4] == filler
    assert numbers.data.sources[4:8] == [replace(s, distractors=1) for s in in_books]
    four_digits = replace(filler[0], key_min=1000, key_max=9999, weight=0.2)
    assert numbers.data.sources[8:] == [
        four_digits, replace(_in_held_out_prose([four_digits])[0], distractors=1)]


def _answer_paths(*args: str) -> list[tuple[str, float]]:
    """(source, memory-only %) per passkey source, from experiments/answer_paths.py."""
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "answer_paths.py"),
                             "passkey-tiny", "--samples", "200", *args], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = result.stdout.splitlines()[1:]
    return [(row.split(":")[0], float(row.split("memory only ")[1].split("%")[0]))
            for row in rows]


def test_answer_paths_measures_which_answers_only_memory_can_give():
    """The stage-1 recipe's first phase (2-segment prompts) leaves most answers to a local copy;
    a needle right after the task text in a 3-4-segment prompt leaves all of them to memory;
    with the whole window one segment, none."""
    from infinitrain.recipe import load_recipe

    _, stage_1 = load_recipe("passkey-tiny")
    rows = _answer_paths()
    assert len(rows) == len(stage_1.data.sources)
    first, *_ = rows
    assert first[0].startswith("passkey (96–127 tokens), steps 0–799") and first[1] < 20
    right_after_the_task = [share for (_, share), source
                            in zip(rows, stage_1.data.sources, strict=True)
                            if source.depth_max == 0.0]
    assert right_after_the_task and all(share == 100.0 for share in right_after_the_task)
    assert all(share == 0.0 for _, share in _answer_paths("--set", "model.segment_len=256"))
