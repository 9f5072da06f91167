"""Ingest: turn MNIST IDX files, ``.npy`` arrays, image folders and photographs into datasets.

Every function here writes a dataset in the format of :mod:`worker.dataset` (a Zarr v3 group
with a 2-D array of m examples x n features chunked by rows) and returns its
:class:`~worker.dataset.DatasetInfo`. Sources are streamed block by block, so a source larger
than memory is never read whole (an IDX file is decompressed as it is read, a ``.npy`` file is
memory-mapped).

Destinations are local paths or fsspec URLs (``file:///data/x``, ``memory://x``, ``s3://...``).
Writing is atomic for local destinations (including ``file://``): the dataset is written into a
hidden sibling folder and renamed into place only once every chunk and attribute is written, and
a failed ingest removes its temporary folders. For other URLs there is no rename: the dataset is
marked ``complete`` only after its last chunk (readers refuse it before) and a failed ingest
removes what it wrote.

Every dataset written here records, in its ``preprocessing`` attribute:

- ``value_range``: ``[min, max]`` of the values (stored * scale), computed while streaming,
  so a trainer can refuse sigmoid output units on data outside [0, 1];
- ``steps``: the list of what was applied (``"scale"``, ``"normalize"``, ``"whiten"``);
- for UFLDL normalisation, ``normalize: {"pstd": ...}``; for whitening,
  ``whitening: {...}`` with the method and epsilon, and the fitted ``mean``, ``U`` and ``S``
  stored as small Zarr arrays in the group ``whitening/`` of the dataset (see
  :func:`load_whitening`) so new inputs can be whitened the same way.

Normalisation and whitening are fitted out-of-core: the rows are written first, then passes
over the stored chunks accumulate sums (:class:`sae.preprocess.NormalizeStats`,
:class:`sae.preprocess.MomentSums`), and a last pass writes the transformed rows chunk by chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from sae.mnist import iter_idx
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")
WHITENING_GROUP = "whitening"

__all__ = [
    "IMAGE_SUFFIXES",
    "dataset_exists",
    "ingest_idx",
    "ingest_images",
    "ingest_npy",
    "ingest_photographs",
    "load_whitening",
    "normalize_dataset",
    "whiten_dataset",
]


# ---------------------------------------------------------------------------------------------
# destinations: existence, scratch siblings, removal, atomic replace


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


_scratch = scratch_path
_remove = remove_path


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
    target = _scratch(dest, "tmp")  # moved into place only once complete (local or remote)
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
        _remove(target)
        raise
    finally:
        _open_array.cache_clear()
    return open_dataset(dest)


def _blocks_of(path: str | os.PathLike, info: DatasetInfo, dtype: str = "float64"):
    """The rows of a stored dataset, chunk by chunk, as floats."""
    for i in range(info.n_chunks):
        yield read_chunk(path, i, dtype, info.scale)


# ---------------------------------------------------------------------------------------------
# MNIST IDX


def ingest_idx(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = False,
    sample_shape: Sequence[int] | None = None,
    source: str | None = None,
) -> DatasetInfo:
    """Write a dataset from an IDX file (MNIST format, gzip-compressed or raw), streaming it.

    Parameters
    ----------
    src : path
        IDX file, e.g. ``t10k-images-idx3-ubyte.gz`` (items of shape (28, 28)).
    dest : str or path
        Local path or fsspec URL of the new dataset.
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB per chunk).
    overwrite : bool
        Replace an existing dataset at ``dest``.
    limit : int, optional
        Keep only the first ``limit`` examples.
    progress : bool
        Show a progress bar.
    sample_shape : sequence of int, optional
        Shape of one example for pictures (default: the file's item shape); its product must
        be the item's size.
    source : str, optional
        Where the data came from, for the dataset's attributes (default ``idx:<file name>``).

    Returns
    -------
    info : DatasetInfo
        Shape (m, prod(item shape)); uint8 items are stored as uint8 with scale 1/255 (values in
        [0, 1]), other item types as float32 (integers) or their float type, scale 1.
        ``sample_shape`` is the item shape, e.g. (28, 28); None for a 1-D file (one feature).
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"src: no such file {src}")
    _check_dest(dest, overwrite)
    it = iter_idx(src)
    try:
        item_dtype, shape = next(it)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    m = shape[0] if limit is None else min(shape[0], int(limit))
    if m < 1:
        raise ValueError(f"{src}: no examples to ingest (file has {shape[0]}, limit {limit})")
    item = tuple(shape[1:])
    n = math.prod(item) if item else 1
    if sample_shape is not None:
        sample_shape = tuple(int(d) for d in sample_shape)
        if math.prod(sample_shape) != n or min(sample_shape, default=0) < 1:
            raise ValueError(
                f"sample_shape: {'x'.join(map(str, sample_shape))} makes "
                f"{math.prod(sample_shape)} values, but each example of {src} has {n} features"
            )
        item = sample_shape
    if item_dtype == np.uint8:
        dtype, scale = "uint8", 1.0 / 255.0
    elif item_dtype.kind in "iu":
        dtype, scale = "float32", 1.0
    else:
        dtype, scale = ("float64" if item_dtype.itemsize == 8 else "float32"), 1.0
    rows = chunk_rows or default_chunk_rows(n, dtype)

    def blocks() -> Iterator[np.ndarray]:
        done = 0
        try:
            for block in it:
                block = block.reshape(block.shape[0], n)[: m - done]
                done += block.shape[0]
                yield block
                if done >= m:
                    break
        except ValueError as exc:
            raise ValueError(f"{src}: {exc}") from None
        finally:
            it.close()

    return _write(
        dest,
        _reblock(blocks(), rows),
        n_rows=m,
        n_features=n,
        dtype=dtype,
        scale=scale,
        chunk_rows=rows,
        sample_shape=item if len(item) >= 1 else None,
        preprocessing={"steps": ["scale"] if scale != 1.0 else [], "scale": scale},
        source=(source or f"idx:{src.name}") + (f" (first {m})" if m < shape[0] else ""),
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


def _reblock(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Pass blocks through, splitting any larger than ``rows`` (bounds memory per step)."""
    for block in blocks:
        for i in range(0, block.shape[0], rows):
            yield block[i : i + rows]


# ---------------------------------------------------------------------------------------------
# .npy


def ingest_npy(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    dtype: str | None = None,
    scale: float = 1.0,
    sample_shape: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    source: str | None = None,
) -> DatasetInfo:
    """Write a dataset from a ``.npy`` file of any size (memory-mapped, written chunk by chunk).

    Parameters
    ----------
    src : path
        A ``.npy`` file holding an array of shape (m, n), or (m, *sample_shape) for pictures
        (trailing dimensions are flattened into features, row-major).
    dest : str or path
        Local path or fsspec URL of the new dataset.
    dtype : {"uint8", "float32", "float64"}, optional
        Stored dtype. Default: uint8 stays uint8, float32/float64 stay, float16, bool and
        integer types become float32. Integers may be stored as uint8 only if they lie in
        [0, 255]; floats are never stored as uint8.
    scale : float
        Values are ``stored * scale`` (e.g. 1/255 for uint8 pixels).
    sample_shape : sequence of int, optional
        Shape of one example (default: the trailing dimensions of an N-D array; none for 2-D).
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB per chunk).
    overwrite : bool
    progress : bool
    source : str, optional
        Where the data came from, for the dataset's attributes (default ``npy:<file name>``).

    Returns
    -------
    info : DatasetInfo
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"src: no such file {src}")
    _check_dest(dest, overwrite)
    try:
        arr = np.load(src, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{src}: cannot be memory-mapped as a numeric array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{src}: not a readable .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{src}: not a .npy array (an .npz archive?)")
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise ValueError(f"{src}: dtype {arr.dtype} cannot be a dataset (need numbers, real)")
    if arr.ndim < 2:
        raise ValueError(
            f"{src}: a dataset needs a 2-D array (m examples x n features) or more; "
            f"got shape {arr.shape}"
        )
    m = arr.shape[0]
    item = tuple(int(d) for d in arr.shape[1:])
    n = math.prod(item)
    if m < 1 or n < 1:
        raise ValueError(f"{src}: empty array of shape {arr.shape}")
    if sample_shape is not None:
        sample_shape = tuple(int(d) for d in sample_shape)
        if math.prod(sample_shape) != n:
            raise ValueError(
                f"sample_shape: {'x'.join(map(str, sample_shape))} makes "
                f"{math.prod(sample_shape)} values, but each example of {src} has {n} features"
            )
    elif len(item) > 1:
        sample_shape = item
    if dtype is None:
        if arr.dtype == np.uint8:
            dtype = "uint8"
        elif arr.dtype == np.float64:
            dtype = "float64"
        else:
            dtype = "float32"
    if dtype not in ("uint8", "float32", "float64"):
        raise ValueError(f"dtype: choose one of ['uint8', 'float32', 'float64'], got {dtype!r}")
    if dtype == "uint8" and kind == "f":
        raise ValueError(f"dtype: {src} holds floats ({arr.dtype}); store them as float32/64")
    rows = chunk_rows or default_chunk_rows(n, dtype)

    def blocks() -> Iterator[np.ndarray]:
        for i in range(0, m, rows):
            block = _npy_rows(src, arr, i, min(i + rows, m)).reshape(-1, n)
            if dtype == "uint8" and arr.dtype != np.uint8:
                if block.min() < 0 or block.max() > 255:
                    raise ValueError(f"{src}: values outside [0, 255] cannot be stored as uint8")
            yield block.astype(dtype, copy=False)

    steps = ["scale"] if scale != 1.0 else []
    return _write(
        dest,
        blocks(),
        n_rows=m,
        n_features=n,
        dtype=dtype,
        scale=scale,
        chunk_rows=rows,
        sample_shape=sample_shape,
        preprocessing={"steps": steps, "scale": float(scale)},
        source=source or f"npy:{src.name}",
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


def _npy_rows(src: Path, arr: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a memory-mapped ``.npy`` array, copied out of the file.

    For a C-ordered file only those rows are mapped, and unmapped again on return, so the
    resident memory stays about one block whatever the file's size (a single map of the whole
    file would keep every page read so far resident).
    """
    offset = getattr(arr, "offset", None)
    if not arr.flags.c_contiguous or offset is None:
        return np.array(arr[start:stop])
    row_bytes = arr.dtype.itemsize * math.prod(arr.shape[1:])
    mm = np.memmap(
        src,
        dtype=arr.dtype,
        mode="r",
        offset=offset + start * row_bytes,
        shape=(stop - start, *arr.shape[1:]),
    )
    try:
        return np.array(mm)
    finally:
        del mm


# ---------------------------------------------------------------------------------------------
# out-of-core preprocessing of a stored dataset


def _derived_preprocessing(info: DatasetInfo, step: str, params: dict[str, Any]) -> dict[str, Any]:
    pre = {k: v for k, v in info.preprocessing.items() if k != "value_range"}
    pre["steps"] = [*pre.get("steps", []), step]
    pre[step if step != "whiten" else "whitening"] = params
    return pre


def normalize_dataset(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    pstd: float | None = None,
    dtype: str = "float64",
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> DatasetInfo:
    """UFLDL normalisation of a stored dataset, fitted out-of-core, into a new dataset.

    One pass over the chunks of ``src`` adds :class:`sae.preprocess.NormalizeStats` to fit the
    truncation bound ``pstd = 3 std`` (unless given); a second pass writes
    ``normalize_patches(chunk, pstd)`` chunk by chunk. The result equals
    ``normalize_patches(read_all(src))`` and lies in [0.1, 0.9].

    Parameters
    ----------
    src, dest : str or path
        Stored dataset of shape (m, n) and the new one (same shape).
    pstd : float, optional
        Truncation bound (default: fitted from ``src``).
    dtype : {"float64", "float32"}
    chunk_rows : int, optional
        Rows per chunk of ``dest`` (default: those of ``src``).
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
        ``preprocessing["normalize"] = {"method": "ufldl", "pstd": pstd}``.
    """
    from sae.preprocess import NormalizeStats, normalize_patches

    _check_dest(dest, overwrite)
    info = open_dataset(src)
    if pstd is None:
        stats = NormalizeStats(0.0, 0.0, 0.0)
        for chunk in _blocks_of(src, info):
            stats = stats + NormalizeStats.of(chunk)
        pstd = stats.pstd
    pstd = float(pstd)
    m, n = info.shape
    return _write(
        dest,
        (normalize_patches(chunk, pstd) for chunk in _blocks_of(src, info)),
        n_rows=m,
        n_features=n,
        dtype=dtype,
        chunk_rows=chunk_rows or info.chunk_rows,
        sample_shape=info.sample_shape,
        preprocessing=_derived_preprocessing(info, "normalize", {"method": "ufldl", "pstd": pstd}),
        source=info.source,
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


def whiten_dataset(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    method: str = "zca",
    epsilon: float = 0.1,
    k: int | None = None,
    dtype: str = "float64",
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> DatasetInfo:
    """PCA or ZCA whitening of a stored dataset, fitted out-of-core, into a new dataset.

    One pass over the chunks of ``src`` adds :class:`sae.preprocess.MomentSums`;
    :func:`sae.preprocess.fit_whitening` turns them into a whitening; a second pass writes the
    whitened chunks. The fitted ``mean`` (n,), ``U`` (n, n) and ``S`` (n,) are stored as Zarr
    arrays in the group ``whitening/`` of ``dest`` (read them back with :func:`load_whitening`);
    the method, epsilon and k are in ``preprocessing["whitening"]``.

    Parameters
    ----------
    src, dest : str or path
        Stored dataset of shape (m, n) and the new one, of shape (m, n) for ZCA and (m, k)
        for PCA (k = n unless given).
    method : {"zca", "pca"}
    epsilon : float
        Regulariser added to the eigenvalues.
    k : int, optional
        PCA only: number of components kept.
    dtype : {"float64", "float32"}
    chunk_rows : int, optional
        Rows per chunk of ``dest`` (default: those of ``src``).
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
        Whitened values are not in [0, 1] (see ``preprocessing["value_range"]``): sigmoid output
        units cannot reconstruct them. ZCA keeps the sample shape (its output is in pixel
        space); PCA output has none.
    """
    from sae.preprocess import MomentSums, fit_whitening

    _check_dest(dest, overwrite)
    info = open_dataset(src)
    m, n = info.shape
    sums = None
    for chunk in _blocks_of(src, info):
        part = MomentSums.of(chunk)
        sums = part if sums is None else sums + part
    w = fit_whitening(sums, method=method, epsilon=epsilon, k=k)
    params = {
        "method": w.method,
        "epsilon": w.epsilon,
        "k": w.k,
        "n_features_in": n,
        "arrays": WHITENING_GROUP,
    }

    def store_whitening(group: zarr.Group) -> None:
        sub = group.create_group(WHITENING_GROUP, overwrite=True)
        for name, value in (("mean", w.mean), ("U", w.U), ("S", w.S)):
            arr = sub.create_array(name, shape=value.shape, dtype="float64")
            arr[...] = value
        sub.attrs.update({"method": w.method, "epsilon": w.epsilon, "k": w.k})

    return _write(
        dest,
        (w.transform(chunk) for chunk in _blocks_of(src, info)),
        n_rows=m,
        n_features=w.n_components,
        dtype=dtype,
        chunk_rows=chunk_rows or info.chunk_rows,
        sample_shape=info.sample_shape if w.method == "zca" else None,
        preprocessing=_derived_preprocessing(info, "whiten", params),
        source=info.source,
        overwrite=overwrite,
        what=str(src),
        progress=progress,
        extra=store_whitening,
    )


def load_whitening(path: str | os.PathLike):
    """The whitening stored with a dataset written by :func:`whiten_dataset`.

    Returns
    -------
    whitening : sae.preprocess.Whitening
        ``whitening.transform(X)`` whitens new inputs X of shape (m, n) the same way.

    Raises
    ------
    DatasetError
        If the dataset was not whitened.
    """
    from sae.preprocess import Whitening

    info = open_dataset(path)
    params = info.preprocessing.get("whitening")
    if not params:
        raise DatasetError(f"dataset: {path} was not whitened")
    sub = zarr.open_group(str(path), mode="r")[params.get("arrays", WHITENING_GROUP)]
    return Whitening(
        mean=np.asarray(sub["mean"][...]),
        U=np.asarray(sub["U"][...]),
        S=np.asarray(sub["S"][...]),
        epsilon=float(params["epsilon"]),
        method=params["method"],
        k=params.get("k"),
    )


def _preprocess_pipeline(
    dest: str | os.PathLike,
    write_raw: Callable[[str, bool], DatasetInfo],
    *,
    normalize: bool,
    whiten: str | None,
    epsilon: float,
    k: int | None,
    dtype: str,
    chunk_rows: int | None,
    overwrite: bool,
    progress: bool,
) -> DatasetInfo:
    """Write raw rows with ``write_raw(path, overwrite)``, then normalise and whiten out-of-core.

    Intermediate datasets are hidden siblings of ``dest``, removed whatever happens.
    """
    if whiten is not None and whiten not in ("zca", "pca"):
        raise ValueError(f"whiten: choose one of ['zca', 'pca'] or none, got {whiten!r}")
    if not normalize and whiten is None:
        return write_raw(str(dest), overwrite)
    scratch: list[str] = []
    try:
        current = _scratch(dest, "raw")
        scratch.append(current)
        write_raw(current, False)
        if normalize:
            nxt = str(dest) if whiten is None else _scratch(dest, "norm")
            if whiten is not None:
                scratch.append(nxt)
            normalize_dataset(
                current,
                nxt,
                dtype=dtype,
                chunk_rows=chunk_rows,
                overwrite=overwrite if whiten is None else False,
                progress=progress,
            )
            current = nxt
        if whiten is not None:
            whiten_dataset(
                current,
                dest,
                method=whiten,
                epsilon=epsilon,
                k=k,
                dtype=dtype,
                chunk_rows=chunk_rows,
                overwrite=overwrite,
                progress=progress,
            )
    finally:
        for path in scratch:
            _remove(path)
        _open_array.cache_clear()
    return open_dataset(dest)


# ---------------------------------------------------------------------------------------------
# images


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"src: no such folder {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def _read_image(path: Path, gray: bool) -> np.ndarray:
    """An image as uint8, shape (H, W) if gray else (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode.startswith("I") or img.mode == "F":
                raise ValueError(
                    f"{path}: {img.mode} images (more than 8 bits per channel) are not supported; "
                    "convert them to 8-bit, or stack them into a .npy file (sae ingest npy)"
                )
            return np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def ingest_images(
    src_folder: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    patch_size: int | None = None,
    n_patches: int = 10000,
    gray: bool = True,
    normalize: bool = False,
    whiten: str | None = None,
    epsilon: float = 0.1,
    k: int | None = None,
    seed: int = 0,
    dtype: str = "float64",
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> DatasetInfo:
    """Write a dataset from a folder of images (PNG, JPEG, ...; read with Pillow).

    Without ``patch_size`` every image is one example: all images must have the same size
    (no resizing), and they are streamed one by one. With ``patch_size`` the images are read
    in memory and ``n_patches`` random ``patch_size x patch_size`` patches are drawn
    (:func:`sae.preprocess.sample_patches`, pixels scaled to [0, 1]) in blocks of at most
    :data:`PATCH_BLOCK` patches, so a large patch set is never in memory whole (up to
    ``PATCH_BLOCK`` patches the rows are exactly ``sample_patches(images, p, n_patches, seed)``).

    Parameters
    ----------
    src_folder : path
        Folder whose image files (by suffix, sorted by name) are read.
    dest : str or path
        Local path or fsspec URL of the new dataset.
    patch_size : int, optional
        Side of square patches; None for whole images.
    n_patches : int
        Number of patches (with ``patch_size``).
    gray : bool
        Convert to grayscale (sample shape (h, w)); otherwise RGB (sample shape (h, w, 3)).
    normalize : bool
        UFLDL normalisation to [0.1, 0.9] (:func:`normalize_dataset`).
    whiten : {None, "zca", "pca"}
        Whitening fitted out-of-core (:func:`whiten_dataset`), after normalisation if both.
    epsilon : float
        Whitening regulariser.
    k : int, optional
        PCA whitening: components kept.
    seed : int
        Seed of the patch sampler.
    dtype : {"float64", "float32"}
        Stored dtype of patches and of normalised/whitened data (whole images without
        preprocessing are stored as uint8 with scale 1/255).
    chunk_rows : int, optional
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
    """
    folder = Path(src_folder)
    files = _image_files(folder)
    _check_dest(dest, overwrite)
    if patch_size is None:
        first = _read_image(files[0], gray)
        shape = first.shape
        n = math.prod(shape)
        rows = chunk_rows or default_chunk_rows(n, "uint8")

        def blocks() -> Iterator[np.ndarray]:
            buf: list[np.ndarray] = []
            for path in files:
                img = first if path == files[0] else _read_image(path, gray)
                if img.shape != shape:
                    raise ValueError(
                        f"{path}: size {img.shape[1]}x{img.shape[0]} differs from "
                        f"{files[0].name} ({shape[1]}x{shape[0]}); all images must have one size "
                        "(or pass patch_size)"
                    )
                buf.append(img.reshape(1, n))
                if len(buf) == rows:
                    yield np.concatenate(buf)
                    buf = []
            if buf:
                yield np.concatenate(buf)

        def write_raw(path: str, ow: bool) -> DatasetInfo:
            return _write(
                path,
                blocks(),
                n_rows=len(files),
                n_features=n,
                dtype="uint8",
                scale=1.0 / 255.0,
                chunk_rows=rows,
                sample_shape=shape,
                preprocessing={"steps": ["scale"], "scale": 1.0 / 255.0, "gray": gray},
                source=f"images:{folder.name} ({len(files)} files)",
                overwrite=ow,
                what=str(folder),
                progress=progress,
            )

    else:
        # uint8 in memory (8x less than float64); sampled patches are divided by 255, which
        # gives the bits of sampling images / 255.0 (the same division of the same pixel).
        images = [_read_image(p, gray) for p in files]
        return _ingest_patches(
            dest,
            images,
            patch_size=patch_size,
            n_patches=n_patches,
            seed=seed,
            gray=gray,
            divisor=255.0,
            source=f"images:{folder.name} ({len(files)} files)",
            what=str(folder),
            normalize=normalize,
            whiten=whiten,
            epsilon=epsilon,
            k=k,
            dtype=dtype,
            chunk_rows=chunk_rows,
            overwrite=overwrite,
            progress=progress,
        )

    return _preprocess_pipeline(
        dest,
        write_raw,
        normalize=normalize,
        whiten=whiten,
        epsilon=epsilon,
        k=k,
        dtype=dtype,
        chunk_rows=chunk_rows,
        overwrite=overwrite,
        progress=progress,
    )


PATCH_BLOCK = 65536


def _patches(
    images: list[np.ndarray],
    patch_size: int,
    n_patches: int,
    seed: int,
    what: str,
    divisor: float | None = None,
) -> tuple[int, Callable[[], Iterator[np.ndarray]]]:
    """Random patches in blocks of at most :data:`PATCH_BLOCK`, so memory stays bounded.

    Up to ``PATCH_BLOCK`` patches are exactly ``sample_patches(images, p, n_patches, seed)``;
    beyond, block ``j`` holds ``sample_patches(images, p, size_j, [seed, j])``; each block is
    divided by ``divisor`` when given (images kept as uint8, patches as float64).

    Returns
    -------
    n_features : int
    blocks : callable returning an iterator of ndarrays of shape (k, n_features)
    """
    from sae.preprocess import sample_patches

    n_patches = int(n_patches)

    def block(j: int) -> np.ndarray:
        size = min(PATCH_BLOCK, n_patches - j * PATCH_BLOCK)
        try:
            X = sample_patches(images, patch_size, size, seed if j == 0 else [seed, j])
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if divisor is not None:
            X /= divisor
        return X

    if n_patches < 1:
        raise ValueError(f"n_patches: must be an integer >= 1, got {n_patches!r}")
    first = block(0)  # checks the arguments before anything is written

    def blocks() -> Iterator[np.ndarray]:
        yield first
        for j in range(1, math.ceil(n_patches / PATCH_BLOCK)):
            yield block(j)

    return first.shape[1], blocks


def ingest_photographs(
    dest: str | os.PathLike,
    *,
    patch_size: int = 8,
    n_patches: int = 10000,
    gray: bool = True,
    normalize: bool = True,
    whiten: str | None = None,
    epsilon: float = 0.1,
    k: int | None = None,
    seed: int = 0,
    dtype: str = "float64",
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> DatasetInfo:
    """Random patches of the photographs scikit-image ships (no download), like UFLDL's IMAGES.

    The default, 10,000 8x8 grayscale patches normalised to [0.1, 0.9], is what ``sae demo``
    trains on (the CS294A exercise).

    Parameters
    ----------
    dest : str or path
        Local path or fsspec URL of the new dataset.
    patch_size, n_patches, seed : int
        Patches drawn by :func:`sae.preprocess.sample_patches` from
        :func:`sae.preprocess.photographs`, in blocks of :data:`PATCH_BLOCK` (as
        :func:`ingest_images`).
    gray : bool
        Grayscale patches (n = p*p) or RGB ones (n = p*p*3).
    normalize : bool
        UFLDL normalisation to [0.1, 0.9].
    whiten : {None, "zca", "pca"}
    epsilon : float
    k : int, optional
    dtype : {"float64", "float32"}
    chunk_rows : int, optional
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
        Shape (n_patches, p*p) for gray patches, sample shape (p, p).
    """
    from sae.preprocess import GRAY_PHOTOGRAPHS, RGB_PHOTOGRAPHS, photographs

    _check_dest(dest, overwrite)
    names = (GRAY_PHOTOGRAPHS + RGB_PHOTOGRAPHS) if gray else RGB_PHOTOGRAPHS
    return _ingest_patches(
        dest,
        photographs(gray=gray),
        patch_size=patch_size,
        n_patches=n_patches,
        seed=seed,
        gray=gray,
        divisor=None,
        source=f"photographs:skimage.data ({', '.join(names)})",
        what="photographs",
        normalize=normalize,
        whiten=whiten,
        epsilon=epsilon,
        k=k,
        dtype=dtype,
        chunk_rows=chunk_rows,
        overwrite=overwrite,
        progress=progress,
    )


def _ingest_patches(
    dest: str | os.PathLike,
    images: list[np.ndarray],
    *,
    patch_size: int,
    n_patches: int,
    seed: int,
    gray: bool,
    divisor: float | None,
    source: str,
    what: str,
    normalize: bool,
    whiten: str | None,
    epsilon: float,
    k: int | None,
    dtype: str,
    chunk_rows: int | None,
    overwrite: bool,
    progress: bool,
) -> DatasetInfo:
    """Random patches of ``images`` (divided by ``divisor``), then the preprocessing steps."""
    n_feat, patch_blocks = _patches(images, patch_size, n_patches, seed, what, divisor=divisor)
    p = int(patch_size)

    def write_raw(path: str, ow: bool) -> DatasetInfo:
        return _write(
            path,
            patch_blocks(),
            n_rows=int(n_patches),
            n_features=n_feat,
            dtype=dtype,
            chunk_rows=chunk_rows,
            sample_shape=(p, p) if gray else (p, p, 3),
            preprocessing={
                "steps": ["patches"],
                "patches": {"patch_size": p, "n_patches": int(n_patches), "seed": seed},
                "gray": gray,
            },
            source=source,
            overwrite=ow,
            what=what,
            progress=progress,
        )

    return _preprocess_pipeline(
        dest,
        write_raw,
        normalize=normalize,
        whiten=whiten,
        epsilon=epsilon,
        k=k,
        dtype=dtype,
        chunk_rows=chunk_rows,
        overwrite=overwrite,
        progress=progress,
    )
