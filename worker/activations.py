"""Ingest activations: a folder of ``.npy`` shards or ``.safetensors`` files into one dataset.

Activations of a neural network (a layer's outputs, e.g. of shape (batch, seq, d_model)) are
usually dumped as many shards. :func:`ingest_activations` writes them, in natural order of their
names (``shard_2`` before ``shard_10``), as one dataset of shape (total rows, d): the leading
dimensions of each tensor are flattened into rows. Shards are read a block of rows at a time
(``.npy`` memory-mapped, ``.safetensors`` through ``safe_open(...).get_slice``) and streamed
through the shared writer of :mod:`worker.ingest`, so the memory held is a few chunks whatever
the total size, and the dataset records its value range like every ingest.

Values may be stored as float16 or bfloat16 (rounded to nearest) and are read back as float32 or
float64 (:func:`worker.dataset.read_chunk`): an epoch reads half the bytes of float32 and the
arithmetic is unchanged.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.array_files import _open_npy
from worker.dataset import DatasetInfo, bfloat16, check_compression, default_chunk_rows
from worker.ingest import _check_dest, _write

__all__ = ["STORAGE", "ingest_activations"]

#: Stored dtypes of activations.
STORAGE = ("float16", "bfloat16", "float32", "float64")
SUFFIXES = (".npy", ".safetensors")
#: Float types of safetensors files, by their format code.
_SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: Largest finite float16 (bfloat16 has float32's range).
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class _Shard:
    """One tensor of activations: a ``.npy`` file, or a tensor ``key`` of a safetensors file."""

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: str  # one of STORAGE

    @property
    def d(self) -> int:
        """Features per row (the last dimension)."""
        return self.shape[-1]

    @property
    def rows(self) -> int:
        """Rows (the product of the leading dimensions)."""
        return math.prod(self.shape[:-1])


def ingest_activations(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    storage: str | None = None,
    key: str | None = None,
    chunk_rows: int | None = None,
    compression: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    source: str | None = None,
) -> DatasetInfo:
    """Write one dataset from a folder of activation shards (or one file), streaming them.

    Parameters
    ----------
    src : path
        A folder of ``.npy`` and/or ``.safetensors`` files (read in natural order of their
        names; other and hidden files are ignored), or one such file. Each holds a float
        tensor of shape (rows, d) or (..., d), e.g. (batch, seq, d_model); its leading
        dimensions are flattened into rows (row-major). Every shard must have the same d.
    dest : str or path
        Local path or fsspec URL of the new dataset.
    storage : {"float16", "bfloat16", "float32", "float64"}, optional
        Stored dtype (values rounded to nearest). Default: the shards' own float type (all
        shards must then share it). Data stored as float16/bfloat16 are read as float32 or
        float64 by :func:`worker.dataset.read_chunk`.
    key : str, optional
        Name of the tensor in each ``.safetensors`` file; required when a file holds more
        than one tensor.
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB of stored values per chunk). Shards are read in
        blocks of at most this many rows.
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
    overwrite : bool
        Replace an existing dataset at ``dest``.
    progress : bool
        Show a progress bar.
    source : str, optional
        Where the data came from, for the dataset's attributes (default: the shards' names).

    Returns
    -------
    info : DatasetInfo
        Shape (sum of the shards' rows, d), dtype ``storage``, scale 1, no sample shape.

    Raises
    ------
    FileNotFoundError
        If ``src`` does not exist.
    ValueError
        Naming the field (``src``, ``key``, ``storage``) and the file: no shards, an unreadable
        file, a tensor that is not float or has fewer than 2 dimensions, a width d that differs
        from the first shard's, an unknown or missing ``key``, no rows at all, NaN or inf, or
        values beyond the range of ``storage`` (e.g. above 65504 stored as float16).
    """
    check_compression(compression)
    if storage is not None and storage not in STORAGE:
        raise ValueError(f"storage: choose one of {list(STORAGE)}, got {storage!r}")
    files = _shard_files(src)
    if key is not None and not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"key: only .safetensors files hold named tensors; {src} has none")
    _check_dest(dest, overwrite)
    shards = [_describe(p, key) for p in files]
    first = shards[0]
    for s in shards[1:]:
        if s.d != first.d:
            raise ValueError(
                f"src: {_name(s)} has rows of {s.d} features (shape {s.shape}), but "
                f"{_name(first)} has {first.d}; all shards must have the same last dimension"
            )
    m = sum(s.rows for s in shards)
    if m < 1 or first.d < 1:
        shapes = ", ".join(str(s.shape) for s in shards[:3]) + (", ..." if len(shards) > 3 else "")
        raise ValueError(f"src: {src} holds no activations (shapes {shapes})")
    storage = storage or _common_dtype(shards)
    rows = chunk_rows or default_chunk_rows(first.d, storage)
    return _write(
        dest,
        _blocks(shards, storage, rows),
        n_rows=m,
        n_features=first.d,
        dtype=storage,
        chunk_rows=rows,
        compression=compression,
        preprocessing={"steps": [], "scale": 1.0, "source_dtype": _dtypes(shards)},
        source=source or _source(src, shards),
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------
# finding and describing shards


def _natural_key(path: Path) -> list[str | int]:
    """Sort key of a name with its numbers compared as numbers (``x_2`` before ``x_10``)."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", path.name)]


