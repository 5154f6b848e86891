"""Rich tables of evaluation results, as printed on the terminal."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from ..data.passkey import FILLER
from ..model.memory import rule_named
from .booksum import BookSumResult
from .gates import GateReport
from .harness import Metric
from .needle_trace import NeedleTraceResult
from .options import format_accuracy, format_tokens, human_bytes
from .passkey import PasskeyResult
from .perplexity import PerplexityResult, position_ranges
from .training_log import TrainingLog

PAPER_BOOKSUM = "paper, 8B at 500K, linear+delta: R-1 40.0, R-2 8.8, R-L 17.9, overall 18.5"


def _percent(value: float) -> str:
    colour = "green" if value >= 0.9 else "yellow" if value >= 0.5 else "red"
    return f"[{colour}]{format_accuracy(value)}[/]"


def passkey_table(result: PasskeyResult) -> Table:
    settings = result.settings
    memory = "memory" if settings.use_memory else "memory disabled"
    spread = f" over {settings.offsets} end positions" if settings.offsets > 1 else ""
    hidden_in = (f", hidden in {settings.haystack}" if settings.haystack else
                 ", other filler" if settings.filler != FILLER else "")
    by_digits = ", ".join(f"{digits}: {_percent(accuracy)} of {n}" for digits, (accuracy, n)
                          in result.accuracy_by_key_digits().items())
    table = Table(title=f"Passkey retrieval, exact match ({settings.samples * settings.offsets} "
                        f"prompts per cell{spread}, {memory}{hidden_in})",
                  caption=f"by digits in the key: {by_digits}")
    table.add_column("length", justify="right")
    for depth in settings.depths:
        table.add_column(f"depth {depth:g}", justify="right")
    table.add_column("all", justify="right")
    if settings.offsets > 1:
        table.add_column("worst offset", justify="right")
    table.add_column("prefill tokens/s", justify="right")
    table.add_column("peak memory", justify="right")
    for length, stats in result.lengths.items():
        worst = []
        if settings.offsets > 1:
            offset, accuracy = result.worst_offset(length)
            worst = [f"+{offset}: {_percent(accuracy)}"]
        table.add_row(format_tokens(length),
                      *(_percent(result.accuracy(length, d)) for d in settings.depths),
                      _percent(result.accuracy(length)), *worst,
                      f"{stats.tokens_per_second:,.0f}", human_bytes(stats.peak_memory_bytes))
    return table


def booksum_table(result: BookSumResult) -> Table:
    table = Table(title="BookSum ROUGE F1", caption=PAPER_BOOKSUM)
    for name in ("book", "tokens", "dropped", "summary tokens", "R-1", "R-2", "R-L", "overall"):
        if name == "book":  # a title is never cut or wrapped, even at 80 columns
            table.add_column(name, justify="left", no_wrap=True,
                             min_width=max((len(book.title) for book in result.books), default=4))
        else:
            table.add_column(name, justify="right")

    def scores(r):
        return (f"{r.rouge1:.1f}", f"{r.rouge2:.1f}", f"{r.rougeL:.1f}", f"{r.overall:.1f}")

    for i, book in enumerate(result.books):
        table.add_row(escape(book.title) or f"#{i}", f"{book.book_tokens:,}",
                      f"{book.dropped_tokens:,}",
                      str(book.summary_tokens), *scores(book.rouge))
    table.add_section()
    table.add_row("[bold]all[/]", f"{sum(b.book_tokens for b in result.books):,}",
                  f"{sum(b.dropped_tokens for b in result.books):,}",
                  str(sum(b.summary_tokens for b in result.books)),
                  *(f"[bold]{cell}[/]" for cell in scores(result.rouge)))
    return table


def _gate_cell(gate: float) -> str:
    colour = "green" if gate >= 0.9 else "blue" if gate <= 0.1 else "white"
    return f"[{colour}]{gate:.3f}[/]"


def gates_table(report: GateReport) -> Table:
    heads = len(report.gates[0])
    table = Table(title="Memory gates sigmoid(β): 1 = memory only, 0 = local attention only")
    table.add_column("layer", justify="right")
    for head in range(heads):
        table.add_column(f"h{head}", justify="right")
    table.add_column("memory / local / mixer", justify="right")
    for layer, gates, roles in zip(report.layers, report.gates, report.roles(), strict=True):
        table.add_row(str(layer), *map(_gate_cell, gates),
                      f"{roles['memory']} / {roles['local']} / {roles['mixer']}")
    return table


def _g3(value: float) -> str:
    """Three significant digits with a short exponent (2.02e3, 4.1e-5): fits 80 columns."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def needle_trace_table(result: NeedleTraceResult) -> Table:
    """Per layer, at 0, 1, 4, 16, … segments after the needle's: how much of it the memory holds,
    how big the memory is and how much one more segment of filler still changes it."""
    n = result.segment_len
    uses_z = rule_named(result.memory_rule).reads_norm
    table = Table(title=f"Needle trace in memory ({result.memory_rule} rule, "
                        f"{format_tokens(result.length)} tokens, depth {result.depth:g}, "
                        f"{len(result.samples)} keys; mean over kv heads)",
                  caption="after: segments of filler written after the needle's segment "
                          "(tokens: as many tokens); trace = "
                          "‖M_with − M_without‖/‖M_with‖ (max head: the largest kv head's); "
                          "change = ‖M_s − M_s−1‖/‖M_s‖"
                          + ("" if uses_z else f"; ‖z‖: — as {result.memory_rule} does not "
                             "read z"))
    for name in ("after", "tokens", "layer", "trace", "max head", "‖M‖", "‖z‖", "change"):
        table.add_column(name, justify="right")
    for point in result.points():
        table.add_section()
        for layer in range(result.n_layers):
            first = layer == 0
            table.add_row(str(point) if first else "", f"{point * n:,}" if first else "",
                          str(layer), _g3(result.trace[layer][point]),
                          _g3(result.trace_max_head[layer][point]),
                          _g3(result.memory_norm[layer][point]),
                          _g3(result.z_norm[layer][point]) if uses_z else "—",
                          _g3(result.change[layer][point]))
    return table


