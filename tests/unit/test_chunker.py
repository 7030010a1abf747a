"""The Chunker cuts any sequence of pieces into the same aligned chunks, and
keeps a piece that is exactly one chunk as it is (no copy)."""

from __future__ import annotations

import os
import random

import pytest

from bms_image.images.adapters.chunks.chunking import Chunker

CHUNK = 1024


def _pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, start, turn = [], 0, 0
    while start < len(data):
        size = sizes[turn % len(sizes)]
        pieces.append(data[start : start + size])
        start, turn = start + size, turn + 1
    return pieces


@pytest.mark.parametrize(
    "sizes", [[CHUNK], [1], [CHUNK - 1], [CHUNK + 1], [3 * CHUNK + 5], [7, CHUNK, 2 * CHUNK - 3]]
)
def test_any_pieces_give_the_same_aligned_chunks(sizes: list[int]) -> None:
    data = os.urandom(10 * CHUNK + 77)
    takes = random.Random(len(sizes))  # when chunks are taken: any time, the same result
    chunker = Chunker(CHUNK)
    chunks: list[bytes] = []
    added = 0
    for piece in _pieces(data, sizes):
        chunker.add(piece)
        added += len(piece)
        assert chunker.buffered == added - sum(map(len, chunks))
        if takes.random() < 0.5:
            chunks += chunker.take()
    chunks += chunker.take(final=True)
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [CHUNK] * 10 + [77]
    assert chunker.buffered == 0 and chunker.take(final=True) == []


def test_a_piece_of_exactly_one_chunk_is_kept_as_it_is() -> None:
    piece = os.urandom(CHUNK)
    chunker = Chunker(CHUNK)
    chunker.add(piece)
    assert chunker.ready == 1
    assert chunker.take()[0] is piece


def test_a_head_continues_the_chunk_it_starts() -> None:
    data = os.urandom(3 * CHUNK)
    chunker = Chunker(CHUNK, head=data[:100])
    assert (chunker.ready, chunker.buffered) == (0, 100)
    chunker.add(data[100:])
    assert chunker.take() == [data[:CHUNK], data[CHUNK : 2 * CHUNK], data[2 * CHUNK :]]
    chunker.add(b"tail")
    chunker.clear()
    assert chunker.take(final=True) == []
