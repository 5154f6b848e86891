"""`infinitrain export hf` and `infinitrain import hf`: Hugging Face interop.

Bad input (not a checkpoint, not a Llama, a tokenizer that does not fit) ends in one ``Error:``
line and exit status 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..evaluation.options import human_bytes
from ..export.llama import (
    DEFAULT_GATE_INIT,
    DEFAULT_MEMORY_FROM_LAYER,
    DEFAULT_MEMORY_RULE,
    import_llama,
    recipe_model_section,
)
from ..model.config import ModelConfig
from ..model.memory import RULES
from .output import reported

export_app = typer.Typer(name="export", no_args_is_help=True,
                         help="Export a checkpoint to another format.")
import_app = typer.Typer(name="import", no_args_is_help=True,
                         help="Import weights from another format.")
stdout = Console()


@export_app.command("hf")
def export_hf(
    checkpoint: Annotated[Path, typer.Argument(
        help="Training checkpoint (step-XXXXXXXX/), a run's out_dir (its 'latest' checkpoint) or "
             "a model directory.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="New directory to write.", show_default=False)],
    dtype: Annotated[str, typer.Option(help="Precision of the stored weights: fp32 or bf16.")]
        = "fp32",
    max_shard_size: Annotated[str, typer.Option(
        help="Largest safetensors file; bigger models are split into shards.")] = "5GB",
) -> None:
    """Write a Hugging Face model directory: AutoModelForCausalLM.from_pretrained(OUT_DIR,
    trust_remote_code=True) loads it, generate() carries the memory."""
    from ..export import export_hf as export
    from ..inference.loading import resolve_model_path

    with reported():
        model_dir = resolve_model_path(checkpoint)
        with stdout.status(f"exporting {model_dir}"):
            out = export(model_dir, out_dir, dtype, max_shard_size)
    print_files(f"Exported {model_dir} to {out}", out)
    stdout.print(f"Load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
                 "trust_remote_code=True); README.md has the details.", highlight=False)


@export_app.command("model")
def export_model(
    checkpoint: Annotated[Path, typer.Argument(
        help="Training checkpoint (step-XXXXXXXX/), a run's out_dir (its 'latest' checkpoint) or "
             "a Hugging Face export.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="New directory to write.", show_default=False)],
) -> None:
    """Write a model directory (float32 weights, config, tokenizer) that a recipe's model.init
    starts from: e.g. from a checkpoint saved without its weights (checkpoint.consolidate:
    final), whose sharded trainer state is gathered here, on one process."""
    from ..export.files import check_new_dir
    from ..inference.loading import load_model
    from ..model_dir import save_model_dir

    with reported():
        check_new_dir(out_dir)
        with stdout.status(f"reading {checkpoint}"):
            loaded = load_model(checkpoint)
            out = save_model_dir(loaded.model, out_dir, loaded.tokenizer_dir)
    print_files(f"Wrote {loaded.path} to {out}", out)
    stdout.print(f"A recipe continues from it with --set model.init={out}", highlight=False)


def print_files(heading: str, directory: Path) -> None:
    stdout.print(heading, highlight=False)
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for file in sorted(directory.iterdir()):
        size = sum(f.stat().st_size for f in file.rglob("*")) if file.is_dir() else \
            file.stat().st_size
        table.add_row(file.name + ("/" if file.is_dir() else ""), human_bytes(size))
    stdout.print(table)


@import_app.command("hf")
def import_hf(
    llama_dir: Annotated[Path, typer.Argument(
        help="Hugging Face Llama checkpoint directory: config.json, model.safetensors (or its "
             "shards), tokenizer.json.", show_default=False)],
    out_ckpt: Annotated[Path, typer.Argument(
        help="New model directory to write; a recipe's model.init starts from it.",
        show_default=False)],
    segment_len: Annotated[int, typer.Option(min=1, help="N: tokens per segment.")]
        = ModelConfig.segment_len,
    rule: Annotated[str, typer.Option(help=f"Memory rule: {', '.join(RULES)}; the default is "
                                           "the 1b recipe's, delta the 8b's.")]
        = DEFAULT_MEMORY_RULE,
    write_gate: Annotated[bool | None, typer.Option(
        "--write-gate/--no-write-gate", help="A learned write gate, clamped, starting fully open "
        "(the 1b recipe's); default: on for rules that take a write strength.",
        show_default=False)] = None,
    memory_from_layer: Annotated[int, typer.Option(
        min=0, help="First layer with memory; the layers below attend locally only. The default "
                    "is the 1b recipe's; 0, every layer as in the paper, the 8b's.")]
        = DEFAULT_MEMORY_FROM_LAYER,
    gate_init: Annotated[float, typer.Option(
        help="Initial β of every head: sigmoid(-6) ≈ 0.0025 keeps the Llama's local attention "
             "while the gate can still learn.")] = DEFAULT_GATE_INIT,
    allow_rope_scaling_drop: Annotated[bool, typer.Option(
        "--allow-rope-scaling-drop", help="Import a checkpoint whose RoPE scaling infinitrain "
        "does not implement (anything but Llama-3's 'llama3') using unscaled frequencies.")]
        = False,
) -> None:
    """Convert a Llama checkpoint into an Infini-Transformer for continual pretraining."""
    import yaml

    with reported(), stdout.status(f"importing {llama_dir}"):
        result = import_llama(llama_dir, out_ckpt, segment_len=segment_len, memory_rule=rule,
                              write_gate=write_gate, memory_from_layer=memory_from_layer,
                              gate_init=gate_init,
                              allow_rope_scaling_drop=allow_rope_scaling_drop)
    config = result.config
    stdout.print(f"[bold]{result.path}[/]: {config.n_layers} layers, d {config.d_model}, "
                 f"{config.n_heads} query / {config.n_kv_heads} key-value heads × "
                 f"{config.head_dim}, vocabulary {config.vocab_size}, segment "
                 f"{config.segment_len}, {config.memory_rule} memory from layer "
                 f"{config.memory_from_layer}"
                 f"{' with a write gate' if config.memory_write_gate else ''}, gates at "
                 f"sigmoid({config.gate_init:g})",
                 highlight=False)
    for note in result.notes:
        stdout.print(f"[yellow]Note:[/] {note}", highlight=False)
    section = yaml.safe_dump({"model": recipe_model_section(config, result.path)},
                             sort_keys=False)
    stdout.print(f"A recipe continues from it with:\n{section}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's command groups to the root app."""
    app.add_typer(export_app)
    app.add_typer(import_app)
