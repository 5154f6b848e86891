"""Where documents come from: a Hugging Face hub dataset or local files, read through `datasets`.

A `DocumentSource` is read one epoch at a time: each data-parallel rank owns a fixed strided share
of the rows (so ranks never see the same document) and visits it in an order shuffled anew
every epoch from the seed. Positions in that order are plain integers, which is what makes a
stream's place in its data a small, exact state dict. Rows are tokenized only when reached.
"""

from __future__ import annotations

import glob
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from .documents import Document
from .tokenizer import Tokenizer

FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SHUFFLE_BUFFER = 1000
"""Rows buffered to shuffle a streamed (hub-streaming) dataset."""


class DataSourceError(ValueError):
    """A data source cannot be read as configured; the message names the source and the fix."""


@dataclass
class SourceConfig:
    """One source of training documents; a recipe's data section lists one or more (a mixture)."""

    kind: Literal["text", "booksum", "passkey"] = "text"
    """'text': every token supervised; 'booksum': a book read unsupervised, then its summary
    supervised; 'passkey': synthetic Landmark-format passkey prompts, only the answer supervised,
    the needle hidden in Landmark's filler or, when `name` or `files` is set, in that text."""
    name: str | None = None
    """Hugging Face hub dataset, e.g. 'emozilla/pg19'. Unset for local data (`files`)."""
    config: str | None = None
    """Hub dataset configuration (subset), e.g. 'books' for 'ubaada/booksum-complete-cleaned'."""
    split: str = "train"
    """Hub dataset split. Local files always form a single split."""
    files: list[str] = field(default_factory=list)
    """Local files or glob patterns, one format per source: .txt (each file one document),
    .json/.jsonl, .parquet, .csv, optionally compressed (.gz, .bz2, .xz, .zst)."""
    text_field: str | None = None
    """Column holding the text (default 'text') or, for booksum, the book or chapter (default: by
    the layout the dataset's name or columns match: 'chapter' for kmfoda/booksum's, 'text' for
    ubaada/booksum-complete-cleaned's)."""
    summary_field: str | None = None
    """booksum only: column holding the summary (default by layout: 'summary_text' for
    kmfoda/booksum's, 'summary' for ubaada's, whose list of summaries gives several references)."""
    streaming: bool = False
    """Stream a large hub dataset instead of downloading it first. Resuming mid-epoch re-reads the
    rows already consumed in that epoch."""
    weight: float = 1.0
    """Relative probability that a stream's next document comes from this source (mixtures)."""
    from_step: int = 0
    """First optimizer step whose new documents may come from this source (curricula)."""
    until_step: int | None = None
    """Step from which this source no longer starts documents (null: never stops). With
    from_step, a mixture can change during a run: e.g. short prompts until a skill forms, then
    long ones."""
    exclude: dict[str, list[str]] = field(default_factory=dict)
    """Leave out the rows whose column holds one of these values, e.g. ``{title: [Persuasion]}``:
    hold whole books out of training to evaluate on them. A value that matches no row is an error
    (a misspelt title would otherwise leak the book into training)."""
    min_tokens: int = 0
    """Skip documents (books, for booksum) with fewer tokens; the paper keeps books > 4K tokens."""
    max_input_tokens: int | None = None
    """booksum only: longest prompt (BOS + book + summary request) in tokens; longer books are
    truncated as `truncate` says, with a warning that counts them."""
    truncate: Literal["start", "middle"] = "start"
    """booksum only: which part of an over-long book is dropped: its 'start' (the end is kept) or
    its 'middle' (the first and last halves of the budget are kept)."""
    passkey_length: int = 4096
    """passkey only: prompt length in tokens (the paper fine-tunes on 5K)."""
    passkey_length_min: int | None = None
    """passkey only: when set, each prompt's length is drawn uniformly from [passkey_length_min,
    passkey_length], so the question and answer land at every offset within a segment (an
    evaluation prompt of a power-of-two length ends exactly on a segment boundary, leaving the
    answer to a fresh segment that reaches the question through memory only)."""
    depth_min: float = 0.0
    """passkey only: smallest needle depth (0 = right after the task description)."""
    depth_max: float = 1.0
    """passkey only: largest needle depth (1 = right before the question)."""
    key_min: int = 1
    """passkey only: smallest key (Landmark draws keys uniformly from [1, 50000])."""
    key_max: int = 50_000
    """passkey only: largest key (use 10000..99999 for keys of exactly 5 digits)."""
    supervise_key_copy: bool = False
    """passkey only: also supervise the needle's second copy of the key ('The pass key is 71432.
    Remember it. 71432 is …'), a copy a few tokens back that teaches the copy the answer needs on
    every prompt, whatever the needle's depth."""
    supervise_prompt: bool = False
    """passkey only: supervise every prompt token too, as language modelling does. The Landmark
    filler repeats one group of sentences, so after its first round each filler token is a copy
    of one a few dozen tokens back: hundreds of copy targets per prompt where the answer and the
    key's copy give about a dozen. The loss then falls without any retrieval, so a write gate
    waiting for the loss (optim.write_gate_below_loss) must also wait for this source's last step
    (optim.write_gate_from_step); docs/memory-length.md, "Which path a phase teaches"."""
    distractors: int = 0
    """passkey only: numbers other than the key (drawn from key_min..key_max) put as ' 4821' at
    random places of the filler or text around the needle: prompts in which writing every number
    buries the key, as a book's own numbers do to a model whose write gate keys on digits. Three
    per prompt in every source of the tiny passkey stage 2 made models worse; one per prose
    prompt, with 4-digit keys, lifted the worst seed in prose (docs/memory-length.md, "Numbers in
    the haystack" and "Stage 2 decides too")."""

    RETIRED_FIELDS: ClassVar[dict[str, tuple[Any, str]]] = {
        "passkey_length_step": (1, "prompt lengths are drawn from every length in "
                                   "[passkey_length_min, passkey_length]; for prompts that end on "
                                   "segment boundaries, add one passkey source per such length"),
    }
    """Fields a source no longer has -> (old default, what replaced them): a recipe may still
    hold one at its old default, which is dropped; any other value is refused (see
    infinitrain.model.config.without_retired)."""

    def __post_init__(self) -> None:
        defaults = SourceConfig.__dataclass_fields__
        if self.kind not in ("text", "booksum", "passkey"):
            raise DataSourceError(f"kind = {self.kind!r}: must be one of text, booksum, passkey")
        if self.kind == "passkey":
            if self.name and self.files:
                raise DataSourceError(f"kind = 'passkey' hides its needles in the text of at "
                                      f"most one of name (a hub dataset) or files (local data); "
                                      f"got name = {self.name!r}, files = {self.files!r}")
            if self.exclude and not (self.name or self.files):
                raise DataSourceError("exclude: a passkey source without name or files hides "
                                      "its needles in Landmark's filler; remove exclude")
            if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
                raise DataSourceError(f"depth_min = {self.depth_min}, depth_max = "
                                      f"{self.depth_max}: need 0 <= depth_min <= depth_max <= 1")
            if self.passkey_length_min is not None and not (
                    0 < self.passkey_length_min <= self.passkey_length):
                raise DataSourceError(f"passkey_length_min = {self.passkey_length_min}: need "
                                      f"0 < passkey_length_min <= passkey_length = "
                                      f"{self.passkey_length}")
            if not 0 <= self.key_min <= self.key_max:
                raise DataSourceError(f"key_min = {self.key_min}, key_max = {self.key_max}: "
                                      "need 0 <= key_min <= key_max")
            if self.distractors < 0 or (self.distractors and self.key_max == self.key_min):
                raise DataSourceError(f"distractors = {self.distractors}: need >= 0, and "
                                      "key_max > key_min for numbers other than the key")
        elif bool(self.name) == bool(self.files):
            raise DataSourceError(f"kind = {self.kind!r} needs exactly one of name (a hub dataset) "
                                  f"or files (local data); got name = {self.name!r}, "
                                  f"files = {self.files!r}")
        only = {"booksum": ("summary_field", "max_input_tokens", "truncate"),
                "passkey": ("passkey_length", "passkey_length_min", "depth_min", "depth_max",
                            "key_min", "key_max", "supervise_key_copy", "supervise_prompt",
                            "distractors")}
        for kind, names in only.items():
            for name in names:
                if self.kind != kind and getattr(self, name) != defaults[name].default:
                    raise DataSourceError(f"{name} = {getattr(self, name)!r}: only used by "
                                          f"kind = {kind!r}, this source is {self.kind!r}")
        if self.files and self.split != "train":
            raise DataSourceError(f"split = {self.split!r}: local files form a single split; "
                                  "list the files of the split you want instead")
        if self.truncate not in ("start", "middle"):
            raise DataSourceError(f"truncate = {self.truncate!r}: must be 'start' or 'middle'")
        if not self.weight > 0:
            raise DataSourceError(f"weight = {self.weight!r}: must be > 0")
        if self.from_step < 0:
            raise DataSourceError(f"from_step = {self.from_step!r}: must be >= 0")
        if self.until_step is not None and self.until_step <= self.from_step:
            raise DataSourceError(f"until_step = {self.until_step!r}: must be > from_step = "
                                  f"{self.from_step} (or null: never stops)")
        if self.min_tokens < 0:
            raise DataSourceError(f"min_tokens = {self.min_tokens!r}: must be >= 0")
        for name in ("passkey_length", "max_input_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DataSourceError(f"{name} = {value!r}: must be > 0")

    def active_at(self, step: int) -> bool:
        """Whether documents started at optimizer step ``step`` may come from this source."""
        return self.from_step <= step and (self.until_step is None or step < self.until_step)

    @property
    def label(self) -> str:
        """How messages name this source."""
        if self.kind == "passkey":
            lengths = (f"{self.passkey_length_min}–" if self.passkey_length_min else "")
            haystack = f" in {self.text_label}" if self.name or self.files else ""
            return f"passkey ({lengths}{self.passkey_length} tokens){haystack}"
        return self.text_label

    @property
    def text_label(self) -> str:
        """How messages name the dataset or files this source reads."""
        if self.name:
            return self.name + (f" ({self.config})" if self.config else "") + f" [{self.split}]"
        return ", ".join(self.files)


@dataclass(frozen=True)
class Skipped:
    """A row that yields no document (too short, empty); it still takes its place in the order."""

    reason: str


Row = dict[str, Any]
if TYPE_CHECKING:  # `datasets` is imported where rows are read: inference never needs it
    import datasets

    Rows = datasets.Dataset | datasets.IterableDataset


def _builder(path: str) -> str:
    name = path.lower()
    for compression in COMPRESSIONS:
        name = name.removesuffix(compression)
    builder = FILE_BUILDERS.get(Path(name).suffix)
    if builder is None:
        raise DataSourceError(f"{path}: unsupported file type; use "
                              f"{', '.join(FILE_BUILDERS)} (optionally compressed)")
    return builder


def expand_files(patterns: list[str]) -> list[str]:
    """Local files named by paths or glob patterns, in a stable order; missing ones are an error."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataSourceError(f"files: pattern {pattern!r} matches no file")
            files += matches
        elif not Path(pattern).is_file():
            raise DataSourceError(f"files: {pattern}: no such file")
        else:
            files.append(pattern)
    for file in files:
        if Path(file).stat().st_size == 0:
            raise DataSourceError(f"files: {file}: empty file (no documents)")
    return files


def root_cause(error: BaseException) -> str:
    """The innermost error of a chain, named: `datasets` wraps a file's real problem (such as
    bytes that are not UTF-8) in a generic DatasetGenerationError."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    if isinstance(error, UnicodeDecodeError):
        return (f"not UTF-8 text: byte {error.object[error.start]:#04x} at offset {error.start}"
                " of a file; save the data as UTF-8")
    return f"{type(error).__name__}: {error}"


