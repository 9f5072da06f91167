"""`sae export` and `sae import`: trained models to and from other tools' file formats.

``sae export MODEL DIR`` writes a one-hidden-layer model (a ``model.npz`` or a job folder) as a
SAELens folder (``cfg.json``, ``sae_weights.safetensors``); ``sae import DIR MODEL_NPZ`` reads
one back as a ``model.npz`` that ``sae encode`` and ``sae reconstruct`` take. The conversions
are :mod:`worker.saelens`'s.
"""

from __future__ import annotations

from pathlib import Path

import click

from service.cli_models import load

FORMATS = ("saelens",)
_DTYPES = ("float32", "float64", "float16", "bfloat16")


_format_opt = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="saelens",
    show_default=True,
    help="File format",
)


@click.command("export")
@click.argument("model")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@_format_opt
@click.option(
    "--dtype",
    type=click.Choice(_DTYPES),
    default="float32",
    show_default=True,
    help="dtype of the written tensors (and of the SAELens config)",
)
@click.option("--model-name", default=None, help="SAELens metadata: the model the inputs came from")
@click.option("--hook-name", default=None, help="SAELens metadata: the hook the inputs came from")
@click.option("--overwrite", is_flag=True, help="Replace the files of a non-empty DIR")
def export_cmd(model, folder, fmt, dtype, model_name, hook_name, overwrite):
    """Write MODEL (a model.npz or a job folder) to DIR in another tool's format.

    SAELens: "relu-l1" dictionaries as architecture "standard", "topk" ones as "topk" (with
    k), with the decoder the model computes with (unit-norm columns where trained so).
    """
    from worker.saelens import export_saelens

    net, theta, meta = load(model)
    try:
        out = export_saelens(
            net,
            theta,
            folder,
            meta=meta,
            dtype=dtype,
            model_name=model_name,
            hook_name=hook_name,
            overwrite=overwrite,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    arch = "topk" if net.kind == "topk" else "standard"
    click.echo(
        f"wrote {out}: SAELens '{arch}' SAE, d_in={net.sizes[0]}, d_sae={net.sizes[1]} ({dtype})"
    )


@click.command("import")
@click.argument("folder", metavar="DIR")
@click.argument("model_npz", type=click.Path(dir_okay=False))
@_format_opt
def import_cmd(folder, model_npz, fmt):
    """Read DIR (a SAELens folder) and write it as MODEL_NPZ for `sae encode`/`reconstruct`."""
    from worker.saelens import import_to_model

    path = Path(model_npz)
    if path.suffix != ".npz":
        raise click.ClickException(f"MODEL_NPZ: give a file name ending in .npz, got {model_npz}")
    try:
        out = import_to_model(folder, path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    from worker.layout import load_model

    net, _, meta = load_model(out)
    arch = meta["imported"]["architecture"]
    click.echo(
        f"wrote {out}: a '{net.kind}' dictionary from SAELens '{arch}', "
        f"d_in={net.sizes[0]}, d_sae={net.sizes[1]}"
    )


def register(main: click.Group) -> None:
    """Add this module's commands to the `sae` group."""
    main.add_command(export_cmd)
    main.add_command(import_cmd)
