"""`sae` commands on trained models: encode, reconstruct, evaluate.

``encode`` and ``reconstruct`` stream over the dataset's chunks (one chunk in memory at a
time) and write ``OUT.npy`` incrementally through a memory map, atomically (a temporary file
renamed at the end). ``evaluate`` streams the chunks into metric sums (in this process, or
on a Dask scheduler) and prints the metrics. They work for every ``model.npz`` written by
``sae train``: one-layer sparse autoencoders, dictionaries (relu-l1, topk) and deep
(unrolled) autoencoders alike.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np


def resolve_model(model: str | os.PathLike) -> Path:
    """``MODEL`` as given, or ``MODEL/model.npz`` for a job folder."""
    p = Path(model)
    if p.is_dir():
        p = p / "model.npz"
    if not p.exists():
        raise click.ClickException(f"MODEL: {model} is neither a model.npz nor a job folder")
    return p


def load(model: str | os.PathLike):
    """``(net, theta, meta)`` of a model file, with a clear error for anything else."""
    from worker.layout import load_model

    path = resolve_model(model)
    try:
        return load_model(path)
    except (OSError, KeyError, ValueError) as exc:
        raise click.ClickException(f"MODEL: {path} is not a readable model.npz ({exc})") from None


def iter_blocks(dataset: str, dtype: str) -> tuple[int, int, Iterator[np.ndarray]]:
    """``(m, n, blocks)``: a Zarr dataset chunk by chunk, or a ``.npy`` file in row blocks."""
    from worker.dataset import ChunkError, DatasetError, open_dataset, read_chunk

    if str(dataset).endswith(".npy"):
        try:
            arr = np.load(dataset, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"DATASET: cannot read {dataset} ({exc})") from None
        if arr.ndim != 2:
            raise click.ClickException(f"DATASET: expected a 2-D array, got shape {arr.shape}")
        rows = max(1, (16 * 2**20) // max(1, arr.shape[1] * 8))

        def gen_npy():
            for s in range(0, arr.shape[0], rows):
                yield np.asarray(arr[s : s + rows], dtype=dtype)

        return arr.shape[0], arr.shape[1], gen_npy()
    try:
        info = open_dataset(dataset)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(f"DATASET: {exc}") from None

    def gen_zarr():
        for i in range(info.n_chunks):
            try:
                yield read_chunk(dataset, i, dtype, info.scale)
            except ChunkError as exc:  # names the chunk
                raise click.ClickException(f"DATASET: {exc}") from None

    return info.shape[0], info.shape[1], gen_zarr()


def stream_to_npy(
    out: str | os.PathLike,
    m: int,
    n_out: int,
    blocks: Iterator[np.ndarray],
    fn: Callable[[np.ndarray], np.ndarray],
    dtype: str,
    progress: bool = True,
    desc: str = "",
) -> Path:
    """Apply ``fn`` to each block and write the rows to ``out`` (shape (m, n_out)) atomically.

    Returns
    -------
    Path of the written file.
    """
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".npy")
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(m, n_out))
        row = 0
        with tqdm(total=m, unit="ex", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for block in blocks:
                res = fn(block)
                mm[row : row + res.shape[0]] = res
                row += res.shape[0]
                bar.update(res.shape[0])
        if row != m:
            raise click.ClickException(f"DATASET: expected {m} rows, read {row}")
        mm.flush()
        del mm
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _check_width(net, n: int, dataset: str) -> None:
    if net.sizes[0] != n:
        raise click.ClickException(
            f"DATASET: {dataset} has {n} features but the model's input layer has "
            f"{net.sizes[0]} units"
        )


_dtype_opt = click.option(
    "--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True
)
_quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar")


@click.command("encode")
@click.argument("model")
@click.argument("dataset")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--layer",
    type=int,
    default=None,
    help="Layer whose activations to write (1-based; default: the code layer)",
)
@_dtype_opt
@_quiet_opt
def encode_cmd(model, dataset, out, layer, dtype, quiet):
    """Write the codes of DATASET under MODEL (model.npz or job folder) to OUT.npy."""
    from sae.deep import encode, n_encoder_layers

    net, theta, _ = load(model)
    k = n_encoder_layers(net) if layer is None else layer
    if not 1 <= k <= net.n_layers:
        raise click.ClickException(
            f"--layer: the model has layers 1..{net.n_layers} "
            f"(code layer {n_encoder_layers(net)}), got {layer}"
        )
    m, n, blocks = iter_blocks(dataset, "float64")
    _check_width(net, n, dataset)
    path = stream_to_npy(
        out,
        m,
        net.sizes[k],
        blocks,
        lambda X: encode(net, theta, X, layer=k),
        dtype,
        not quiet,
        "encode",
    )
    click.echo(f"wrote {path}: {m} x {net.sizes[k]} codes of layer {k} ({dtype})")


@click.command("reconstruct")
@click.argument("model")
@click.argument("dataset")
@click.argument("out", type=click.Path(dir_okay=False))
@_dtype_opt
@_quiet_opt
def reconstruct_cmd(model, dataset, out, dtype, quiet):
    """Write the reconstructions of DATASET under MODEL to OUT.npy, and report the error."""
    from sae.deep import reconstruct

    net, theta, _ = load(model)
    m, n, blocks = iter_blocks(dataset, "float64")
    _check_width(net, n, dataset)
    if net.sizes[-1] != n:
        raise click.ClickException(
            f"MODEL: its output has {net.sizes[-1]} units, not the {n} inputs it would "
            "reconstruct (a pretraining stage of another layer?)"
        )
    err = [0.0]

    def fn(X):
        R = reconstruct(net, theta, X)
        d = R - X
        err[0] += float(np.einsum("ij,ij->", d, d))
        return R

    path = stream_to_npy(out, m, n, blocks, fn, dtype, not quiet, "reconstruct")
    click.echo(
        f"wrote {path}: {m} x {n} reconstructions; squared error per example "
        f"{err[0] / max(m, 1):.6g}"
    )


class ArgumentError(click.ClickException):
    """A bad argument (a missing or unfitting model or dataset): ``Error: MODEL: ...`` and
    exit status 2, as click's own usage errors."""

    exit_code = 2


