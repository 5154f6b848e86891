"""`infinitrain export hf`: the exported directory loads through transformers (remote code,
offline) and computes what infinitrain computes — logits, greedy and beam generation, a state
carried across generate() calls — and malformed inputs fail in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, one_line_error, write_run
from safetensors import safe_open
from typer.testing import CliRunner

from infinitrain.cli import app
from infinitrain.data import load_tokenizer
from infinitrain.export.hf import core_files
from infinitrain.inference import GenerationConfig, SamplingConfig, generate
from infinitrain.inference.loading import load_exported, load_model
from infinitrain.model import InfiniTransformer, preset
from infinitrain.model_dir import load_model_dir, save_model_dir

REPO = Path(__file__).resolve().parent.parent
SEGMENT = 8
TEXT = "It is a truth universally acknowledged, that a single man in possession of 42 pounds"


pytestmark = pytest.mark.usefixtures("one_thread")


def _cache_name() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def carried(output):
    """The state an output carries, under the installed transformers' name for it."""
    return getattr(output, _cache_name())


def continuing(state) -> dict:
    """The keyword that hands a carried state back to forward() or generate()."""
    return {_cache_name(): state}


def export(*args: str):
    return CliRunner().invoke(app, ["export", "hf", *map(str, args)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_run(run)
    return run


@pytest.fixture(scope="module")
def core(run_dir) -> InfiniTransformer:
    return load_model_dir(run_dir / "step-00000010")


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tiny-hf"
    result = export(run_dir, out)  # a run directory: its 'latest' checkpoint
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def hf_model(exported):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()


def test_export_ships_the_core_files_verbatim_with_config_and_card(exported):
    for source in core_files():
        assert (exported / source.name).read_bytes() == source.read_bytes(), source.name
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "infini_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_infini.InfiniForCausalLM"
    assert config["segment_len"] == SEGMENT and config["dtype"] == "float32"
    generation = json.loads((exported / "generation_config.json").read_text())
    tokenizer = load_tokenizer(REPO / "data" / "tokenizer")
    assert generation["eos_token_id"] == tokenizer.eos_id
    card = (exported / "README.md").read_text()
    assert TINY_RECIPE.strip() in card and "trust_remote_code=True" in card


@pytest.mark.parametrize("length", [3 * SEGMENT + 5, 3 * SEGMENT])
def test_transformers_logits_equal_infinitrain(hf_model, core, length):
    ids = torch.randint(0, 4096, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected, _ = core(ids)
        whole = hf_model(ids, attention_mask=torch.ones_like(ids)).logits
        first = hf_model(ids[:, :13])  # then the rest on the carried state
        rest = hf_model(ids[:, 13:], **continuing(carried(first))).logits
    assert torch.allclose(whole, expected, atol=1e-5, rtol=0)
    assert torch.allclose(torch.cat([first.logits, rest], dim=1), expected, atol=1e-5, rtol=0)
    assert carried(first).get_seq_length() == length


def test_greedy_generate_equals_infinitrain_generate(hf_model, core):
    prompt = torch.randint(0, 4096, (1, 13), generator=torch.Generator().manual_seed(1))
    new = 3 * SEGMENT  # crosses three segment boundaries while decoding
    out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                            do_sample=False, return_dict_in_generate=True, output_logits=True)
    ours = generate(core, prompt[0], config=GenerationConfig(max_new_tokens=new))
    assert out.sequences[0, 13:].tolist() == ours.tokens
    with torch.no_grad():  # every step's logits are the whole sequence's, read in one call
        expected, _ = core(out.sequences)
    steps = torch.stack(out.logits, dim=1)
    assert torch.allclose(steps, expected[:, 12:-1], atol=1e-5, rtol=0)


def test_generate_continues_from_a_returned_state(hf_model):
    """Ask a second question without re-reading: only the unseen tokens are read."""
    document = torch.randint(0, 4096, (1, 21), generator=torch.Generator().manual_seed(2))
    question = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(3))
    first = hf_model.generate(document, max_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True)
    state = carried(first)
    assert state.get_seq_length() == first.sequences.shape[1] - 1  # last token not yet read
    ids = torch.cat([first.sequences, question], dim=1)
    continued = hf_model.generate(ids, **continuing(state), max_new_tokens=5, do_sample=False)
    fresh = hf_model.generate(ids, max_new_tokens=5, do_sample=False)
    assert continued.tolist() == fresh.tolist()


def test_beam_search_reorders_the_state(hf_model, core):
    """With length_penalty 0 a beam's score is the sum of its tokens' log-probabilities; a state
    not following its beam would score tokens against another beam's memory."""
    prompt = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(4))
    out = hf_model.generate(prompt, num_beams=3, max_new_tokens=SEGMENT + 2, do_sample=False,
                            length_penalty=0.0, eos_token_id=None, return_dict_in_generate=True,
                            output_scores=True)
    with torch.no_grad():
        logits, _ = core(out.sequences[:1])
    log_probs = logits[0, 5:-1].log_softmax(-1)
    expected = log_probs.gather(-1, out.sequences[0, 6:, None]).sum()
    assert torch.allclose(out.sequences_scores[0], expected, atol=1e-4)


