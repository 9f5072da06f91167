"""`sae` commands: train, gradcheck."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import click


def parse_hidden(text: str) -> int | list[int]:
    """``"25"`` -> 25, ``"1000,500,250,30"`` -> [1000, 500, 250, 30]."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(
            f"give a size or comma-separated sizes, got {text!r}", param_hint="--hidden"
        ) from None
    if not sizes:
        raise click.BadParameter("give at least one size", param_hint="--hidden")
    return sizes[0] if len(sizes) == 1 else sizes


def build_spec(**fields):
    """A TrainSpec from CLI values; a validation error becomes a ClickException naming the
    field."""
    from pydantic import ValidationError

    from worker.spec import TrainSpec

    compute = fields.pop("compute", None)
    if compute == "bf16":
        if fields.get("dtype") not in (None, "bfloat16"):
            raise click.UsageError("--compute bf16 computes in bfloat16: do not give --dtype too")
        fields["dtype"] = "bfloat16"
    try:
        return TrainSpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        from service.errors import describe_errors

        msg = describe_errors(exc.errors(), dash=True)
        raise click.ClickException(f"invalid training spec: {msg}") from None


def run_training(
    spec,
    out_dir: str | Path,
    *,
    workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = "auto",
    scheduler: str | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    execution: str = "auto",
    echo: Callable[[str], None] | None = None,
):
    """Train ``spec`` into ``out_dir`` on an embedded cluster (or ``scheduler``); its stages
    run where ``execution`` says (``--plan``: auto, local or distributed).

    Returns
    -------
    worker.train.TrainResult
    """
    from worker.cluster import get_client
    from worker.train import train

    with get_client(
        scheduler=scheduler,
        workers=workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
    ) as (client, _):
        if echo is not None:
            echo(f"Dashboard: {client.dashboard_link}")
        return train(
            spec,
            out_dir,
            client=client,
            on_iteration=on_iteration,
            should_stop=should_stop,
            resume=resume,
            execution=execution,
        )


def progress_callbacks(
    spec, rows: int | None = None
) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """A tqdm bar of iterations (steps, for adam and sgd on ``rows`` rows) and cost:
    ``(on_iteration, close)`` for :func:`run_training`."""
    from tqdm import tqdm

    unit = "step" if spec.is_stochastic else "it"
    bar = tqdm(total=spec.total_iterations(rows), desc="train", unit=unit, dynamic_ncols=True)
    last = {"stage": None, "iteration": 0}

    def on_iteration(entry: dict) -> None:
        stage, it = entry.get("stage"), int(entry["iteration"])
        bar.update(it - (last["iteration"] if stage == last["stage"] else 0))
        last.update(stage=stage, iteration=it)
        postfix = {"cost": f"{entry['cost']:.6g}"}
        if "epoch" in entry:
            postfix["epoch"] = entry["epoch"] + 1
        if stage:
            postfix["stage"] = stage
        bar.set_postfix(postfix)

    return on_iteration, bar.close


def _cluster_options(f):
    for opt in reversed(
        [
            click.option("--workers", type=click.IntRange(1, 256), default=2, show_default=True),
            click.option(
                "--threads-per-worker", type=click.IntRange(1, 256), default=1, show_default=True
            ),
            click.option(
                "--memory-limit",
                default="auto",
                show_default=True,
                help="Per worker, e.g. 2GB",
            ),
            click.option("--scheduler", default=None, help="Address of a running scheduler"),
        ]
    ):
        f = opt(f)
    return f


