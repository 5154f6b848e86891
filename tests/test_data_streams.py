"""Document streams for streaming TBPTT, on real text through `datasets` and our tokenizer."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator

import pytest
import torch

from infinitrain.data import (
    IGNORE_INDEX,
    WRITE_UNKNOWN,
    Document,
    DocumentSource,
    DocumentStreams,
    Skipped,
    SourceConfig,
    StreamConfig,
    build_source,
    build_streams,
)

N, K, B = 16, 4, 3


def expected_documents(path, tokenizer) -> list[tuple[int, ...]]:
    """Every document of a .jsonl file as BOS + tokens + EOS, tokenized independently of streams."""
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return [tuple(tokenizer.encode(text, bos=True, eos=True)) for text in rows if text]


def started_in_order(streams, k: int) -> list[tuple[int, int]]:
    """(stream, document index) of every document in the order the rank started them."""
    keys = [(doc[2][0] // k, b, doc[2][0], b, i)
            for b, docs in enumerate(streams) for i, doc in enumerate(docs)]
    return [(b, i) for *_, b, i in sorted(keys)]


def test_document_mode_covers_every_token_once_in_order(data_tokenizer, data_kjv_snippets,
                                                         data_split_documents):
    tok = data_tokenizer
    expected = expected_documents(data_kjv_snippets, tok)
    streams = build_streams([SourceConfig(files=[str(data_kjv_snippets)])],
                            StreamConfig(streams=B, segment_len=N, segments_per_window=K, seed=7),
                            tok)
    windows = list(itertools.islice(streams, 400))
    for w in windows:
        assert w.input_ids.shape == w.labels.shape == (B, K * N)
        assert w.reset.shape == (B, K) and w.reset.dtype == torch.bool
    split = data_split_documents(windows, N)
    order = started_in_order(split, K)
    first_epoch = order[:len(expected)]
    assert all(i < len(split[b]) - 1 for b, i in first_epoch), "epoch 0 did not finish in time"
    seen = []
    for b, i in first_epoch:
        ids, labels, segments = split[b][i]
        length = ids.index(tok.eos_id) + 1  # EOS only ever ends a document
        doc = tuple(ids[:length])
        seen.append(doc)
        assert ids[0] == tok.bos_id and tok.bos_id not in doc[1:]
        # padded exactly to the next segment boundary, never a whole segment of padding
        assert len(segments) == -(-length // N)
        assert ids[length:] == [tok.pad_id] * (len(ids) - length)
        # labels: the next token inside the document; nothing on its last token or the padding
        assert labels[:length - 1] == list(doc[1:])
        assert labels[length - 1:] == [IGNORE_INDEX] * (len(ids) - length + 1)
    assert sorted(seen) == sorted(expected)  # every document exactly once, each token in order


def test_resets_mark_exactly_the_segments_where_documents_start(data_tokenizer, data_kjv_snippets):
    config = StreamConfig(streams=B, segment_len=N, segments_per_window=K)
    streams = build_streams([SourceConfig(files=[str(data_kjv_snippets)])], config, data_tokenizer)
    for w in itertools.islice(streams, 60):
        segment_starts = w.input_ids[:, ::N]
        assert torch.equal(w.reset, segment_starts == data_tokenizer.bos_id)
        assert (w.input_ids == data_tokenizer.bos_id).sum() == w.reset.sum()


def test_long_documents_are_read_as_pieces_whose_memory_starts_empty(data_tokenizer,
                                                                      data_kjv_snippets):
    piece = 2 * N
    config = StreamConfig(streams=B, segment_len=N, segments_per_window=K,
                          max_document_tokens=piece)
    streams = build_streams([SourceConfig(files=[str(data_kjv_snippets)])], config, data_tokenizer)
    whole = build_streams([SourceConfig(files=[str(data_kjv_snippets)])],
                          StreamConfig(streams=B, segment_len=N, segments_per_window=K),
                          data_tokenizer)
    offsets = [0] * B  # tokens of the current document before each stream's next segment
    pieces_inside = 0
    for w, w_whole in itertools.islice(zip(streams, whole, strict=True), 60):
        assert torch.equal(w.input_ids, w_whole.input_ids)  # same tokens, same places
        for b in range(B):
            for s in range(K):
                if w.input_ids[b, s * N] == data_tokenizer.bos_id:
                    offsets[b] = 0
                assert bool(w.reset[b, s]) == (offsets[b] % piece == 0)
                pieces_inside += bool(w.reset[b, s]) and offsets[b] > 0
                offsets[b] += N
    assert pieces_inside > 0
    restored = build_streams([SourceConfig(files=[str(data_kjv_snippets)])],
                             StreamConfig(streams=B, segment_len=N, segments_per_window=K),
                             data_tokenizer)
    with pytest.raises(ValueError, match="max_document_tokens"):
        restored.load_state_dict(streams.state_dict())
    with pytest.raises(ValueError, match="multiple of segment_len"):
        StreamConfig(segment_len=N, max_document_tokens=N + 1)


def test_concat_mode_packs_documents_back_to_back(data_tokenizer, data_kjv_snippets):
    tok = data_tokenizer
    expected = set(expected_documents(data_kjv_snippets, tok))
    streams = build_streams([SourceConfig(files=[str(data_kjv_snippets)])],
                            StreamConfig(streams=2, segment_len=N, segments_per_window=K,
                                         mode="concat"), tok)
    windows = list(itertools.islice(streams, 150))
    assert windows[0].reset[:, 0].all() and windows[0].reset.sum() == 2
    assert not any(w.reset.any() for w in windows[1:])
    for b in range(2):
        ids = torch.cat([w.input_ids[b] for w in windows]).tolist()
        labels = torch.cat([w.labels[b] for w in windows]).tolist()
        assert tok.pad_id not in ids
        ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
        assert len(ends) > 5
        starts = [0] + [e + 1 for e in ends[:-1]]
        for start, end in zip(starts, ends, strict=True):
            assert tuple(ids[start:end + 1]) in expected
            assert labels[start:end] == ids[start + 1:end + 1]
            assert labels[end] == IGNORE_INDEX  # EOS does not predict the next document's BOS


def test_write_targets_travel_with_their_tokens(data_tokenizer, data_kjv_snippets):
    """Window.write_targets: 1 on exactly the needle tokens of the passkey prompts in the window,
    0 on their other tokens, WRITE_UNKNOWN on plain text (which says nothing) and padding."""
    sources, config = _mixture(data_kjv_snippets)
    streams = build_streams(sources, config, data_tokenizer)
    needle = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.")
    remember = torch.as_tensor(data_tokenizer.encode(" Remember it."))
    whole = text_tokens = 0
    for window in itertools.islice(streams, 40):
        targets = window.write_targets
        assert targets.shape == window.input_ids.shape and targets.dtype == torch.int8
        for row, ids in zip(targets, window.input_ids, strict=True):
            assert set(row.tolist()) <= {WRITE_UNKNOWN, 0, 1}
            text_tokens += int((row == WRITE_UNKNOWN).sum())
            # every run of tokens to write inside the window is one whole needle
            edges = torch.diff(torch.cat([row.new_zeros(1), (row == 1).to(torch.int8),
                                          row.new_zeros(1)]))
            for start, end in zip((edges == 1).nonzero().flatten().tolist(),
                                  (edges == -1).nonzero().flatten().tolist(), strict=True):
                if start > 0 and end < len(ids):
                    assert needle.fullmatch(data_tokenizer.decode(ids[start:end]).strip())
                    whole += 1
            for start in range(len(ids) - len(remember) + 1):  # and no needle is left out
                if torch.equal(ids[start:start + len(remember)], remember):
                    assert (row[start:start + len(remember)] == 1).all()
    assert whole and text_tokens


def _mixture(path, **stream):
    return [SourceConfig(files=[str(path)], min_tokens=12, weight=3.0),
            SourceConfig(kind="passkey", passkey_length=150, weight=1.0)], \
        StreamConfig(streams=B, segment_len=N, segments_per_window=K, seed=3, **stream)


def assert_same_windows(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.reset, y.reset)
        assert x.position == y.position


@pytest.mark.parametrize("mode", ["document", "concat"])
def test_restoring_a_window_position_continues_with_exactly_the_next_windows(
        data_tokenizer, data_kjv_snippets, mode):
    sources, config = _mixture(data_kjv_snippets, mode=mode)
    windows = list(itertools.islice(build_streams(sources, config, data_tokenizer), 420))
    epochs = [w.position["cursors"][0][0] for w in windows]
    assert epochs[-1] >= 1, "the run should cross an epoch boundary"
    crossing = epochs.index(1)
    # a fresh process (new sources, new datasets objects) resumes from a saved position
    resumed = build_streams(sources, config, data_tokenizer)
    for j in (0, 57, crossing - 1, crossing + 3):
        saved = json.loads(json.dumps(windows[j].position))  # survives a checkpoint file
        resumed.load_state_dict(saved)
        assert_same_windows(itertools.islice(resumed, 12), windows[j + 1:j + 13])
    streams = build_streams(sources, config, data_tokenizer)
    consumed = list(itertools.islice(streams, 9))
    assert streams.state_dict() == consumed[-1].position
    assert len(json.dumps(consumed[-1].position)) < 1000  # small: a few integers per stream


def test_streamed_source_restores_exactly(data_tokenizer, data_kjv_snippets):
    source = SourceConfig(files=[str(data_kjv_snippets)], streaming=True)
    config = StreamConfig(streams=2, segment_len=N, segments_per_window=K, seed=5)
    windows = list(itertools.islice(build_streams([source], config, data_tokenizer), 300))
    assert windows[-1].position["cursors"][0][0] >= 1
    resumed = build_streams([source], config, data_tokenizer)
    resumed.load_state_dict(windows[150].position)
    assert_same_windows(itertools.islice(resumed, 10), windows[151:161])


@pytest.mark.parametrize("streaming", [False, True])
def test_same_seed_same_windows_and_epochs_reshuffle(data_tokenizer, data_kjv_snippets,
                                                      data_split_documents, streaming):
    config = SourceConfig(files=[str(data_kjv_snippets)], streaming=streaming)
    sources = [build_source(config, data_tokenizer)]
    config = StreamConfig(streams=1, segment_len=N, segments_per_window=32, seed=11)
    first = list(itertools.islice(DocumentStreams(sources, config, data_tokenizer.pad_id), 250))
    again = list(itertools.islice(DocumentStreams(sources, config, data_tokenizer.pad_id), 250))
    assert_same_windows(first, again)
    other = next(DocumentStreams(sources, StreamConfig(streams=1, segment_len=N,
                                                       segments_per_window=32, seed=12),
                                 data_tokenizer.pad_id))
    assert not torch.equal(other.input_ids, first[0].input_ids)
    docs = [tuple(d[0]) for d in data_split_documents(first, N)[0]]
    n = len(expected_documents(data_kjv_snippets, data_tokenizer))
    assert len(docs) > 2 * n
    epoch0, epoch1 = docs[:n], docs[n:2 * n]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("streaming", [False, True])
def test_two_ranks_read_disjoint_documents(data_tokenizer, data_kjv_snippets, data_split_documents,
                                           streaming):
    tok = data_tokenizer
    expected = expected_documents(data_kjv_snippets, tok)
    config = StreamConfig(streams=2, segment_len=N, segments_per_window=K, seed=1)
    source = SourceConfig(files=[str(data_kjv_snippets)], streaming=streaming)
    seen = []
    for rank in (0, 1):
        streams = build_streams([source], config, tok, rank=rank, world_size=2)
        split = data_split_documents(list(itertools.islice(streams, 300)), N)
        share = started_in_order(split, K)[:len(expected) // 2]
        docs = [split[b][i][0] for b, i in share]
        seen.append({tuple(d[:d.index(tok.eos_id) + 1]) for d in docs})
    assert not seen[0] & seen[1]
    assert sorted(seen[0] | seen[1]) == sorted(set(expected))


class _Fixed(DocumentSource):
    """Documents of given lengths (token ids count up), to pin down padding at the boundaries."""

    def __init__(self, lengths: list[int]) -> None:
        super().__init__("fixed", 1.0)
        self.docs = [Document.from_ids([0, *range(10, 10 + n - 2), 1]) for n in lengths]

    def epoch(self, rank, world_size, epoch, seed, start=0) -> Iterator[Document | Skipped]:
        yield from self.docs[start:]


def test_documents_fill_whole_segments_then_pad():
    source = _Fixed([N, N + 1, 2, 2 * N, N - 1])
    streams = DocumentStreams([source], StreamConfig(streams=1, segment_len=N,
                                                     segments_per_window=8), pad_id=2)
    w = next(streams)
    d = [doc.ids.tolist() for doc in source.docs]
    pad = [2]
    assert w.input_ids[0].tolist() == (d[0] + d[1] + pad * 15 + d[2] + pad * 14 + d[3] + d[4]
                                       + pad + d[0])  # the next epoch starts in the last segment
    assert w.reset[0].tolist() == [True, True, False, True, True, False, True, True]
    ignore = [IGNORE_INDEX]
    assert w.labels[0].tolist() == (d[0][1:] + ignore + d[1][1:] + ignore * 16 + d[2][1:]
                                    + ignore * 15 + d[3][1:] + ignore + d[4][1:] + ignore * 2
                                    + d[0][1:] + ignore)


def test_position_from_another_world_size_is_refused(data_tokenizer, data_kjv_snippets):
    config = StreamConfig(streams=1, segment_len=N, segments_per_window=K)
    position = next(build_streams([SourceConfig(files=[str(data_kjv_snippets)])], config,
                                  data_tokenizer, rank=0, world_size=2)).position
    single = build_streams([SourceConfig(files=[str(data_kjv_snippets)])], config, data_tokenizer)
    with pytest.raises(ValueError, match="world_size = 2, this run has 1"):
        single.load_state_dict(position)


def test_a_dataloader_passes_windows_and_positions_through(data_tokenizer, data_kjv_snippets):
    from torch.utils.data import DataLoader

    config = StreamConfig(streams=2, segment_len=N, segments_per_window=K)
    streams = build_streams([SourceConfig(files=[str(data_kjv_snippets)])], config, data_tokenizer)
    direct = list(itertools.islice(build_streams([SourceConfig(files=[str(data_kjv_snippets)])],
                                                 config, data_tokenizer), 3))
    loaded = [w.to("cpu") for w in itertools.islice(DataLoader(streams, batch_size=None), 3)]
    assert_same_windows(loaded, direct)
    assert loaded[-1].position["windows"] == 3
