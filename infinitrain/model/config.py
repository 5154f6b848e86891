"""Model configuration and presets.

Torch-free at import on purpose (the Hugging Face export's configuration class imports it); only
checking a configuration looks up the memory rules, which are torch code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

WRITE_GATE_ACTIVATIONS = ("sigmoid", "clamp")

RETIRED_FIELDS: dict[str, tuple[Any, str]] = {
    "memory_features": ("elu", "this version always uses σ = ELU + 1, the paper's feature map"),
}
"""Fields ModelConfig no longer has -> (their old default, what replaced them). A saved config
(model_config.json, an export's config.json, a recipe's model section) may still hold one at its
old default, which changes nothing and is dropped; any other value is refused: the model it
describes cannot be built any more."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def without_retired(values: dict[str, Any],
                    retired: dict[str, tuple[Any, str]] = RETIRED_FIELDS,
                    path: str = "model") -> dict[str, Any]:
    """``values`` (of the config at ``path``) less the ``retired`` fields (name -> (old default,
    what replaced it)) they hold at their old default; ConfigError if one holds anything else."""
    for name, (old, replacement) in retired.items():
        if name in values and (type(values[name]) is not type(old) or values[name] != old):
            where = f"{path}.{name}" if path else name
            raise ConfigError(f"{where} = {values[name]!r}: removed (only its old default, "
                              f"{old!r}, is still accepted); {replacement}")
    return {name: value for name, value in values.items() if name not in retired}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and memory settings of a Llama-style Infini-Transformer."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    """Width of one head; 0 means d_model // n_heads."""
    segment_len: int = 2048
    """N: tokens per segment. Local softmax attention never looks across a segment boundary
    (unless ``local_overlap`` > 0)."""
    local_overlap: int = 0
    """W: tokens at the end of the previous segment that local attention also reads (not in the
    paper: 0). Like Transformer-XL's cache, but bounded: the state keeps W keys/values per layer.
    It leaves the memory alone (each token is still written once, with its own segment) and lets
    a question, key or answer that a boundary cuts be read whole (docs/memory-length.md,
    "Reading across the boundary: local overlap").
    Segments whose context a reset hides (a new document) use SDPA with a mask, not flash-attn."""
    memory_rule: str = "delta"
    """A registered rule of model/memory.py: 'linear' (M += σ(K)ᵀV) or 'delta'
    (M += σ(K)ᵀ(V − retrieved)), the paper's; or 'deltanet', a length-robust variant (unit-norm
    features, unnormalised read, token-sequential delta rule)."""
    memory_from_layer: int = 0
    """First layer with compressive memory; the layers below attend locally only. The paper gives
    every layer memory: 0. n_layers: no layer has memory, the local-attention baseline that the
    long-book comparison trains (recipes/books.yaml, its local and xl arms)."""
    memory_write_gate: bool = False
    """Rules that take a write strength ('deltanet'): each token writes with a learned strength
    β_t from x_t = k_t·w + b per key/value head (DeltaNet's β; see write_gate_activation), so
    filler can write weakly or not at all and leave older facts in place."""
    write_gate_activation: str = "sigmoid"
    """How the write gate's logit x_t = k_t·w + b becomes β_t: 'sigmoid' (DeltaNet's), or 'clamp',
    clamp(x_t, 0, 1): exactly 0 below zero, so a token the gate closes writes nothing however long
    the stream, where sigmoid's small β still adds up over 1M tokens of filler. Pair it with
    ``optim.write_penalty``, which closes what the loss does not need, and ``write_gate_init: 1``
    (every token writes fully until the gate starts training)."""
    write_gate_init: float = 0.0
    """Initial bias b of the write gate: sigmoid(b) (or clamp(b, 0, 1)) is every token's write
    strength before training. Negative (−4: 0.018) starts the memory writing weakly, so that
    filler piles up slowly and the model has to learn to raise β_t for what it keeps (at −4 the
    tiny passkey model never learned to retrieve through memory: docs/memory-length.md,
    "What did not work")."""
    gate_init: float = 0.0
    """Initial β of every head; sigmoid(0) = 0.5 mixes memory and local attention equally."""
    rope_theta: float = 500_000.0
    rope_scale_factor: float = 1.0
    """Llama-3 RoPE scaling factor; 1 = none. Frequencies whose wavelength exceeds
    rope_original_context / rope_low_freq_factor are divided by it, those shorter than
    rope_original_context / rope_high_freq_factor are kept, and the ones between are blended
    (Llama-3.1 and 3.2 use 8 and 32 with 1, 4, 8192). Needed to continue a Llama-3 checkpoint."""
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_heads, 1))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "head_dim", "segment_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} = {value!r}: must be a positive integer")
        overlap = self.local_overlap
        if not isinstance(overlap, int) or not 0 <= overlap <= self.segment_len:
            raise ConfigError(f"model.local_overlap = {overlap!r}: must be an integer in "
                              f"[0, segment_len = {self.segment_len}] (0: the paper's local "
                              "attention, which stops at the segment boundary)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads = {self.n_kv_heads}: must divide model.n_heads = {self.n_heads} "
                "(each key/value head, and its memory, serves a whole group of query heads)"
            )
        from .memory import RULES

        rule = RULES.get(self.memory_rule)
        if rule is None:
            raise ConfigError(f"model.memory_rule = {self.memory_rule!r}: must be one of "
                              f"{', '.join(RULES)}")
        if not 0 <= self.memory_from_layer <= self.n_layers:
            raise ConfigError(f"model.memory_from_layer = {self.memory_from_layer!r}: must be in "
                              f"[0, n_layers = {self.n_layers}] (n_layers: no memory at all)")
        if self.memory_write_gate and not rule.takes_write_strength:
            raise ConfigError(f"model.memory_write_gate = true needs a memory rule that takes a "
                              f"write strength ({_rules_where(RULES, 'takes_write_strength', True)}"
                              f"), not {self.memory_rule!r}: it writes every token at full "
                              "strength")
        if self.write_gate_activation not in WRITE_GATE_ACTIVATIONS:
            raise ConfigError(f"model.write_gate_activation = {self.write_gate_activation!r}: must "
                              f"be one of {', '.join(WRITE_GATE_ACTIVATIONS)}")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta = {self.rope_theta!r}: must be > 0")
        if self.rope_scale_factor < 1:
            raise ConfigError(f"model.rope_scale_factor = {self.rope_scale_factor!r}: must be >= 1 "
                              "(1 disables scaling)")
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor = {self.rope_high_freq_factor!r}: "
                              "must exceed model.rope_low_freq_factor = "
                              f"{self.rope_low_freq_factor!r} (> 0)")
        if self.rope_original_context <= 0:
            raise ConfigError(f"model.rope_original_context = {self.rope_original_context!r}: "
                              "must be a positive integer")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps = {self.norm_eps!r}: must be > 0")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std = {self.init_std!r}: must be > 0")

    @property
    def kv_group_size(self) -> int:
        """Query heads that share one key/value head (and its memory)."""
        return self.n_heads // self.n_kv_heads

    @property
    def memory_layers(self) -> int:
        """Layers with compressive memory (from ``memory_from_layer`` on)."""
        return self.n_layers - self.memory_from_layer

    @property
    def memory_state_bytes(self) -> int:
        """Bytes of compressive memory per stream: M and z in float32 in every memory layer."""
        return self.memory_layers * self.memory_floats_per_layer * 4

    @property
    def memory_floats_per_layer(self) -> int:
        """Floats of compressive memory per layer: d_k × (d_v + 1) per key/value head."""
        return self.n_kv_heads * self.head_dim * (self.head_dim + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """A config from its saved fields; a retired one at its old default is dropped."""
        values = without_retired(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"model.{unknown[0]}: unknown field; allowed fields: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def with_updates(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; a retired field at its old default is dropped."""
        return replace(self, **without_retired(changes))


PRESETS: dict[str, ModelConfig] = {
    # Runs in minutes on a laptop CPU; vocabulary sized for the bundled byte-level BPE tokenizer.
    "tiny": ModelConfig(
        vocab_size=4096, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
        segment_len=64, tie_embeddings=True,
    ),
    # Llama-3.2-1B shape, so a Llama checkpoint can be continually pretrained.
    "1b": ModelConfig(
        vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        segment_len=2048, tie_embeddings=True,
    ),
    # Llama-3.1-8B shape.
    "8b": ModelConfig(
        vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14_336,
        segment_len=2048, tie_embeddings=False,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset = {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].with_updates(**overrides)


def _rules_where(rules: dict[str, Any], attribute: str, value: bool) -> str:
    """The names of the rules whose ``attribute`` is ``value``, for error messages."""
    return ", ".join(name for name, rule in rules.items() if getattr(rule, attribute) == value)
