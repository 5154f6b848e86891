"""The one memory code path: exact against the paper's equations and independent of chunking."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from infinitrain.model import InfiniTransformer, LayerState, preset
from infinitrain.model import memory as memory_rules
from infinitrain.model.attention import InfiniAttention


def small_config(rule: str = "delta", **overrides):
    """``rule`` is a memory rule, or "deltanet-gated" for deltanet with the write gate,
    "deltanet-clamp" for the write gate clamped to [0, 1], "deltanet-local0" for deltanet with a
    local-only first layer, "-overlap" for local attention that also reads the previous segment's
    last 3 tokens."""
    base, _, variant = rule.partition("-")
    values = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  segment_len=8, memory_rule=base, memory_write_gate=variant in ("gated", "clamp"),
                  write_gate_activation="clamp" if variant == "clamp" else "sigmoid",
                  memory_from_layer=int(variant == "local0"),
                  local_overlap=3 if variant == "overlap" else 0)
    values.update(overrides)
    return preset("tiny", **values)


def randomise_gates(model: torch.nn.Module) -> None:
    """Distinct gates per head (and write gates per token), so a head/group mix-up cannot hide
    behind equal gates."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate", "write_weight", "write_bias")):
                param.copy_(torch.randn_like(param) * 2)


def normalised_read(sigma_q, memory, norm):
    """The paper's read, σ(Q)M / σ(Q)z; 0 before anything is written."""
    if norm.abs().sum() == 0:
        return torch.zeros(sigma_q.shape[0], memory.shape[1])
    return sigma_q @ memory / (sigma_q @ norm)[:, None]


def linear_write(sigma, k, v, memory, norm, strength):
    return memory + sigma(k).T @ v, norm + sigma(k).sum(0)


def delta_write(sigma, k, v, memory, norm, strength):
    if norm.abs().sum():
        v = v - (sigma(k) @ memory) / (sigma(k) @ norm)[:, None]
    return linear_write(sigma, k, v, memory, norm, strength)


def sequential_delta_write(sigma, k, v, memory, norm, strength):
    """DeltaNet's rule one token at a time, each write scaled by its strength β_t."""
    for t in range(k.shape[0]):
        key = sigma(k[t:t + 1])
        memory = memory + strength(k[t]) * key.T @ (v[t:t + 1] - key @ memory)
    return memory, norm + sigma(k).sum(0)


PAPER_RULES = {  # name -> (unit-norm features, read, write), written out independently
    "linear": (False, normalised_read, linear_write),
    "delta": (False, normalised_read, delta_write),
    "deltanet": (True, lambda sigma_q, memory, norm: sigma_q @ memory, sequential_delta_write),
}
"""Every registered memory rule's equations, looped: adding a rule adds its entry here."""


