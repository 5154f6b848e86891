"""The README.md (model card) of an exported model: what it is, its memory, how to load it."""

from __future__ import annotations

from ..model import InfiniTransformer, kv_cache_nbytes

LONG_CONTEXT = 1_048_576
"""Context length at which the card compares the bounded memory with a KV cache."""


def model_card(model: InfiniTransformer, dtype: str, recipe: str | None, source: str) -> str:
    """Markdown for an exported ``model`` (weights stored in ``dtype``) trained by ``recipe``."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    memory = config.memory_state_bytes
    kv_cache = kv_cache_nbytes(config.n_layers, config.n_kv_heads, config.head_dim, LONG_CONTEXT)
    first = config.memory_from_layer
    gate_rows = "\n".join(
        f"| {layer} | {row.min():.3f} | {row.mean():.3f} | {row.max():.3f} |"
        for layer, row in enumerate(model.memory_gates(), first)
    )
    which_layers = ("every attention layer is" if first == 0 else
                    f"attention layers from layer {first} on are")
    local_only = "" if first == 0 else f" Layers below {first} attend within their segment only."
    recipe_section = (f"## Training recipe\n\n```yaml\n{recipe.rstrip()}\n```\n" if recipe else
                      "## Training recipe\n\nThe checkpoint carried no recipe.yaml.\n")
    return f"""---
library_name: transformers
tags: [infini-attention, infinitrain, custom_code]
---

# Infini-Transformer

A Llama-style decoder whose {which_layers} Infini-attention (Munkhdalai et al. 2024,
"Leave No Context Behind"): causal softmax attention inside segments of {config.segment_len} tokens
and a compressive memory carried from segment to segment.{local_only} Exported by infinitrain from
`{source}`; the modeling code is infinitrain's own model, copied next to a thin `transformers`
wrapper.

| | |
|---|---|
| parameters | {params / 1e6:,.1f}M |
| layers | {config.n_layers} |
| hidden size / FFN | {config.d_model} / {config.ffn_dim} |
| heads | {config.n_heads} query, {config.n_kv_heads} key/value, {config.head_dim} wide |
| vocabulary | {config.vocab_size} |
| weights | {dtype} (the memory is always computed in float32) |

## Memory

| | |
|---|---|
| segment length N | {config.segment_len} tokens; RoPE positions restart in every segment |
| memory rule | `{config.memory_rule}` |
| compressive memory | {memory / 2**20:,.2f} MiB per sequence (float32), at any context length |
| KV cache of full attention, {LONG_CONTEXT:,} tokens | {kv_cache / 2**30:,.1f} GiB (bf16) |

Bounded memory: whatever the context length, a sequence's state is the compressive memory above
plus the keys and values of fewer than N tokens (the current segment). Reading a 1M-token prompt
costs time, not memory.

Memory gates sigmoid(β) per layer (1 = memory, 0 = local attention):

| layer | min | mean | max |
|---|---|---|---|
{gate_rows}

## How to load

Requires `transformers>=5.10.1` (tested to 5.24) and `torch`; `trust_remote_code=True` runs the
modeling files in this directory.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
inputs = tokenizer("A very long document ...", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1]:]))
```

The prompt is read in one call and each new token is fed with the carried state (`out.cache`;
`out.past_key_values` in transformers releases before the rename). To ask a second question
without re-reading the document, append it to `out.sequences` and call
`model.generate(ids, cache=out.cache, ...)`: only the tokens the state has not seen are read.

Batches may be padded (`tokenizer.padding_side = "left"` for generation): a padded position is
neither attended to nor written into memory, and each row gives the tokens it would give alone.
Greedy, sampling and beam search work, and so does `pipeline("text-generation", ...,
batch_size=N)`.

{recipe_section}"""
