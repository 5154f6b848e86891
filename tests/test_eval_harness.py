"""`infinitrain eval harness`: lm-eval's HFLM scores the Hugging Face export on the bundled tasks
(data/harness-tasks) exactly as infinitrain's own forward pass does, whatever the batch size, with
exactly one BOS before every request, and user mistakes end in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, write_run
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data import load_tokenizer
from infinitrain.evaluation.harness import harness_model, hf_export, run_harness
from infinitrain.export import export_hf
from infinitrain.inference import GenerationConfig, generate
from infinitrain.inference.loading import load_model
from infinitrain.model import InfiniTransformer

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "data" / "harness-tasks"
SEGMENT = 8
SCORED = "infinitrain_choice,infinitrain_rolling"
"""The bundled loglikelihood tasks; infinitrain_passkey (generate_until) is tested on its own."""

pytestmark = pytest.mark.usefixtures("one_thread")


def harness(*args: str | Path):
    return CliRunner().invoke(app, ["eval", "harness", *map(str, args)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_run(run, tie=False)  # a tied random model repeats the prompt's last token
    return run


@pytest.fixture(scope="module")
def core(run_dir) -> InfiniTransformer:
    return load_model(run_dir).model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(REPO / "data" / "tokenizer")


def evaluate(run_dir: Path, out: Path, tasks: str, *options: str) -> dict:
    """The command's JSON for ``tasks`` on the run's latest checkpoint, samples included."""
    result = harness("--model", run_dir, "--tasks", tasks, "--include-path", TASKS,
                     "--device", "cpu", "--json", out, "--log-samples", *options)
    assert result.exit_code == 0, result.output
    for task in tasks.split(","):
        assert task in result.stdout  # the table
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def scored(run_dir, tmp_path_factory) -> dict[int, dict]:
    """The command's JSON for the loglikelihood tasks at batch sizes 1 and 4."""
    out = tmp_path_factory.mktemp("scored")
    return {size: evaluate(run_dir, out / f"batch-{size}.json", SCORED, "--batch-size", str(size))
            for size in (1, 4)}


def samples(payload: dict, task: str) -> list[dict]:
    return sorted(payload["results"]["samples"][task], key=lambda sample: sample["doc_id"])


def log_probability(model: InfiniTransformer, ids: list[int]) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i ≥ 1, from one forward pass of the core model.

    Summed in float64; lm-eval sums in float32, so the two agree to float32 precision: 1e-6
    relative, about 1e-3 nats on these documents of 75 to 190 tokens."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    log_probs = logits[0, :-1].double().log_softmax(-1)
    return log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()


def test_bundled_tasks_run_with_the_recorded_settings(scored):
    payload = scored[1]
    assert payload["command"] == "eval harness"
    settings = payload["settings"]
    assert settings["max_length"] == 1 << 20
    assert settings["batch_size"] == 1 and settings["tasks"] == SCORED.split(",")
    results = payload["results"]
    assert results["n-samples"]["infinitrain_choice"]["effective"] == 6
    assert results["n-samples"]["infinitrain_rolling"]["effective"] == 4
    assert 0 <= results["results"]["infinitrain_choice"]["acc,none"] <= 1
    assert results["results"]["infinitrain_rolling"]["byte_perplexity,none"] > 1


@pytest.mark.parametrize("task", ["infinitrain_choice", "infinitrain_rolling"])
def test_batch_size_does_not_change_the_results(scored, task):
    one, four = scored[1]["results"], scored[4]["results"]
    assert one["results"][task] == four["results"][task]
    assert ([s["resps"] for s in samples(scored[1], task)]
            == [s["resps"] for s in samples(scored[4], task)])


def test_rolling_loglikelihood_is_the_core_models(scored, core, tokenizer):
    """Each document is read once from BOS: lm-eval's figure is infinitrain's own forward pass,
    every text token scored once."""
    for sample in samples(scored[1], "infinitrain_rolling"):
        ids = tokenizer.encode(sample["doc"]["text"], bos=True)
        assert sample["resps"][0][0] == pytest.approx(log_probability(core, ids), rel=1e-6)


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory) -> Path:
    return export_hf(run_dir / "step-00000010", tmp_path_factory.mktemp("export") / "hf")


TEXT = "It is a truth universally acknowledged"


