"""`infinitrain model-info`: parameter count and the memory-vs-KV-cache compression figure."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..evaluation.options import human_bytes
from ..model import PRESETS, InfiniTransformer, kv_cache_nbytes, preset

CONTEXTS = {"32K": 32_768, "128K": 131_072, "1M": 1_048_576}


def model_info(
    name: str = typer.Argument("tiny", help=f"Model preset: {', '.join(PRESETS)}."),
) -> None:
    """Show a preset's size and how its bounded memory compares with a growing KV cache."""
    import torch

    config = preset(name)
    with torch.device("meta"):
        model = InfiniTransformer(config)
    params = sum(p.numel() for p in model.parameters())
    memory_bytes = config.memory_state_bytes
    console = Console()
    console.print(f"[bold]{name}[/]: {params / 1e6:,.1f}M parameters, {config.n_layers} layers, "
                  f"{config.n_heads} query / {config.n_kv_heads} key-value heads × "
                  f"{config.head_dim}, segment {config.segment_len} tokens, "
                  f"{config.memory_rule} memory rule")
    table = Table(title="Memory per stream: compressive memory (fp32) vs full-attention KV cache "
                        "(bf16)")
    table.add_column("context")
    table.add_column("Infini memory", justify="right")
    table.add_column("KV cache", justify="right")
    table.add_column("compression", justify="right")
    for label, tokens in CONTEXTS.items():
        kv = kv_cache_nbytes(config.n_layers, config.n_kv_heads, config.head_dim, tokens)
        table.add_row(label, human_bytes(memory_bytes), human_bytes(kv),
                      f"{kv / memory_bytes:,.0f}×")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("model-info")(model_info)
