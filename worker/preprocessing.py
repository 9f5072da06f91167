"""Out-of-core preprocessing of stored datasets: UFLDL normalisation and PCA/ZCA whitening.

Each step reads a stored dataset and writes a new one (:mod:`worker.ingest`); the ingests of
:mod:`worker.images` chain them after writing their raw rows, through hidden scratch datasets.
Each records in the ``preprocessing`` attribute, besides ``value_range`` and ``steps``:

- for UFLDL normalisation, ``normalize: {"pstd": ...}``; for whitening,
  ``whitening: {...}`` with the method and epsilon, and the fitted ``mean``, ``U`` and ``S``
  stored as small Zarr arrays in the group ``whitening/`` of the dataset (see
  :func:`load_whitening`) so new inputs can be whitened the same way.

Normalisation and whitening are fitted out-of-core: the rows are written first, then passes
over the stored chunks accumulate sums (:class:`sae.preprocess.NormalizeStats`,
:class:`sae.preprocess.MomentSums`), and a last pass writes the transformed rows chunk by chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from worker.dataset import (
    DatasetError,
    DatasetInfo,
    _open_array,
    check_compression,
    open_dataset,
    remove_path,
    scratch_path,
)
from worker.ingest import _blocks_of, _check_dest, _write

WHITENING_GROUP = "whitening"

__all__ = ["load_whitening", "normalize_dataset", "whiten_dataset"]


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
    compression: str = "auto",
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
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
        ``preprocessing["normalize"] = {"method": "ufldl", "pstd": pstd}``.
    """
    check_compression(compression)
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
        compression=compression,
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
    compression: str = "auto",
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
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
        Whitened values are not in [0, 1] (see ``preprocessing["value_range"]``): sigmoid output
        units cannot reconstruct them. ZCA keeps the sample shape (its output is in pixel
        space); PCA output has none.
    """
    check_compression(compression)
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
        compression=compression,
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
    compression: str,
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
        current = scratch_path(dest, "raw")
        scratch.append(current)
        write_raw(current, False)
        if normalize:
            nxt = str(dest) if whiten is None else scratch_path(dest, "norm")
            if whiten is not None:
                scratch.append(nxt)
            normalize_dataset(
                current,
                nxt,
                dtype=dtype,
                chunk_rows=chunk_rows,
                compression=compression,
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
                compression=compression,
                overwrite=overwrite,
                progress=progress,
            )
    finally:
        for path in scratch:
            remove_path(path)
        _open_array.cache_clear()
    return open_dataset(dest)
