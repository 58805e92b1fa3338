"""Packing samples into rows of ``seq_len`` positions without splitting any sample that fits.

A *piece* is a run of a sample's positions: the whole sample, or (for a sample longer than ``seq_len``)
one of the cuts made by the long-sample policy. Rows hold whole pieces; what is left of a row is filler.
"""

from __future__ import annotations

import bisect
import heapq
from typing import NamedTuple

import numpy as np


class Piece(NamedTuple):
    arrival: int  # order in which the piece entered the buffer; ties and restore order
    source: int
    index: int  # sample index within the source
    start: int  # first position within the sample
    length: int  # positions (inputs tokens[start:start+length], targets tokens[start+1:start+length+1])


def cut_long(
    length: int, seq_len: int, policy: str, spans: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """``(start, length)`` pieces of a sample with ``length`` positions under the long-sample policy.

    A cut never falls inside a picture's token run (``spans``, ``[start, end)`` rows, none longer than
    ``seq_len``): it moves back to the run's start, so each picture stays whole in one piece."""
    if length <= seq_len:
        return [(0, length)]
    if policy == "drop":
        return []
    assert policy in ("split", "truncate"), policy  # DataArgs.validate admits only the three policies
    pieces, a = [], 0
    while a < length:
        b = min(a + seq_len, length)
        for s, e in spans if spans is not None else ():
            if s < b < e:
                assert s > a, "an image run longer than seq_len is refused before packing"
                b = int(s)
                break
        pieces.append((a, b - a))
        if policy == "truncate":
            break
        a = b
    return pieces


class BestFitBuffer:
    """A shuffle buffer of pieces from which rows are filled best-fit.

    Each row starts with the oldest piece (so nothing waits forever), then repeatedly takes the longest
    piece that still fits (oldest first among equals) until none fits. Lookups are a bisection over the
    pieces sorted by length, O(log n) plus a list shift.
    """

    def __init__(self) -> None:
        self._by_length: list[tuple[int, int]] = []  # (length, -arrival), sorted
        self._pieces: dict[int, Piece] = {}
        self._oldest: list[int] = []  # heap of arrivals, lazily cleaned

    def __len__(self) -> int:
        return len(self._pieces)

    def add(self, piece: Piece) -> None:
        bisect.insort(self._by_length, (piece.length, -piece.arrival))
        self._pieces[piece.arrival] = piece
        heapq.heappush(self._oldest, piece.arrival)

    def _remove(self, piece: Piece) -> Piece:
        i = bisect.bisect_left(self._by_length, (piece.length, -piece.arrival))
        del self._by_length[i]
        return self._pieces.pop(piece.arrival)

    def pop_oldest(self) -> Piece:
        while self._oldest[0] not in self._pieces:
            heapq.heappop(self._oldest)
        return self._remove(self._pieces[heapq.heappop(self._oldest)])

    def pop_best_fit(self, free: int) -> Piece | None:
        i = bisect.bisect_right(self._by_length, (free, 0)) - 1
        if i < 0:
            return None
        length, neg_arrival = self._by_length[i]
        return self._remove(self._pieces[-neg_arrival])

    def fill_row(self, seq_len: int) -> list[Piece]:
        row = [self.pop_oldest()]
        free = seq_len - row[0].length
        while free > 0 and self._pieces:
            piece = self.pop_best_fit(free)
            if piece is None:
                break
            row.append(piece)
            free -= piece.length
        return row

    def pieces(self) -> list[Piece]:
        return sorted(self._pieces.values())


def best_fit_decreasing(lengths: np.ndarray | list[int], seq_len: int) -> list[list[int]]:
    """Offline packing (eval): indices into ``lengths`` grouped into rows, longest pieces placed first,
    each into the row whose free space fits it most tightly. Every length must be <= seq_len."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row id), sorted
    for i in order:
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, row = free.pop(j)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows
