"""What the commands that load a model share (`eval`, `inspect`, `generate`): their options,
the consoles, loading ``--model``, and the error policy.

Commands parse and check their options, load the model, call the library showing its progress
(`progress.py`), print rich tables and write JSON/PNG where asked. User mistakes end in one
``Error:`` line that names the option and the value, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .output import reported

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)

ModelOption = Annotated[Path, typer.Option(
    "--model", help="Training checkpoint (step-XXXXXXXX/), a run's out_dir (its 'latest' "
    "checkpoint) or a model directory.", show_default=False)]
DeviceOption = Annotated[str, typer.Option(help="auto (cuda when available), cpu, cuda, cuda:1, …")]
DtypeOption = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16. "
                                               "The memory M, z is float32 always.")]
WindowOption = Annotated[int, typer.Option(
    "--window-segments", min=1, help="Segments per prefill window: more is faster, fewer uses "
    "less memory; results do not depend on it.")]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Write results and settings here.")]
PlotOption = Annotated[Path | None, typer.Option("--plot", help="Write a PNG figure here.")]
CompileOption = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the model's blocks: slower to start (about a minute), "
                      "faster on long inputs where the machine gains from it.")]


def load_for_command(path: Path, device: str, dtype: str, need_tokenizer: bool = True,
                     compile: bool = False):
    """(LoadedModel, Tokenizer | None) for ``--model``, every failure as a one-line error;
    ``compile``: its blocks compiled (``--compile``)."""
    from ..inference.loading import choose_device, choose_dtype, load_model, load_with_tokenizer

    with reported("--device"):
        torch_device = choose_device(device)
    with reported("--dtype"):
        torch_dtype = choose_dtype(dtype, torch_device)
    with reported("--model"):
        if need_tokenizer:
            loaded, tokenizer = load_with_tokenizer(path, torch_device, torch_dtype)
        else:
            loaded, tokenizer = load_model(path, torch_device, torch_dtype), None
    if compile:
        loaded.model.compile_blocks()
    return loaded, tokenizer


def written(kind: str, path: Path) -> None:
    stderr.print(f"{kind} written to [bold]{path}[/]")
