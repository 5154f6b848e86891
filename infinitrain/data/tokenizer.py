"""Tokenizers: load a `tokenizer.json` or a Hugging Face tokenizer directory, train a byte BPE.

Special tokens are explicit: every document the pipeline builds is ``BOS + text + EOS`` and padding
uses ``PAD``, so a tokenizer must name its EOS. Resolution order for each of BOS, EOS and PAD:
an explicit argument, then ``tokenizer_config.json`` / ``special_tokens_map.json`` next to
``tokenizer.json``, then well-known token names found in the vocabulary. A missing BOS or PAD falls
back to EOS (GPT-2 style BOS; PAD only ever sits after a document's EOS and is never supervised,
so reusing EOS is harmless — Llama-3 has no PAD). A missing EOS is an error.

Text is always encoded with special-token strings treated as plain text: a book that happens to
contain ``<|end_of_text|>`` must not end a document in the middle.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
"""Special tokens of tokenizers trained here; BOS and EOS spelled as in Llama-3."""

KNOWN_TOKENS = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
}


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or lacks a required special token; the message says which."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its BOS, EOS and PAD tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str, eos_token: str,
                 pad_token: str, source: str = "<memory>") -> None:
        self.backend = backend
        self.backend.encode_special_tokens = True
        self.source = source
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._id(bos_token, "bos")
        self.eos_id = self._id(eos_token, "eos")
        self.pad_id = self._id(pad_token, "pad")

    def _id(self, token: str, role: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {role}_token {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocab_size must be at least this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS/EOS only where asked (never the backend's post-processor).

        The batch call without offsets is twice as fast as ``backend.encode`` on a book and
        releases the GIL, so documents can be tokenized in a thread while the model trains.
        """
        (encoding,) = self.backend.encode_batch_fast([text], add_special_tokens=False)
        return [self.bos_id] * bos + encoding.ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(map(int, ids))
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        The files load with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (offline) as
        well as with `load_tokenizer`.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / TOKENIZER_FILE), pretty=False)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "pad_token": self.pad_token}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 60}
        (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (out / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n")
        return out

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")


def _configured_tokens(directory: Path) -> dict[str, str]:
    """BOS/EOS/PAD named in a HF tokenizer directory; values may be strings or AddedToken dicts."""
    found: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):  # tokenizer_config.json wins
        path = directory / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        for role in KNOWN_TOKENS:
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                found[role] = value
    return found


def load_tokenizer(path: str | Path, bos_token: str | None = None, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file or a directory holding one (HF layout)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no tokenizer here; expected a {TOKENIZER_FILE} file or a "
                             "directory containing one (`infinitrain tokenizer train` makes one)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{file}: not a valid {TOKENIZER_FILE}: {error}") from error
    vocab = backend.get_vocab(with_added_tokens=True)
    chosen = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
    configured = _configured_tokens(file.parent)
    for role, candidates in KNOWN_TOKENS.items():
        if chosen[role] is None:
            chosen[role] = configured.get(role) or next((t for t in candidates if t in vocab), None)
    if chosen["eos"] is None:
        raise TokenizerError(
            f"{file}: tokenizer has no EOS token (none in {TOKENIZER_CONFIG_FILE} and none of "
            f"{', '.join(KNOWN_TOKENS['eos'])} in its vocabulary); documents need one to end, "
            "so add an eos_token to its tokenizer_config.json"
        )
    eos = chosen["eos"]
    return Tokenizer(backend, chosen["bos"] or eos, eos, chosen["pad"] or eos, source=str(file))


def read_texts(files: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Texts of local files: each ``.txt`` file whole, each ``.jsonl`` row's ``text_field``.

    Either may be gzip-compressed (``.gz``); a ``.json`` file is read as JSON Lines too.
    """
    for file in map(Path, files):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        name = file.name.removesuffix(".gz")
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as stream:
            if name.endswith(".txt"):
                yield stream.read()
            elif name.endswith((".jsonl", ".json")):
                for number, line in enumerate(stream, 1):
                    if line.strip():
                        row = json.loads(line)
                        if text_field not in row:
                            raise TokenizerError(f"{file}:{number}: no {text_field!r} field; "
                                                 f"fields: {', '.join(row)}")
                        yield row[text_field]
            else:
                raise TokenizerError(f"{file}: unsupported file type; use .txt or .jsonl "
                                     "(optionally .gz)")


def train_tokenizer(files: Iterable[str | Path], vocab_size: int, out_dir: str | Path | None = None,
                    text_field: str = "text") -> Tokenizer:
    """Train a byte-level BPE (Llama-3 special tokens, digits split one per token) and save it.

    Byte-level: any text encodes without unknown tokens. Single-digit tokens give every number the
    same spelling whatever its neighbours, which the passkey task (copy a number) relies on.
    """
    files = list(files)
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"{file}: no such file")
    special = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    if vocab_size < 256 + len(special):
        raise TokenizerError(f"vocab_size = {vocab_size}: must be at least {256 + len(special)} "
                             "(256 byte tokens plus BOS, EOS and PAD)")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(read_texts(files, text_field), trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Like Llama-3, AutoTokenizer users get BOS prepended; our own encode() adds it explicitly.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = Tokenizer(backend, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, source="trained")
    if out_dir is not None:
        tokenizer.save(out_dir)
        tokenizer.source = str(Path(out_dir) / TOKENIZER_FILE)
    return tokenizer