def _network_options(f):
    acts = click.Choice(["sigmoid", "tanh", "linear", "relu"])
    for opt in reversed(
        [
            click.option("--hidden", default=None, help="25, or 1000,500,250,30 for a deep net"),
            click.option("--lam", type=float, default=None, help="Weight decay [1e-4]"),
            click.option("--rho", type=float, default=None, help="Sparsity target [0.01]"),
            click.option("--beta", type=float, default=None, help="Sparsity weight [3]"),
            click.option("--activation", type=acts, default=None),
            click.option("--output-activation", type=acts, default=None),
            click.option("--passes", type=click.Choice(["two", "fused"]), default=None),
            click.option(
                "--dtype",
                type=click.Choice(["float64", "float32", "bfloat16"]),
                default=None,
                help="Compute dtype [float64]; sums are float64",
            ),
            click.option(
                "--compute",
                type=click.Choice(["bf16"]),
                default=None,
                help="bf16: matrix products in bfloat16 on the CPU's matrix units (needs "
                "PyTorch; same as --dtype bfloat16)",
            ),
            click.option("--seed", type=int, default=None),
            click.option(
                "--kind",
                type=click.Choice(["sigmoid-kl", "relu-l1", "topk"]),
                default=None,
                help="Model kind [sigmoid-kl]: classic sigmoid + KL, ReLU + L1, or TopK",
            ),
            click.option("--l1", type=float, default=None, help="relu-l1: L1 weight [1e-3]"),
            click.option(
                "--l1-weighting",
                type=click.Choice(["none", "decoder-norm"]),
                default=None,
                help="relu-l1: weight L1 by decoder column norms [none]",
            ),
            click.option("--k", type=int, default=None, help="topk: active latents per example"),
            click.option("--k-aux", type=int, default=None, help="topk: AuxK's dead latents"),
            click.option("--aux-coeff", type=float, default=None, help="topk: AuxK weight [1/32]"),
            click.option(
                "--dead-after", type=int, default=None, help="topk, adam/sgd: examples [1 epoch]"
            ),
            click.option(
                "--unit-norm-decoder/--free-decoder",
                default=None,
                help="relu-l1, topk: unit-norm decoder columns [unit]",
            ),
            click.option(
                "--tied-init/--no-tied-init",
                default=None,
                help="relu-l1, topk: W_enc = W_dec^T at the start [tied]",
            ),
            click.option(
                "--init-model",
                type=click.Path(dir_okay=False),
                default=None,
                help="Start from this model.npz (one hidden layer; e.g. from `sae import`)",
            ),
            click.option(
                "--b-dec-init",
                type=click.Choice(["mean", "zeros"]),
                default=None,
                help="relu-l1, topk: start b_dec at the data mean [mean]",
            ),
        ]
    ):
        f = opt(f)
    return f


def _stochastic_options(f):
    """Options of the minibatch optimizers (adam, sgd)."""
    for opt in reversed(
        [
            click.option(
                "--learning-rate", type=float, default=None, help="adam [1e-3], sgd [1e-2]"
            ),
            click.option("--batch-size", type=int, default=None, help="Rows per step [256]"),
            click.option("--epochs", type=int, default=None, help="Epochs per stage [10]"),
            click.option("--finetune-epochs", type=int, default=None, help="Deep: fine-tuning [0]"),
            click.option("--max-steps", type=int, default=None, help="At most, per stage"),
            click.option(
                "--lr-schedule",
                type=click.Choice(["constant", "cosine", "linear"]),
                default=None,
                help="After warmup [constant]",
            ),
            click.option("--warmup-steps", type=int, default=None, help="Linear warmup [0]"),
            click.option("--clip-grad-norm", type=float, default=None, help="Max gradient norm"),
            click.option("--momentum", type=float, default=None, help="sgd [0.9]"),
            click.option("--nesterov/--no-nesterov", default=None, help="sgd [no]"),
            click.option("--adam-beta1", type=float, default=None, help="[0.9]"),
            click.option("--adam-beta2", type=float, default=None, help="[0.999]"),
            click.option("--adam-eps", type=float, default=None, help="[1e-8]"),
            click.option(
                "--sparsity-estimate",
                type=click.Choice(["batch", "ema"]),
                default=None,
                help="rho_hat of each batch [batch] or a running average",
            ),
            click.option("--ema-decay", type=float, default=None, help="[0.99]"),
            click.option(
                "--validation-fraction",
                type=float,
                default=None,
                help="Hold out this share of the chunks (never trained on) for held-out costs",
            ),
            click.option(
                "--validation-dataset",
                default=None,
                help="Held-out costs on this dataset (same width) instead of held-out chunks",
            ),
            click.option(
                "--validate-every",
                type=int,
                default=None,
                help="Steps between held-out costs [100; and at each epoch's end]",
            ),
            click.option(
                "--early-stopping",
                type=int,
                default=None,
                help="End a stage after N held-out costs without a new best (best.npz kept)",
            ),
            click.option(
                "--log-every", type=int, default=None, help="Steps per history entry [10]"
            ),
            click.option("--checkpoint-every", type=int, default=None, help="Steps [100]"),
            click.option("--shuffle-window", type=int, default=None, help="Chunks mixed [4]"),
        ]
    ):
        f = opt(f)
    return f