def load_rows(config: SourceConfig) -> Rows:
    """The rows of a hub dataset or of local files, through `datasets` (streamed if configured)."""
    import datasets

    if config.files:
        files = expand_files(config.files)
        builders = {_builder(f) for f in files}
        if len(builders) > 1:
            raise DataSourceError(f"files: mixes formats ({', '.join(sorted(builders))}); "
                                  "use one source per format")
        builder = builders.pop()
        extra = {"sample_by": "document"} if builder == "text" else {}
        try:
            rows = datasets.load_dataset(builder, data_files=files, split="train",
                                         streaming=config.streaming, **extra)
        except Exception as error:  # datasets raises StopIteration, ValueError, ArrowInvalid, ...
            raise DataSourceError(f"{config.label}: cannot read as {builder} files "
                                  f"({root_cause(error)})") from error
    else:
        try:
            rows = datasets.load_dataset(config.name, config.config, split=config.split,
                                         streaming=config.streaming)
        except (ConnectionError, FileNotFoundError) as error:
            raise DataSourceError(
                f"cannot load hub dataset {config.name!r} ({type(error).__name__}: {error}); "
                "without network access download it elsewhere and point the source at local "
                "files instead (files: [path/to/*.parquet])"
            ) from error
    if isinstance(rows, datasets.Dataset) and len(rows) == 0:
        raise DataSourceError(f"{config.label}: empty dataset (0 rows)")
    for column, values in config.exclude.items():
        rows = _without(rows, column, set(values), config.label)
    return rows


