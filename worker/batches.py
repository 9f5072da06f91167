"""Which rows make up minibatch t of epoch e: a seeded shuffle that reads chunks, not rows.

An epoch visits every row exactly once:

1. the chunks are put in a random order (seeded by ``(seed, epoch)``);
2. consecutive groups of ``window`` chunks of that order form windows, and the rows of a
   window are shuffled together (seeded by ``(seed, epoch, window)``);
3. the windows' shuffled rows, one window after the other, are cut into batches of
   ``batch_size`` rows (the last batch of an epoch may be smaller).

So a batch's rows come from at most a window or two of chunks, a worker that keeps the chunks
of the current window in its cache reads each chunk from storage about once per epoch, and the
contents of batch t of epoch e depend only on ``(seed, epoch, t)`` and the dataset's chunking:
never on the number of workers, nor on where or how often the batch was computed before.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: A batch's rows as ``(chunk index, row indices in that chunk)``, chunks in ascending order.
Parts = list[tuple[int, np.ndarray]]


def chunk_sizes(n_rows: int, chunk_rows: int) -> tuple[int, ...]:
    """Rows of each chunk of ``n_rows`` rows stored in chunks of ``chunk_rows``."""
    full, rest = divmod(n_rows, chunk_rows)
    return (chunk_rows,) * full + ((rest,) if rest else ())


def held_out_chunks(n_chunks: int, fraction: float, seed: int) -> tuple[int, ...]:
    """The chunks a validation set of ``fraction`` of ``n_chunks`` holds (at least one), drawn
    with ``seed``, in ascending order.

    Raises
    ------
    ValueError
        Naming ``validation_fraction`` when no chunk would be left to train on.
    """
    k = max(1, round(fraction * n_chunks))
    if k >= n_chunks:
        raise ValueError(
            f"validation_fraction: {fraction:g} of the dataset's {n_chunks} chunks leaves no "
            "chunk to train on; give a smaller fraction or a dataset of more chunks"
        )
    pick = np.random.default_rng([seed, 2]).permutation(n_chunks)[:k]
    return tuple(int(i) for i in np.sort(pick))


def whole_chunks(ids, n_rows: int, chunk_rows: int) -> Parts:
    """Every row of the chunks ``ids``, as parts (a validation set)."""
    sizes = chunk_sizes(n_rows, chunk_rows)
    return [(int(i), np.arange(sizes[i], dtype=np.int64)) for i in ids]


@dataclass(frozen=True)
class Batches:
    """The minibatches of a dataset.

    Parameters
    ----------
    chunk_rows : tuple of int
        Rows of each chunk the batches draw from.
    batch_size : int
    seed : int
    window : int
        Chunks whose rows are shuffled together.
    ids : tuple of int, optional
        The dataset's index of each of those chunks (default ``0, 1, ...``): a training set
        of some chunks, the others held out.
    """

    chunk_rows: tuple[int, ...]
    batch_size: int
    seed: int = 0
    window: int = 4
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.batch_size > self.n_rows:
            raise ValueError(
                f"batch_size: {self.batch_size} is larger than the dataset ({self.n_rows} rows)"
            )
        if self.window < 1:
            raise ValueError(f"shuffle_window: must be >= 1, got {self.window}")

    @classmethod
    def of(
        cls,
        n_rows: int,
        chunk_rows: int,
        batch_size: int,
        seed: int = 0,
        window: int = 4,
        held_out: tuple[int, ...] = (),
    ):
        """The batches of ``n_rows`` rows stored in chunks of ``chunk_rows``, without the
        chunks ``held_out``."""
        rows = chunk_sizes(n_rows, chunk_rows)
        ids = tuple(i for i in range(len(rows)) if i not in set(held_out))
        return cls(tuple(rows[i] for i in ids), batch_size, seed, window, ids)

    @property
    def n_rows(self) -> int:
        """Rows of the dataset."""
        return sum(self.chunk_rows)

    @property
    def per_epoch(self) -> int:
        """Batches in one epoch."""
        return math.ceil(self.n_rows / self.batch_size)

    def chunk_order(self, epoch: int) -> np.ndarray:
        """The chunks in the order epoch ``epoch`` visits them."""
        rng = np.random.default_rng([self.seed, epoch, 0])
        return rng.permutation(len(self.chunk_rows))

    @functools.lru_cache(maxsize=8)  # noqa: B019 - the instances are few and immutable
    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk and row index of every row of window ``w``, shuffled."""
        chunks = self.chunk_order(epoch)[w * self.window : (w + 1) * self.window]
        ids = self.ids or range(len(self.chunk_rows))
        ci = np.concatenate([np.full(self.chunk_rows[c], ids[c], dtype=np.int64) for c in chunks])
        ri = np.concatenate([np.arange(self.chunk_rows[c], dtype=np.int64) for c in chunks])
        perm = np.random.default_rng([self.seed, epoch, 1, w]).permutation(ci.size)
        return ci[perm], ri[perm]

    @functools.lru_cache(maxsize=2)  # noqa: B019 - the instances are few and immutable
    def _starts(self, epoch: int) -> np.ndarray:
        """First stream position of each window of ``epoch`` (and the end)."""
        order = self.chunk_order(epoch)
        sizes = [
            sum(self.chunk_rows[c] for c in order[k : k + self.window])
            for k in range(0, len(order), self.window)
        ]
        return np.concatenate([[0], np.cumsum(sizes)])

    @functools.lru_cache(maxsize=2)  # noqa: B019 - the instances are few and immutable
    def _positions(self, epoch: int) -> dict[int, int]:
        """Dataset chunk index -> position in the epoch's chunk order."""
        ids = self.ids or range(len(self.chunk_rows))
        return {ids[c]: p for p, c in enumerate(self.chunk_order(epoch))}

    def slots(self, epoch: int, parts: Parts) -> list[int]:
        """Each part's chunk's position in the epoch's chunk order: consecutive positions go
        to different workers, so the parts of a batch (its window's chunks) spread evenly."""
        where = self._positions(epoch)
        return [where[c] for c, _ in parts]

    def parts(self, epoch: int, t: int) -> Parts:
        """The rows of batch ``t`` of epoch ``epoch``, grouped by chunk.

        Raises
        ------
        IndexError
            If the epoch has no batch ``t``.
        """
        if not 0 <= t < self.per_epoch:
            raise IndexError(f"batch {t}: epochs have {self.per_epoch} batches")
        lo, hi = t * self.batch_size, min((t + 1) * self.batch_size, self.n_rows)
        starts = self._starts(epoch)
        ci, ri = [], []
        w = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            c, r = self._window(epoch, w)
            a, b = lo - starts[w], min(hi, starts[w + 1]) - starts[w]
            ci.append(c[a:b])
            ri.append(r[a:b])
            lo = starts[w + 1]
            w += 1
        chunk, row = np.concatenate(ci), np.concatenate(ri)
        order = np.lexsort((row, chunk))
        chunk, row = chunk[order], row[order]
        cuts = np.flatnonzero(np.diff(chunk)) + 1
        return [
            (int(c[0]), r) for c, r in zip(np.split(chunk, cuts), np.split(row, cuts), strict=True)
        ]
