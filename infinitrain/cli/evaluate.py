"""`infinitrain eval passkey|perplexity|booksum|harness`."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CompileOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    PlotOption,
    WindowOption,
    load_for_command,
    stderr,
    stdout,
    written,
)
from .output import UsageError, reported
from .progress import progress

eval_app = typer.Typer(name="eval", no_args_is_help=True,
                       help="Evaluate a checkpoint: passkey retrieval, perplexity, BookSum ROUGE, "
                            "lm-evaluation-harness tasks.")


# ----------------------------------------------------------------------------------------------
# infinitrain eval perplexity


@eval_app.command("perplexity")
def perplexity(
    models: Annotated[list[Path], typer.Option(
        "--model", help="Training checkpoint (step-XXXXXXXX/), a run's out_dir (its 'latest' "
        "checkpoint) or a model directory; repeat it to compare models side by side on the same "
        "documents.", show_default=False)],
    data: Annotated[str, typer.Option(
        help="Documents: a file (.txt, .jsonl, .parquet, … as PG19's format), a directory or glob "
             "of such files, or a hub dataset name.", show_default=False)],
    split: Annotated[str, typer.Option(help="Hub dataset split.")] = "test",
    config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Column with the text.")] = None,
    max_docs: Annotated[int | None, typer.Option(min=1, help="Score the first N documents.")]
        = None,
    min_tokens: Annotated[int, typer.Option(min=0, help="Skip shorter documents.")] = 0,
    compare_empty_memory: Annotated[bool, typer.Option(
        "--compare-empty-memory", help="Also score with the memory emptied before every segment "
                                       "(same gates, nothing retrieved): what its content adds.")]
        = False,
    compare_no_memory: Annotated[bool, typer.Option(
        "--compare-no-memory", help="Also score with the memory disabled (memory and gate "
                                    "removed: local attention alone).")] = False,
    window_segments: WindowOption = 4,
    json_path: JsonOption = None,
    plot: PlotOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile: CompileOption = False,
) -> None:
    """Token-level perplexity over whole documents, streamed through memory, by position in them."""
    import itertools

    from ..data.sources import source_for, text_source
    from ..evaluation.perplexity import evaluate_perplexity, position_ranges
    from ..evaluation.plots import curves
    from ..evaluation.report import write_json
    from ..evaluation.tables import perplexity_tables

    with reported("--data"):
        source_config = source_for(data, split=split, config=config, text_field=text_field,
                                   min_tokens=min_tokens)
    results, loaded_models = [], []
    tokenized: dict[str, list] = {}  # models that share a tokenizer share its documents
    for path in models:
        loaded, tokenizer = load_for_command(path, device, dtype, compile=compile)
        key = tokenizer.backend.to_str()
        if key not in tokenized:
            with reported("--data"):
                source = text_source(source_config, tokenizer)
                tokenized[key] = list(itertools.islice(source, max_docs))
        documents = tokenized[key]
        if not documents:
            raise UsageError(f"{data}: no document with at least {max(min_tokens, 1)} tokens")
        named = [(f"#{i}", doc) for i, doc in enumerate(documents)]
        ablations = ("empty",) * compare_empty_memory + ("off",) * compare_no_memory
        total = sum(len(doc) for doc in documents) * (1 + len(ablations))
        name = model_name(path) if len(models) > 1 else ""
        with progress(stderr, f"scoring {name}".strip(), total) as advance:
            results += evaluate_perplexity(loaded.model, named, window_segments=window_segments,
                                           ablations=ablations, name=name,
                                           on_progress=advance)
        loaded_models.append(loaded)
    for table in perplexity_tables(results):
        stdout.print(table)
    if plot is not None:
        ranges = position_ranges(results)
        curves({r.label: r.range_losses(ranges) for r in results}, plot,
               x=[(p.start + p.stop) / 2 for p in ranges], logx=True,
               title="Loss by position in the document", xlabel="token position",
               ylabel="loss (nats/token)")
        written("plot", plot)
    if json_path is not None:
        settings = {"data": data, "split": split, "config": config, "text_field": text_field,
                    "max_docs": max_docs, "min_tokens": min_tokens,
                    "window_segments": window_segments,
                    "compare_empty_memory": compare_empty_memory,
                    "compare_no_memory": compare_no_memory}
        write_json(json_path, "eval perplexity", loaded_models, settings,
                   {"runs": [r.to_dict() for r in results]})
        written("results", json_path)


def model_name(path: Path) -> str:
    """How a compared model is named: its run directory (and checkpoint, if one was given)."""
    return f"{path.parent.name}/{path.name}" if path.name.startswith("step-") else path.name


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
    compile: CompileOption = False,
) -> None:
    """Passkey retrieval (Landmark format, greedy) per length × depth, with bounded memory."""
    from ..data.passkey import FILLER, PasskeyGenerator, load_haystack
    from ..data.sources import source_for
    from ..evaluation.options import format_accuracy, format_tokens, parse_depths, parse_lengths
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
    loaded, tokenizer = load_for_command(model, device, dtype, compile=compile)
    haystack_ids = None
    if haystack is not None:
        with reported("--haystack"):
            haystack_ids = load_haystack(source_for(haystack, split="test"), tokenizer)
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
                col_title="prompt length (tokens)", cmap="RdYlGn", fmt=format_accuracy)
        written("plot", plot)
    if offset_plot is not None:
        by_depth = {f"depth {d:g}": result.accuracy_by_end_position(d) for d in settings.depths}
        curves({name: list(acc.values()) for name, acc in by_depth.items()}, offset_plot,
               x=list(next(iter(by_depth.values()))),
               title="Passkey retrieval by where the prompt ends",
               xlabel="prompt end: tokens into its last segment (0 = on a boundary)",
               ylabel="exact match")
        written("offset plot", offset_plot)
    if json_path is not None:
        write_json(json_path, "eval passkey", loaded,
                   {**asdict(settings), "format": "landmark"}, result.to_dict())
        written("results", json_path)


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
    compile: CompileOption = False,
) -> None:
    """Summarise whole books read through memory; ROUGE-1/2/L and their geometric mean."""
    import itertools

    from ..data.booksum import load_booksum
    from ..data.sources import source_for
    from ..evaluation.booksum import BookSumSettings, evaluate_booksum
    from ..evaluation.options import parse_token_count
    from ..evaluation.report import write_json
    from ..evaluation.tables import booksum_table

    with reported():
        budget = parse_token_count(max_input_tokens, "--max-input-tokens")
        settings = BookSumSettings(max_new_tokens, temperature, top_p, seed, window_segments,
                                   not no_memory)
    loaded, tokenizer = load_for_command(model, device, dtype, compile=compile)
    with reported("--data"):
        source = source_for(data, split=split, config=config, text_field=text_field,
                            kind="booksum", summary_field=summary_field,
                            max_input_tokens=budget, truncate=truncate)
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
        written("results", json_path)


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
    from ..inference.loading import choose_device, choose_dtype

    with reported():
        names = parse_names(tasks, "--tasks")
        tokens = parse_token_count(max_length, "--max-length")
        if log_samples and json_path is None:
            raise UsageError("--log-samples writes to --json: give --json too")
        lm_harness.require_lm_eval()
    with reported("--device"):
        torch_device = choose_device(device)
    with reported("--dtype"):
        torch_dtype = choose_dtype(dtype, torch_device)
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
        written("results", json_path)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(eval_app)
