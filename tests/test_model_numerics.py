"""Failure modes of public Infini-attention ports: NaN, precision, dead gradients, shapes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from infinitrain.layout import MODEL_CONFIG_FILE
from infinitrain.model import (
    ConfigError,
    InfiniState,
    InfiniTransformer,
    LayerState,
    ModelConfig,
    preset,
)
from infinitrain.model import memory as mem
from infinitrain.model.attention import InfiniAttention
from infinitrain.model_dir import load_model_dir, save_model_dir


def small_config(**overrides):
    values = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  segment_len=8)
    values.update(overrides)
    return preset("tiny", **values)


def test_empty_memory_retrieves_exact_zeros_with_finite_gradients() -> None:
    sigma_q = mem.feature_map(torch.randn(2, 5, 16, requires_grad=True), "delta")
    memory = torch.zeros(2, 16, 16, requires_grad=True)
    norm = torch.zeros(2, 16, requires_grad=True)
    out = mem.retrieve(sigma_q, memory, norm, "delta")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(memory.grad).all() and torch.isfinite(norm.grad).all()


def test_first_segment_and_long_stream_stay_finite() -> None:
    torch.manual_seed(0)
    model = InfiniTransformer(small_config()).eval()
    state = None
    with torch.no_grad():
        for _ in range(200):  # 200 segments, far beyond any training window
            logits, state = model(torch.randint(0, 97, (2, 8)), state)
            assert torch.isfinite(logits).all()
    for layer in state.layers:
        assert torch.isfinite(layer.memory).all() and torch.isfinite(layer.norm).all()


def test_memory_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = InfiniTransformer(small_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(torch.randint(0, 97, (2, 24)))
    assert logits.dtype == torch.bfloat16
    assert all(layer.memory.dtype == torch.float32 and layer.norm.dtype == torch.float32
               for layer in state.layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(torch.randint(0, 97, (2, 24)), state)
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("rule", ["linear", "delta", "deltanet"])
def test_memory_math_ignores_autocast(rule: str) -> None:
    torch.manual_seed(0)
    sigma_q, sigma_k = (mem.feature_map(torch.randn(2, 3, 2, 16, 8), rule) for _ in range(2))
    values = torch.randn(2, 3, 2, 16, 8).bfloat16()  # bf16 activations, as under autocast
    memory, norm = torch.rand(2, 2, 8, 8) * 100, torch.rand(2, 2, 8) * 1e5
    expected = mem.scan(sigma_q, sigma_k, values.float(), memory, norm, rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mem.scan(sigma_q, sigma_k, values, memory, norm, rule)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.dtype == torch.float32
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0), rule


def test_normaliser_accumulates_a_million_tokens_exactly_enough() -> None:
    """z is a running sum; bf16 stalls near 766K tokens and fp16 overflows (docs/design.md §2)."""
    torch.manual_seed(0)
    segment, d = 2048, 64
    memory, norm = torch.zeros(1, d, d), torch.zeros(1, d)
    exact = torch.zeros(d, dtype=torch.float64)
    bf16_norm = torch.zeros(d, dtype=torch.bfloat16)  # what a bf16 state would hold
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(1_048_576 // segment):
            sigma_k = mem.feature_map(torch.randn(1, segment, d), "linear")
            memory, norm = mem.update(sigma_k, torch.randn(1, segment, d), memory, norm, "linear")
            exact += sigma_k[0].double().sum(0)
            bf16_norm += sigma_k[0].sum(0).bfloat16()
    assert norm.dtype == torch.float32
    relative = ((norm[0].double() - exact).abs() / exact).max().item()
    assert relative < 1e-5, relative
    bf16_relative = ((bf16_norm.double() - exact).abs() / exact).max().item()
    assert bf16_relative > 1e-3  # the trap the float32 state avoids


def needle_share_after_filler(rule: str, repeats: list[int]) -> tuple[list[float], list[float]]:
    """Write a needle, then one filler segment over and over. After each count in ``repeats``
    return the needle's share of the read-out at its key (the read with the needle written minus
    the read without, relative to the needle's value) and how much one more filler write changed M.
    """
    torch.manual_seed(0)
    d, n = 32, 16
    needle_k, needle_v = torch.randn(1, 1, d) + 1, torch.randn(1, 1, d)
    filler_k, filler_v = torch.randn(1, n, d), torch.randn(1, n, d)
    fk, nk = mem.feature_map(filler_k, rule), mem.feature_map(needle_k, rule)
    empty = torch.zeros(1, d, d), torch.zeros(1, d)
    with_needle = mem.update(nk, needle_v, *empty, rule)
    without = empty
    shares, changes = [], []
    for count in range(1, max(repeats) + 1):
        before = with_needle[0]
        with_needle = mem.update(fk, filler_v, *with_needle, rule)
        without = mem.update(fk, filler_v, *without, rule)
        if count in repeats:
            contribution = (mem.retrieve(nk, *with_needle, rule)
                            - mem.retrieve(nk, *without, rule))
            shares.append((contribution.norm() / needle_v.norm()).item())
            changes.append(((with_needle[0] - before).norm() / before.norm()).item())
    return shares, changes


def test_deltanet_memory_reaches_a_fixed_point_under_repeated_filler() -> None:
    shares, changes = needle_share_after_filler("deltanet", [10, 100, 1000])
    assert changes[-1] < 1e-6  # re-writing what it holds changes nothing
    assert shares[-1] > 0.1 and abs(shares[-1] - shares[1]) < 0.1 * shares[1]  # 100× vs 1000×
    for rule in ("linear", "delta"):  # the paper's rules keep writing, and the needle fades
        paper_shares, paper_changes = needle_share_after_filler(rule, [10, 100, 1000])
        assert paper_changes[-1] > 1e-4, rule
        assert paper_shares[-1] < 0.2 * paper_shares[0], rule


def test_gradient_flows_through_memory_writes_and_stops_at_detach() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    attn = InfiniAttention(cfg)
    n = cfg.segment_len
    empty = LayerState.empty(1, cfg.n_kv_heads, cfg.head_dim, None, torch.float32)

    x = torch.randn(1, 3 * n, cfg.d_model, requires_grad=True)
    out, _, _ = attn(x, empty)
    out[:, 2 * n:].sum().backward()  # loss on segment 3 only
    assert x.grad[:, :n].abs().sum() > 0  # segment 1 reaches it, through memory alone
    assert attn.k_proj.weight.grad.abs().sum() > 0 and attn.v_proj.weight.grad.abs().sum() > 0

    x.grad = None
    out, _, _ = attn(x, empty, use_memory=False)
    out[:, 2 * n:].sum().backward()
    assert torch.equal(x.grad[:, :n], torch.zeros_like(x.grad[:, :n]))  # control

    first = torch.randn(1, n, cfg.d_model, requires_grad=True)
    rest = torch.randn(1, 2 * n, cfg.d_model)
    _, state, _ = attn(first, empty)
    out, _, _ = attn(rest, InfiniState([state]).detach().layers[0])
    out.sum().backward()
    assert first.grad is None  # truncated BPTT boundary


@pytest.mark.parametrize("rule", ["delta", "deltanet"])
def test_the_memory_disabled_baseline_neither_reads_nor_writes_the_memory(rule) -> None:
    """use_memory=False is the model with every gate shut, minus the memory work: the state's
    memory comes back as it went in, where the shut model still writes it."""
    torch.manual_seed(0)
    model = InfiniTransformer(small_config(memory_rule=rule)).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.gate.normal_(0, 2)
    shut = InfiniTransformer(model.config).eval()
    shut.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in shut.layers:
            block.attn.gate.fill_(-1e4)  # sigmoid: exactly 0 in float32
    ids = torch.randint(0, 97, (2, 3 * 8 + 5))
    with torch.no_grad():
        _, state = model(ids[:, :11])  # a memory that holds something, mid-segment
        off, after = model(ids[:, 11:], state, use_memory=False)
        gated, written = shut(ids[:, 11:], state)
    assert torch.allclose(off, gated, atol=1e-5, rtol=0)
    for layer, before, shut_layer in zip(after.layers, state.layers, written.layers, strict=True):
        assert torch.equal(layer.memory, before.memory) and torch.equal(layer.norm, before.norm)
        assert not torch.equal(shut_layer.memory, before.memory)  # the shut model still writes


@pytest.mark.parametrize(("name", "llama_params"), [("1b", 1_235_814_400), ("8b", 8_030_261_248)])
def test_presets_match_llama_shapes(name: str, llama_params: int) -> None:
    config = preset(name)
    with torch.device("meta"):
        model = InfiniTransformer(config)
    params = sum(p.numel() for p in model.parameters())
    gates = config.n_layers * config.n_heads
    assert params == llama_params + gates  # within 1% is the bar; equality is what we get
    state = model.empty_state(1, device="meta")
    expected = config.head_dim * (config.head_dim + 1) * config.n_kv_heads * config.n_layers * 4
    assert state.memory_nbytes() == expected


@pytest.mark.parametrize("overlap", [0, 3])
def test_state_round_trips_through_safetensors(tmp_path, overlap: int) -> None:
    torch.manual_seed(0)
    model = InfiniTransformer(small_config(local_overlap=overlap)).eval()
    ids = torch.randint(0, 97, (2, 21))  # ends mid-segment: the partial KV is saved too
    with torch.no_grad():
        _, state = model(ids[:, :13])
        save_file(state.state_dict(), tmp_path / "state.safetensors")
        restored = InfiniState.from_state_dict(load_file(tmp_path / "state.safetensors"))
        expected, _ = model(ids[:, 13:], state)
        got, _ = model(ids[:, 13:], restored)
    assert restored.partial_len == 5
    assert restored.layers[0].context_keys.shape[1] == overlap  # the overlap context too
    assert torch.equal(expected, got)
    assert restored.nbytes() == state.nbytes()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"n_kv_heads": 3}, "n_kv_heads"), ({"memory_rule": "gated"}, "memory_rule"),
     ({"segment_len": 0}, "segment_len"), ({"d_model": -4}, "d_model"),
     ({"rope_theta": 0.0}, "rope_theta"), ({"memory_write_gate": True}, "memory_write_gate"),
     ({"memory_from_layer": 3}, "memory_from_layer"),
     ({"write_gate_activation": "relu"}, "write_gate_activation"),
     ({"local_overlap": 9}, "local_overlap"), ({"local_overlap": -1}, "local_overlap")],
)
def test_invalid_config_names_the_field(overrides, field) -> None:
    with pytest.raises(ConfigError, match=f"model.{field}"):
        small_config(**overrides)


def test_unknown_preset_and_field_are_rejected() -> None:
    with pytest.raises(ConfigError, match="tiny, 1b, 8b"):
        preset("70b")
    with pytest.raises(ConfigError, match=r"model\.n_head: unknown field"):
        type(preset("tiny")).from_dict({**preset("tiny").to_dict(), "n_head": 4})


def test_a_config_saved_with_a_retired_field_at_its_old_default_loads_the_same_model(
        tmp_path) -> None:
    """memory_features (removed: σ is always ELU + 1) at its old default 'elu', as every config
    saved before held it: dropped wherever a config is read, and the model is the same."""
    config = small_config(memory_rule="deltanet")
    assert ModelConfig.from_dict({**config.to_dict(), "memory_features": "elu"}) == config
    assert small_config(memory_rule="deltanet", memory_features="elu") == config
    assert "memory_features" not in config.to_dict() and not hasattr(config, "memory_features")
    torch.manual_seed(0)
    model = InfiniTransformer(config).eval()
    saved = save_model_dir(model, tmp_path / "old") / MODEL_CONFIG_FILE
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "memory_features": "elu"}))
    ids = torch.randint(0, config.vocab_size, (1, 3 * config.segment_len + 5))
    with torch.no_grad():
        assert torch.equal(load_model_dir(tmp_path / "old")(ids)[0], model(ids)[0])


@pytest.mark.parametrize("value", ["signed", "relu", None])
def test_a_retired_field_at_another_value_fails_in_one_line(value) -> None:
    expected = (f"model.memory_features = {value!r}: removed (only its old default, 'elu', is "
                "still accepted); this version always uses σ = ELU + 1, the paper's feature map")
    values = {**small_config().to_dict(), "memory_features": value}
    for load in (lambda: ModelConfig.from_dict(values),
                 lambda: small_config(memory_features=value)):
        with pytest.raises(ConfigError) as error:
            load()
        assert str(error.value) == expected


def test_write_gate_starts_at_its_configured_strength() -> None:
    """write_gate_init sets every token's write strength before training, in a fresh model and
    after reset_parameters (the path a checkpoint-free run takes)."""
    model = InfiniTransformer(small_config(memory_rule="deltanet", memory_write_gate=True,
                                           write_gate_init=-4.0))
    keys = torch.randn(5, 2, model.config.head_dim)
    for layer in model.layers:
        strength = layer.attn.write_strength(keys)
        assert torch.allclose(strength, torch.sigmoid(torch.tensor(-4.0)).expand(5, 2))


@pytest.mark.parametrize("activation", ["clamp", "sigmoid"])
def test_the_write_error_counts_the_tokens_with_a_target_and_vanishes_at_a_right_gate(
        activation) -> None:
    """write_cost against targets: tokens without one (negative) change nothing; a gate whose
    logits sit far on the target's side has (clamp: exactly) no error, the opposite gate a large
    one."""
    torch.manual_seed(4)
    cfg = small_config(memory_rule="deltanet", memory_write_gate=True,
                       write_gate_activation=activation)
    attn = InfiniAttention(cfg)
    d = cfg.head_dim
    targets = torch.tensor([[1, 0, -1, -1, 1, 0]])
    keys = torch.zeros(1, 6, cfg.n_kv_heads, d)
    keys[..., 0] = torch.tensor([20.0, -20.0, 0.0, 0.0, 20.0, -20.0])[None, :, None]
    with torch.no_grad():
        attn.write_weight.zero_()
        attn.write_weight[:, 0] = 1.0  # logit = the key's dimension 0
        attn.write_bias.zero_()
    right = attn.write_cost(keys, targets)
    moved = keys.clone()
    moved[:, 2:4] = torch.randn(1, 2, cfg.n_kv_heads, d) * 50  # the tokens without a target
    assert attn.write_cost(moved, targets) == right
    assert right < 1e-6 and (activation == "sigmoid" or right == 0)
    assert attn.write_cost(-keys, targets) > 15


@pytest.mark.parametrize("activation", ["clamp", "sigmoid"])
def test_tokens_the_clamped_write_gate_closes_leave_the_memory_exactly_alone(activation) -> None:
    """With write_gate_activation 'clamp', filler whose gate logit is below 0 writes nothing, so a
    segment read after 1 or 40 segments of it sees the same memory: retrieval cannot drift with
    length. A sigmoid gate at the same logit (≈ 1e-4) still moves the memory."""
    torch.manual_seed(3)
    cfg = small_config(memory_rule="deltanet", memory_write_gate=True,
                       write_gate_activation=activation)
    attn = InfiniAttention(cfg).eval()
    d, n = cfg.head_dim, cfg.segment_len
    with torch.no_grad():  # key dimension 0 of every head reads input feature 0 alone
        attn.k_proj.weight.view(cfg.n_kv_heads, d, -1)[:, 0] = torch.eye(cfg.d_model)[0]
        attn.write_weight.zero_()
        attn.write_weight[:, 0] = -10.0
        attn.write_bias.fill_(1.0)  # logit 1 - 10·x₀: x₀ = -1 writes fully, x₀ = +1 gives -9
        attn.gate.fill_(10.0)  # the output is all memory read-out

    def segments(count: int, first_feature: float) -> torch.Tensor:
        x = torch.randn(1, count * n, cfg.d_model)
        x[..., 0] = first_feature
        return x

    needle, query = segments(1, -1.0), segments(1, -1.0)
    filler = segments(40, 1.0)
    empty = LayerState.empty(1, cfg.n_kv_heads, d, None, torch.float32)
    with torch.no_grad():
        short, short_state, _ = attn(torch.cat([needle, filler[:, :n], query], dim=1), empty)
        long, long_state, _ = attn(torch.cat([needle, filler, query], dim=1), empty)
    same_read = torch.equal(short[:, -n:], long[:, -n:])
    same_memory = torch.equal(short_state.memory, long_state.memory)
    if activation == "clamp":
        assert same_read and same_memory
        assert attn.write_strength(attn.k_proj(filler).view(1, -1, cfg.n_kv_heads, d)).max() == 0
    else:
        assert not same_read and not same_memory


@pytest.mark.parametrize("rule", list(mem.RULES))
def test_a_reset_erases_even_a_non_finite_memory(rule) -> None:
    """A stream whose carried memory went NaN (a diverged step) starts clean at its next
    document: the reset selects zeros, it does not multiply by them (0 · NaN is NaN)."""
    torch.manual_seed(0)
    model = InfiniTransformer(small_config(memory_rule=rule)).eval()
    n = model.config.segment_len
    state = model.empty_state(1)
    for layer in state.layers:
        layer.memory.fill_(float("nan"))
        layer.norm.fill_(float("nan"))
    reset = torch.tensor([[False, True, False]])
    with torch.no_grad():
        logits, after = model(torch.randint(0, 97, (1, 3 * n)), state, reset)
    assert torch.isfinite(logits[:, n:]).all()
    for layer in after.layers:
        assert torch.isfinite(layer.memory).all() and torch.isfinite(layer.norm).all()


class ElementsWritten(TorchDispatchMode):
    """Counts the elements every operation run under it writes: the work of a computation,
    independent of the machine's speed."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.elements += sum(t.numel() for t in pytree.tree_leaves(out)
                             if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("rule", ["delta", "deltanet"])