def reference_attention(attn: InfiniAttention, x: torch.Tensor) -> torch.Tensor:
    """Infini-attention straight from the paper: loops over streams, heads and segments."""
    cfg = attn.config
    n, d = cfg.segment_len, cfg.head_dim
    group = cfg.n_heads // cfg.n_kv_heads
    batch, length, _ = x.shape
    wq = attn.q_proj.weight.view(cfg.n_heads, d, -1)
    wk = attn.k_proj.weight.view(cfg.n_kv_heads, d, -1)
    wv = attn.v_proj.weight.view(cfg.n_kv_heads, d, -1)
    unit_norm, read, write = PAPER_RULES[cfg.memory_rule]

    def sigma(t):
        features = F.elu(t) + 1
        return features / features.norm(dim=-1, keepdim=True) if unit_norm else features

    def write_strength(kv):  # β_t from the raw key; 1 without the write gate
        def strength(k):
            if not cfg.memory_write_gate:
                return 1.0
            logit = k @ attn.write_weight[kv] + attn.write_bias[kv]
            if cfg.write_gate_activation == "clamp":
                return logit.clamp(0, 1)
            return torch.sigmoid(logit)
        return strength

    def rope(t, first=0):  # t [L, d]; positions restart at 0 in every segment
        half = d // 2
        pos = torch.arange(first, first + t.shape[0], dtype=torch.float32)[:, None]
        freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) * 2 / d)
        cos, sin = torch.cos(pos * freq), torch.sin(pos * freq)
        a, b = t[:, :half], t[:, half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    out = torch.zeros(batch, length, cfg.n_heads, d)
    for bi in range(batch):
        for h in range(cfg.n_heads):
            kv = h // group  # query head h reads the memory of its key/value head
            memory, norm = torch.zeros(d, d), torch.zeros(d)
            beta = torch.sigmoid(attn.gate[h])
            for start in range(0, length, n):
                xs = x[bi, start:start + n]
                q, k, v = xs @ wq[h].T, xs @ wk[kv].T, xs @ wv[kv].T
                context = x[bi, max(start - cfg.local_overlap, 0):start]  # previous segment's end
                w = context.shape[0]
                k_seen = torch.cat([context @ wk[kv].T, k])
                v_seen = torch.cat([context @ wv[kv].T, v])
                scores = rope(q) @ rope(k_seen, -w).T / math.sqrt(d)
                causal = torch.ones(n, w + n).tril(w).bool()
                local = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v_seen
                mem = read(sigma(q), memory, norm)  # retrieve first, from the memory so far
                out[bi, start:start + n, h] = beta * mem + (1 - beta) * local
                memory, norm = write(sigma, k, v, memory, norm, write_strength(kv))
    return out.reshape(batch, length, -1) @ attn.o_proj.weight.T


def test_every_registered_memory_rule_has_a_paper_reference() -> None:
    assert set(PAPER_RULES) == set(memory_rules.RULES)


RULES = [*memory_rules.RULES, "deltanet-gated", "deltanet-clamp", "delta-overlap",
         "deltanet-overlap"]
MODEL_RULES = [*RULES, "deltanet-local0"]
"""Model-level variants: memory_from_layer changes which layers have memory, not one layer."""


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_paper_reference(rule: str, kv_heads: int) -> None:
    torch.manual_seed(0)
    cfg = small_config(rule, n_kv_heads=kv_heads)
    attn = InfiniAttention(cfg)
    randomise_gates(attn)
    x = torch.randn(2, 4 * cfg.segment_len, cfg.d_model)
    state = LayerState.empty(2, cfg.n_kv_heads, cfg.head_dim, None, torch.float32)
    ours, _, _ = attn(x, state)
    assert torch.allclose(ours, reference_attention(attn, x), atol=1e-5)


def chunked_forward(model, ids, sizes, reset=None):
    """Feed ``ids`` in chunks of ``sizes`` tokens, carrying the state."""
    state, logits, start = None, [], 0
    n = model.config.segment_len
    for size in sizes:
        chunk_reset = None
        if reset is not None:  # the segments that start inside this chunk
            chunk_reset = reset[:, -(-start // n):-(-(start + size) // n)]
        out, state = model(ids[:, start:start + size], state, chunk_reset)
        logits.append(out)
        start += size
    return torch.cat(logits, dim=1), state


@pytest.mark.parametrize("rule", MODEL_RULES)
def test_chunk_invariance_of_logits_state_and_gradients(rule: str) -> None:
    torch.manual_seed(1)
    model = InfiniTransformer(small_config(rule))
    randomise_gates(model)
    n = model.config.segment_len
    ids = torch.randint(0, 97, (3, 6 * n))
    reset = torch.zeros(3, 6, dtype=torch.bool)
    reset[0, 2] = reset[2, 4] = True  # new documents start mid-stream

    def run(sizes):
        model.zero_grad()
        logits, state = chunked_forward(model, ids, sizes, reset)
        logits.square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return logits.detach(), state, grads

    full, full_state, full_grads = run([6 * n])
    # The last split starts a reset segment mid-chunk and completes it in the next chunk.
    for sizes in ([n] * 6, [2 * n, 3 * n, n], [2 * n + 3, 2 * n, 2 * n - 3]):
        logits, state, grads = run(sizes)
        assert (logits - full).abs().max() <= 1e-5
        for ours, theirs in zip(state.layers, full_state.layers, strict=True):
            assert torch.allclose(ours.memory, theirs.memory, atol=1e-5)
            assert torch.allclose(ours.norm, theirs.norm, atol=1e-5)
        for name, grad in grads.items():
            assert torch.allclose(grad, full_grads[name], atol=1e-5), name


def test_compiled_blocks_read_a_stream_as_eager_does_however_it_is_chunked() -> None:
    """``compile_blocks`` (--compile): a stream cut mid-segment (new shapes: compiled again,
    with symbolic sizes) gives eager's whole-window logits. Training under compilation:
    tests/test_train_cli.py."""
    torch.manual_seed(1)
    eager = InfiniTransformer(small_config("delta", n_layers=1)).eval()
    randomise_gates(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    n = eager.config.segment_len
    ids = torch.randint(0, 97, (2, 3 * n))
    reset = torch.zeros(2, 3, dtype=torch.bool)
    reset[1, 1] = True
    with torch.no_grad():
        expected, _ = eager(ids, reset=reset)
        streamed, _ = chunked_forward(compiled, ids, [n + 3, 2 * n - 3], reset)
    assert (streamed - expected).abs().max() <= 1e-5


def test_a_block_reading_across_the_boundary_compiles_to_one_graph() -> None:
    """Stage 2's overlap (``local_overlap``) traces as one graph per block, forward and backward:
    a graph break there once split each compiled block in two, and a second run with the first
    run's compile cache then failed at its first step. Dynamo alone (no inductor) so that it takes
    seconds; ``fullgraph=True`` turns any break into an error."""
    torch.manual_seed(4)
    model = InfiniTransformer(small_config("deltanet-overlap")).train()
    block = model.layers[1]
    traced = torch.compile(block, fullgraph=True, backend="eager", dynamic=False)
    n = model.config.segment_len
    x = torch.randn(2, 3 * n, model.config.d_model, requires_grad=True)
    state = model.empty_state(2).layers[1]
    reset = torch.zeros(2, 3, dtype=torch.bool)
    reset[1, 1] = True  # one stream starts a document mid-window: some context keys are hidden
    out, _, _ = traced(x, state, reset, True)
    expected, _, _ = block(x, state, reset, True)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("rule", MODEL_RULES)
def test_token_by_token_equals_full_forward_across_segment_boundaries(rule: str) -> None:
    torch.manual_seed(2)
    model = InfiniTransformer(small_config(rule)).eval()
    randomise_gates(model)
    n = model.config.segment_len
    ids = torch.randint(0, 97, (2, 3 * n + 5))
    with torch.no_grad():
        full, full_state = model(ids)
        ragged, ragged_state = chunked_forward(model, ids, [3, n, 1, 2 * n - 4, 1, 1, 3])
    assert (full - ragged).abs().max() <= 1e-5
    assert full_state.partial_len == ragged_state.partial_len == 5
    assert torch.allclose(full_state.layers[1].memory, ragged_state.layers[1].memory, atol=1e-5)


@pytest.mark.parametrize("keep", [1, 5])
def test_keeping_the_last_logits_gives_those_of_the_full_forward_and_the_same_state(
        keep: int) -> None:
    """A prefill keeps the last logits only, and runs the last block's feed-forward for those
    positions alone: the kept logits are the full forward's, the state the same bits."""
    torch.manual_seed(3)
    model = InfiniTransformer(small_config("deltanet-overlap")).eval()
    randomise_gates(model)
    n = model.config.segment_len
    ids = torch.randint(0, 97, (2, 2 * n + 3))
    with torch.no_grad():
        full, full_state = model(ids)
        kept, kept_state = model(ids, logits_to_keep=keep)
    assert kept.shape == (2, keep, 97)
    assert (kept - full[:, -keep:]).abs().max() <= 1e-6
    for ours, theirs in zip(kept_state.layers, full_state.layers, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(vars(ours).values(), vars(theirs).values(),
                                                     strict=True))


def test_local_only_layers_equal_a_memory_layer_gated_shut() -> None:
    """Below memory_from_layer a layer is local attention only: the same output as a memory layer
    whose gates are shut, no gate parameter, and a memory that stays empty."""
    torch.manual_seed(5)
    local_first = InfiniTransformer(small_config("deltanet-local0")).eval()
    reference = InfiniTransformer(small_config("deltanet")).eval()
    assert not hasattr(local_first.layers[0].attn, "gate")
    with torch.no_grad():
        reference.layers[0].attn.gate.fill_(-1e4)  # sigmoid = 0: local attention only
        reference.layers[1].attn.gate.normal_(0, 2)
        reference.load_state_dict(local_first.state_dict() | {
            "layers.0.attn.gate": reference.layers[0].attn.gate,
            "layers.1.attn.gate": reference.layers[1].attn.gate})
        local_first.layers[1].attn.gate.copy_(reference.layers[1].attn.gate)
        ids = torch.randint(0, 97, (2, 3 * local_first.config.segment_len + 3))
        ours, state = local_first(ids)
        theirs, _ = reference(ids)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert state.layers[0].memory.abs().sum() == 0 and state.layers[1].memory.abs().sum() > 0
    torch.testing.assert_close(local_first.memory_gates(),  # layer 1's alone: layer 0 has none
                               torch.sigmoid(reference.layers[1].attn.gate)[None])


@pytest.mark.parametrize("rule", ["delta", "delta-overlap"])
def test_reset_equals_starting_a_fresh_stream(rule: str) -> None:
    torch.manual_seed(3)
    model = InfiniTransformer(small_config(rule)).eval()
    n = model.config.segment_len
    ids = torch.randint(0, 97, (1, 4 * n))
    reset = torch.tensor([[False, False, True, False]])
    with torch.no_grad():
        streamed, _ = model(ids, reset=reset)
        fresh, _ = model(ids[:, 2 * n:])
        carried, _ = model(ids)
    assert torch.allclose(streamed[:, 2 * n:], fresh, atol=1e-6)
    assert not torch.allclose(carried[:, 2 * n:], fresh, atol=1e-3)  # memory mattered


def test_causality_across_segment_boundaries() -> None:
    torch.manual_seed(4)
    model = InfiniTransformer(small_config("delta")).eval()
    randomise_gates(model)
    n = model.config.segment_len
    ids = torch.randint(0, 97, (1, 4 * n))
    with torch.no_grad():
        base, _ = model(ids)
        for t in (0, n - 1, n, 2 * n + 3, 4 * n - 1):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % 97
            out, _ = model(changed)
            assert torch.equal(out[:, :t], base[:, :t]), f"token {t} leaked backwards"
            assert not torch.allclose(out[:, t], base[:, t])


def test_memory_never_sees_the_current_segment() -> None:
    """Retrieve-then-update: within a segment, memory holds only earlier segments."""
    torch.manual_seed(5)
    cfg = small_config("linear", gate_init=30.0)  # sigmoid(30) = 1: memory output only
    attn = InfiniAttention(cfg)
    x = torch.randn(1, 2 * cfg.segment_len, cfg.d_model)
    state = LayerState.empty(1, cfg.n_kv_heads, cfg.head_dim, None, torch.float32)
    out, _, _ = attn(x, state)
    n = cfg.segment_len
    assert torch.equal(out[:, :n], torch.zeros_like(out[:, :n]))  # empty memory reads zeros
    changed = x.clone()
    changed[:, n + 3] += 1.0  # a later token of the second segment
    out2, _, _ = attn(changed, state)
    others = [t for t in range(n, 2 * n) if t != n + 3]  # t = n + 3 reads with a new query
    assert torch.equal(out2[:, others], out[:, others])
