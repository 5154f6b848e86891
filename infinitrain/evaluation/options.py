"""Parsing the evaluation commands' list and size options; errors name the option and value."""

from __future__ import annotations

import re

_COUNT = re.compile(r"(\d+)([kKmM]?)")
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


class OptionError(ValueError):
    """A command-line value is invalid; the message names option, value and what is allowed."""

    def __init__(self, option: str, value: str, allowed: str) -> None:
        super().__init__(f"{option} {value!r}: {allowed}")


def parse_token_count(text: str, option: str) -> int:
    """``4096``, ``4k``/``4K`` (4096), ``1m``/``1M`` (1048576): binary multiples."""
    match = _COUNT.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise OptionError(option, text, "expected a positive token count like 4096, 32k or 1M")
    return int(match[1]) * _SUFFIX[match[2].lower()]


def _items(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise OptionError(option, text, "expected a comma-separated list with at least one value")
    if not all(items):
        raise OptionError(option, text, "empty item in the comma-separated list")
    return items


def parse_names(text: str, option: str) -> list[str]:
    """Comma-separated names, in their order, each once."""
    return list(dict.fromkeys(_items(text, option)))


def parse_lengths(text: str, option: str = "--lengths") -> list[int]:
    """Comma-separated token counts, sorted and deduplicated."""
    return sorted({parse_token_count(item, option) for item in _items(text, option)})


def parse_depths(text: str, option: str = "--depths") -> list[float]:
    """Comma-separated needle depths in [0, 1] (0 = start of the filler, 1 = its end)."""
    depths = set()
    for item in _items(text, option):
        try:
            depth = float(item)
        except ValueError:
            raise OptionError(option, item, "expected a number between 0 and 1") from None
        if not 0 <= depth <= 1:
            raise OptionError(option, item, "depth must be between 0 (start) and 1 (end)")
        depths.add(depth)
    return sorted(depths)


def format_tokens(count: int) -> str:
    """4096 -> '4K', 1048576 -> '1M', 5000 -> '5000': the inverse of :func:`parse_token_count`."""
    for suffix, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if count % scale == 0:
            return f"{count // scale}{suffix}"
    return str(count)


def format_accuracy(fraction: float) -> str:
    """0.999 -> '99.9%', 0.5 -> '50%': whole percents, with as many decimals as it takes never
    to print '100%' for a score that missed something (959 of 960) nor '0%' for one that got
    something right."""
    exact = fraction in (0.0, 1.0)
    decimals = 0
    while True:
        text = f"{100 * fraction:.{decimals}f}"
        if exact or float(text) not in (0.0, 100.0):
            return f"{text}%"
        decimals += 1


def human_count(n: float) -> str:
    """918152 -> '918K', 1235814400 -> '1.24B': parameter counts at a glance, never '0.00B'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes as tables print them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
