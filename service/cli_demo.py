"""`sae demo`: the UFLDL natural-image exercise, end to end, with nothing to download."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="sae-demo",
    show_default=True,
    help="Folder for the patches dataset and the results",
)
@click.option(
    "--n-patches", type=click.IntRange(100, 10_000_000), default=10_000, show_default=True
)
@click.option("--max-iter", type=click.IntRange(0, 100_000), default=400, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def demo_cmd(out: str, n_patches: int, max_iter: int, workers: int, seed: int) -> None:
    """Learn edge detectors from 8x8 patches of the photographs scikit-image ships.

    Samples 10,000 8x8 patches, applies the UFLDL normalisation, and trains the 64-25 sparse
    autoencoder (rho 0.01, lambda 1e-4, beta 3, 400 L-BFGS iterations) on an embedded Dask
    cluster. Writes filters.png, model.npz and history.json.
    """
    from service.cli_train import build_spec, progress_callbacks, run_training
    from worker.images import ingest_photographs

    root = Path(out)
    data = root / "patches.zarr"
    click.echo(f"Sampling {n_patches} 8x8 patches from scikit-image's photographs -> {data}")
    ingest_photographs(
        data, patch_size=8, n_patches=n_patches, normalize=True, seed=seed, overwrite=True
    )
    spec = build_spec(
        dataset=str(data),
        hidden=25,
        lam=1e-4,
        rho=0.01,
        beta=3.0,
        activation="sigmoid",
        optimizer="lbfgs",
        max_iter=max_iter,
        seed=seed,
    )
    run = root / "run"
    on_iteration, close = progress_callbacks(spec)
    try:
        result = run_training(
            spec, run, workers=workers, on_iteration=on_iteration, echo=click.echo
        )
    finally:
        close()
    click.echo(f"Final cost {result.final_cost:.6g} after {result.iterations} iterations")
    for name in ("filters.png", "model.npz", "history.json", "cost.png"):
        path = run / name
        if path.exists():
            click.echo(f"  {path}")


def register(main: click.Group) -> None:
    """Add ``sae demo`` to the ``sae`` group."""
    main.add_command(demo_cmd)
