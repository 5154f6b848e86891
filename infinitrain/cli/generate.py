"""`infinitrain generate`: read a document or a saved state, then answer or continue a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..evaluation.options import human_bytes
from .common import (
    CompileOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    WindowOption,
    load_for_command,
    stderr,
    stdout,
    written,
)
from .output import UsageError, counted, reported
from .progress import progress

# ----------------------------------------------------------------------------------------------
# infinitrain generate


def generate(
    model: ModelOption,
    prompt: Annotated[str | None, typer.Option(help="Text to answer or continue.")] = None,
    file: Annotated[Path | None, typer.Option(
        help="A document to read into memory first (its state can be saved with --save-state).")]
        = None,
    state: Annotated[Path | None, typer.Option(
        help="Start from a memory state saved by --save-state instead of an empty memory.")]
        = None,
    save_state: Annotated[Path | None, typer.Option(
        help="After reading --file, save the memory state here (safetensors, a few MB whatever "
             "the document's length).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampler.")] = None,
    window_segments: WindowOption = 4,
    no_memory: Annotated[bool, typer.Option("--no-memory",
                                            help="Disable the memory (local attention only).")]
        = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile: CompileOption = False,
) -> None:
    """Read a document once, save its memory state, and answer prompts from it later.

    Prints the generated text on stdout and statistics on stderr.
    """
    import torch

    from ..inference import GenerationConfig, SamplingConfig, load_state, prefill
    from ..inference import generate as run_generation
    from ..inference import save_state as save_state_to

    if prompt is None and file is None:
        with reported():
            raise UsageError("give --prompt TEXT, --file PATH, or both")
    if save_state is not None and file is None:
        with reported():
            raise UsageError("--save-state saves what --file reads: give --file too")
    with reported():
        sampling = SamplingConfig(temperature, top_p, seed)
    loaded, tokenizer = load_for_command(model, device, dtype, compile=compile)
    config, weight = loaded.model.config, loaded.model.embed_tokens.weight
    tokens_read, memory = 0, None
    if state is not None:
        with reported("--state"):
            saved = load_state(state, config, weight.device, weight.dtype)
        memory, tokens_read = saved.state, saved.tokens_read
        stderr.print(f"memory state {state}: {counted(tokens_read, 'token')} read "
                     f"({saved.source})")
        # resolve(): older files hold the path as given, relative to where they were saved
        if saved.model and Path(saved.model).resolve() != loaded.path.resolve():
            stderr.print(f"[yellow]Warning:[/] {state} was saved by {saved.model}, not "
                         f"{loaded.path}; answers are only meaningful with the same weights")
    settings = GenerationConfig(max_new_tokens, sampling, tokenizer.eos_id, window_segments,
                                not no_memory)

    context: list[int] = []
    if file is not None:
        with reported("--file"):
            if not file.is_file():
                raise UsageError(f"{file}: no such file")
            text = file.read_text(encoding="utf-8")
            if not text.strip():
                raise UsageError(f"{file}: empty file")
        context = tokenizer.encode(text, bos=memory is None)
    if save_state is not None:
        with progress(stderr, f"reading {file.name}", len(context)) as advance:
            _, memory = prefill(loaded.model, torch.tensor([context], device=weight.device),
                                memory, window_segments=window_segments,
                                use_memory=not no_memory, on_progress=advance)
        tokens_read += len(context)
        save_state_to(save_state, memory, config, tokens_read, source=str(file),
                      model=str(loaded.path.resolve()))
        stderr.print(f"read {counted(len(context), 'token')} of {file}; memory state of "
                     f"{human_bytes(memory.nbytes())} after {counted(tokens_read, 'token')}")
        written("memory state", save_state)
        if prompt is None:
            return
        context = []

    prompt_ids = context + (tokenizer.encode(prompt, bos=memory is None and not context)
                            if prompt is not None else [])
    if not prompt_ids:
        with reported("--prompt"):
            raise UsageError("'': empty prompt")
    with progress(stderr, "reading", len(prompt_ids)) as advance:
        out = run_generation(loaded.model, prompt_ids, memory, settings, on_progress=advance)
    stdout.print(tokenizer.decode(out.tokens), highlight=False, markup=False)
    stderr.print(f"{counted(out.prompt_tokens, 'prompt token')} at "
                 f"{out.prompt_tokens / max(out.prefill_seconds, 1e-9):,.0f} tokens/s; "
                 f"{counted(len(out.tokens), 'new token')} at "
                 f"{len(out.tokens) / max(out.decode_seconds, 1e-9):,.1f} tokens/s"
                 f"{' (stopped at EOS)' if out.stopped_at_eos else ''}")


def register(app: typer.Typer) -> None:
    """Add this module's command to the root app."""
    app.command("generate")(generate)