def _shard_files(src: str | os.PathLike) -> list[Path]:
    """The shard files of ``src`` (a folder or one file), in natural order."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"src: no such file or folder {path}")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"src: {path} is neither a .npy nor a .safetensors file")
        return [path]
    files = [
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
    ]
    if not files:
        raise ValueError(f"src: no .npy or .safetensors files in {path}")
    return sorted(files, key=_natural_key)


def _describe(path: Path, key: str | None) -> _Shard:
    """The shard of ``path`` (its tensor ``key`` for safetensors), checked: float, >= 2-D."""
    if path.suffix == ".npy":
        arr = _npy(path)
        return _checked(path, None, tuple(int(d) for d in arr.shape), arr.dtype.name)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = sorted(f.keys())
            if key is None:
                if len(names) != 1:
                    raise ValueError(
                        f"key: {path} holds {len(names)} tensors ({', '.join(names) or 'none'}); "
                        "pass key=NAME (--key NAME) to choose one"
                    )
                key = names[0]
            elif key not in names:
                raise ValueError(
                    f"key: {path} has no tensor {key!r}; it holds {', '.join(names) or 'none'}"
                )
            sl = f.get_slice(key)
            code, shape = str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape())
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"src: {path} is not a readable .safetensors file ({exc})") from None
    return _checked(path, key, shape, _SAFETENSORS_FLOATS.get(code, code))


def _npy(path: Path) -> np.ndarray:
    """A ``.npy`` shard memory-mapped (refused, naming ``src`` and the file, if it cannot be)."""
    try:
        return _open_npy(path)
    except ValueError as exc:
        raise ValueError(f"src: {exc}") from None


def _checked(path: Path, key: str | None, shape: tuple[int, ...], dtype: str) -> _Shard:
    shard = _Shard(path, key, shape, dtype)
    if dtype not in STORAGE:
        raise ValueError(
            f"src: {_name(shard)} holds {dtype}, not floats (activations must be float16, "
            "bfloat16, float32 or float64; `sae ingest npy` takes integer data)"
        )
    if len(shape) < 2:
        raise ValueError(
            f"src: {_name(shard)} has shape {shape}; activations need (rows, d) or (..., d)"
        )
    return shard


def _dtypes(shards: Sequence[_Shard]) -> str:
    """The shards' float types, e.g. ``"float32"`` or ``"float16, float32"``."""
    return ", ".join(sorted({s.dtype for s in shards}))


def _common_dtype(shards: Sequence[_Shard]) -> str:
    """The float type all shards share (ValueError naming ``storage`` if they differ)."""
    kinds = {s.dtype: s for s in shards}
    if len(kinds) == 1:
        return shards[0].dtype
    seen = ", ".join(f"{dt} ({_name(s)})" for dt, s in kinds.items())
    raise ValueError(
        f"storage: the shards hold different float types: {seen}; pass storage=... "
        f"(--storage) to store them as one of {list(STORAGE)}"
    )


def _name(shard: _Shard) -> str:
    return str(shard.path) + (f" [{shard.key}]" if shard.key is not None else "")


def _source(src: str | os.PathLike, shards: Sequence[_Shard]) -> str:
    names = [s.path.name for s in shards]
    listed = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
    key = {s.key for s in shards if s.key is not None}
    return (
        f"activations:{Path(src).name} ({len(shards)} shard{'s' if len(shards) != 1 else ''}: "
        f"{listed}" + (f"; key {key.pop()}" if len(key) == 1 else "") + ")"
    )


