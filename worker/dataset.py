"""Datasets: a Zarr v3 group holding a 2-D array ``X`` of m examples x n features.

Layout of a dataset at ``PATH`` (a local folder or an fsspec URL)::

    PATH/zarr.json      group attributes (see below)
    PATH/X              array of shape (m, n), chunked by rows only: chunks (chunk_rows, n)

Group attributes::

    sae_dataset   format version (1)
    complete      True once every chunk is written (written last)
    scale         float: values = stored * scale (1/255 for uint8 pixels, 1.0 for floats)
    sample_shape  shape of one example for pictures, e.g. [28, 28] or [8, 8] or [8, 8, 3]
    preprocessing dict describing what was applied (normalisation, whitening parameters, ...)
    source        free text: where the data came from
    write_id      a random id of this write (identifies the version on remote stores, whose
                  metadata has no inode/mtime to tell a rewrite from the original)

Stored dtypes: ``uint8`` (pixels, with a scale), ``float16``, ``bfloat16``, ``float32``,
``float64``. Zarr has no bfloat16, so a bfloat16 dataset stores the raw 16 bits as ``uint16``
with the array attribute ``storage: "bfloat16"`` (on ``X``, next to the bits it describes);
:func:`read_chunk` views them as ``ml_dtypes.bfloat16``. Half-precision data are read back as
float32 or float64 (every float16/bfloat16 value is exact in both), so an epoch reads half the
bytes of float32 and the arithmetic is unchanged.

Writing is atomic: a dataset is written into a hidden sibling (folder or URL) and moved into
place only once complete (renamed locally; moved with fsspec on remote stores, after the
old version was moved aside), so a failed rewrite leaves the old dataset intact; every
dataset is marked ``complete`` only after its last chunk, and readers refuse one that is
not. Chunks are read by the tasks themselves with :func:`read_chunk`, which refuses a missing
chunk (never reading it as the fill value), names the chunk of an unreadable one, and refuses
non-finite values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from sae.objective import array_dtype

FORMAT_VERSION = 1
ARRAY_NAME = "X"
DEFAULT_CHUNK_BYTES = 16 * 2**20
STORED_DTYPES = ("uint8", "float16", "bfloat16", "float32", "float64")
#: Stored dtypes Zarr has no data type for: the dtype of their bits in the array.
_BITS = {"bfloat16": "uint16"}


@functools.cache
def bfloat16() -> np.dtype:
    """``ml_dtypes.bfloat16`` (imported on first use: the import takes most of a second)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def itemsize(dtype: str) -> int:
    """Bytes per stored value of ``dtype`` (one of :data:`STORED_DTYPES`)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


class DatasetError(ValueError):
    """A dataset cannot be opened or is not a complete sae dataset."""


class ChunkError(RuntimeError):
    """A chunk is missing, unreadable, or holds non-finite values; the message names it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds.

    Attributes
    ----------
    path : str
    shape : tuple of int
        (m, n).
    dtype : str
        Stored dtype, one of :data:`STORED_DTYPES` (``"bfloat16"`` is stored as its bits,
        ``uint16``; :func:`read_chunk` decodes it).
    chunk_rows : int
        Rows per chunk (the last chunk may be shorter).
    scale : float
        Values are ``stored * scale``.
    sample_shape : tuple of int or None
    preprocessing : dict
    source : str
    """

    path: str
    shape: tuple[int, int]
    dtype: str
    chunk_rows: int
    scale: float = 1.0
    sample_shape: tuple[int, ...] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def n_chunks(self) -> int:
        """Number of row chunks."""
        return math.ceil(self.shape[0] / self.chunk_rows) if self.shape[0] else 0

    @property
    def nbytes(self) -> int:
        """Uncompressed size in bytes."""
        return self.shape[0] * self.shape[1] * itemsize(self.dtype)

    def chunk_slice(self, i: int) -> slice:
        """Rows of chunk ``i``."""
        return slice(i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.shape[0]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (with chunk count and size)."""
        d = asdict(self)
        d.update(n_chunks=self.n_chunks, nbytes=self.nbytes)
        return d


