"""`infinitrain import hf`: a Llama checkpoint becomes an Infini-Transformer that computes the
Llama's logits within a segment when the memory path is off, that a recipe's model.init starts
from, and checkpoints we cannot convert faithfully are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import one_line_error
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.export.llama import recipe_model_section
from infinitrain.model import InfiniTransformer, preset
from infinitrain.model_dir import load_model_config, load_model_dir

REPO = Path(__file__).resolve().parent.parent
SEGMENT = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


pytestmark = pytest.mark.usefixtures("one_thread")


def save_llama(directory: Path, tie: bool, rope_parameters: dict | None = None):
    """A tiny random Llama with GQA, a non-default head width, RoPE base and norm epsilon, and
    norm weights that are not all ones (so a mapping that mixed up or ignored any of them would
    show), saved with the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=64,
                         rope_parameters=rope_parameters or {"rope_type": "default",
                                                             "rope_theta": 10_000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:  # the RMSNorm weights
                parameter.normal_(1.0, 0.2)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(REPO / "data" / "tokenizer" / name, directory / name)
    return model


def import_hf(*args: str):
    return CliRunner().invoke(app, ["import", "hf", *map(str, args)])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return directory, save_llama(directory, tie=True)


@pytest.mark.parametrize("tie", [True, False])
def test_imported_model_equals_the_llama_within_a_segment(tmp_path, tie):
    llama_model = save_llama(tmp_path / "llama", tie)
    result = import_hf(tmp_path / "llama", tmp_path / "infini", "--segment-len", SEGMENT)
    assert result.exit_code == 0, result.output
    model = load_model_dir(tmp_path / "infini")
    assert model.config.tie_embeddings == tie
    for length in (SEGMENT, 13):
        ids = torch.randint(0, 4096, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = llama_model(ids).logits
            without_memory, _ = model(ids, use_memory=False)
            with_memory, _ = model(ids)
        assert torch.allclose(without_memory, expected, atol=1e-4, rtol=0)
        # Memory on: the first segment reads an empty memory, so only the 1 − sigmoid(−6)
        # weight on local attention separates the two.
        assert 0 < (with_memory - expected).abs().max() < 0.05 * expected.abs().max()
    # Layer 0 attends locally (the 1b recipe's memory_from_layer): the gates are layer 1's on.
    gates = model.memory_gates()
    assert gates.shape == (model.config.n_layers - 1, 4)
    assert torch.allclose(gates, torch.full_like(gates, 1 / (1 + math.exp(6))))


def test_import_settings_and_tokenizer_are_kept(llama, tmp_path):
    directory, _ = llama
    result = import_hf(directory, tmp_path / "out", "--segment-len", 16, "--rule", "linear",
                       "--gate-init", -4)
    assert result.exit_code == 0, result.output
    config = load_model_config(tmp_path / "out")
    assert (config.segment_len, config.memory_rule, config.gate_init) == (16, "linear", -4.0)
    assert (config.rope_theta, config.norm_eps, config.head_dim) == (10_000.0, 1e-6, 8)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "out" / "tokenizer" / name).read_bytes() == \
            (directory / name).read_bytes()


def test_a_recipe_can_start_from_the_import(llama, tmp_path):
    """The printed model section rebuilds the imported config, which training's init accepts."""
    from infinitrain.training.weights import check_init, load_initial_weights

    directory, _ = llama
    assert import_hf(directory, tmp_path / "out", "--segment-len", SEGMENT).exit_code == 0
    imported = load_model_config(tmp_path / "out")
    section = recipe_model_section(imported, tmp_path / "out")
    name, init = section.pop("preset"), Path(section.pop("init"))
    config = preset(name, **section)
    assert config == imported
    model = InfiniTransformer(config)
    load_initial_weights(model, check_init(init, config), is_global_zero=True)
    ids = torch.randint(0, 4096, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], load_model_dir(init)(ids)[0])


PAPER_MEMORY = ("--rule", "delta", "--memory-from-layer", "0")
IMPORT_FOR = {"1b": (), "passkey-5k": (), "8b": PAPER_MEMORY, "booksum-500k": PAPER_MEMORY}
"""The `import hf` options each large recipe's pipeline starts from (the 1b and 8b recipes'
comments): the default import for the passkey pipeline, the paper's memory for the books one."""


@pytest.fixture(scope="module")
def imports(llama, tmp_path_factory) -> dict[tuple[str, ...], Path]:
    out = {}
    for options in set(IMPORT_FOR.values()):
        out[options] = tmp_path_factory.mktemp("import") / "out"
        assert import_hf(llama[0], out[options], "--segment-len", SEGMENT, *options).exit_code == 0
    return out