# ---------------------------------------------------------------------------------------------
# blocks of rows


def _blocks(shards: Sequence[_Shard], storage: str, rows: int) -> Iterator[np.ndarray]:
    """Every shard's rows in blocks of at most ``rows``, as the values ``storage`` holds.

    The values are rounded to ``storage`` here (so the recorded value range is the stored
    one) and given as float32 (float64 for float64 storage), which hold them exactly.
    """
    target = bfloat16() if storage == "bfloat16" else np.dtype(storage)
    compute = np.float64 if storage == "float64" else np.float32
    for shard in shards:
        done = 0
        for block in _shard_blocks(shard, rows):
            finite = np.isfinite(block)
            if not finite.all():
                bad = int(np.argwhere(~finite)[0][0]) + done
                raise ValueError(f"src: {_name(shard)} holds NaN or inf (first at row {bad})")
            with np.errstate(over="ignore"):  # overflow is refused just below
                stored = block.astype(target, copy=False)
            if stored is not block and not np.isfinite(stored).all():
                big = float(np.abs(block.astype(np.float64)).max())
                raise ValueError(
                    f"storage: {_name(shard)} has values up to {big:.6g} in magnitude, beyond "
                    f"the range of {storage}"
                    + (f" (largest {_FLOAT16_MAX:g})" if storage == "float16" else "")
                    + "; store it as a wider float type"
                )
            done += block.shape[0]
            yield stored.astype(compute, copy=False)


def _shard_blocks(shard: _Shard, rows: int) -> Iterator[np.ndarray]:
    """The rows of one shard, flattened to (k, d) blocks of k <= ``rows``, in row-major order."""
    if shard.path.suffix == ".npy":
        yield from _npy_blocks(shard, rows)
        return
    from safetensors import safe_open

    if shard.dtype == "bfloat16":
        bfloat16()  # numpy learns the name "bfloat16" that safetensors asks it for
    with safe_open(str(shard.path), framework="numpy") as f:
        sl = f.get_slice(shard.key)
        for index, r0, r1 in _pieces(shard.shape[:-1], rows):
            try:
                block = np.asarray(sl[index])
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                why = f"{type(exc).__name__}: {exc}"
                raise ValueError(f"src: {_name(shard)}: rows {r0}:{r1} unreadable ({why})") from exc
            yield block.reshape(r1 - r0, shard.d)


def _npy_blocks(shard: _Shard, rows: int) -> Iterator[np.ndarray]:
    """Rows of a ``.npy`` shard: a C-ordered file is mapped a block at a time (resident memory
    stays one block), another is indexed through one map of the file."""
    arr = _npy(shard.path)
    offset = getattr(arr, "offset", None)
    if arr.flags.c_contiguous and offset is not None:
        row_bytes = arr.dtype.itemsize * shard.d
        for r0 in range(0, shard.rows, rows):
            r1 = min(r0 + rows, shard.rows)
            mm = np.memmap(
                shard.path,
                dtype=arr.dtype,
                mode="r",
                offset=offset + r0 * row_bytes,
                shape=(r1 - r0, shard.d),
            )
            try:
                yield np.array(mm)
            finally:
                del mm
        return
    for index, r0, r1 in _pieces(shard.shape[:-1], rows):
        yield np.array(arr[index]).reshape(r1 - r0, shard.d)


def _pieces(lead: tuple[int, ...], rows: int) -> Iterator[tuple[tuple[int | slice, ...], int, int]]:
    """Basic indices into a tensor of leading shape ``lead`` that cover its rows in row-major
    order, each at most ``rows`` rows: ``(index, first row, end row)``.

    Steps along the first axis when a slice of it fits, else walks into the next axis, so a
    single entry of a huge (batch, seq, d) tensor is still read in pieces.
    """
    if math.prod(lead) == 0:
        return

    def walk(prefix: tuple[int, ...], start: int, dims: tuple[int, ...]):
        inner = math.prod(dims[1:])
        if inner <= rows:
            step = max(1, rows // inner)
            for a in range(0, dims[0], step):
                b = min(a + step, dims[0])
                yield (*prefix, slice(a, b)), start + a * inner, start + b * inner
        else:
            for a in range(dims[0]):
                yield from walk((*prefix, a), start + a * inner, dims[1:])

    yield from walk((), 0, lead)
