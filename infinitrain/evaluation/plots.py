"""PNG figures of evaluation results, drawn with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

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
            fmt: str = "{:.2f}") -> Path:
    """A labelled heatmap with each cell's value written in it."""
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
            axes.text(c, r, fmt.format(value), ha="center", va="center",
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
           ylabel: str, max_points: int = 100) -> Path:
    """One line per named series against its index, averaged into at most ``max_points`` bins."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for name, ys in series.items():
        xs, means = _binned(ys, max_points)
        axes.plot(xs, means, label=name, marker="." if len(xs) < 60 else None)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)
