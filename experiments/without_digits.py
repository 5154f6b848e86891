"""Writes a copy of a haystack with every digit removed, for docs/memory-length.md, "Numbers in the
haystack": a passkey model that fails in a book but not in the same book without its numbers is
failing on the book's numbers.

    python experiments/without_digits.py data/pg19-sample /tmp/pg19-no-digits.jsonl
    infinitrain eval passkey --model RUN --lengths 4000 --haystack /tmp/pg19-no-digits.jsonl

The input is read as ``eval passkey --haystack`` reads it (a file, glob, directory or hub
dataset, its test split where it has one); the output is JSON lines of ``{"text": ...}``.
"""

from __future__ import annotations

import argparse
import json
import re

from infinitrain.data.sources import column_value, load_rows, source_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("haystack")
    parser.add_argument("out", help="a .jsonl file to write")
    args = parser.parse_args()
    config = source_for(args.haystack, split="test")
    rows, removed = 0, 0
    with open(args.out, "w") as out:
        for row in load_rows(config):
            text = column_value(row, config.text_field or "text", config.text_label)
            kept = re.sub(r"\d", "", text)
            removed += len(text) - len(kept)
            rows += 1
            out.write(json.dumps({"text": kept}) + "\n")
    print(f"{rows} documents, {removed} digits removed: {args.out}")


if __name__ == "__main__":
    main()