def test_the_default_import_writes_through_a_fully_open_write_gate_from_layer_1(imports):
    model = load_model_dir(imports[()])
    assert (model.config.memory_rule, model.config.write_gate_activation) == ("deltanet", "clamp")
    first, *others = model.layers
    assert not first.attn.has_memory and not hasattr(first.attn, "write_bias")
    for layer in others:
        assert torch.equal(layer.attn.write_bias, torch.ones(2))
        assert not layer.attn.write_weight.any()
    paper = load_model_dir(imports[PAPER_MEMORY])
    assert not paper.config.memory_write_gate
    assert all(layer.attn.has_memory for layer in paper.layers)


@pytest.mark.parametrize("name", list(IMPORT_FOR))
def test_the_large_recipes_continue_from_their_import(imports, name):
    """A large recipe's model.init accepts the import its pipeline starts from and computes what
    it computes: here a tiny Llama's import, with the recipe's memory settings."""
    from infinitrain.recipe import load_recipe
    from infinitrain.training.weights import check_init, load_initial_weights

    directory = imports[IMPORT_FOR[name]]
    model = load_model_dir(directory)
    recipe = load_recipe(name)[1].model_config
    config = dataclasses.replace(model.config, **{field: getattr(recipe, field) for field in (
        "memory_rule", "memory_from_layer", "memory_write_gate", "write_gate_activation")})
    continued = InfiniTransformer(config)
    load_initial_weights(continued, check_init(directory, config), is_global_zero=True)
    ids = torch.randint(0, 4096, (1, 3 * SEGMENT))
    with torch.no_grad():
        assert torch.equal(continued(ids)[0], model(ids)[0])


def edited_copy(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
"""Llama-3.1's scaling, with a context small enough that this model's head width (8: wavelengths
6.3, 63, 628, 6283) has a kept, a blended and two scaled frequencies."""


def test_llama3_rope_scaling_is_imported_exactly(tmp_path):
    llama_model = save_llama(tmp_path / "llama", tie=True, rope_parameters=LLAMA3_ROPE)
    result = import_hf(tmp_path / "llama", tmp_path / "infini", "--segment-len", SEGMENT)
    assert result.exit_code == 0, result.output
    model = load_model_dir(tmp_path / "infini")
    assert model.config.rope_scale_factor == 8.0 and model.config.rope_original_context == 64
    ids = torch.randint(0, 4096, (2, SEGMENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = llama_model(ids).logits
        ours, _ = model(ids, use_memory=False)
        unscaled = InfiniTransformer(model.config.with_updates(rope_scale_factor=1.0)).eval()
        unscaled.load_state_dict(model.state_dict())
        plain, _ = unscaled(ids, use_memory=False)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the scaling matters here


def test_other_rope_scaling_is_refused_unless_dropping_it_is_allowed(llama, tmp_path):
    directory, _ = llama
    scaled = edited_copy(directory, tmp_path / "scaled", rope_parameters={
        "rope_type": "yarn", "rope_theta": 500_000.0, "factor": 4.0,
        "original_max_position_embeddings": 8192})
    one_line_error(import_hf(scaled, tmp_path / "a"), "'rope_type': 'yarn'")
    assert not (tmp_path / "a").exists()
    result = import_hf(scaled, tmp_path / "b", "--allow-rope-scaling-drop")
    assert result.exit_code == 0, result.output
    assert "dropped RoPE scaling" in result.output
    assert load_model_config(tmp_path / "b").rope_theta == 500_000.0


def test_malformed_inputs_fail_in_one_line(llama, tmp_path):
    directory, _ = llama
    one_line_error(import_hf(tmp_path / "missing", tmp_path / "o1"), "no such directory")
    (tmp_path / "bare").mkdir()
    one_line_error(import_hf(tmp_path / "bare", tmp_path / "o2"), "no config.json")
    mistral = edited_copy(directory, tmp_path / "mistral", model_type="mistral",
                          architectures=["MistralForCausalLM"])
    one_line_error(import_hf(mistral, tmp_path / "o3"), "only Llama checkpoints")
    small = edited_copy(directory, tmp_path / "small", vocab_size=300)
    one_line_error(import_hf(small, tmp_path / "o4"), "model's vocabulary has 300")
    no_tokenizer = edited_copy(directory, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    one_line_error(import_hf(no_tokenizer, tmp_path / "o5"), "no tokenizer.json")
    deeper = edited_copy(directory, tmp_path / "deeper", num_hidden_layers=3)
    one_line_error(import_hf(deeper, tmp_path / "o6"), "weight(s) missing")
    one_line_error(import_hf(directory, tmp_path / "o7", "--rule", "hebbian"), "memory_rule")
    one_line_error(import_hf(directory, tmp_path / "o8", "--rule", "delta", "--write-gate"),
                   "needs a memory rule that takes a write strength")
    for out in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"):
        assert not (tmp_path / out).exists()
