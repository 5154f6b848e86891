"""Shared fixtures. Data fixtures use the bundled files in data/ only, never the network."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

# `datasets` makes a network request even for local files unless offline mode is on; it reads this
# when first imported, so set it before any test module imports it.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def data_tokenizer():
    """The bundled 4096-token project tokenizer (data/tokenizer)."""
    from infinitrain.data import load_tokenizer

    return load_tokenizer(DATA_DIR / "tokenizer")


@pytest.fixture(scope="session")
def data_kjv_snippets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 documents of varied length (a few tokens to ~1.5K) cut from the bundled King James Bible,
    as a .jsonl file: small enough to stream through many times, real text throughout."""
    with gzip.open(DATA_DIR / "books" / "kjv.jsonl.gz", "rt", encoding="utf-8") as lines:
        text = "\n\n".join(json.loads(line)["text"] for line in lines)
    rng = random.Random(1234)
    path = tmp_path_factory.mktemp("data") / "kjv-snippets.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i in range(60):
            start = rng.randrange(len(text) - 10_000)
            length = rng.choice([3, 10, 40, 60, 200]) if i % 4 == 0 else rng.randrange(20, 6000)
            out.write(json.dumps({"id": i, "text": text[start:start + length]}) + "\n")
    return path


Stream = list[tuple[list[int], list[int], list[int]]]
"""Per document, in the order documents were started: (ids, labels, segments it occupied)."""


@pytest.fixture(scope="session")
def data_split_documents() -> Callable[..., list[Stream]]:
    """Cut the windows of each stream back into documents at the segments flagged by ``reset``.

    Returns, per stream, the documents in the order they started, each as its ids and labels
    (padding included) and the global segment indices it spans; the last one may be unfinished.
    """
    def split(windows, segment_len: int) -> list[Stream]:
        import torch

        ids = torch.cat([w.input_ids for w in windows], dim=1)
        labels = torch.cat([w.labels for w in windows], dim=1)
        reset = torch.cat([w.reset for w in windows], dim=1)
        streams = []
        for b in range(ids.shape[0]):
            starts = [*reset[b].nonzero().flatten().tolist(), reset.shape[1]]
            docs = []
            for first, end in itertools.pairwise(starts):
                span = slice(first * segment_len, end * segment_len)
                docs.append((ids[b, span].tolist(), labels[b, span].tolist(),
                             list(range(first, end))))
            streams.append(docs)
        return streams
    return split


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread; two spin-wait badly on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
