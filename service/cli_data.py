"""`sae` commands: data (`sae ingest ...`, `sae datasets info PATH`)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from worker.dataset import DatasetError, DatasetInfo, open_dataset, stored_compression

_MB = 2**20


def _sample_shape(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    """Parse ``28x28`` / ``28,28`` / ``8x8x3``."""
    if value is None:
        return None
    try:
        shape = tuple(int(p) for p in value.replace(",", "x").lower().split("x") if p.strip())
    except ValueError:
        raise click.BadParameter(f"expected sizes like 28x28, got {value!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"expected positive sizes like 28x28, got {value!r}")
    return shape


def _disk_bytes(path: str) -> int | None:
    """Bytes on disk of a local dataset (compressed chunks), None for remote ones."""
    if "://" in path and not path.startswith("file://"):
        return None
    root = Path(path.removeprefix("file://"))
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            total += (Path(dirpath) / f).stat().st_size
    return total


def format_info(info: DatasetInfo) -> str:
    """A human-readable description of a dataset (shape, dtype, chunks, size, preprocessing)."""
    m, n = info.shape
    last = m - (info.n_chunks - 1) * info.chunk_rows if info.n_chunks else 0
    lines = [
        f"dataset:       {info.path}",
        f"shape:         {m} x {n} (examples x features)",
        f"dtype:         {info.dtype}"
        + (f" (values = stored * scale, scale {info.scale:.6g})" if info.scale != 1.0 else "")
        + (" (read as float32 or float64)" if info.dtype in ("float16", "bfloat16") else ""),
        f"chunks:        {info.n_chunks} chunk{'s' if info.n_chunks != 1 else ''} of "
        f"{info.chunk_rows} rows"
        + (f" (last one {last})" if info.n_chunks and last != info.chunk_rows else ""),
        f"size:          {info.nbytes / _MB:.2f} MB uncompressed"
        + (
            f", {disk / _MB:.2f} MB on disk" if (disk := _disk_bytes(info.path)) is not None else ""
        ),
        f"compression:   {stored_compression(info.path)}",
        "sample shape:  "
        + ("x".join(str(d) for d in info.sample_shape) if info.sample_shape else "none"),
    ]
    pre = dict(info.preprocessing)
    if "value_range" in pre:
        lo, hi = pre.pop("value_range")
        lines.append(f"value range:   [{lo:.6g}, {hi:.6g}]")
    steps = pre.pop("steps", None)
    lines.append("preprocessing: " + (", ".join(steps) if steps else "none"))
    for key, value in pre.items():
        lines.append(f"  {key}: {json.dumps(value)}")
    if info.source:
        lines.append(f"source:        {info.source}")
    return "\n".join(lines)


def _run(fn: Callable[..., DatasetInfo], *args: Any, **kwargs: Any) -> None:
    """Call an ingest function; turn expected failures into clean click errors; print info."""
    try:
        info = fn(*args, **kwargs)
    except (DatasetError, ValueError, FileNotFoundError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {info.path}")
    click.echo(format_info(info))


def _common(f: Callable) -> Callable:
    """Options every ingest command has."""
    f = click.option("--overwrite", is_flag=True, help="Replace an existing dataset at DEST.")(f)
    f = click.option(
        "--chunk-rows",
        type=click.IntRange(min=1),
        default=None,
        help="Rows per chunk (default: about 16 MB per chunk).",
    )(f)
    f = click.option(
        "--compression",
        type=click.Choice(["auto", "zstd", "none"]),
        default="auto",
        show_default=True,
        help="Codec of the chunks: auto compresses uint8 pixels with Zstandard and leaves "
        "floats raw (they read ~5x faster; zstd saves 10-20% of their bytes).",
    )(f)
    f = click.option("--progress/--no-progress", default=True, help="Progress bar on a terminal.")(
        f
    )
    return f


def _preprocess(f: Callable, normalize_default: bool) -> Callable:
    """Options of the picture commands: patches, normalisation, whitening."""
    f = click.option("--seed", type=int, default=0, show_default=True, help="Patch sampler seed.")(
        f
    )
    f = click.option(
        "--k",
        "k",
        type=click.IntRange(min=1),
        default=None,
        help="PCA whitening: number of components kept (default all).",
    )(f)
    f = click.option(
        "--epsilon",
        type=click.FloatRange(min=0),
        default=0.1,
        show_default=True,
        help="Whitening regulariser added to the eigenvalues.",
    )(f)
    f = click.option(
        "--whiten",
        type=click.Choice(["zca", "pca"]),
        default=None,
        help="Whitening fitted out-of-core (after normalisation). Whitened data is not in "
        "[0, 1]: train it with linear output units.",
    )(f)
    f = click.option(
        "--normalize/--no-normalize",
        default=normalize_default,
        show_default=True,
        help="UFLDL normalisation: remove each patch's mean, truncate to 3 std, map to [0.1, 0.9].",
    )(f)
    f = click.option("--gray/--color", default=True, show_default=True, help="Grayscale or RGB.")(f)
    f = click.option(
        "--dtype",
        type=click.Choice(["float64", "float32"]),
        default="float64",
        show_default=True,
        help="Stored dtype of patches / preprocessed data.",
    )(f)
    return f


def register(main: click.Group) -> None:
    """Add this module's commands to the `sae` group."""

    @main.group()
    def ingest() -> None:
        """Write a dataset (Zarr, chunked by rows) from MNIST, .npy, activations, images or
        photographs.

        DEST is a local path or an fsspec URL (file:///..., s3://...). Writing is atomic:
        a failed ingest leaves nothing at DEST.
        """

    @ingest.command("mnist")
    @click.argument("src", type=click.Path(exists=True, dir_okay=False))
    @click.argument("dest")
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="First N examples.")
    @_common
    def ingest_mnist(src, dest, limit, chunk_rows, compression, overwrite, progress) -> None:
        """Write a dataset from an MNIST IDX file SRC (gzip or raw): uint8 pixels, scale 1/255."""
        from worker.array_files import ingest_idx

        _run(
            ingest_idx,
            src,
            dest,
            chunk_rows=chunk_rows,
            compression=compression,
            overwrite=overwrite,
            limit=limit,
            progress=progress,
        )

    @ingest.command("npy")
    @click.argument("src", type=click.Path(exists=True, dir_okay=False))
    @click.argument("dest")
    @click.option(
        "--dtype",
        type=click.Choice(["uint8", "float32", "float64"]),
        default=None,
        help="Stored dtype (default: uint8 stays uint8, float64 stays, others float32).",
    )
    @click.option(
        "--scale",
        type=click.FloatRange(min=0, min_open=True),
        default=1.0,
        show_default=True,
        help="Values = stored * scale (e.g. 0.00392156862745098 = 1/255 for pixels).",
    )
    @click.option(
        "--sample-shape",
        callback=_sample_shape,
        default=None,
        help="Shape of one example, e.g. 28x28 (default: the array's trailing dimensions).",
    )
    @_common
    def ingest_npy_cmd(
        src, dest, dtype, scale, sample_shape, chunk_rows, compression, overwrite, progress
    ) -> None:
        """Write a dataset from a .npy file SRC of shape (m, n) or (m, *sample_shape).

        The file is memory-mapped and written chunk by chunk, so it may exceed memory.
        """
        from worker.array_files import ingest_npy

        _run(
            ingest_npy,
            src,
            dest,
            dtype=dtype,
            scale=scale,
            sample_shape=sample_shape,
            chunk_rows=chunk_rows,
            compression=compression,
            overwrite=overwrite,
            progress=progress,
        )

    @ingest.command("activations")
    @click.argument("src", type=click.Path())
    @click.argument("dest")
    @click.option(
        "--storage",
        type=click.Choice(["float16", "bfloat16", "float32", "float64"]),
        default=None,
        help="Stored dtype, rounded to nearest (default: the shards' own float type). "
        "float16/bfloat16 halve the bytes read per epoch; training still computes in "
        "float32/float64.",
    )
    @click.option(
        "--key",
        default=None,
        metavar="NAME",
        help="Tensor to read from each .safetensors file (needed when one holds several).",
    )
    @_common
    def ingest_activations_cmd(
        src, dest, storage, key, chunk_rows, compression, overwrite, progress
    ) -> None:
        """Write one dataset from the activations in SRC: a folder of .npy or .safetensors
        shards (in natural order: shard_2 before shard_10), or one such file.

        Each shard holds a float tensor of shape (rows, d) or (..., d), e.g. (batch, seq,
        d_model); leading dimensions are flattened into rows. Shards are streamed a block of
        rows at a time, so the total may exceed memory.
        """
        from worker.activations import ingest_activations

        _run(
            ingest_activations,
            src,
            dest,
            storage=storage,
            key=key,
            chunk_rows=chunk_rows,
            compression=compression,
            overwrite=overwrite,
            progress=progress,
        )

    @ingest.command("images")
    @click.argument("folder", type=click.Path(exists=True, file_okay=False))
    @click.argument("dest")
    @click.option(
        "--patch-size",
        type=click.IntRange(min=1),
        default=None,
        help="Draw random square patches of this side (default: whole images, one size).",
    )
    @click.option("--n-patches", type=click.IntRange(min=1), default=10000, show_default=True)
    @functools.partial(_preprocess, normalize_default=False)
    @_common
    def ingest_images_cmd(
        folder,
        dest,
        patch_size,
        n_patches,
        dtype,
        gray,
        normalize,
        whiten,
        epsilon,
        k,
        seed,
        chunk_rows,
        compression,
        overwrite,
        progress,
    ) -> None:
        """Write a dataset from the images (PNG, JPEG, ...) in FOLDER: whole images or patches."""
        from worker.images import ingest_images

        _run(
            ingest_images,
            folder,
            dest,
            patch_size=patch_size,
            n_patches=n_patches,
            gray=gray,
            normalize=normalize,
            whiten=whiten,
            epsilon=epsilon,
            k=k,
            seed=seed,
            dtype=dtype,
            chunk_rows=chunk_rows,
            compression=compression,
            overwrite=overwrite,
            progress=progress,
        )

    @ingest.command("photographs")
    @click.argument("dest")
    @click.option("--patch-size", type=click.IntRange(min=1), default=8, show_default=True)
    @click.option("--n-patches", type=click.IntRange(min=1), default=10000, show_default=True)
    @functools.partial(_preprocess, normalize_default=True)
    @_common
    def ingest_photographs_cmd(
        dest,
        patch_size,
        n_patches,
        dtype,
        gray,
        normalize,
        whiten,
        epsilon,
        k,
        seed,
        chunk_rows,
        compression,
        overwrite,
        progress,
    ) -> None:
        """Write random patches of the photographs scikit-image ships (the `sae demo` data).

        Default: 10,000 8x8 grayscale patches normalised to [0.1, 0.9], as in CS294A.
        """
        from worker.images import ingest_photographs

        _run(
            ingest_photographs,
            dest,
            patch_size=patch_size,
            n_patches=n_patches,
            gray=gray,
            normalize=normalize,
            whiten=whiten,
            epsilon=epsilon,
            k=k,
            seed=seed,
            dtype=dtype,
            chunk_rows=chunk_rows,
            compression=compression,
            overwrite=overwrite,
            progress=progress,
        )

    @main.group()
    def datasets() -> None:
        """Inspect datasets."""

    @datasets.command("info")
    @click.argument("path")
    @click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
    def datasets_info(path, as_json) -> None:
        """Print shape, dtype, chunks, size, sample shape and preprocessing of PATH."""
        try:
            info = open_dataset(path)
        except (DatasetError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            out = {**info.to_dict(), "compression": stored_compression(info.path)}
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo(format_info(info))
