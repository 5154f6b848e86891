"""`infinitrain eval passkey|perplexity|booksum|harness`, `generate` and
`inspect gates|training|needle-trace`.

Commands parse and check their options, load the model, call the evaluation code showing its
progress (`progress.py`), print rich tables and write JSON/PNG where asked. User mistakes end in
one ``Error:`` line that names the option and the value, never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..evaluation.options import human_bytes
from .output import counted, fail
from .progress import progress

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)

eval_app = typer.Typer(name="eval", no_args_is_help=True,
                       help="Evaluate a checkpoint: passkey retrieval, perplexity, BookSum ROUGE, "
                            "lm-evaluation-harness tasks.")
inspect_app = typer.Typer(name="inspect", no_args_is_help=True,
                          help="Look inside a checkpoint or a training run.")

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


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


@contextlib.contextmanager
def reported(option: str | None = None) -> Iterator[None]:
    """Turn input errors into one ``Error:`` line, prefixed with ``option``.

    Wraps only the code that checks user input (options, model, tokenizer, data, state files),
    where the library's ValueError and OSError subclasses (OptionError, ModelDirError,
    DataSourceError, StateFileError, …) all mean a bad value.
    """
    try:
        yield
    except (UsageError, ValueError, OSError) as error:
        message = str(error) if option is None else f"{option} {error}"
        fail(message)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
    return device


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def _load(path: Path, device: str, dtype: str, need_tokenizer: bool = True):
    """(LoadedModel, Tokenizer | None) for ``--model``, every failure as a one-line error."""
    from ..data.tokenizer import load_tokenizer
    from ..inference import load_model

    with reported():
        torch_device = _device(device)
        torch_dtype = _dtype(dtype, torch_device)
    with reported("--model"):
        loaded = load_model(path, torch_device, torch_dtype)
        if not need_tokenizer:
            return loaded, None
        if loaded.tokenizer_dir is None:
            raise UsageError(f"{path}: has no tokenizer/ directory; evaluation needs the "
                             "tokenizer the model was trained with")
        tokenizer = load_tokenizer(loaded.tokenizer_dir)
        if tokenizer.vocab_size > loaded.model.config.vocab_size:
            raise UsageError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                             f"vocabulary only {loaded.model.config.vocab_size}")
    return loaded, tokenizer


def _written(kind: str, path: Path) -> None:
    stderr.print(f"{kind} written to [bold]{path}[/]")


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
    loaded, tokenizer = _load(model, device, dtype)
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
        _written("memory state", save_state)
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


# ----------------------------------------------------------------------------------------------
# infinitrain inspect gates


@inspect_app.command("gates")
def gates(
    model: ModelOption,
    plot: PlotOption = None,
    json_path: JsonOption = None,
) -> None:
    """Memory gates sigmoid(β) per layer and head: specialised vs mixer heads (paper Fig. 3)."""
    from ..evaluation.gates import GateReport
    from ..evaluation.plots import heatmap
    from ..evaluation.report import write_json
    from ..evaluation.tables import gates_table

    loaded, _ = _load(model, "cpu", "fp32", need_tokenizer=False)
    report = GateReport.of(loaded.model)
    stdout.print(gates_table(report))
    if plot is not None:
        heatmap(report.gates, plot, title="Memory gate sigmoid(β) per head",
                row_labels=[str(i) for i in range(len(report.gates))],
                col_labels=[str(h) for h in range(len(report.gates[0]))],
                row_title="layer", col_title="query head", cmap="coolwarm")
        _written("plot", plot)
    if json_path is not None:
        write_json(json_path, "inspect gates", loaded, {}, report.to_dict())
        _written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain inspect training


@inspect_app.command("training")
def training(
    run: Annotated[Path, typer.Option(
        "--run", help="A run's out_dir: the folder holding logs/ and the step-XXXXXXXX/ "
        "checkpoints.", show_default=False)],
    plot: PlotOption = None,
    json_path: JsonOption = None,
) -> None:
    """A run's training curve from its CSV logs: loss and each layer's memory gates vs step."""
    from ..evaluation.plots import training_curves
    from ..evaluation.report import write_json
    from ..evaluation.tables import training_table
    from ..evaluation.training_log import TrainingLog

    with reported("--run"):
        log = TrainingLog.read(run)
    stdout.print(training_table(log))
    if plot is not None:
        steps, (loss,) = log.points("loss")
        training_curves(steps, loss, {layer.replace("_", " "): log.gates(layer)
                                      for layer in log.gate_layers},
                        plot, title=f"Training loss, {run.resolve().name}")
        _written("plot", plot)
    if json_path is not None:
        write_json(json_path, "inspect training", None, {"run": str(run)}, log.to_dict())
        _written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain inspect needle-trace


@inspect_app.command("needle-trace")
def needle_trace(
    model: ModelOption,
    length: Annotated[str, typer.Option(help="Prompt length in tokens: 4096, 16k, 1M, …")]
        = "16k",
    depth: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Needle depth in [0, 1]: 0 = start of the filler, 1 = its end.")]
        = 0.0,
    samples: Annotated[int, typer.Option(min=1, help="Prompts (keys) to average over.")] = 3,
    seed: Annotated[int, typer.Option(
        help="Seed of the keys: the keys `eval passkey --seed` draws at this length for its "
             "first depth.")] = 0,
    plot: PlotOption = None,
    json_path: JsonOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """How much of a passkey needle the memory still holds as filler accumulates, per layer.

    Compares the memory M of each prompt with that of a twin without the needle, segment by segment.
    """
    from ..data.passkey import PasskeyGenerator
    from ..evaluation.needle_trace import checked_sample
    from ..evaluation.needle_trace import needle_trace as run_trace
    from ..evaluation.options import format_tokens, parse_token_count
    from ..evaluation.plots import loglog_panels
    from ..evaluation.report import write_json
    from ..evaluation.tables import needle_trace_table

    with reported():
        tokens = parse_token_count(length, "--length")
    loaded, tokenizer = _load(model, device, dtype)
    segment_len = loaded.model.config.segment_len
    prompts = PasskeyGenerator(tokenizer)
    with reported("--length"):  # the prompt must hold the task, needle and question
        prompts.sample(tokens, depth, seed=0)
    with reported("--depth"):
        checked_sample(prompts, tokens, depth, 0, segment_len)
    # reported: another key's needle may be a token longer
    with progress(stderr, "needle and twin", tokens * samples) as advance, reported("--depth"):
        result = run_trace(loaded.model, tokenizer, tokens, depth, samples, seed,
                           on_progress=advance)
    stdout.print(needle_trace_table(result))
    if plot is not None:
        def lines(values: list[list[float]]) -> dict[str, tuple[list[int], list[float]]]:
            return {f"layer {i}": (result.after, row) for i, row in enumerate(values)}

        loglog_panels({"needle trace ‖ΔM‖/‖M‖": lines(result.trace),
                       "change of M per segment": lines(result.change)}, plot,
                      title=f"Needle in memory, {result.memory_rule} rule, "
                            f"{format_tokens(tokens)} tokens, depth {depth:g} "
                            f"({loaded.path.parent.name}/{loaded.path.name})",
                      xlabel=f"segments after the needle's ({segment_len} tokens each)")
        _written("plot", plot)
    if json_path is not None:
        write_json(json_path, "inspect needle-trace", loaded,
                   {"length": tokens, "depth": depth, "samples": samples, "seed": seed},
                   result.to_dict())
        _written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain eval perplexity


def _data_source(data: str, split: str, config: str | None, text_field: str | None,
                 min_tokens: int, **fields):
    """A local file, glob or directory becomes a file source; anything else a hub dataset name."""
    from ..data.sources import FILE_BUILDERS, SourceConfig

    common = dict(text_field=text_field, min_tokens=min_tokens, **fields)
    path = Path(data)
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir()
                       if f.is_file() and any(suffix in FILE_BUILDERS for suffix in f.suffixes))
        if not files:
            raise UsageError(f"{data}: directory holds no {', '.join(FILE_BUILDERS)} file")
        return SourceConfig(files=files, **common)
    if path.exists() or any(ch in data for ch in "*?["):
        return SourceConfig(files=[data], **common)
    if "/" not in data or data.startswith((".", "/")):
        raise UsageError(f"{data}: no such file, and not a hub dataset name (owner/name)")
    return SourceConfig(name=data, config=config, split=split, **common)


@eval_app.command("perplexity")
def perplexity(
    model: ModelOption,
    data: Annotated[str, typer.Option(
        help="Documents: a file (.txt, .jsonl, .parquet, … as PG19's format), a directory or glob "
             "of such files, or a hub dataset name.", show_default=False)],
    split: Annotated[str, typer.Option(help="Hub dataset split.")] = "test",
    config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Column with the text.")] = None,
    max_docs: Annotated[int | None, typer.Option(min=1, help="Score the first N documents.")]
        = None,
    min_tokens: Annotated[int, typer.Option(min=0, help="Skip shorter documents.")] = 0,
    compare_no_memory: Annotated[bool, typer.Option(
        "--compare-no-memory", help="Also score with the memory disabled (gate forced to local "
                                    "attention).")] = False,
    window_segments: WindowOption = 4,
    json_path: JsonOption = None,
    plot: PlotOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Token-level perplexity over whole documents, streamed through memory, by position in them."""
    import itertools

    from ..data.sources import text_source
    from ..evaluation.perplexity import evaluate_perplexity
    from ..evaluation.plots import curves
    from ..evaluation.report import write_json
    from ..evaluation.tables import perplexity_tables

    loaded, tokenizer = _load(model, device, dtype)
    with reported("--data"):
        source = text_source(_data_source(data, split, config, text_field, min_tokens), tokenizer)
        documents = list(itertools.islice(source, max_docs))
        if not documents:
            raise UsageError(f"{data}: no document with at least {max(min_tokens, 1)} tokens")
    named = [(f"#{i}", doc) for i, doc in enumerate(documents)]
    total = sum(len(doc) for doc in documents) * (2 if compare_no_memory else 1)
    with progress(stderr, "scoring", total) as advance:
        results = evaluate_perplexity(loaded.model, named, window_segments=window_segments,
                                      compare_no_memory=compare_no_memory,
                                      on_progress=advance)
    for table in perplexity_tables(results, loaded.model.config.segment_len):
        stdout.print(table)
    if plot is not None:
        label = {True: "memory", False: "memory disabled"}
        curves({label[r.use_memory]: r.segment_curve() for r in results}, plot,
               title="Loss by position in the document", xlabel="segment",
               ylabel="loss (nats/token)")
        _written("plot", plot)
    if json_path is not None:
        settings = {"data": data, "split": split, "config": config, "text_field": text_field,
                    "max_docs": max_docs, "min_tokens": min_tokens,
                    "window_segments": window_segments, "compare_no_memory": compare_no_memory}
        write_json(json_path, "eval perplexity", loaded, settings,
                   {"runs": [r.to_dict() for r in results]})
        _written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain eval passkey