#: The fields of :mod:`worker.evaluate`'s messages, as the arguments of ``sae evaluate``.
_ARGUMENTS = {"dataset": "DATASET", "model": "MODEL", "threshold": "--threshold"}


def _argument_error(exc: Exception) -> ArgumentError:
    """``exc``'s message with its leading field named as the command's argument."""
    msg = str(exc)
    field, sep, rest = msg.partition(": ")
    if sep and field in _ARGUMENTS:
        return ArgumentError(f"{_ARGUMENTS[field]}: {rest}")
    return ArgumentError(msg)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _number(x, digits: int = 6) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def metrics_table(metrics: dict, model: str | None = None) -> str:
    """The metrics of :func:`worker.evaluate.evaluate` as an aligned two-column table (the
    per-latent density is left out: it is the picture); ``model`` describes the model."""
    m = metrics
    h = m["latents"]
    chunks = "all" if m.get("chunks") is None else m.get("split", "chosen")
    rows = []
    if model is not None:
        rows.append(("model", model))
    rows += [
        ("dataset", f"{m.get('dataset', '')} ({_count(m['n_chunks'], 'chunk')}: {chunks})"),
        ("examples", str(m["examples"])),
        ("mse", f"{_number(m['mse'])} (per element)"),
        ("fvu", _number(m["fvu"])),
        ("explained_variance", _number(m["explained_variance"])),
        ("l0", f"{_number(m['l0'], 4)} of {h} latents"),
        ("dead", f"{m['dead']} of {h} ({100 * m['dead_fraction']:.1f}%)"),
        ("cosine", _number(m["cosine"])),
        ("shrinkage", _number(m["shrinkage"])),
        (
            "active",
            m["active"] + ("" if m["latent_layer"] == 1 else f" (layer {m['latent_layer']})"),
        ),
    ]
    if m.get("zero_norm_examples") or m.get("zero_reconstructions"):
        rows.append(
            (
                "skipped",
                f"{m['zero_norm_examples']} examples of norm 0 (cosine, shrinkage), "
                f"{m['zero_reconstructions']} reconstructions of norm 0 (cosine)",
            )
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@click.command("evaluate")
@click.argument("model")
@click.argument("dataset")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="metrics.json",
    show_default=True,
    help="The metrics as JSON (default: metrics.json in the current directory); the "
    "feature-density histogram density.png is written beside it",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=0.1,
    show_default=True,
    help="sigmoid-kl models: a unit is active when its activation mapped onto [0, 1] exceeds "
    "this (linear units: |a|); relu-l1 and topk latents are active when > 0",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    default="float64",
    show_default=True,
    help="Compute dtype of the forward pass (the sums are float64)",
)
@click.option(
    "--scheduler",
    default=None,
    help="Evaluate on the Dask scheduler at this address (default: in this process, no cluster)",
)
@_quiet_opt
def evaluate_cmd(model, dataset, out, threshold, dtype, scheduler, quiet):
    """Print the metrics of MODEL (a model.npz or a job folder) on DATASET (a Zarr dataset):
    reconstruction error (mse per element, fraction of variance unexplained, explained
    variance, cosine, shrinkage) and sparsity (L0, dead latents), and write them to --out
    with density.png beside it."""
    from worker.dataset import ChunkError, DatasetError, open_dataset
    from worker.evaluate import check_fit, evaluate, write_metrics
    from worker.layout import DENSITY

    try:
        net, theta, _ = load(model)
    except click.ClickException as exc:
        raise ArgumentError(exc.message) from None
    try:
        info = open_dataset(dataset)
        check_fit(net, info.shape[1], dataset)
    except (DatasetError, ValueError, OSError) as exc:
        raise _argument_error(exc) from None
    stack = contextlib.ExitStack()
    client = None
    if scheduler:
        from worker.cluster import get_client

        try:
            client, _ = stack.enter_context(get_client(scheduler=scheduler))
        except (OSError, TimeoutError) as exc:  # an unreachable scheduler
            msg = str(exc).removeprefix("scheduler: ")
            raise ArgumentError(f"--scheduler: {msg}") from None
    with stack:
        from tqdm import tqdm

        bar = tqdm(
            total=info.shape[0],
            unit="ex",
            desc="evaluate",
            disable=quiet or client is not None,
            dynamic_ncols=True,
        )
        try:
            metrics = evaluate(
                net,
                theta,
                dataset,
                client=client,
                dtype=dtype,
                threshold=threshold,
                on_chunk=bar.update,
            )
        except ChunkError as exc:  # names the chunk
            raise click.ClickException(f"DATASET: {exc}") from None
        except ValueError as exc:
            raise _argument_error(exc) from None
        finally:
            bar.close()
    path = Path(out)
    try:
        written = write_metrics(path.parent, metrics, name=path.name)
    except OSError as exc:
        raise ArgumentError(f"--out: cannot write {out} ({exc})") from None
    sizes = "-".join(str(n) for n in net.sizes)
    click.echo(metrics_table(metrics, f"{resolve_model(model)} ({net.kind} {sizes})"))
    click.echo(f"wrote {written} and {written.parent / DENSITY}")


def register(main: click.Group) -> None:
    """Add this module's commands to the `sae` group."""
    main.add_command(encode_cmd)
    main.add_command(reconstruct_cmd)
    main.add_command(evaluate_cmd)
