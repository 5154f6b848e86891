"""PNG figures of evaluation results, drawn with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def heatmap(values: Sequence[Sequence[float]], path: str | Path, *, title: str,
            row_labels: Sequence[str], col_labels: Sequence[str], row_title: str,
            col_title: str, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis",
            fmt: Callable[[float], str] = "{:.2f}".format) -> Path:
    """A labelled heatmap with each cell's value written in it as ``fmt`` formats it."""
    rows, cols = len(row_labels), len(col_labels)
    figure = Figure(figsize=(max(4.0, 0.9 * cols + 2), max(3.0, 0.5 * rows + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    axes.set_xticks(range(cols), labels=list(col_labels))
    axes.set_yticks(range(rows), labels=list(row_labels))
    axes.set_xlabel(col_title)
    axes.set_ylabel(row_title)
    axes.set_title(title)
    for r in range(rows):
        for c in range(cols):
            value = values[r][c]
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            axes.text(c, r, fmt(value), ha="center", va="center",
                      color="white" if dark else "black", fontsize=8)
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def _binned(ys: Sequence[float], max_points: int) -> tuple[list[float], list[float]]:
    """(x, y) with consecutive values averaged into at most ``max_points`` bins (NaN ignored)."""
    size = max(1, math.ceil(len(ys) / max_points))
    xs, means = [], []
    for start in range(0, len(ys), size):
        values = [y for y in ys[start:start + size] if not math.isnan(y)]
        if values:
            xs.append(start + (min(size, len(ys) - start) - 1) / 2)
            means.append(sum(values) / len(values))
    return xs, means


def curves(series: Mapping[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str,
           ylabel: str, max_points: int = 100, x: Sequence[float] | None = None,
           logx: bool = False) -> Path:
    """One line per named series against ``x`` or, without it, against its index averaged into
    at most ``max_points`` bins; ``logx``: a logarithmic x axis."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for name, ys in series.items():
        xs, means = (list(x), list(ys)) if x is not None else _binned(ys, max_points)
        axes.plot(xs, means, label=name, marker="." if len(xs) < 60 else None)
    if logx:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def loglog_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                  path: str | Path, *, title: str, xlabel: str) -> Path:
    """Side-by-side log-log panels, one per y label, each with one line per named (xs, ys) series;
    points that are not positive (log scale has no place for them) or NaN are left out."""
    figure = Figure(figsize=(5.5 * len(panels), 4))
    for i, (ylabel, series) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for name, (xs, ys) in series.items():
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
            if points:
                axes.plot(*zip(*points, strict=True), label=name,
                          marker="." if len(points) < 60 else None)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3, which="both")
        if axes.lines:
            axes.legend()
    figure.suptitle(title)
    return _save(figure, path)


def _smoothed(ys: Sequence[float], span: int) -> list[float]:
    """Exponential moving average over about ``span`` points, debiased so it starts at ys[0]."""
    alpha = 2 / (span + 1)
    average, weight, out = 0.0, 0.0, []
    for y in ys:
        average = (1 - alpha) * average + alpha * y
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def training_curves(steps: Sequence[int], loss: Sequence[float],
                    gates: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float],
                                              Sequence[float]]],
                    path: str | Path, *, title: str) -> Path:
    """Loss (raw and smoothed) above each layer's gate mean with its min–max band, vs step.

    ``gates`` maps a layer's label to (steps, mean, min, max); with none, only the loss is drawn.
    """
    panels = 2 if gates else 1
    figure = Figure(figsize=(8, 3.2 * panels + 0.4))
    top = figure.add_subplot(panels, 1, 1)
    top.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    top.plot(steps, _smoothed(loss, max(4, len(loss) // 20)), color="tab:blue", linewidth=1.8,
             label="smoothed")
    top.set_ylabel("loss (nats/token)")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend()
    if not gates:
        top.set_xlabel("step")
        return _save(figure, path)
    bottom = figure.add_subplot(panels, 1, 2, sharex=top)
    for i, (label, (gate_steps, mean, low, high)) in enumerate(gates.items()):
        colour = colormaps["viridis"](0.85 * i / max(1, len(gates) - 1))  # its yellow end is faint
        bottom.fill_between(gate_steps, low, high, color=colour, alpha=0.15, linewidth=0)
        bottom.plot(gate_steps, mean, color=colour, linewidth=1.5, label=label)
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("step")
    bottom.set_ylabel("memory gate sigmoid(β)")
    bottom.set_title("Gate mean per layer (band: min–max over heads)")
    bottom.grid(alpha=0.3)
    bottom.legend(ncol=math.ceil(len(gates) / 8), fontsize="small")
    return _save(figure, path)