def test_labels_give_the_causal_lm_loss(hf_model, core):
    ids = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss = hf_model(ids, labels=ids).loss
        logits, _ = core(ids)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_sampled_generate_equals_infinitrain_generate(hf_model, core):
    """Seeded sampling draws the same tokens: both sample softmax(logits / T) with one seeded
    CPU generator."""
    prompt = torch.randint(0, 4096, (1, 11), generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    out = hf_model.generate(prompt, do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                            max_new_tokens=2 * SEGMENT)
    ours = generate(core, prompt[0], config=GenerationConfig(
        max_new_tokens=2 * SEGMENT, sampling=SamplingConfig(temperature=0.8, seed=7)))
    assert out[0, 11:].tolist() == ours.tokens


PAD = 0


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def prompts_of(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(1, 4096, (length,), generator=generator) for length in lengths]


def test_a_left_padded_batch_reads_each_prompt_as_if_alone(hf_model):
    """Different lengths put the segment boundaries at different columns: each row's logits at
    its real positions and its memory equal those of the prompt read alone."""
    prompts = prompts_of(2 * SEGMENT + 5, 6, 3 * SEGMENT)
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        batched = hf_model(ids, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = hf_model(prompt[None])
            real = mask[row].bool()
            assert torch.allclose(batched.logits[row, real], alone.logits[0], atol=1e-5, rtol=0)
            assert not batched.logits[row, ~real].any()  # padding: no prediction
            state, expected = carried(batched).state_of(row), carried(alone).state_of(0)
            for layer, layer_alone in zip(state.layers, expected.layers, strict=True):
                for name, tensor in layer.tensors().items():
                    assert torch.allclose(tensor, layer_alone.tensors()[name], atol=1e-5), name


def test_a_right_padded_batch_scores_each_row_as_if_alone(hf_model):
    """Scoring tools (lm-eval's loglikelihood) pad on the right."""
    prompts = prompts_of(SEGMENT + 3, 2 * SEGMENT + 7)
    width = max(len(prompt) for prompt in prompts)
    ids = torch.stack([torch.cat([p, torch.full((width - len(p),), PAD)]) for p in prompts])
    mask = (torch.arange(width)[None] < torch.tensor([[len(p)] for p in prompts])).long()
    with torch.no_grad():
        batched = hf_model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = hf_model(prompt[None]).logits[0]
            assert torch.allclose(batched[row, : len(prompt)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beams", [1, 2])
def test_batched_generation_of_left_padded_prompts_equals_one_at_a_time(hf_model, beams):
    prompts = prompts_of(SEGMENT + 5, 4, 2 * SEGMENT)
    ids, mask = left_padded(prompts)
    options = {"max_new_tokens": 2 * SEGMENT, "do_sample": False, "num_beams": beams,
               "eos_token_id": None, "pad_token_id": PAD, "return_dict_in_generate": True,
               "output_scores": True}
    batched = hf_model.generate(ids, attention_mask=mask, **options)
    for row, prompt in enumerate(prompts):
        alone = hf_model.generate(prompt[None], **options)
        tokens = batched.sequences[row, ids.shape[1]:]
        assert tokens.tolist() == alone.sequences[0, len(prompt):].tolist()
        if beams == 1:  # every step's scores, not only the argmax
            for step, expected in zip(batched.scores, alone.scores, strict=True):
                assert torch.allclose(step[row], expected[0], atol=1e-5, rtol=0)


def test_text_generation_pipeline_batches(exported, hf_model):
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=hf_model, tokenizer=tokenizer)
    texts = ["It is a truth universally acknowledged", "Call me Ishmael. Some years ago, never "
             "mind how long precisely, having little or no money in my purse"]
    options = {"max_new_tokens": SEGMENT + 2, "do_sample": False}
    together = generator(texts, batch_size=2, **options)
    alone = [generator(text, **options) for text in texts]
    assert together == alone


def test_autotokenizer_loads_and_round_trips(exported):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    ours = load_tokenizer(REPO / "data" / "tokenizer")
    ids = hf_tokenizer(TEXT).input_ids
    assert ids == ours.encode(TEXT, bos=True)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_bf16_sharded_export(tmp_path, core, run_dir):
    """Weights stored in bf16 and split into shards; transformers and the evaluation loader
    both read them back."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    result = export(run_dir / "step-00000010", out, "--dtype", "bf16", "--max-shard-size", "100KB")
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with safe_open(str(shards[0]), framework="pt") as weights:
        assert all(weights.get_tensor(name).dtype == torch.bfloat16 for name in weights.keys())  # noqa: SIM118
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hf_model.dtype == torch.bfloat16
    loaded = load_exported(out, torch.device("cpu"), torch.float32)
    assert loaded is not None and loaded.tokenizer_dir == out
    ids = torch.randint(0, 4096, (1, 2 * SEGMENT + 3))
    with torch.no_grad():
        expected, _ = core(ids)
        ours, _ = loaded.model(ids)
        theirs = hf_model(ids).logits.float()
    assert torch.allclose(ours, theirs, atol=2e-2)  # same bf16 weights, different compute dtype
    assert 0 < (ours - expected).abs().max() < 5e-2  # bf16 rounding, nothing worse


def test_load_exported_is_exact_and_declines_other_directories(exported, core, run_dir):
    loaded = load_exported(exported, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 4096, (1, 19))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids)[0], core(ids)[0])
    assert load_exported(run_dir / "step-00000010", torch.device("cpu"), torch.float32) is None


def test_exports_list_no_retired_field_and_older_ones_still_load(exported, core, tmp_path):
    """config.json holds no removed field (model.memory_features). An export written before its
    removal, which held it at its old default 'elu', loads as the same model through
    transformers and infinitrain; at another value both refuse it in one line."""
    from transformers import AutoModelForCausalLM

    values = json.loads((exported / "config.json").read_text())
    assert "memory_features" not in values and "vocab_size" in values
    older = tmp_path / "pre-removal-export"
    shutil.copytree(exported, older)
    (older / "config.json").write_text(json.dumps({**values, "memory_features": "elu"}))
    ids = torch.randint(0, 4096, (1, 2 * SEGMENT + 3))
    with torch.no_grad():
        expected, _ = core(ids)
        theirs = AutoModelForCausalLM.from_pretrained(older, trust_remote_code=True)(ids).logits
        ours, _ = load_exported(older, torch.device("cpu"), torch.float32).model(ids)
    assert torch.allclose(theirs, expected, atol=1e-5, rtol=0) and torch.equal(ours, expected)
    (older / "config.json").write_text(json.dumps({**values, "memory_features": "signed"}))
    message = "model.memory_features = 'signed': removed (only its old default, 'elu', is still"
    for load in (lambda: AutoModelForCausalLM.from_pretrained(older, trust_remote_code=True),
                 lambda: load_exported(older, torch.device("cpu"), torch.float32)):
        with pytest.raises(ValueError) as error:  # the export's own ConfigError, or ours
            load()
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("variant", [{"tie": False}, {"memory_from_layer": 1},
                                     {"memory_rule": "deltanet", "memory_write_gate": True,
                                      "write_gate_activation": "clamp", "write_gate_init": 0.5},
                                     {"local_overlap": 3}],
                         ids=["untied", "local-only first layer", "clamped write gate",
                              "local overlap"])
def test_model_variants_round_trip(tmp_path, variant):
    step = write_run(tmp_path / "run", **variant)
    assert export(step, tmp_path / "hf").exit_code == 0
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.randint(0, 4096, (1, 3 * SEGMENT + 3))
    with torch.no_grad():
        expected, _ = load_model_dir(step)(ids)
        assert torch.allclose(hf_model(ids).logits, expected, atol=1e-5, rtol=0)
    first = variant.get("memory_from_layer", 0)  # the card names the layers with memory
    card = (tmp_path / "hf" / "README.md").read_text()
    assert ("every attention layer is Infini-attention" in card) == (first == 0)
    gate_rows = [line for line in card.splitlines() if re.fullmatch(r"\| \d+ \| [\d.| ]+", line)]
    assert [int(row.split()[1]) for row in gate_rows] == list(range(first, 2))


def test_save_pretrained_output_loads_again(hf_model, core, tmp_path):
    """A model fine-tuned with transformers and saved again stays loadable, by both."""
    from transformers import AutoModelForCausalLM

    hf_model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    loaded = load_exported(tmp_path / "again", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 4096, (1, 2 * SEGMENT + 1))
    with torch.no_grad():
        expected, _ = core(ids)
        assert torch.allclose(again(ids).logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(loaded.model(ids)[0], expected)


def test_malformed_inputs_fail_in_one_line(tmp_path, run_dir, exported):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(export(empty, tmp_path / "a"), "not a model directory")
    one_line_error(export(tmp_path / "missing", tmp_path / "b"), "no such directory")
    one_line_error(export(run_dir, exported), "not an empty directory")
    one_line_error(export(run_dir, tmp_path / "c", "--dtype", "fp8"), "dtype 'fp8'")
    one_line_error(export(run_dir, tmp_path / "c", "--max-shard-size", "lots"),
                   "max_shard_size 'lots'")
    bare = save_model_dir(InfiniTransformer(preset("tiny", d_model=32, ffn_dim=64)),
                          tmp_path / "bare")
    one_line_error(export(bare, tmp_path / "e"), "has no tokenizer/ directory")
    small_vocab = write_run(tmp_path / "small", vocab_size=300)  # the 4096-token tokenizer
    one_line_error(export(small_vocab, tmp_path / "d"), "model's vocabulary has 300")
    assert not (tmp_path / "d").exists()


def test_evaluation_commands_load_an_export(exported, core):
    """`--model` of every eval command goes through load_model, which must accept an export."""
    loaded = load_model(exported)
    ids = torch.randint(0, core.config.vocab_size, (1, 29))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids)[0], core(ids)[0])
    assert loaded.tokenizer_dir is not None and (loaded.tokenizer_dir / "tokenizer.json").is_file()