def training_table(log: TrainingLog) -> Table:
    """Where the run's loss went and where each layer's gates ended up."""
    summary = log.summary()
    first, last = summary["first_loss"], summary["last_loss"]
    table = Table(title=f"Training run {log.run}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("logged steps", f"{summary['first_step']:,}–{summary['last_step']:,} "
                  f"({summary['logged_steps']:,} rows, {summary['invocations']} invocation"
                  f"{'s' if summary['invocations'] > 1 else ''})")
    table.add_row("first loss", f"{first['value']:.4f} at step {first['step']:,}")
    table.add_row("last loss", f"[bold]{last['value']:.4f}[/] at step {last['step']:,}")
    if summary["final_gates"]:
        table.add_section()
    for layer, gate in summary["final_gates"].items():
        table.add_row(f"gate mean {layer.replace('_', ' ')}",
                      f"{_gate_cell(gate['mean'])} (min {gate['min']:.3f}, max {gate['max']:.3f})"
                      f" at step {gate['step']:,}")
    return table


def perplexity_tables(results: list[PerplexityResult]) -> list[Table]:
    """Per-document perplexity, then mean loss by position in the document (token ranges that
    double, cut on every model's segment boundaries, so that models of different N compare)."""
    documents = Table(title="Perplexity per document")
    documents.add_column("document")
    documents.add_column("tokens", justify="right")
    for result in results:
        documents.add_column(f"ppl ({escape(result.label)})", justify="right")
    for i, doc in enumerate(results[0].documents):
        documents.add_row(escape(doc.name), f"{doc.tokens:,}",
                          *(f"{r.documents[i].perplexity:.2f}" for r in results))
    documents.add_section()
    documents.add_row("[bold]all[/]", f"{results[0].tokens:,}",
                      *(f"[bold]{r.perplexity:.2f}[/]" for r in results))

    ranges = position_ranges(results)
    segment_lens = sorted({r.segment_len for r in results})
    positions = Table(title="Loss (nats/token) by position in the document",
                      caption=f"segments of {' / '.join(map(str, segment_lens))} tokens")
    positions.add_column("tokens", justify="right")
    for result in results:
        positions.add_column(f"loss ({escape(result.label)})", justify="right")
    columns = [r.range_losses(ranges) for r in results]
    for i, positions_range in enumerate(ranges):
        cells = ["–" if math.isnan(c[i]) else f"{c[i]:.3f}" for c in columns]
        positions.add_row(f"{positions_range.start:,}–{positions_range.stop:,}", *cells)
    return [documents, positions]


def harness_table(rows: list[Metric]) -> Table:
    """lm-eval's figures, one row per task, metric and filter (↑: higher is better; a filter in
    brackets: the metric of the responses so post-processed)."""
    table = Table(title="lm-evaluation-harness")
    table.add_column("task", no_wrap=True)
    table.add_column("docs", justify="right")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    arrow = {True: " ↑", False: " ↓", None: ""}
    task = None
    for row in rows:
        first = row.task != task
        if first and task is not None:
            table.add_section()
        task = row.task
        metric = row.name + arrow[row.higher_is_better]
        if row.filter != "none":
            metric += " " + escape(f"[{row.filter}]")
        table.add_row(row.task if first else "", str(row.docs or "") if first else "", metric,
                      f"{row.value:.4g}", "" if row.stderr is None else f"{row.stderr:.2g}")
    return table
