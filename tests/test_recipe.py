"""Recipes: every shipped one validates and sizes up; bad ones fail in one clear line."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.model import InfiniTransformer
from infinitrain.recipe import RecipeError, dump_recipe, load_recipe, parse_recipe, shipped_recipes
from infinitrain.recipe.loading import parse_yaml

SHIPPED = ["tiny", "1b", "8b", "passkey-tiny", "passkey-tiny-overlap", "passkey-5k", "booksum-500k",
           "booksum-tiny"]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_every_promised_recipe_is_shipped():
    assert set(SHIPPED) <= set(shipped_recipes())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_builds_on_meta(name):
    _, recipe = load_recipe(name)
    with torch.device("meta"):
        model = InfiniTransformer(recipe.model_config)
    parameters = sum(p.numel() for p in model.parameters())
    expected = {"tiny": (0.5e6, 2e6), "1b": (1.2e9, 1.3e9), "8b": (7.9e9, 8.1e9)}
    low, high = expected[recipe.model.preset]
    assert low < parameters < high
    assert recipe.data.window_tokens % recipe.model_config.segment_len == 0
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe  # resolved form loads back


@pytest.mark.parametrize("name", SHIPPED)
def test_dry_run_prints_the_recipe_and_the_run_size(name):
    result = invoke("pretrain", "--recipe", name, "--dry-run")
    assert result.exit_code == 0, result.output
    for expected in ("parameters", "memory state per stream", "tokens per optimizer step",
                     "window_tokens:"):
        assert expected in result.output


def test_paper_settings_of_the_large_recipes():
    _, passkey = load_recipe("passkey-5k")
    assert (passkey.train.max_steps, passkey.optim.lr) == (400, 1e-4)
    assert passkey.model_config.segment_len == 2048 and passkey.data.sources[0].kind == "passkey"
    _, booksum = load_recipe("booksum-500k")
    assert booksum.model.preset == "8b" and booksum.data.sources[0].max_input_tokens == 500_000
    for name in ("1b", "8b"):
        _, recipe = load_recipe(name)
        assert recipe.train.strategy == "deepspeed" and recipe.train.deepspeed.stage == 3
        assert recipe.optim.lr == 1e-4 and recipe.model_config.segment_len == 2048


@pytest.mark.parametrize("name", ["passkey-tiny", "passkey-5k"])
def test_passkey_training_teaches_the_write_gate_the_needle_for_the_whole_run(name):
    """Both passkey recipes that train the write gate from an open start train it on where the
    needle is from their first step to their last, so no loss threshold decides when it starts
    (the start that made stage 1 chaotic), and every source is a passkey one, whose documents
    say which tokens to write."""
    from infinitrain.training.write_gate import WriteGateSchedule

    _, recipe = load_recipe(name)
    gate = WriteGateSchedule(recipe.optim)
    assert gate.targets(0) and gate.targets(recipe.train.max_steps - 1)
    assert not gate.waits_for_loss
    assert recipe.model_config.memory_write_gate and recipe.optim.write_penalty > 0
    assert {source.kind for source in recipe.data.sources} == {"passkey"}


def test_set_overrides_parse_yaml_values_and_reach_list_items():
    _, recipe = load_recipe("tiny", ["optim.lr=1e-4", "data.sources.0.min_tokens=5",
                                     "train.precision=bf16-mixed", "model.segment_len=32",
                                     "checkpoint.out_dir=/tmp/x"])
    assert recipe.optim.lr == 1e-4  # YAML reads 1e-4 as text; a numeric field accepts it
    assert recipe.data.sources[0].min_tokens == 5
    assert recipe.model_config.segment_len == 32
    assert recipe.checkpoint.out_dir == "/tmp/x"


def recipe_file(tmp_path, change) -> str:
    """The tiny recipe with one change applied to its raw YAML mapping, written to a file."""
    raw = parse_yaml(shipped_recipes()["tiny"], "tiny")
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


BAD_RECIPES = {
    "unknown key": (lambda r: r["optim"].update(learning_rate=0.1),
                    "optim.learning_rate: unknown field; allowed: name, lr,"),
    "wrong type": (lambda r: r["train"].update(max_steps="many"),
                   "train.max_steps = 'many': expected an integer"),
    "negative lr": (lambda r: r["optim"].update(lr=-0.001), "optim.lr = -0.001: must be > 0"),
    "window not whole segments": (lambda r: r["data"].update(window_tokens=100),
                                  "data.window_tokens = 100: must be a multiple of "
                                  "model.segment_len = 64"),
    "pieces not whole segments": (lambda r: r["data"].update(max_document_tokens=100),
                                  "data.max_document_tokens = 100: must be a positive multiple "
                                  "of model.segment_len = 64"),
    "missing data path": (lambda r: r["data"]["sources"][0].update(files=["nowhere.jsonl.gz"]),
                          "data.sources.0.files: nowhere.jsonl.gz: no such file"),
    "unknown model field": (lambda r: r["model"].update(layers=3),
                            "model.layers: unknown field (did you mean model.n_layers?); "
                            "allowed: init, preset, vocab_size"),
    "misspelt field": (lambda r: r["train"].update(max_step=3),
                       "train.max_step: unknown field (did you mean train.max_steps?); "
                       "allowed: max_steps,"),
    "field in another section": (lambda r: r["train"].update(lr=1e-3),
                                 "train.lr: unknown field (did you mean optim.lr?); allowed:"),
    "source field at the data level": (
        lambda r: r["data"].update(files=["a.jsonl"]),
        "data.files: unknown field (did you mean data.sources.<i>.files or "
        "data.validation.sources.<i>.files?)"),
    "bad model value": (lambda r: r["model"].update(n_kv_heads=3),
                        "model.n_kv_heads = 3: must divide model.n_heads = 4"),
    "unknown choice": (lambda r: r["train"].update(precision="fp8"),
                       "train.precision = 'fp8': must be one of 32-true, bf16-mixed"),
    "missing section": (lambda r: r.pop("train"), "train: missing; expected a mapping"),
    "bad source": (lambda r: r["data"]["sources"][0].update(kind="passkey",
                                                             name="emozilla/pg19"),
                   "data.sources.0: kind = 'passkey' hides its needles in the text of at most "
                   "one of name (a hub dataset) or files (local data)"),
    "curriculum gap": (lambda r: r["data"]["sources"][0].update(from_step=10),
                       "data.sources: no source is active at step 0"),
    "empty step range": (lambda r: r["data"]["sources"][0].update(from_step=5, until_step=5),
                         "until_step = 5: must be > from_step = 5"),
    "write penalty without a write gate": (
        lambda r: r["optim"].update(write_penalty=0.1),
        "optim.write_penalty = 0.1: needs model.memory_write_gate: true"),
    "write targets without a penalty to weigh them": (
        lambda r: r["optim"].update(write_target_until_step=100),
        "optim.write_target_until_step = 100: needs optim.write_penalty > 0"),
    "negative write penalty": (lambda r: r["optim"].update(write_penalty=-1),
                               "optim.write_penalty = -1.0: must be >= 0"),
    "retired model field": (lambda r: r["model"].update(memory_features="signed"),
                            "model.memory_features = 'signed': removed (only its old default, "
                            "'elu', is still accepted); this version always uses σ = ELU + 1"),
    "retired source field": (lambda r: r["data"]["sources"][0].update(passkey_length_step=64),
                             "data.sources.0.passkey_length_step = 64: removed (only its old "
                             "default, 1, is still accepted); prompt lengths are drawn from "
                             "every length in [passkey_length_min, passkey_length]"),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_malformed_recipe_fails_in_one_clear_line(case, tmp_path):
    change, message = BAD_RECIPES[case]
    result = invoke("pretrain", "--recipe", recipe_file(tmp_path, change), "--dry-run")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]


def test_a_recipe_saved_with_retired_fields_at_their_old_defaults_loads_the_same_run():
    """A resolved recipe as checkpoints saved it before model.memory_features and
    passkey_length_step were removed (every source listed the step at its default, 1): the same
    model and data, so a run resumes from it; the fields are gone from what is saved now."""
    _, recipe = load_recipe("passkey-tiny")
    old = yaml.safe_load(dump_recipe(recipe))
    old["model"]["memory_features"] = "elu"
    for source in old["data"]["sources"]:
        source["passkey_length_step"] = 1
    loaded = parse_recipe(old)
    assert loaded.model_config == recipe.model_config and loaded.data == recipe.data
    assert "passkey_length_step" not in dump_recipe(recipe)


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "optim.lr"], "--set 'optim.lr': expected FIELD=VALUE"),
    (["--set", "data.sources.3.files=[a]"], "--set data.sources.3: no list item '3'"),
    (["--set", "optim.lr=abc"], "optim.lr = 'abc': expected a number"),
    (["--set", "trian.seed=3"], "trian: unknown field (did you mean train?)"),
    (["--set", "logging.seed=3"], "logging.seed: unknown field (did you mean train.seed?)"),
])
def test_bad_overrides_fail_in_one_clear_line(args, message):
    result = invoke("pretrain", "--recipe", "tiny", "--dry-run", *args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert message in result.output


def test_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(RecipeError, match=r"shipped: .*tiny"):
        load_recipe("no-such-recipe")


def test_finetune_requires_weights_to_start_from():
    result = invoke("finetune", "--recipe", "passkey-5k", "--dry-run")
    assert result.exit_code == 2 and "finetune needs weights to start from" in result.output


def test_recipes_list_and_show():
    listed = invoke("recipes", "list")
    assert listed.exit_code == 0
    assert all(name in listed.output for name in SHIPPED)
    shown = invoke("recipes", "show", "tiny")
    assert shown.exit_code == 0 and "austen.jsonl.gz" in shown.output
    resolved = invoke("recipes", "show", "tiny", "--resolved")
    assert resolved.exit_code == 0 and "gate_lr_multiplier: 10.0" in resolved.output