def _without(rows: Rows, column: str, values: set[str], label: str) -> Rows:
    """``rows`` less those whose ``column`` is one of ``values`` (the ``exclude`` option)."""
    import datasets

    if isinstance(rows, datasets.IterableDataset):  # streamed: filtered lazily, unchecked
        return rows.filter(lambda row: row[column] not in values)
    if column not in rows.column_names:
        raise DataSourceError(f"{label}: exclude names column {column!r}, which it does not "
                              f"have; available columns: {', '.join(rows.column_names)}")
    present = rows[column]
    unmatched = sorted(values - set(present))
    if unmatched:
        raise DataSourceError(f"{label}: exclude {column} = {unmatched[0]!r} matches no row; "
                              f"the values there are: {', '.join(map(str, present[:20]))}")
    kept = [i for i, value in enumerate(present) if value not in values]
    if not kept:
        raise DataSourceError(f"{label}: exclude leaves no row")
    return rows.select(kept)


def check_columns(rows: Rows, columns: list[str], label: str) -> Rows:
    """Keep only ``columns``; a missing one is an error naming the columns there are."""
    available = rows.column_names
    if available is None:  # streamed without known features: checked row by row instead
        return rows
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataSourceError(f"{label}: no column {missing[0]!r}; available columns: "
                              f"{', '.join(available)} (set text_field/summary_field)")
    return rows.select_columns(columns)


