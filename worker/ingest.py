"""Ingest: what every ingest shares, streaming blocks of rows into a new dataset.

Every ingest (:mod:`worker.array_files`, :mod:`worker.images`, :mod:`worker.preprocessing`)
writes a dataset in the format of :mod:`worker.dataset` (a Zarr v3 group with a 2-D array of
m examples x n features chunked by rows) and returns its :class:`~worker.dataset.DatasetInfo`.
Sources are streamed block by block, so a source larger than memory is never read whole.

Destinations are local paths or fsspec URLs (``file:///data/x``, ``memory://x``, ``s3://...``).
Writing is atomic (:mod:`worker.dataset`): the dataset is written into a hidden sibling and
moved into place only once every chunk and attribute is written (renamed locally, moved with
fsspec on remote stores), it is marked ``complete`` only after its last chunk (readers refuse it
before), and a failed ingest removes its temporary folders.

Every dataset written by an ingest records, in its ``preprocessing`` attribute:

- ``value_range``: ``[min, max]`` of the values (stored * scale), computed while streaming,
  so a trainer can refuse sigmoid output units on data outside [0, 1];
- ``steps``: the list of what was applied (``"scale"``, ``"normalize"``, ``"whiten"``; the
  parameters of the last two are described in :mod:`worker.preprocessing`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import zarr

from worker.dataset import (
    DatasetError,
    DatasetInfo,
    _is_local,
    _local,
    _open_array,
    default_chunk_rows,
    move_into_place,
    open_dataset,
    read_chunk,
    remove_path,
    scratch_path,
    write_dataset,
)

__all__ = ["dataset_exists"]


# ---------------------------------------------------------------------------------------------
# destinations: existence, refusal to overwrite


def dataset_exists(path: str | os.PathLike) -> bool:
    """Whether anything exists at ``path`` (a local path or an fsspec URL)."""
    if _is_local(path):
        return _local(path).exists()
    import fsspec

    fs, p = fsspec.core.url_to_fs(str(path))
    return bool(fs.exists(p))


def _exists_message(dest: str | os.PathLike) -> str:
    return f"dest: {dest} exists (pass overwrite=True or --overwrite to replace it)"


def _check_dest(dest: str | os.PathLike, overwrite: bool) -> None:
    if not overwrite and dataset_exists(dest):
        raise DatasetError(_exists_message(dest))


# ---------------------------------------------------------------------------------------------
# streaming writer that records the value range


class _RangeTracker:
    """Wraps a stream of blocks: checks them, records min/max of ``block * scale``."""

    def __init__(self, scale: float, what: str, progress: Callable[[int], Any] | None = None):
        self.scale = scale
        self.what = what
        self.lo = math.inf
        self.hi = -math.inf
        self.rows = 0
        self.progress = progress

    def track(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            block = np.asarray(block)
            if block.size:
                if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
                    bad = int(np.argwhere(~np.isfinite(block))[0][0]) + self.rows
                    raise ValueError(f"{self.what}: holds NaN or inf (first at row {bad})")
                self.lo = min(self.lo, float(block.min()) * self.scale)
                self.hi = max(self.hi, float(block.max()) * self.scale)
            self.rows += block.shape[0]
            if self.progress is not None:
                self.progress(block.shape[0])
            yield block

    @property
    def value_range(self) -> list[float]:
        return [self.lo, self.hi]


def _progress_bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=None if enabled else True, leave=False)


def _write(
    dest: str | os.PathLike,
    blocks: Iterable[np.ndarray],
    *,
    n_rows: int,
    n_features: int,
    dtype: str,
    scale: float = 1.0,
    chunk_rows: int | None = None,
    compression: str = "auto",
    sample_shape: tuple[int, ...] | None = None,
    preprocessing: dict[str, Any] | None = None,
    source: str = "",
    overwrite: bool = False,
    what: str = "source",
    progress: bool = False,
    extra: Callable[[zarr.Group], None] | None = None,
) -> DatasetInfo:
    """Stream ``blocks`` into a new dataset at ``dest`` atomically, recording ``value_range``.

    ``extra(group)`` may add arrays/attributes to the group before it is put in place.
    """
    chunk_rows = max(1, min(chunk_rows or default_chunk_rows(n_features, dtype), n_rows))
    if isinstance(blocks, np.ndarray):
        arr = blocks
        blocks = (arr[i : i + chunk_rows] for i in range(0, arr.shape[0], chunk_rows))
    _check_dest(dest, overwrite)
    target = scratch_path(dest, "tmp")  # moved into place only once complete (local or remote)
    bar = _progress_bar(progress, n_rows, f"writing {dest}")
    tracker = _RangeTracker(scale, what, bar.update)
    try:
        with bar:
            write_dataset(
                target,
                tracker.track(blocks),
                n_rows=n_rows,
                n_features=n_features,
                dtype=dtype,
                chunk_rows=chunk_rows,
                compression=compression,
                scale=scale,
                sample_shape=sample_shape,
                preprocessing=preprocessing,
                source=source,
                in_place=True,
            )
        group = zarr.open_group(target, mode="r+")
        pre = dict(group.attrs.get("preprocessing") or {})
        pre["value_range"] = tracker.value_range
        if extra is not None:
            extra(group)
        group.attrs["preprocessing"] = pre
        move_into_place(target, dest, overwrite)
    except BaseException:
        remove_path(target)
        raise
    finally:
        _open_array.cache_clear()
    return open_dataset(dest)


# ---------------------------------------------------------------------------------------------
# blocks of rows


def _blocks_of(path: str | os.PathLike, info: DatasetInfo, dtype: str = "float64"):
    """The rows of a stored dataset, chunk by chunk, as floats."""
    for i in range(info.n_chunks):
        yield read_chunk(path, i, dtype, info.scale)


def _reblock(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Pass blocks through, splitting any larger than ``rows`` (bounds memory per step)."""
    for block in blocks:
        for i in range(0, block.shape[0], rows):
            yield block[i : i + rows]
