"""Streaming inference: incremental decoding is exact, generation is one loop, states round-trip."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from infinitrain.inference import (
    GenerationConfig,
    SamplingConfig,
    StateFileError,
    generate,
    load_model,
    load_state,
    prefill,
    save_state,
    window_slices,
)
from infinitrain.inference.sampling import Sampler, nucleus
from infinitrain.model import InfiniTransformer, preset
from infinitrain.model_dir import ModelDirError, save_model_dir

SEGMENT = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(vocab_size: int = 101, rule: str = "delta", seed: int = 0,
                 segment_len: int = SEGMENT) -> InfiniTransformer:
    """A tiny random model whose gates differ per head, so memory visibly matters."""
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, ffn_dim=64, segment_len=segment_len, memory_rule=rule)
    model = InfiniTransformer(config).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.gate.copy_(torch.randn_like(block.attn.gate) * 2)
    return model


def test_window_slices_align_to_segments_after_a_partial_segment():
    assert list(window_slices(30, 3, 8, 2)) == [slice(0, 13), slice(13, 29), slice(29, 30)]
    assert list(window_slices(16, 0, 8, 1)) == [slice(0, 8), slice(8, 16)]
    with pytest.raises(ValueError, match="window_segments"):
        list(window_slices(16, 0, 8, 0))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_token_by_token_decoding_matches_full_forward(rule):
    """Five segment boundaries crossed one token at a time, after a prefill ending mid-segment."""
    model = random_model(rule=rule)
    ids = torch.randint(0, 101, (1, 6 * SEGMENT + 3))
    with torch.no_grad():
        full, _ = model(ids)
    prompt = 5
    logits, state = prefill(model, ids[:, :prompt], window_segments=1)
    torch.testing.assert_close(logits, full[:, prompt - 1], rtol=0, atol=1e-5)
    for t in range(prompt, ids.shape[1]):
        with torch.no_grad():
            step, state = model(ids[:, t : t + 1], state)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
        assert state.partial_len == (t + 1) % SEGMENT  # only the partial segment's KV is kept


def test_prefill_does_not_depend_on_window_size():
    model = random_model()
    ids = torch.randint(0, 101, (2, 5 * SEGMENT + 5))
    reference, ref_state = prefill(model, ids, window_segments=100)
    for k in (1, 2, 3):
        logits, state = prefill(model, ids, window_segments=k)
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
        for got, want in zip(state.layers, ref_state.layers, strict=True):
            torch.testing.assert_close(got.memory, want.memory, rtol=0, atol=1e-5)


def brute_force_greedy(model: InfiniTransformer, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding that re-reads the whole sequence from scratch for every new token."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def test_greedy_generation_equals_rereading_everything():
    model = random_model()
    prompt = torch.randint(0, 101, (1, 2 * SEGMENT + 5))
    steps = 2 * SEGMENT + 2  # crosses two segment boundaries while decoding
    out = generate(model, prompt[0].tolist(),
                   config=GenerationConfig(max_new_tokens=steps, window_segments=2))
    assert out.tokens == brute_force_greedy(model, prompt, steps)
    assert out.prompt_tokens == prompt.shape[1] and not out.stopped_at_eos
    assert out.state.partial_len == (prompt.shape[1] + steps) % SEGMENT


def test_generation_stops_at_eos():
    model = random_model()
    prompt = torch.randint(0, 101, (1, 11))
    free = generate(model, prompt, config=GenerationConfig(max_new_tokens=12))
    eos = free.tokens[4]
    first = free.tokens.index(eos)
    stopped = generate(model, prompt, config=GenerationConfig(max_new_tokens=12, eos_token_id=eos))
    assert stopped.tokens == free.tokens[: first + 1] and stopped.stopped_at_eos


def test_no_memory_baseline_ignores_earlier_segments():
    """use_memory=False: the answer depends only on the current segment."""
    model = random_model()
    tail = torch.randint(0, 101, (1, SEGMENT + 3))
    answers = set()
    for seed in range(2):
        head = torch.randint(0, 101, (1, 3 * SEGMENT),
                             generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([head, tail], dim=1)
        logits, _ = prefill(model, ids, use_memory=False)
        with_memory, _ = prefill(model, ids)
        answers.add(tuple(logits[0].tolist()))
        assert not torch.allclose(logits, with_memory)
    assert len(answers) == 1


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    def kept(top_p):
        return (nucleus(probs, top_p) > 0)[0].tolist()

    assert kept(0.7) == [False, True, True, False]
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.96) == [True, True, True, True]
    assert kept(0.1) == [False, True, False, False]  # the top token always stays


def test_sampling_is_seeded_and_greedy_at_temperature_zero():
    logits = torch.randn(3, 50)
    assert torch.equal(Sampler(SamplingConfig())(logits), logits.argmax(-1))
    config = SamplingConfig(temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(Sampler(config)(logits), Sampler(config)(logits))
    many = torch.stack([Sampler(SamplingConfig(1.0, 0.9, seed))(logits) for seed in range(30)])
    assert len(set(many[:, 0].tolist())) > 1
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=0.5, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_saved_state_answers_like_the_state_in_memory(tmp_path):
    model = random_model()
    document = torch.randint(0, 101, (1, 4 * SEGMENT + 5))
    question = torch.randint(0, 101, (10,)).tolist()
    _, state = prefill(model, document)
    path = save_state(tmp_path / "doc.state", state, model.config, tokens_read=document.shape[1],
                      source="doc.txt", model="runs/x/step-00000001")
    saved = load_state(path, model.config)
    assert saved.tokens_read == document.shape[1] and saved.source == "doc.txt"
    assert saved.model == "runs/x/step-00000001"
    assert path.stat().st_size < 2 * state.nbytes()
    config = GenerationConfig(max_new_tokens=2 * SEGMENT,
                              sampling=SamplingConfig(temperature=0.8, top_p=0.95, seed=3))
    from_memory = generate(model, question, state, config)
    from_file = generate(model, question, saved.state, config)
    reread = generate(model, document[0].tolist() + question, None, config)
    assert from_file.tokens == from_memory.tokens == reread.tokens


def test_state_from_another_model_is_refused(tmp_path):
    model = random_model()
    _, state = prefill(model, torch.randint(0, 101, (1, 20)))
    path = save_state(tmp_path / "s.safetensors", state, model.config, tokens_read=20)
    other = random_model(rule="linear").config
    with pytest.raises(StateFileError, match="memory_rule 'delta' vs 'linear'"):
        load_state(path, other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a state")
    with pytest.raises(StateFileError, match="not a safetensors state file"):
        load_state(garbage, model.config)
    with pytest.raises(StateFileError, match="no such state file"):
        load_state(tmp_path / "missing", model.config)


def test_a_state_saved_before_a_field_was_retired_still_fits(tmp_path):
    """A state file records its model's config and a hash of it. One written while
    model.memory_features existed (hashed with it) fits the same model still at its old default,
    'elu'; at another value it is refused, naming the field."""
    model = random_model()
    _, state = prefill(model, torch.randint(0, 101, (1, 20)))
    path = save_state(tmp_path / "s.safetensors", state, model.config, tokens_read=20)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    for value in ("elu", "signed"):
        old = json.dumps({**model.config.to_dict(), "memory_features": value}, sort_keys=True)
        save_file(tensors, str(path), metadata={
            **metadata, "model_config": old,
            "config_fingerprint": hashlib.sha256(old.encode()).hexdigest()[:16]})
        if value == "elu":
            saved = load_state(path, model.config)
            assert torch.equal(saved.state.layers[0].memory, state.layers[0].memory)
        else:
            with pytest.raises(StateFileError, match=r"model: memory_features 'signed' vs None\)"):
                load_state(path, model.config)


def test_load_model_follows_the_latest_pointer(tmp_path):
    model = random_model()
    save_model_dir(model, tmp_path / "run" / "step-00000002")
    (tmp_path / "run" / "latest").write_text("step-00000002\n")
    loaded = load_model(tmp_path / "run")
    assert loaded.path == tmp_path / "run" / "step-00000002"
    ids = torch.randint(0, 101, (1, 12))
    torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0])
    with pytest.raises(ModelDirError, match="no such directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="not a model"):
        load_model(tmp_path)