@click.command("train")
@click.argument("dataset", required=False)
@_network_options
@click.option("--code-activation", type=click.Choice(["sigmoid", "tanh", "linear"]))
@click.option("--optimizer", type=click.Choice(["lbfgs", "cg", "gd", "adam", "sgd"]), default=None)
@click.option("--alpha", type=float, default=None, help="Learning rate of gd")
@click.option("--max-iter", type=int, default=None, help="Iterations (per stage) [400]")
@click.option("--pretrain", type=click.Choice(["previous", "input", "none"]), default=None)
@click.option("--decoder-init", type=click.Choice(["pretrained", "transpose"]), default=None)
@click.option("--finetune-iter", type=int, default=None)
@_stochastic_options
@_cluster_options
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="Job folder")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Continue the job in this folder (its saved spec)",
)
@click.option(
    "--plan",
    type=click.Choice(["auto", "local", "distributed"]),
    default="auto",
    help="Where the stages run [auto: a stage on small data as one task next to them]",
)
def train_cmd(
    dataset, out, resume_dir, workers, threads_per_worker, memory_limit, scheduler, plan, **fields
):
    """Train a sparse (or deep) autoencoder on DATASET."""
    from tqdm import tqdm

    if resume_dir and dataset:
        raise click.UsageError("give a DATASET or --resume DIR, not both")
    if resume_dir:
        from worker import layout

        try:
            saved = layout.read_job(Path(resume_dir))["spec"]
        except FileNotFoundError:
            raise click.ClickException(f"--resume: {resume_dir} holds no {layout.JOB}") from None
        given = {k: v for k, v in fields.items() if v is not None}
        extend = given.pop("max_iter", None)
        if given:
            raise click.ClickException(
                "--resume continues the saved spec (only --max-iter may change); do not give "
                + ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            )
        spec = build_spec(**saved)
        if extend is not None:
            if spec.is_stochastic:
                raise click.ClickException(
                    "--max-iter: adam and sgd jobs run epochs; resume continues them as saved"
                )
            if spec.is_deep:
                raise click.ClickException(
                    "--max-iter: a deep job's stages cannot be extended on resume; train a new "
                    "job (its pretraining can start from this one's model)"
                )
            spec = build_spec(**{**saved, "max_iter": extend})
        out = resume_dir
        done = _finished(spec, Path(resume_dir))
        if done is not None:
            click.echo(f"nothing to do: {done}")
            return
    else:
        if not dataset:
            raise click.UsageError("give a DATASET (or --resume DIR)")
        if fields.get("hidden") is not None:
            fields["hidden"] = parse_hidden(fields["hidden"])
        spec = build_spec(dataset=dataset, **fields)
        out = out or f"runs/{Path(dataset).name}-{spec.hidden_sizes[-1]}"
    from worker.schedule import check_job

    try:  # before a cluster starts: a missing dataset or a bad spec is reported at once
        info = check_job(spec, execution=plan)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    from worker.schedule import training_rows

    on_iteration, close_bar = progress_callbacks(spec, training_rows(spec, info))
    try:
        result = run_training(
            spec,
            out,
            workers=workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            scheduler=scheduler,
            on_iteration=on_iteration,
            resume=bool(resume_dir),
            execution=plan,
            echo=lambda s: tqdm.write(s),
        )
    except (ValueError, RuntimeError, FloatingPointError, OSError, TimeoutError) as exc:
        close_bar()  # OSError: an unreachable --scheduler, or the job folder
        raise click.ClickException(str(exc)) from None
    close_bar()
    work = (
        f"{result.iterations} steps"
        if spec.is_stochastic
        else f"{result.iterations} iterations, {result.evaluations} evaluations"
    )
    cost = "n/a" if result.final_cost is None else f"{result.final_cost:.6g}"
    click.echo(
        f"{result.status}: {work}, cost {cost}, {result.seconds:.1f} s "
        f"({result.execution} execution)"
    )
    click.echo(f"Outputs in {result.out_dir}:")
    for p in (result.model_path, result.history_path, result.filters_path, result.cost_path):
        if p is not None and Path(p).exists():
            click.echo(f"  {p}")