def default_chunk_rows(n_features: int, dtype: str, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one decoded chunk is about ``target_bytes`` (16 MB)."""
    return max(1, target_bytes // (n_features * itemsize(dtype)))


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    p = str(path)
    return Path(p[len("file://") :] if p.startswith("file://") else p)


COMPRESSIONS = ("auto", "zstd", "none")


def check_compression(compression: str) -> None:
    """Raise :class:`DatasetError` naming the field for a compression outside
    :data:`COMPRESSIONS` (checked before an ingest reads anything)."""
    if compression not in COMPRESSIONS:
        raise DatasetError(f"compression: choose one of {list(COMPRESSIONS)}, got {compression!r}")


def compressors(compression: str, dtype: str) -> Any:
    """The ``compressors`` argument of :meth:`zarr.Group.create_array` for a dataset.

    ``"auto"`` compresses ``uint8`` pixels (backgrounds and repeated values: several-fold
    smaller) and leaves floats raw: reading a raw float32 chunk from the page cache runs at
    3-4 GB/s through Zarr, a Zstandard one at 0.7 GB/s for 17% fewer bytes (uniform random
    floats; activations save less), and an out-of-core evaluation pays that on every pass.

    Raises
    ------
    DatasetError
        For a compression outside :data:`COMPRESSIONS`.
    """
    check_compression(compression)
    if compression == "auto":
        compression = "zstd" if dtype == "uint8" else "none"
    return None if compression == "none" else [zarr.codecs.ZstdCodec(level=0)]


def write_dataset(
    path: str | os.PathLike,
    blocks: Iterable[np.ndarray] | np.ndarray,
    n_rows: int,
    n_features: int,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    scale: float = 1.0,
    sample_shape: tuple[int, ...] | None = None,
    preprocessing: dict[str, Any] | None = None,
    source: str = "",
    overwrite: bool = False,
    *,
    in_place: bool = False,
    compression: str = "auto",
) -> DatasetInfo:
    """Write a dataset atomically from an array or from row blocks of any size.

    Parameters
    ----------
    path : str or path
        Destination (local folder or fsspec URL).
    blocks : ndarray of shape (n_rows, n_features) or iterable of ndarrays of shape (k, n_features)
        The rows, in order; blocks are re-cut into chunks of ``chunk_rows`` as they stream, so
        the whole dataset is never in memory.
    n_rows, n_features : int
    dtype : {"uint8", "float16", "bfloat16", "float32", "float64"}
        Stored dtype (values are cast to it, rounding to nearest for the 16-bit floats;
        bfloat16 is stored as its ``uint16`` bits with the array attribute
        ``storage: "bfloat16"``).
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB per chunk).
    scale : float
        Values are ``stored * scale`` (e.g. 1/255 for pixels stored as uint8).
    sample_shape : tuple of int, optional
    preprocessing : dict, optional
    source : str
    overwrite : bool
        Replace an existing dataset at ``path``.
    in_place : bool
        Write directly at ``path`` (a scratch location of the caller, which moves it into
        place itself with :func:`move_into_place`), not through a hidden sibling.
    compression : {"auto", "zstd", "none"}
        Codec of the chunks. ``"auto"`` (:func:`compressors`): Zstandard for ``uint8``
        pixels, none for floats, whose mantissas compress by 10-20% while decoding them
        costs a core about 5x the time of reading the raw bytes.

    Returns
    -------
    info : DatasetInfo

    Raises
    ------
    DatasetError
        For a bad dtype, shape, sample_shape, scale (not finite and > 0) or compression, an
        existing ``path`` without ``overwrite``, or blocks that do not match
        ``n_rows``/``n_features``.
    """
    check_scale(scale)
    codecs = compressors(compression, dtype)
    if dtype not in STORED_DTYPES:
        raise DatasetError(f"dtype: choose one of {list(STORED_DTYPES)}, got {dtype!r}")
    if n_rows < 1 or n_features < 1:
        raise DatasetError(f"shape: a dataset needs rows and features, got {(n_rows, n_features)}")
    if sample_shape is not None and math.prod(sample_shape) != n_features:
        raise DatasetError(
            f"sample_shape: {tuple(sample_shape)} does not hold {n_features} features"
        )
    chunk_rows = chunk_rows or default_chunk_rows(n_features, dtype)
    if isinstance(blocks, np.ndarray):
        arr = blocks
        blocks = (arr[i : i + chunk_rows] for i in range(0, arr.shape[0], chunk_rows))
    if in_place:
        target = str(path)
    else:
        if _exists(path) and not overwrite:
            raise DatasetError(f"path: {path} exists (pass overwrite=True to replace it)")
        target = scratch_path(path, "tmp")
    try:
        group = zarr.open_group(target, mode="w")
        X = group.create_array(
            ARRAY_NAME,
            shape=(n_rows, n_features),
            chunks=(chunk_rows, n_features),
            dtype=_BITS.get(dtype, dtype),
            compressors=codecs,
            config={"write_empty_chunks": True},
            attributes={"storage": dtype} if dtype in _BITS else None,
        )
        group.attrs.update(
            {
                "sae_dataset": FORMAT_VERSION,
                "complete": False,
                "scale": float(scale),
                "sample_shape": list(sample_shape) if sample_shape is not None else None,
                "preprocessing": preprocessing or {},
                "source": source,
                "write_id": uuid.uuid4().hex,
            }
        )
        written = 0
        pending: list[np.ndarray] = []
        pending_rows = 0
        for block in blocks:
            block = np.asarray(block)
            if block.ndim != 2 or block.shape[1] != n_features:
                raise DatasetError(
                    f"blocks: expected rows of {n_features} features, got shape {block.shape}"
                )
            pending.append(block)
            pending_rows += block.shape[0]
            while pending_rows >= chunk_rows or (pending_rows and written + pending_rows >= n_rows):
                buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
                take = min(chunk_rows, buf.shape[0])
                if written + take > n_rows:
                    raise DatasetError(f"blocks: more than n_rows={n_rows} rows were given")
                X[written : written + take] = _encode(buf[:take], dtype)
                written += take
                rest = buf[take:]
                pending = [rest] if rest.shape[0] else []
                pending_rows = rest.shape[0]
        if written != n_rows:
            raise DatasetError(f"blocks: expected {n_rows} rows, got {written}")
        group.attrs["complete"] = True
        if not in_place:
            move_into_place(target, path, overwrite)
    except BaseException:
        if not in_place:
            remove_path(target)
        raise
    finally:
        _open_array.cache_clear()
    return open_dataset(path)


def _encode(block: np.ndarray, dtype: str) -> np.ndarray:
    """``block`` cast to the stored ``dtype``, as the array holds it (bfloat16: its bits).

    Finite values beyond the range of a 16-bit float are refused (DatasetError naming
    ``dtype``), not stored as inf.
    """
    with np.errstate(over="ignore"):  # overflow is refused just below
        out = block.astype(bfloat16() if dtype == "bfloat16" else dtype, copy=False)
    if dtype in ("float16", "bfloat16") and out is not block and not np.isfinite(out).all():
        if np.isfinite(block).all():
            big = float(np.abs(block.astype(np.float64)).max())
            raise DatasetError(
                f"dtype: values up to {big:.6g} in magnitude overflow {dtype}; "
                "store them as float32"
            )
    return out.view(np.uint16) if dtype == "bfloat16" else out


def _decode(raw: np.ndarray, X: zarr.Array) -> np.ndarray:
    """The values of ``raw`` read from ``X``: bits of a dtype Zarr lacks viewed as that dtype."""
    if X.attrs.get("storage") == "bfloat16":
        return raw.view(bfloat16())
    return raw


def _stored_dtype(X: zarr.Array, spath: str) -> str:
    """The stored dtype of ``X`` (``storage`` attribute, else the array's own dtype)."""
    storage = X.attrs.get("storage")
    if storage is None:
        return str(X.dtype)
    if storage not in _BITS or str(X.dtype) != _BITS[storage]:
        raise DatasetError(
            f"dataset: {spath}: storage attribute {storage!r} does not describe a "
            f"{X.dtype} array (known: {dict(_BITS)})"
        )
    return str(storage)


def check_scale(scale: float) -> float:
    """``scale`` as a float, refused (DatasetError naming it) unless finite and > 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise DatasetError(f"scale: must be a finite number > 0, got {scale!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise DatasetError(f"scale: must be a finite number > 0, got {scale!r}")
    return value


def _fs(path: str | os.PathLike):
    import fsspec

    return fsspec.core.url_to_fs(str(path).rstrip("/"))


def _exists(path: str | os.PathLike) -> bool:
    """Whether anything is at ``path`` (local folder or URL)."""
    if _is_local(path):
        return _local(path).exists()
    fs, p = _fs(path)
    return bool(fs.exists(p))


def scratch_path(dest: str | os.PathLike, tag: str) -> str:
    """A hidden sibling of ``dest`` (same filesystem or bucket) for a write in progress."""
    hexid = uuid.uuid4().hex[:8]
    if _is_local(dest):
        final = _local(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        return str(final.parent / f".{final.name}.{tag}-{hexid}")
    url = str(dest).rstrip("/")
    head, _, name = url.rpartition("/")
    return f"{head}/.{name}.{tag}-{hexid}"


def remove_path(path: str | os.PathLike) -> None:
    """Remove whatever is at ``path`` (local folder or URL), quietly."""
    if _is_local(path):
        shutil.rmtree(_local(path), ignore_errors=True)
        return
    try:
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass


def move_into_place(tmp: str | os.PathLike, dest: str | os.PathLike, overwrite: bool) -> None:
    """Move a finished dataset at ``tmp`` to ``dest``, replacing an old one if allowed.

    The old version is first moved aside and removed only after the new one is in place
    (renames locally; fsspec ``mv`` on remote stores). If the move fails, the old version
    is put back and ``tmp`` is left for the caller to remove.
    """
    if _exists(dest) and not overwrite:
        raise DatasetError(f"dest: {dest} exists (pass overwrite=True to replace it)")
    if _is_local(dest):
        final = _local(dest)
        if final.exists():
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            try:
                os.replace(_local(tmp), final)
            except BaseException:
                os.replace(trash, final)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(_local(tmp), final)
        return
    fs, d = _fs(dest)
    _, t = _fs(tmp)
    trash = None
    if fs.exists(d):
        trash = scratch_path(dest, "old")
        fs.mv(d, _fs(trash)[1], recursive=True)
    try:
        fs.mv(t, d, recursive=True)
    except BaseException:
        if trash is not None:
            with contextlib.suppress(Exception):
                if fs.exists(d):
                    fs.rm(d, recursive=True)
                fs.mv(_fs(trash)[1], d, recursive=True)
        raise
    if trash is not None:
        remove_path(trash)


def open_dataset(path: str | os.PathLike) -> DatasetInfo:
    """Describe the dataset at ``path``.

    Raises
    ------
    DatasetError
        If there is no dataset there, or it is incomplete or not an sae dataset.
    """
    spath = str(path)
    if _is_local(spath) and not _local(spath).exists():
        raise DatasetError(f"dataset: no dataset at {spath}")
    try:
        group = zarr.open_group(spath, mode="r")
        attrs = dict(group.attrs)
        X = group[ARRAY_NAME]
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise DatasetError(f"dataset: {spath} is not an sae dataset ({exc})") from None
    if not isinstance(X, zarr.Array):
        raise DatasetError(f"dataset: {spath} is not an sae dataset ({ARRAY_NAME} is not an array)")
    if attrs.get("sae_dataset") != FORMAT_VERSION:
        raise DatasetError(f"dataset: {spath} is not an sae dataset (no sae_dataset attribute)")
    if not attrs.get("complete"):
        raise DatasetError(f"dataset: {spath} is incomplete (its writing did not finish)")
    if X.ndim != 2 or X.chunks[1] != X.shape[1]:
        raise DatasetError(f"dataset: {spath} must be 2-D and chunked by rows only")
    try:
        scale = check_scale(attrs.get("scale", 1.0))
    except DatasetError as exc:
        raise DatasetError(f"dataset: {spath}: {exc}") from None
    ss = attrs.get("sample_shape")
    return DatasetInfo(
        path=spath,
        shape=(int(X.shape[0]), int(X.shape[1])),
        dtype=_stored_dtype(X, spath),
        chunk_rows=int(X.chunks[0]),
        scale=scale,
        sample_shape=tuple(ss) if ss else None,
        preprocessing=attrs.get("preprocessing") or {},
        source=attrs.get("source", ""),
    )


def stored_compression(path: str | os.PathLike) -> str:
    """How the chunks of the dataset at ``path`` are compressed: ``"none"``, ``"zstd"``, or
    the names of other Zarr codecs joined by ``+`` (datasets written by other tools)."""
    X = zarr.open_group(str(path), mode="r")[ARRAY_NAME]
    names = [type(c).__name__.removesuffix("Codec").lower() for c in X.compressors]
    return "+".join(names) or "none"


def write_id(path: str | os.PathLike) -> str | None:
    """The ``write_id`` attribute of the dataset at ``path`` (None if absent or unreadable)."""
    try:
        wid = zarr.open_group(str(path), mode="r").attrs.get("write_id")
    except Exception:  # noqa: BLE001 - no id: callers do not reuse cached state
        return None
    return str(wid) if wid else None


def dataset_version(path: str | os.PathLike) -> str | None:
    """The identity of a dataset's current version: it changes whenever the dataset is
    rewritten, so nothing cached from an old version (an open array, decoded chunks, a value
    range) is used for a new one.

    Local datasets: the inode, mtime and size of the group's ``zarr.json`` (a rewrite moves a
    new folder into place). Remote stores, whose metadata has no inode: the ``write_id`` of the
    write, or for a dataset written before ``write_id`` a hash of the group's metadata.
    None when unknown (callers then cache nothing).
    """
    p = str(path)
    if _is_local(p):
        try:
            st = os.stat(_local(p) / "zarr.json")
        except OSError:
            return None
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"
    wid = write_id(p)
    if wid:
        return f"w-{wid}"
    try:
        import hashlib

        import fsspec

        with fsspec.open(p.rstrip("/") + "/zarr.json", "rb") as fh:
            return hashlib.sha1(fh.read()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - unknown: callers cache nothing
        return None


@functools.lru_cache(maxsize=32)
def _open_array_cached(path: str, version: str) -> zarr.Array:
    return zarr.open_group(path, mode="r")[ARRAY_NAME]


def _open_array(path: str) -> zarr.Array:
    return _open_array_cached(path, dataset_version(path) or uuid.uuid4().hex)


_open_array.cache_clear = _open_array_cached.cache_clear  # type: ignore[attr-defined]


def read_chunk(
    path: str | os.PathLike, i: int, dtype: str = "float64", scale: float | None = None
) -> np.ndarray:
    """Read chunk ``i`` of a dataset as floats (stored values times the scale).

    Parameters
    ----------
    path : str or path
    i : int
        Chunk index.
    dtype : {"float64", "float32", "bfloat16"}
        Returned dtype (float16 and bfloat16 data convert to it exactly); the bfloat16
        compute dtype reads float32 (:func:`sae.objective.array_dtype`).
    scale : float, optional
        Overrides the dataset's scale attribute (saves opening the group attributes).

    Returns
    -------
    X : ndarray of shape (rows_in_chunk, n)

    Raises
    ------
    ChunkError
        If the chunk is missing from the store, cannot be read or decoded, or holds NaN/inf;
        the message names the chunk and the dataset.
    """
    spath = str(path)
    try:
        X = _open_array(spath)
    except Exception as exc:  # noqa: BLE001 - reported with the chunk's name
        raise ChunkError(f"chunk {i} of {spath}: cannot open the dataset ({exc})") from exc
    rows = X.chunks[0]
    if not 0 <= i < math.ceil(X.shape[0] / rows):
        raise ChunkError(f"chunk {i} of {spath}: no such chunk")
    key = X.metadata.encode_chunk_key((i, 0))
    store_path = X.store_path
    full_key = f"{store_path.path}/{key}" if store_path.path else key
    try:
        present = sync(store_path.store.exists(full_key))
    except Exception as exc:  # noqa: BLE001
        raise ChunkError(f"chunk {i} of {spath}: cannot reach the store ({exc})") from exc
    if not present:
        raise ChunkError(f"chunk {i} of {spath}: missing from the store ({key})")
    try:
        raw = X[i * rows : min((i + 1) * rows, X.shape[0])]
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {exc}"
        raise ChunkError(f"chunk {i} of {spath}: cannot be read ({why})") from exc
    if scale is None:
        scale = float(zarr.open_group(spath, mode="r").attrs.get("scale", 1.0))
    dtype = array_dtype(dtype)
    out = _decode(raw, X).astype(dtype, copy=False)
    if scale != 1.0:
        return _finite_chunk(_scaled(out, scale, dtype), i, rows, spath)
    return _finite_chunk(out, i, rows, spath)


def _scaled(out: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """``out * scale`` (overflow shows as inf, refused by :func:`_finite_chunk`)."""
    with np.errstate(over="ignore"):
        inv = 1.0 / scale
        if abs(inv - round(inv)) < 1e-9 * inv:
            # pixels stored with scale 1/255 read back exactly as x / 255, as the notes scale them
            out = out / np.asarray(round(inv), dtype=dtype)
        else:
            out = out * np.asarray(scale, dtype=dtype)
    return out


def _finite_chunk(out: np.ndarray, i: int, rows: int, spath: str) -> np.ndarray:
    """``out``, refused (naming the chunk) if it holds NaN or inf, whatever the stored dtype
    (a stored NaN, or values times the scale overflowing the compute dtype)."""
    if not np.all(np.isfinite(out)):
        bad = int(np.argwhere(~np.isfinite(out))[0][0]) + i * rows
        raise ChunkError(f"chunk {i} of {spath}: holds NaN or inf (first at row {bad})")
    return out


def read_all(path: str | os.PathLike, dtype: str = "float64") -> np.ndarray:
    """The whole dataset in memory, chunk by chunk (for small datasets and tests).

    Returns
    -------
    X : ndarray of shape (m, n)
    """
    info = open_dataset(path)
    return np.concatenate([read_chunk(path, i, dtype, info.scale) for i in range(info.n_chunks)])