@pytest.mark.parametrize("with_reset", [False, True])
def test_the_scanned_memorys_backward_grows_linearly_with_the_segments(rule, with_reset) -> None:
    """The rules that scan segment by segment do linear work in backward too: a 16-segment
    window's backward writes at most 4 × (1 + 25%) as many elements as a 4-segment one's. (Indexing
    each segment inside the loop made it quadratic: every index's backward writes a zero
    gradient the size of the whole window.)"""

    def backward_elements(segments: int) -> int:
        torch.manual_seed(0)
        b, h, n, d = 2, 2, 8, 4
        sigma_k = mem.feature_map(torch.randn(b, segments, h, n, d), rule).requires_grad_()
        sigma_q = mem.feature_map(torch.randn(b, segments, h, n, d), rule).requires_grad_()
        values = torch.randn(b, segments, h, n, d, requires_grad=True)
        reset = torch.zeros(b, segments, dtype=torch.bool)
        reset[1, segments // 2] = True
        retrieved, memory, norm = mem.scan(sigma_q, sigma_k, values, torch.zeros(b, h, d, d),
                                           torch.zeros(b, h, d), rule,
                                           reset if with_reset else None)
        loss = retrieved.square().sum() + memory.sum() + norm.sum()
        with ElementsWritten() as counter:
            loss.backward()
        return counter.elements

    assert backward_elements(16) <= 4 * 1.25 * backward_elements(4)