def column_value(row: Row, column: str, label: str) -> Any:
    """A row's value in ``column``; a missing column is an error naming the columns there are."""
    if column not in row:
        raise DataSourceError(f"{label}: no column {column!r}; available columns: "
                              f"{', '.join(row)} (set text_field/summary_field)")
    return row[column]


class DocumentSource(ABC):
    """A collection of documents that streams read epoch by epoch, rank by rank."""

    def __init__(self, label: str, weight: float) -> None:
        self.label = label
        self.weight = weight

    @abstractmethod
    def epoch(self, rank: int, world_size: int, epoch: int, seed: int,
              start: int = 0) -> Iterator[Document | Skipped]:
        """This rank's documents for one epoch in their shuffled order, from position ``start``.

        Deterministic in its arguments; the shares of different ranks are disjoint.
        """


class DatasetSource(DocumentSource):
    """Documents made from the rows of a `datasets` dataset by ``convert`` (e.g. tokenize)."""

    def __init__(self, label: str, weight: float, rows: Rows,
                 convert: Callable[[Row], Document | Skipped]) -> None:
        super().__init__(label, weight)
        self.rows = rows
        self.convert = convert

    def epoch(self, rank: int, world_size: int, epoch: int, seed: int,
              start: int = 0) -> Iterator[Document | Skipped]:
        import datasets
        from datasets.distributed import split_dataset_by_node

        if isinstance(self.rows, datasets.IterableDataset):
            rows = split_dataset_by_node(self.rows, rank=rank, world_size=world_size)
            # Same order on every rank: with fewer shards than ranks, each rank keeps every
            # world_size-th row of the shuffled stream, which is disjoint only if orders agree.
            generator = np.random.default_rng([seed, epoch])
            rows = rows.shuffle(generator=generator, buffer_size=SHUFFLE_BUFFER)
            for row in rows.skip(start):
                yield self.convert(row)
            return
        share = np.arange(rank, len(self.rows), world_size)
        order = share[np.random.default_rng([seed, rank, epoch]).permutation(len(share))]
        for index in order[start:]:
            yield self.convert(self.rows[int(index)])

    def __iter__(self) -> Iterator[Document]:
        """Every document once, in stored order, skipped rows left out (for evaluation)."""
        for row in self.rows:
            document = self.convert(row)
            if isinstance(document, Document):
                yield document