NoMemoryOption = Annotated[bool, typer.Option(
    "--no-memory", help="Disable the memory (gate forced to local attention): the baseline.")]


@eval_app.command("passkey")
def passkey(
    model: ModelOption,
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens: 4096, 32k, 1M, …")]
        = "4k,32k,128k,1m",
    depths: Annotated[str, typer.Option(
        help="Needle depths in [0, 1]: 0 = start of the filler, 1 = its end.")] = "0,0.5,1",
    samples: Annotated[int, typer.Option(min=1, help="Prompts per length and depth.")] = 5,
    seed: int = 0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 8,
    key_min: Annotated[int, typer.Option(help="Smallest key.")] = 1,
    key_max: Annotated[int, typer.Option(
        help="Largest key; keys are uniform in [key-min, key-max] (Landmark: 1-50000).")] = 50_000,
    offsets: Annotated[int, typer.Option(
        min=1, help="End positions per length, spread evenly over a segment (segment length: every "
             "position); --samples prompts at each.")] = 1,
    offset_plot: Annotated[Path | None, typer.Option(
        help="Write accuracy against where the prompt ends in its last segment (PNG).")] = None,
    haystack: Annotated[str | None, typer.Option(
        help="Hide the needle in real text instead of the filler: a local file, glob or "
             "directory (txt, jsonl, parquet, …) or a hub dataset name, held out from training; "
             "read from a random place per prompt, repeated when a prompt is longer.",
        show_default=False)] = None,
    filler: Annotated[str | None, typer.Option(
        help="Other sentences to repeat around the needle instead of Landmark's.",
        show_default=False)] = None,
    window_segments: WindowOption = 4,
    no_memory: NoMemoryOption = False,
    json_path: JsonOption = None,
    plot: PlotOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Passkey retrieval (Landmark format, greedy) per length × depth, with bounded memory."""
    from ..data.passkey import FILLER, PasskeyGenerator, haystack_tokens
    from ..data.sources import text_source
    from ..evaluation.options import format_tokens, parse_depths, parse_lengths
    from ..evaluation.passkey import PasskeySettings, evaluate_passkey, length_offsets
    from ..evaluation.plots import curves, heatmap
    from ..evaluation.report import write_json
    from ..evaluation.tables import passkey_table

    with reported():
        if haystack is not None and filler is not None:
            raise UsageError("--haystack and --filler: choose one (a haystack replaces the filler)")
        if filler is not None and not filler.strip():
            raise UsageError("--filler '': give the sentences to repeat")
        settings = PasskeySettings(tuple(parse_lengths(lengths)), tuple(parse_depths(depths)),
                                   samples, seed, window_segments, not no_memory, max_new_tokens,
                                   key_min, key_max, offsets, filler or FILLER, haystack)
    loaded, tokenizer = _load(model, device, dtype)
    haystack_ids = None
    if haystack is not None:
        with reported("--haystack"):
            source = text_source(_data_source(haystack, "test", None, None, 0), tokenizer)
            haystack_ids = haystack_tokens((document.ids for document in source), tokenizer)
            if len(haystack_ids) == 0:
                raise UsageError(f"--haystack {haystack}: holds no text")
    with reported("--lengths"):  # the shortest must hold the task, needle and question
        PasskeyGenerator(tokenizer).check_length(settings.lengths[0])
    added = length_offsets(settings, loaded.model.config.segment_len)
    total = sum(n + a for n in settings.lengths for a in added) * len(settings.depths) * samples
    with progress(stderr, "passkey prompts", total) as advance:
        result = evaluate_passkey(loaded.model, tokenizer, settings,
                                  on_progress=advance, haystack=haystack_ids)
    stdout.print(passkey_table(result))
    if plot is not None:
        heatmap([[result.accuracy(n, d) for n in settings.lengths] for d in settings.depths],
                plot, title="Passkey retrieval accuracy", row_labels=[f"{d:g}" for d in
                                                                      settings.depths],
                col_labels=[format_tokens(n) for n in settings.lengths], row_title="depth",
                col_title="prompt length (tokens)", cmap="RdYlGn", fmt="{:.0%}")
        _written("plot", plot)
    if offset_plot is not None:
        by_depth = {f"depth {d:g}": result.accuracy_by_end_position(d) for d in settings.depths}
        curves({name: list(acc.values()) for name, acc in by_depth.items()}, offset_plot,
               x=list(next(iter(by_depth.values()))),
               title="Passkey retrieval by where the prompt ends",
               xlabel="prompt end: tokens into its last segment (0 = on a boundary)",
               ylabel="exact match")
        _written("offset plot", offset_plot)
    if json_path is not None:
        write_json(json_path, "eval passkey", loaded,
                   {**asdict(settings), "format": "landmark"}, result.to_dict())
        _written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain eval booksum


@eval_app.command("booksum")
def booksum(
    model: ModelOption,
    data: Annotated[str, typer.Option(
        help="BookSum rows: a local file in kmfoda/booksum (chapter, summary_text) or "
             "ubaada/booksum-complete-cleaned (text, summary) layout, or a hub dataset name.",
        show_default=False)],
    split: Annotated[str, typer.Option(help="Hub dataset split.")] = "test",
    config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Column with the book.")] = None,
    summary_field: Annotated[str | None, typer.Option(help="Column with the summary.")] = None,
    max_input_tokens: Annotated[str, typer.Option(
        help="Longest prompt in tokens (book + summary request); longer books are truncated.")]
        = "500k",
    truncate: Annotated[str, typer.Option(
        help="Which part of an over-long book to drop: start or middle.")] = "start",
    max_books: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N books.")]
        = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.5,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 0.95,
    seed: int = 0,
    window_segments: WindowOption = 4,
    no_memory: NoMemoryOption = False,
    json_path: JsonOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Summarise whole books read through memory; ROUGE-1/2/L and their geometric mean."""
    import itertools

    from ..data.booksum import load_booksum
    from ..evaluation.booksum import BookSumSettings, evaluate_booksum
    from ..evaluation.options import parse_token_count
    from ..evaluation.report import write_json
    from ..evaluation.tables import booksum_table

    with reported():
        budget = parse_token_count(max_input_tokens, "--max-input-tokens")
        settings = BookSumSettings(max_new_tokens, temperature, top_p, seed, window_segments,
                                   not no_memory)
    loaded, tokenizer = _load(model, device, dtype)
    with reported("--data"):
        source = _data_source(data, split, config, text_field, 0, kind="booksum",
                              summary_field=summary_field, max_input_tokens=budget,
                              truncate=truncate)
        examples = list(itertools.islice(load_booksum(source, tokenizer), max_books))
        if not examples:
            raise UsageError(f"{data}: no book with a summary")
    total = sum(len(e.prompt_ids) for e in examples)
    with progress(stderr, f"summarising {len(examples)} books", total) as advance:
        result = evaluate_booksum(loaded.model, tokenizer, examples, settings,
                                  on_progress=advance)
    stdout.print(booksum_table(result))
    if json_path is not None:
        write_json(json_path, "eval booksum", loaded,
                   {**asdict(settings), "data": data, "split": split, "config": config,
                    "max_input_tokens": budget, "truncate": truncate, "max_books": max_books},
                   result.to_dict())
        _written("results", json_path)


# ----------------------------------------------------------------------------------------------
# infinitrain eval harness


@eval_app.command("harness")
def harness(
    model: ModelOption,
    tasks: Annotated[str, typer.Option(
        help="Comma-separated lm-eval tasks, groups or tags: lm-eval's own (hellaswag, …) or "
             "those in --include-path (data/harness-tasks: infinitrain_smoke).",
        show_default=False)],
    include_path: Annotated[Path | None, typer.Option(
        help="A directory of lm-eval task YAMLs, searched before lm-eval's own tasks.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass; results do "
                                                        "not depend on it.")] = 1,
    limit: Annotated[int | None, typer.Option(min=1, help="Score the first N documents of each "
                                                          "task.")] = None,
    max_length: Annotated[str, typer.Option(
        help="Tokens per forward pass (4096, 64k, 1M): longer documents are scored in windows "
             "of this many tokens, each from an empty memory; longer prompts lose their start. "
             "Logits take max-length × vocabulary floats per request in a batch.")] = "1m",
    log_samples: Annotated[bool, typer.Option(
        "--log-samples", help="Also write every request and response to --json.")] = False,
    json_path: JsonOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """lm-evaluation-harness tasks, scored through the model's Hugging Face export (a checkpoint
    is exported to a temporary directory first): what is measured is what ships. Every request
    is read after exactly one BOS, as the model was trained."""
    from ..evaluation import harness as lm_harness
    from ..evaluation.options import parse_names, parse_token_count
    from ..evaluation.report import write_json
    from ..evaluation.tables import harness_table

    with reported():
        names = parse_names(tasks, "--tasks")
        tokens = parse_token_count(max_length, "--max-length")
        if log_samples and json_path is None:
            raise UsageError("--log-samples writes to --json: give --json too")
        torch_device = _device(device)
        torch_dtype = _dtype(dtype, torch_device)
        lm_harness.require_lm_eval()
    with reported("--tasks"):
        manager = lm_harness.task_manager(names, include_path)
    with contextlib.ExitStack() as stack:
        with reported("--model"):
            hf_dir = stack.enter_context(lm_harness.hf_export(model, torch_dtype))
        results = lm_harness.run_harness(
            hf_dir, names, batch_size=batch_size, limit=limit, device=torch_device,
            dtype=torch_dtype, max_length=tokens, log_samples=log_samples, manager=manager)
    results["config"]["model"] = str(model)
    stdout.print(harness_table(lm_harness.metrics(results)))
    if json_path is not None:
        settings = {"tasks": names, "include_path": None if include_path is None
                    else str(include_path), "batch_size": batch_size, "limit": limit,
                    "max_length": tokens, "device": str(torch_device),
                    "dtype": str(torch_dtype).removeprefix("torch.")}
        write_json(json_path, "eval harness", None, {"model": str(model), **settings},
                   lm_harness.jsonable(results))
        _written("results", json_path)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(eval_app)
    app.add_typer(inspect_app)
    app.command("generate")(generate)