def test_every_loglikelihood_request_reads_one_bos(hf_dir, core, tokenizer):
    """A multiple-choice context and an empty one are both read after one BOS."""
    from lm_eval.api.instance import Instance

    lm = harness_model(hf_dir)
    context, continuation = "Question: who is single?\nAnswer:", " a man"
    (with_context, _), (empty_context, _) = lm.loglikelihood([
        Instance("loglikelihood", {}, (context, continuation), 0),
        Instance("loglikelihood", {}, ("", TEXT), 1)])
    whole = tokenizer.encode(context + continuation, bos=True)
    prefix = len(tokenizer.encode(context, bos=True))
    expected = log_probability(core, whole) - log_probability(core, whole[:prefix])
    assert with_context == pytest.approx(expected, rel=1e-5)
    assert empty_context == pytest.approx(log_probability(core, tokenizer.encode(TEXT, bos=True)),
                                          rel=1e-6)


def test_lm_evals_own_default_scores_a_second_bos_in_rolling_windows(hf_dir, core, tokenizer):
    """Why harness_model turns the tokenizer's BOS off for rolling windows: left to the tokenizer
    (lm-eval's default), a window reads BOS BOS text and scores the second BOS."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True),
                 tokenizer=AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True),
                 backend="causal", max_length=4096)
    (doubled,) = plain.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)])
    (ours,) = harness_model(hf_dir).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (TEXT,), 0)])
    text = tokenizer.encode(TEXT, bos=True)
    assert doubled == pytest.approx(log_probability(core, [tokenizer.bos_id, *text]), rel=1e-6)
    assert ours == pytest.approx(log_probability(core, text), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_generations_are_infinitrain_greedy_decoding(run_dir, core, tokenizer, tmp_path,
                                                     batch_size):
    """Every passkey prompt's generation, alone or left-padded in a batch of four prompts of
    different lengths, is what infinitrain's greedy decoding produces (cut at the task's stop
    sequence). The four differ in length by other than multiples of the segment length: a
    padded prompt must not be read shifted against its segments either."""
    payload = evaluate(run_dir, tmp_path / "passkey.json", "infinitrain_passkey",
                       "--batch-size", str(batch_size))
    generations = samples(payload, "infinitrain_passkey")
    prompts = [tokenizer.encode(sample["doc"]["prompt"], bos=True) for sample in generations]
    longest = max(map(len, prompts))
    settings = GenerationConfig(max_new_tokens=8)
    for sample, prompt in zip(generations, prompts, strict=True):
        ours = generate(core, torch.tensor(prompt), config=settings)
        assert sample["resps"][0][0] == tokenizer.decode(ours.tokens).split("\n")[0]
        if len(prompt) < longest:  # the test can fail: read after its padding, it would differ
            padding = [tokenizer.pad_id] * (longest - len(prompt))
            assert generate(core, torch.tensor(padding + prompt), config=settings).tokens != (
                ours.tokens)


def test_an_export_is_evaluated_as_is_and_a_checkpoint_through_a_temporary_one(run_dir, hf_dir,
                                                                              scored):
    with hf_export(hf_dir) as directory:
        assert directory == hf_dir
    with hf_export(run_dir) as directory:  # the run's latest checkpoint
        assert json.loads((directory / "config.json").read_text())["model_type"] == "infini_llama"
    assert not directory.exists()
    results = run_harness(hf_dir, ["infinitrain_rolling"], TASKS)
    assert results["results"]["infinitrain_rolling"] == (
        scored[1]["results"]["results"]["infinitrain_rolling"])


def test_missing_lm_eval_names_the_extra(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    one_line_error(harness("--model", run_dir, "--tasks", "infinitrain_choice"),
                   "lm-eval is not installed: pip install 'infinitrain[harness]'")


def test_malformed_inputs_fail_in_one_line(run_dir, tmp_path):
    one_line_error(harness("--model", run_dir, "--tasks", "infinitrain_choice,nonexistent_task",
                           "--include-path", TASKS),
                   f"--tasks 'nonexistent_task': no such task, group or tag in lm-eval's tasks "
                   f"or {TASKS}")
    one_line_error(harness("--model", run_dir, "--tasks", "infinitrain_choice",
                           "--include-path", tmp_path / "missing"), "no such directory")
    one_line_error(harness("--model", tmp_path / "missing", "--tasks", "infinitrain_choice",
                           "--include-path", TASKS), "--model")
    one_line_error(harness("--model", run_dir, "--tasks", " , "), "--tasks")
    one_line_error(harness("--model", run_dir, "--tasks", "infinitrain_choice",
                           "--max-length", "lots"), "--max-length 'lots'")
    one_line_error(harness("--model", run_dir, "--tasks", "infinitrain_choice", "--log-samples"),
                   "--json")