def _text_converter(tokenizer: Tokenizer, text_field: str, min_tokens: int,
                   label: str) -> Callable[[Row], Document | Skipped]:
    """Row -> ``BOS + text + EOS``, all supervised; shorter than ``min_tokens``: skipped."""
    def convert(row: Row) -> Document | Skipped:
        ids = tokenizer.encode(column_value(row, text_field, label) or "", bos=True, eos=True)
        tokens = len(ids) - 2
        if tokens == 0 or tokens < min_tokens:
            return Skipped(f"a document has {tokens} tokens, fewer than min_tokens = {min_tokens}"
                           if tokens else "a document is empty")
        return Document.from_ids(ids)
    return convert


def text_source(config: SourceConfig, tokenizer: Tokenizer) -> DatasetSource:
    """A plain-text source: language modelling on every token."""
    text_field = config.text_field or "text"
    rows = check_columns(load_rows(config), [text_field], config.label)
    convert = _text_converter(tokenizer, text_field, config.min_tokens, config.label)
    return DatasetSource(config.label, config.weight, rows, convert)


def source_for(data: str, **fields: Any) -> SourceConfig:
    """What a command's ``--data`` names: a local file, glob or directory (its files of a
    supported format) becomes a file source, an ``owner/name`` a hub dataset; ``fields`` are the
    rest of the SourceConfig (split, text_field, …). DataSourceError when it is neither."""
    path = Path(data)
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir()
                       if f.is_file() and any(suffix in FILE_BUILDERS for suffix in f.suffixes))
        if not files:
            raise DataSourceError(f"{data}: directory holds no {', '.join(FILE_BUILDERS)} file")
    elif path.exists() or any(ch in data for ch in "*?["):
        files = [data]
    elif "/" not in data or data.startswith((".", "/")):
        raise DataSourceError(f"{data}: no such file, and not a hub dataset name (owner/name)")
    else:
        return SourceConfig(name=data, **fields)
    fields.pop("split", None)  # local files form a single split, with no configuration
    fields.pop("config", None)
    return SourceConfig(files=files, **fields)