def _finished(spec, out: Path) -> str | None:
    """Why resuming the one-layer job in ``out`` up to ``spec.max_iter`` would do nothing
    (its last checkpoint already meets a stopping test), or None."""
    from sae.optimize import FAILED, OptimizerState, stop_reason
    from worker.layout import STATE

    if spec.is_deep or not (out / STATE).exists():
        return None
    if spec.is_stochastic:
        return _finished_steps(spec, out)
    try:
        state = OptimizerState.load(out / STATE)
    except (OSError, ValueError):
        return None  # the run reports what is wrong with it
    if state.J is None:
        return None
    if state.status in FAILED:
        return f"{out} ended at iteration {state.iteration} with {state.status}: {state.message}"
    reason = stop_reason(state, spec.max_iter)
    if reason is None:
        return None
    status, message = reason
    hint = (
        f"; give --max-iter above {state.iteration} to train further"
        if status == "max_iter"
        else ""
    )
    return f"{out} finished at iteration {state.iteration} ({message}){hint}"


def _finished_steps(spec, out: Path) -> str | None:
    """Why resuming the one-layer adam or sgd job in ``out`` would do nothing (its checkpoint
    holds all its steps, or it stopped early), or None."""
    from sae.optimize.stochastic import StochasticState
    from worker.dataset import DatasetError, open_dataset
    from worker.layout import STATE
    from worker.schedule import training_rows

    try:
        state = StochasticState.load(out / STATE)
        steps = spec.stage_iterations(training_rows(spec, open_dataset(spec.dataset)))
    except (OSError, ValueError, DatasetError):
        return None  # the run reports what is wrong
    stale = spec.early_stopping is not None and state.stale >= spec.early_stopping
    if state.step < steps and not stale:
        return None
    why = "early stopping" if stale and state.step < steps else f"all {steps} steps"
    return f"{out} finished at step {state.step} ({why})"


@click.command("gradcheck")
@click.argument("dataset")
@_network_options
@click.option("--n-coords", type=click.IntRange(1), default=20, show_default=True)
@click.option("--epsilon", type=float, default=1e-4, show_default=True)
@_cluster_options
def gradcheck_cmd(
    dataset, n_coords, epsilon, workers, threads_per_worker, memory_limit, scheduler, **fields
):
    """Check the distributed gradient on DATASET against central differences."""
    from sae.gradcheck import check_gradient
    from worker import schedule
    from worker.cluster import get_client
    from worker.dataset import DatasetError, open_dataset
    from worker.engine import DistributedObjective

    if fields.get("hidden") is not None:
        fields["hidden"] = parse_hidden(fields["hidden"])
    spec = build_spec(dataset=dataset, **fields)
    if spec.dtype == "bfloat16":
        raise click.ClickException(
            "dtype: gradcheck needs float64 or float32: bfloat16 rounds the weights in every "
            "product, which swamps central differences (check with --dtype float32)"
        )
    try:
        info = open_dataset(dataset)
        net = schedule.network(spec, info.shape[1])  # what the job trains in the end
    except (DatasetError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    theta = net.init_theta(spec.seed)
    stack = contextlib.ExitStack()
    try:
        client, _ = stack.enter_context(
            get_client(
                scheduler=scheduler,
                workers=workers,
                threads_per_worker=threads_per_worker,
                memory_limit=memory_limit,
            )
        )
    except (OSError, TimeoutError) as exc:  # an unreachable --scheduler
        raise click.ClickException(str(exc)) from None
    with stack:
        click.echo(f"Dashboard: {client.dashboard_link}")
        f = DistributedObjective(
            client, dataset, net, passes=spec.passes, dtype=spec.dtype, job="gradcheck"
        )
        try:
            diff = check_gradient(f, theta, epsilon=epsilon, n_coords=n_coords, seed=spec.seed)
        except (ValueError, RuntimeError, FloatingPointError) as exc:
            raise click.ClickException(str(exc)) from None
    k = min(n_coords, net.n_params)
    click.echo(
        f"relative difference over {k} of {net.n_params} coordinates "
        f"({f.n_evals} distributed evaluations): {diff:.3e}"
    )
    ok = diff < (1e-6 if spec.dtype == "float64" else 1e-2)
    click.echo("gradient OK" if ok else "gradient MISMATCH")
    if not ok:
        raise SystemExit(1)


def register(main: click.Group) -> None:
    """Add this module's commands to the `sae` group."""
    main.add_command(train_cmd)
    main.add_command(gradcheck_cmd)
