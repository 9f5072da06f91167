"""Ingest pictures: folders of image files and the photographs scikit-image ships.

Whole images (one example each, streamed one by one) or random square patches (drawn in
blocks of at most :data:`PATCH_BLOCK`, so a large patch set is never in memory whole), written
by :mod:`worker.ingest` and then, if asked, normalised and whitened out-of-core
(:mod:`worker.preprocessing`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from worker.dataset import DatasetInfo, check_compression, default_chunk_rows
from worker.ingest import _check_dest, _write
from worker.preprocessing import _preprocess_pipeline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")

__all__ = ["IMAGE_SUFFIXES", "ingest_images", "ingest_photographs"]


# ---------------------------------------------------------------------------------------------
# image files


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
    compression: str = "auto",
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
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
    """
    check_compression(compression)
    folder = Path(src_folder)
    files = _image_files(folder)
    _check_dest(dest, overwrite)
    if patch_size is not None:
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
            compression=compression,
            overwrite=overwrite,
            progress=progress,
        )
    return _preprocess_pipeline(
        dest,
        _whole_images_writer(folder, files, gray, chunk_rows, compression, progress),
        normalize=normalize,
        whiten=whiten,
        epsilon=epsilon,
        k=k,
        dtype=dtype,
        chunk_rows=chunk_rows,
        compression=compression,
        overwrite=overwrite,
        progress=progress,
    )


def _whole_images_writer(
    folder: Path,
    files: list[Path],
    gray: bool,
    chunk_rows: int | None,
    compression: str,
    progress: bool,
) -> Callable[[str, bool], DatasetInfo]:
    """``write_raw(path, overwrite)`` writing every image as one example (uint8, scale 1/255).

    The first image is read now: it sets the size every image must have.
    """
    first = _read_image(files[0], gray)
    shape = first.shape
    n = math.prod(shape)
    rows = chunk_rows or default_chunk_rows(n, "uint8")

    def write_raw(path: str, ow: bool) -> DatasetInfo:
        return _write(
            path,
            _whole_image_blocks(files, first, gray, rows),
            n_rows=len(files),
            n_features=n,
            dtype="uint8",
            scale=1.0 / 255.0,
            chunk_rows=rows,
            compression=compression,
            sample_shape=shape,
            preprocessing={"steps": ["scale"], "scale": 1.0 / 255.0, "gray": gray},
            source=f"images:{folder.name} ({len(files)} files)",
            overwrite=ow,
            what=str(folder),
            progress=progress,
        )

    return write_raw


def _whole_image_blocks(
    files: list[Path], first: np.ndarray, gray: bool, rows: int
) -> Iterator[np.ndarray]:
    """Blocks of ``rows`` images (``first`` is that of ``files[0]``), one flattened per row."""
    shape = first.shape
    n = math.prod(shape)
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


# ---------------------------------------------------------------------------------------------
# random patches


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
    compression: str = "auto",
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
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
    overwrite, progress : bool

    Returns
    -------
    info : DatasetInfo
        Shape (n_patches, p*p) for gray patches, sample shape (p, p).
    """
    check_compression(compression)
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
        compression=compression,
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
    compression: str,
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
            compression=compression,
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
        compression=compression,
        overwrite=overwrite,
        progress=progress,
    )
