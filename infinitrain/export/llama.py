"""Import a Llama checkpoint (Hugging Face safetensors) as an infinitrain model directory.

An Infini-Transformer is a Llama whose attention layers also read and write a compressive memory
with the same Q, K, V: every Llama tensor fills its counterpart one to one, and only the gates β
(one per query head) are new. The result is a model directory (``model_config.json``,
``model.safetensors``, ``tokenizer/``) that ``model.init`` of a recipe starts training from.

Gates start at ``gate_init`` = −6 by default: sigmoid(−6) ≈ 0.0025, so every attention output is
99.75 % the original local attention and the model starts close to the Llama it came from (with
``use_memory=False``, within one segment, it computes exactly the Llama's logits). The gate's
gradient σ'(β) ≈ 0.0025 is small but alive, where β ≤ −10 would never move (docs/design.md §2); the
training recipe gives β its own, larger learning rate.

The memory is by default the one the 1b recipe trains (:data:`DEFAULT_MEMORY_RULE` with
:data:`WRITE_GATE`, from layer :data:`DEFAULT_MEMORY_FROM_LAYER` on): the ``deltanet`` rule with a
clamped write gate that starts fully open, the only configuration of the tiny passkey study that
kept retrieving far beyond its training length, in every layer but the first, whose write gate sees
a token alone and wrote every digit of a book (docs/memory-length.md). Its write gate is new
weights too, initialised so that every token writes at full strength. The 8b recipe trains the
paper's memory in every layer: ``memory_rule="delta"``, ``memory_from_layer=0``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..data.tokenizer import TOKENIZER_FILE
from ..layout import TOKENIZER_DIR
from ..model import PRESETS, ConfigError, InfiniTransformer, ModelConfig
from ..model.memory import RULES
from ..model_dir import save_model_dir
from .files import check_new_dir, checked_tokenizer, copy_tokenizer_files

DEFAULT_GATE_INIT = -6.0
DEFAULT_MEMORY_RULE = "deltanet"
DEFAULT_MEMORY_FROM_LAYER = 1
WRITE_GATE = {"memory_write_gate": True, "write_gate_activation": "clamp", "write_gate_init": 1.0}
"""The write gate an import gets when its memory rule takes a write strength: clamp(k·w + b, 0, 1)
with w = 0 and b = 1, every token writing fully until training (and the recipe's write penalty)
closes it where the loss does not need the write."""
WEIGHT_NAMES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"model\.embed_tokens\.weight", "embed_tokens.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.attn.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
)]
"""Llama (``LlamaForCausalLM``) weight name → infinitrain core weight name."""
IGNORED_WEIGHTS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""RoPE buffers some older checkpoints stored; recomputed from rope_theta."""


class LlamaImportError(ValueError):
    """The directory is not a Llama checkpoint infinitrain can import; the message says why."""


@dataclass
class LlamaImport:
    path: Path
    config: ModelConfig
    notes: list[str]
    """What the user should know about the conversion (a dropped RoPE scaling, …)."""


def import_llama(llama_dir: str | Path, out_dir: str | Path, *,
                 segment_len: int = ModelConfig.segment_len,
                 memory_rule: str = DEFAULT_MEMORY_RULE, write_gate: bool | None = None,
                 memory_from_layer: int = DEFAULT_MEMORY_FROM_LAYER,
                 gate_init: float = DEFAULT_GATE_INIT,
                 allow_rope_scaling_drop: bool = False) -> LlamaImport:
    """Convert ``llama_dir`` into the model directory ``out_dir``.

    ``write_gate``: give the memory :data:`WRITE_GATE`; None gives it to rules that take a write
    strength. Everything is checked before anything is written.
    """
    llama_dir, out = Path(llama_dir), Path(out_dir)
    hf_config = read_llama_config(llama_dir)
    config, notes = infini_config(hf_config, segment_len=segment_len, memory_rule=memory_rule,
                                  write_gate=write_gate, memory_from_layer=memory_from_layer,
                                  gate_init=gate_init,
                                  allow_rope_scaling_drop=allow_rope_scaling_drop)
    if not (llama_dir / TOKENIZER_FILE).is_file():
        raise LlamaImportError(f"{llama_dir}: no {TOKENIZER_FILE}; infinitrain needs a fast "
                               "tokenizer: AutoTokenizer.from_pretrained(dir).save_pretrained(dir) "
                               "writes one")
    checked_tokenizer(llama_dir, config.vocab_size)
    check_new_dir(out)
    weights = read_llama_weights(llama_dir)
    with torch.device("meta"):
        model = InfiniTransformer(config)
    if config.tie_embeddings:
        # one tensor for both (a copy some tied checkpoints store is dropped)
        weights["lm_head.weight"] = weights.get("embed_tokens.weight")
    for layer in range(config.memory_from_layer, config.n_layers):
        weights[f"layers.{layer}.attn.gate"] = torch.full((config.n_heads,), config.gate_init)
        if config.memory_write_gate:
            weights[f"layers.{layer}.attn.write_weight"] = torch.zeros(config.n_kv_heads,
                                                                       config.head_dim)
            weights[f"layers.{layer}.attn.write_bias"] = torch.full((config.n_kv_heads,),
                                                                    config.write_gate_init)
    missing = [name for name in model.state_dict() if weights.get(name) is None]
    if missing:
        raise LlamaImportError(f"{llama_dir}: {len(missing)} weight(s) missing, e.g. the one "
                               f"infinitrain calls {missing[0]!r}")
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as error:  # shapes or layers that contradict config.json
        detail = str(error).strip().splitlines()[-1].strip()
        raise LlamaImportError(f"{llama_dir}: weights do not match its config.json: "
                               f"{detail}") from None
    save_model_dir(model, out)
    copy_tokenizer_files(llama_dir, out / TOKENIZER_DIR)
    return LlamaImport(out, config, notes)


def recipe_model_section(config: ModelConfig, init: Path) -> dict:
    """The ``model:`` section of a recipe that trains on from ``init`` (holding ``config``): the
    closest preset plus every field that differs from it."""
    def overrides(name: str) -> dict:
        base = PRESETS[name].to_dict()
        return {key: value for key, value in config.to_dict().items() if base[key] != value}

    closest = min(PRESETS, key=lambda name: len(overrides(name)))
    return {"preset": closest, "init": str(init), **overrides(closest)}


def read_llama_config(llama_dir: Path) -> dict:
    """config.json of a Llama checkpoint directory (refusing anything else)."""
    if not llama_dir.is_dir():
        raise LlamaImportError(f"{llama_dir}: no such directory")
    config_file = llama_dir / "config.json"
    if not config_file.is_file():
        raise LlamaImportError(f"{llama_dir}: no config.json; expected a Hugging Face Llama "
                               "checkpoint directory (config.json, model.safetensors, tokenizer)")
    hf_config = json.loads(config_file.read_text())
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures")
    if model_type != "llama" or "LlamaForCausalLM" not in (architectures or ["LlamaForCausalLM"]):
        raise LlamaImportError(f"{llama_dir}: model_type {model_type!r}, architectures "
                               f"{architectures}: only Llama checkpoints (model_type 'llama', "
                               "LlamaForCausalLM) can be imported")
    unsupported = {key: hf_config[key] for key, fine in (
        ("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
    ) if hf_config.get(key, fine) != fine}
    if unsupported:
        raise LlamaImportError(f"{llama_dir}: {unsupported}: infinitrain's Llama blocks use SiLU "
                               "and no biases")
    return hf_config


def infini_config(hf_config: dict, *, segment_len: int, memory_rule: str,
                  write_gate: bool | None, memory_from_layer: int, gate_init: float,
                  allow_rope_scaling_drop: bool) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig of an Infini-Transformer with a Llama's shape, and conversion notes."""
    if write_gate is None:
        rule = RULES.get(memory_rule)
        write_gate = rule is not None and rule.takes_write_strength
    rope = hf_config.get("rope_parameters") or {}  # transformers 5 layout
    scaling = hf_config.get("rope_scaling") or rope  # transformers 4 layout
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    notes = []
    rope_fields: dict = {}
    if rope_type == "llama3":  # Llama-3.1 / 3.2: implemented by the core
        try:
            rope_fields = dict(
                rope_scale_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_context=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as missing:
            raise LlamaImportError(f"llama3 RoPE scaling without {missing}") from None
    elif rope_type != "default":
        summary = {key: value for key, value in scaling.items() if key != "rope_theta"}
        if not allow_rope_scaling_drop:
            raise LlamaImportError(
                f"RoPE scaling {summary} is not implemented by infinitrain (it implements "
                "'llama3' scaling and plain rope_theta); pass --allow-rope-scaling-drop to import "
                "with unscaled frequencies, which changes the model until training adapts it"
            )
        notes.append(f"dropped RoPE scaling {summary}: the model uses unscaled frequencies")
    try:
        heads = hf_config["num_attention_heads"]
        config = ModelConfig(
            vocab_size=hf_config["vocab_size"],
            d_model=hf_config["hidden_size"],
            n_layers=hf_config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf_config.get("num_key_value_heads") or heads,
            ffn_dim=hf_config["intermediate_size"],
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            segment_len=segment_len,
            memory_rule=memory_rule,
            memory_from_layer=memory_from_layer,
            **(WRITE_GATE if write_gate else {}),
            gate_init=float(gate_init),
            rope_theta=float(hf_config.get("rope_theta", rope.get("rope_theta", 10_000.0))),
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            init_std=float(hf_config.get("initializer_range", 0.02)),
            **rope_fields,
        )
    except KeyError as missing:
        raise LlamaImportError(f"config.json has no {missing} field") from None
    except ConfigError as error:
        raise LlamaImportError(str(error)) from None
    trained_positions = hf_config.get("max_position_embeddings")
    if trained_positions and segment_len > trained_positions:
        notes.append(f"segment length {segment_len} exceeds the {trained_positions} positions "
                     "the Llama was trained on: RoPE positions restart each segment, but reach "
                     f"{segment_len - 1}")
    return config, notes


def read_llama_weights(llama_dir: Path) -> dict[str, Tensor]:
    """The Llama's weights (every safetensors shard), under infinitrain's names."""
    weights: dict[str, Tensor] = {}
    for file in _safetensors_files(llama_dir):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not IGNORED_WEIGHTS.fullmatch(name):
                    weights[_core_name(name, file)] = tensors.get_tensor(name)
    return weights


def _safetensors_files(llama_dir: Path) -> list[Path]:
    index = llama_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [llama_dir / name for name in names]
    if (llama_dir / "model.safetensors").is_file():
        return [llama_dir / "model.safetensors"]
    raise LlamaImportError(f"{llama_dir}: no model.safetensors (or its index); only safetensors "
                           "checkpoints are read: load it with transformers and save_pretrained")


def _core_name(name: str, file: Path) -> str:
    for pattern, replacement in WEIGHT_NAMES:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(replacement)
    raise LlamaImportError(f"{file}: unexpected weight {name!r}: not part of a plain Llama "
                           "(LlamaForCausalLM) checkpoint")
