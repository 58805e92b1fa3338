"""Training and evaluation batches: mixing, shuffling, rank sharding, packing, resumable state.

Train stream, identical on every rank for a given (seed, world size):
  1. Each source visits its samples in a seeded permutation per epoch (``rng(seed, source, epoch)``),
     or in file order when shuffling is off for that source type.
  2. Sources are mixed per token: the next sample comes from the source with the fewest tokens drawn
     so far relative to its weight (ties: lowest source index). Deterministic, and exact over any window.
  3. The k-th sample of that global stream belongs to rank ``k % world_size``: ranks are disjoint and
     together cover every sample of every epoch.
  4. Each rank packs its samples best-fit from a buffer of ``buffer_size`` pieces (``packing.py``);
     a sample that fits ``seq_len`` is never split. Samples without any target token are skipped.
Every rank's stream is infinite, so every rank yields the same number of batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finetune.data.dataset import SourceData
from finetune.data.packing import BestFitBuffer, Piece, best_fit_decreasing, cut_long

logger = logging.getLogger("finetune.data")

STATE_VERSION = 1
PAD_ID = 0  # filler input/target id; filler is never a target and is its own attention segment


@dataclass
class Batch:
    x: np.ndarray  # int64 (batch_size * seq_len,)
    y: np.ndarray  # int64 (batch_size * seq_len,)
    y_mask: np.ndarray  # bool (batch_size * seq_len,): y[i] is a training target
    seqlens: list[int]  # attention segments, sum == len(x); each row's filler is one extra segment
    # float32 (C, H, W) pictures whose [IMG] runs are in x, in order of appearance (vision data only)
    images: list[np.ndarray] = field(default_factory=list)

    @property
    def n_targets(self) -> int:
        return int(self.y_mask.sum())


def _assemble(rows: list[list[Piece]], data: list[SourceData], seq_len: int) -> Batch:
    n = len(rows) * seq_len
    x = np.full(n, PAD_ID, dtype=np.int64)
    y = np.full(n, PAD_ID, dtype=np.int64)
    mask = np.zeros(n, dtype=np.bool_)
    seqlens: list[int] = []
    wanted: list[tuple[SourceData, int, np.ndarray]] = []  # (source, sample, which of its pictures)
    for r, row in enumerate(rows):
        at = r * seq_len
        for p in row:
            d = data[p.source]
            tokens, masks = d.arrays(p.index)
            if d.has_images:  # the pictures whose runs lie in this piece (cut_long never splits a run)
                spans = d.spans(p.index)
                inside = (spans[:, 0] >= p.start) & (spans[:, 1] <= p.start + p.length)
                if inside.any():
                    wanted.append((d, p.index, np.flatnonzero(inside)))
            x[at : at + p.length] = tokens[p.start : p.start + p.length]
            y[at : at + p.length] = tokens[p.start + 1 : p.start + p.length + 1]
            mask[at : at + p.length] = masks[p.start + 1 : p.start + p.length + 1]
            seqlens.append(p.length)
            at += p.length
        if at < (r + 1) * seq_len:
            seqlens.append((r + 1) * seq_len - at)
    return Batch(x, y, mask, seqlens, _read_pictures(wanted))


def _read_pictures(wanted: list[tuple[SourceData, int, np.ndarray]]) -> list[np.ndarray]:
    """The pictures, in order, each read and re-encoded from its source (docs/data.md); a piece of a
    split sample reads only its own."""
    return [image for d, index, which in wanted for image in d.images(index, which)]


class TrainLoader:
    """Infinite iterator of :class:`Batch`; ``state_dict``/``load_state_dict`` resume it exactly."""

    def __init__(
        self,
        data: list[SourceData],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        long_sample_policy: str = "split",
        buffer_size: int = 1024,
    ) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}.")
        for d in data:
            usable = d.targets > 0
            if long_sample_policy == "drop":
                usable &= d.positions <= seq_len
            if not usable.any():
                raise ValueError(
                    f"{d.source.key} source {d.source.spec!r} has no sample with a training target"
                    + (
                        " that fits seq_len (data.long_sample_policy is drop)"
                        if long_sample_policy == "drop"
                        else ""
                    )
                    + "; add data, give assistant turns weight 1, or remove the source."
                )
        if not data:
            raise ValueError("No training data: set data.instruct_data or data.data.")
        check_image_runs(data, seq_len)
        self.data = data
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.policy = long_sample_policy
        # A buffer larger than a rank's share of an epoch would let short samples of later epochs
        # overtake long ones many times; capped, every sample is yielded once per epoch give or take one.
        self.buffer_size = max(1, min(buffer_size, sum(len(d) for d in data) // world_size))
        total = sum(d.source.weight for d in data)
        self.weights = [d.source.weight / total for d in data]
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._reset()

    def _reset(self) -> None:
        n = len(self.data)
        self.epoch = [0] * n
        self.pos = [0] * n
        self.drawn = [0] * n  # tokens drawn per source, all ranks together
        self.k = 0  # samples drawn from the global stream
        self.arrival = 0
        self.buffer = BestFitBuffer()
        self.stats = {"batches": 0, "positions": 0, "filler": 0, "long_samples": 0, "skipped_no_target": 0}

    # ------------------------------------------------------------------------------------------ stream

    def _perm(self, s: int) -> np.ndarray | None:
        if not self.data[s].shuffle:
            return None
        cached = self._perms.get(s)
        if cached is None or cached[0] != self.epoch[s]:
            rng = np.random.default_rng([self.seed, s, self.epoch[s]])
            cached = (self.epoch[s], rng.permutation(len(self.data[s])))
            self._perms[s] = cached
        return cached[1]

    def _draw(self) -> tuple[int, int, int]:
        """Next sample of the global stream: (rank it belongs to, source, index)."""
        s = min(range(len(self.data)), key=lambda i: self.drawn[i] / self.weights[i])
        perm = self._perm(s)
        index = int(perm[self.pos[s]]) if perm is not None else self.pos[s]
        self.pos[s] += 1
        if self.pos[s] == len(self.data[s]):
            self.pos[s] = 0
            self.epoch[s] += 1
        self.drawn[s] += int(self.data[s].positions[index]) + 1
        owner = self.k % self.world_size
        self.k += 1
        return owner, s, index

    def _refill(self) -> None:
        misses, patience = 0, 4 * self.world_size * sum(len(d) for d in self.data) + 100
        while len(self.buffer) < self.buffer_size:
            misses += 1
            if misses > patience:  # e.g. unshuffled data whose trainable samples all fall on other ranks
                raise ValueError(
                    f"Rank {self.rank} of {self.world_size} receives no sample with a training target; "
                    "turn on shuffling (data.shuffle / data.instruct.shuffle) or add trainable samples."
                )
            owner, s, index = self._draw()
            if owner != self.rank:
                continue
            d = self.data[s]
            if d.targets[index] == 0:
                self.stats["skipped_no_target"] += 1
                continue
            misses = 0
            length = int(d.positions[index])
            if length > self.seq_len:
                self.stats["long_samples"] += 1
            long = length > self.seq_len
            _, masks = d.arrays(index) if long else (None, None)
            for start, n in cut_long(length, self.seq_len, self.policy, d.spans(index) if long else None):
                if masks is not None and not masks[start + 1 : start + n + 1].any():
                    continue  # a piece of a long sample with nothing to learn
                self.buffer.add(Piece(self.arrival, s, index, start, n))
                self.arrival += 1

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        rows = []
        for _ in range(self.batch_size):
            self._refill()
            rows.append(self.buffer.fill_row(self.seq_len))
        batch = _assemble(rows, self.data, self.seq_len)
        used = sum(p.length for row in rows for p in row)
        self.stats["batches"] += 1
        self.stats["positions"] += len(batch.x)
        self.stats["filler"] += len(batch.x) - used
        return batch

    @property
    def filler_fraction(self) -> float:
        """Share of row positions that are filler so far."""
        return self.stats["filler"] / max(1, self.stats["positions"])

    # ------------------------------------------------------------------------------------------- state

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "long_sample_policy": self.policy,
            "buffer_size": self.buffer_size,
            "sources": [[d.source.spec, d.source.weight, d.keys] for d in self.data],
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-serialisable). Each rank has its own state: save one per rank."""
        return {
            "version": STATE_VERSION,
            "config": self._fingerprint(),
            "epoch": list(self.epoch),
            "pos": list(self.pos),
            "drawn": list(self.drawn),
            "k": self.k,
            "arrival": self.arrival,
            "buffer": [list(p) for p in self.buffer.pieces()],
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Data loader state has version {state.get('version')!r}, expected {STATE_VERSION}."
            )
        saved, now = state["config"], self._fingerprint()
        if saved != _jsonable(now):
            diff = [k for k in now if _jsonable(now[k]) != saved.get(k)]
            raise ValueError(
                f"Cannot resume the data loader: {', '.join(diff)} changed since the checkpoint "
                "(the data files, their order or the settings differ). Resume with the original data and "
                "settings, or start a new run."
            )
        self._reset()
        self.epoch, self.pos, self.drawn = list(state["epoch"]), list(state["pos"]), list(state["drawn"])
        self.k, self.arrival = int(state["k"]), int(state["arrival"])
        for p in state["buffer"]:
            self.buffer.add(Piece(*map(int, p)))
        self.stats = dict(state["stats"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def check_image_runs(data: list[SourceData], seq_len: int) -> None:
    """A picture's tokens must fit one row: its run is never cut, and a row holds seq_len positions."""
    too_long = [where for d in data for where in d.image_runs_longer_than(seq_len)]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sample(s) have a picture whose image tokens do not fit seq_len {seq_len}, e.g. "
            f"{'; '.join(too_long[:3])}. A picture is never split across rows: raise seq_len, or shrink the "
            "pictures (fewer pixels give fewer tokens)."
        )


def build_train_loader(
    data: list[SourceData],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    long_sample_policy: str,
    buffer_size: int = 1024,
) -> TrainLoader:
    """The training batches of ``rank``, from checked sources (``check_data``'s ``report.train``).

    ``buffer_size`` pieces are kept for best-fit packing: larger packs tighter and mixes more."""
    for d in data:
        n_long = int((d.positions > seq_len).sum())
        if n_long:
            logger.warning("%s %s: %d of %d samples are longer than seq_len %d; data.long_sample_policy=%s",
                           d.source.key, d.source.spec, n_long, len(d), seq_len, long_sample_policy)
    return TrainLoader(data, seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                       long_sample_policy=long_sample_policy, buffer_size=buffer_size)


def build_eval_batches(
    data: list[SourceData], *, seq_len: int, batch_size: int, rank: int, world_size: int, long_sample_policy: str
) -> list[Batch]:
    """This rank's eval batches, from checked sources (``report.eval``). Every eval sample (or piece,
    under the long-sample policy) is used exactly once across ranks; the last batch is padded, not
    dropped; every rank gets the same number of batches, padded with batches that have no target, so no
    rank waits in a collective."""
    if not data:
        return []
    # Global order: sources in order, samples in file order; sample g belongs to rank g % world_size.
    check_image_runs(data, seq_len)
    per_rank: list[list[Piece]] = [[] for _ in range(world_size)]
    g = n_long = 0
    for s, d in enumerate(data):
        for index in range(len(d)):
            length = int(d.positions[index])
            n_long += length > seq_len
            spans = d.spans(index) if length > seq_len else None
            for start, n in cut_long(length, seq_len, long_sample_policy, spans):
                per_rank[g % world_size].append(Piece(0, s, index, start, n))
            g += 1
    if n_long:
        logger.warning(
            "data.eval_instruct_data: %d samples longer than seq_len %d (data.long_sample_policy=%s)",
            n_long,
            seq_len,
            long_sample_policy,
        )
    rows_of = [best_fit_decreasing([p.length for p in pieces], seq_len) for pieces in per_rank]
    n_batches = max(math.ceil(len(rows) / batch_size) for rows in rows_of)
    mine = [[per_rank[rank][i] for i in row] for row in rows_of[rank]]
    mine += [[] for _ in range(n_batches * batch_size - len(mine))]  # empty rows: all filler
    return [_assemble(mine[b * batch_size : (b + 1) * batch_size], data, seq_len) for b in range(n_batches)]
