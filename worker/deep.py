"""Deep autoencoders on the cluster: greedy layer-wise pretraining, then fine-tuning.

:func:`train_deep` runs a deep :class:`~worker.spec.TrainSpec` (``hidden`` a list) as a
sequence of ordinary distributed jobs, each with its own history and checkpoints::

    out_dir/
        job.json            spec, dataset, the plan (sae.deep.DeepPlan) and the stage list
        stage-1/ ...        pretraining stage k: state.npz, history.json, model.npz (the
        stage-K/            stage's own sparse autoencoder), filters.png (stage 1), cost.png,
                            done.json once the stage has finished
        finetune/           the unrolled network trained end to end (same files)
        model.npz           every layer W1..WL, b1..bL from input to output, theta, and the
                            spec (JSON: the TrainSpec, the network dict with each layer's
                            activation, the plan, the code layer)
        history.json        all entries in order, each with "stage": "pretrain k/K" or
                            "finetune" (iterations restart at 0 in each stage)
        filters.png         the first layer's filters
        cost.png            cost per iteration, one line per stage

Resume (``resume=True``) skips the stages that hold ``done.json`` (their parameters are read
back from their model.npz) and continues the unfinished stage from its ``state.npz``, on the
same trajectory.

Where a stage's inputs come from
--------------------------------
Stage k trains on the codes ``a_{k-1}`` of the frozen encoders ``1..k-1``. They are computed
from the raw chunks inside the tasks (``DistributedObjective(encoder=...)``) rather than
written once to a Zarr array, because:

- *Bytes.* Codes of a wide layer are larger than the data: a 1000-unit layer is 4000 bytes
  per example in float32 against 784 for a uint8 MNIST digit, so reading codes costs 5x the
  I/O of reading the raw chunk, on every evaluation, plus an extra copy of that size on disk
  (40 GB for 10 million digits). For ``pretrain="input"`` the task needs the raw chunk as its
  target anyway, so a code array would be read *in addition* to it.
- *Compute.* The frozen forward pass is cheap next to the stages' own work. Measured with
  ``benchmarks/bench_deep_mnist.py --cost`` (784-1000-500-250-30, chunks of 2,000 digits,
  one thread, float64, two passes, best of 7 on a shared 2-core machine), seconds per chunk:

  ==================  ===========  ==========
  stage               encoder fwd  stage eval
  ==================  ===========  ==========
  784-1000-784        -            0.480
  1000-500-1000       0.068        0.282
  500-250-500         0.123        0.113
  250-30-250          0.235        0.008
  ==================  ===========  ==========

  The top stage is dominated by its encoder, but summed over the four stages recomputing adds
  about half of the pretraining compute (0.43 s on top of 0.88 s per chunk; twice that when
  two passes both recompute with no chunk cache): about one extra stage-1 evaluation per
  evaluation (two without the cache), never an order of magnitude; and fine-tuning (the
  whole unrolled stack) costs more than any stage anyway. A Zarr copy would save that
  compute at the price of the I/O and storage above.
- *Memory.* When the stage's inputs fit in the workers' memory, the engine's chunk cache keeps
  the encoded chunks (keyed by the encoder's parameters), so the codes are computed once per
  stage, exactly as a Zarr copy would be, without touching the disk.
- *Simplicity.* No intermediate dataset to name, version, clean up or keep consistent on
  resume: a stage's inputs are a pure function of (dataset, frozen encoder parameters).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sae.deep import DeepPlan
from sae.network import Network
from sae.objective import check_fused
from worker.dataset import open_dataset
from worker.engine import DistributedObjective
from worker.train import (
    COST,
    FILTERS,
    HISTORY,
    JOB,
    MODEL,
    STATE,
    TrainResult,
    load_model,
    optimizer_options,
    read_history,
    save_model,
    train_stage,
    write_json,
)

DONE = "done.json"
FINETUNE = "finetune"

#: Bracketing iterations of the line search in deep stages (the optimizers' default is 10).
#: Measured failure with 10: the top stage of ``pretrain="input"`` on MNIST (32 -> 8 linear
#: -> 784) has ``||grad||_1 = 262`` at its random start, so the first steepest-descent trial
#: step ``min(1, 1/||grad||_1)`` is ~250x shorter than a good one; the search doubles the step
#: per iteration and gave up after 10 with "line search failed along -grad at iteration 0",
#: leaving the stage untrained. With 40 it trains. Searches that succeed within 10 iterations
#: are unchanged (same trajectory).
DEEP_LS_MAXITER = 40


def plan_from_spec(spec, n_visible: int) -> DeepPlan:
    """The :class:`sae.deep.DeepPlan` of a deep TrainSpec for data of ``n_visible`` features.

    Raises
    ------
    ValueError
        Naming the field (``hidden``, ``stages``, ``rho`` ...).
    """
    return DeepPlan(
        n_visible=n_visible,
        hidden=tuple(spec.hidden_sizes),
        activation=spec.activation,
        code_activation=spec.code_activation,
        output_activation=spec.output_activation,
        lam=spec.lam,
        rho=spec.rho,
        beta=spec.beta if spec.rho is not None else 0.0,
        pretrain=spec.pretrain,
        decoder_init=spec.decoder_init,
        stages=getattr(spec, "stages", None),
        finetune_sparse=getattr(spec, "finetune_sparse", False),
    )


def validate_deep(spec, n_visible: int) -> DeepPlan:
    """Check a deep spec against its data; return its plan.

    Catches what the spec alone cannot: a code layer larger than the input, more pretraining
    stages than encoder layers, and (again, for specs built without pydantic) empty or
    non-positive layer sizes.

    Raises
    ------
    ValueError
        Whose message starts with the field's name, e.g. ``"hidden: the code layer (900
        units) is larger than the input (784 features) ..."``.
    """
    return plan_from_spec(spec, n_visible)


def stage_name(plan: DeepPlan, k: int | None) -> str:
    """``"pretrain k/K"`` for stage k, ``"finetune"`` for None."""
    return FINETUNE if k is None else f"pretrain {k}/{plan.n_stages}"


def stage_options(spec) -> dict:
    """Optimizer options of every stage: the spec's, with :data:`DEEP_LS_MAXITER`."""
    options = optimizer_options(spec)
    if spec.optimizer in ("lbfgs", "cg"):
        options.setdefault("ls_maxiter", DEEP_LS_MAXITER)
    return options


def _passes(spec_passes: str, net: Network) -> str:
    """The spec's passes, or "two" where the one-pass form does not apply to ``net``."""
    if spec_passes == "fused":
        try:
            check_fused(net)
        except ValueError:
            return "two"
    return spec_passes


def train_deep(
    spec,
    out_dir,
    *,
    client,
    dataset_path: str | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    refresh_seconds: float = 5.0,
) -> TrainResult:
    """Pretrain a deep autoencoder stage by stage, then fine-tune it, on a Dask cluster.

    Parameters
    ----------
    spec : worker.spec.TrainSpec
        A deep spec (``hidden`` a list); ``max_iter`` iterations per pretraining stage,
        ``finetune_iter`` for fine-tuning (with ``pretrain="none"`` there are no stages and
        only ``finetune_iter`` counts: give it the whole budget to compare fairly).
    out_dir : path
        Job folder (see the module docstring).
    client : distributed.Client
    dataset_path : str, optional
        Default ``spec.dataset``.
    on_iteration : callable, optional
        Called with each history entry (with its ``"stage"``).
    should_stop : callable, optional
        True cancels the job after the current iteration; ``resume`` continues it.
    resume : bool
        Continue from the checkpoints in ``out_dir``.

    Returns
    -------
    worker.train.TrainResult
        ``plan="deep"``; iterations, evaluations and seconds summed over the stages;
        ``final_cost`` of fine-tuning.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = str(dataset_path or spec.dataset)
    info = open_dataset(path)
    plan = validate_deep(spec, info.shape[1])
    if not resume:
        for name in (STATE, HISTORY, MODEL, FILTERS, COST):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        for d in [*out.glob("stage-*"), out / FINETUNE]:
            shutil.rmtree(d, ignore_errors=True)
    job = out.resolve().name or "deep"
    stages = [stage_name(plan, k) for k in range(1, plan.n_stages + 1)] + [FINETUNE]
    metadata = {
        "spec": spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec),
        "dataset": info.to_dict(),
        "sample_shape": list(info.sample_shape) if info.sample_shape else None,
        "deep": plan.to_dict(),
    }
    dashboard = _dashboard(client)
    write_json(
        out / JOB,
        {
            **metadata,
            "plan": "deep",
            "stages": stages,
            "dashboard": dashboard,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed": bool(resume),
        },
    )
    options = stage_options(spec)
    done_history: list[dict] = []
    totals = {"iterations": 0, "evaluations": 0, "seconds": 0.0}

    def run(k: int | None, net: Network, theta0: np.ndarray, objective, max_iter: int):
        """One stage with checkpoints, or its saved result when it has finished."""
        name = stage_name(plan, k)
        sdir = out / (FINETUNE if k is None else f"stage-{k}")
        done = sdir / DONE
        if resume and done.exists():
            summary = json.loads(done.read_text())
            theta = finished_theta(sdir, net)
            hist = read_history(sdir / HISTORY)
            done_history.extend(hist)
            _add(totals, summary)
            return "succeeded", theta, summary
        current = read_history(sdir / HISTORY) if resume else []

        def entry_cb(entry: dict) -> None:
            current[:] = [e for e in current if e["iteration"] < entry["iteration"]] + [entry]
            write_json(out / HISTORY, done_history + current)
            if on_iteration is not None:
                on_iteration(entry)

        res = train_stage(
            net,
            theta0,
            objective(),
            sdir,
            optimizer=spec.optimizer,
            options=options,
            max_iter=max_iter,
            on_iteration=entry_cb,
            should_stop=should_stop,
            resume=resume,
            sample_shape=info.sample_shape if k in (1, None) else None,
            metadata={**metadata, "stage": name},
            refresh_seconds=refresh_seconds,
            write_pictures=k in (1, None),
            entry_extra={"stage": name},
        )
        summary = {k_: v for k_, v in asdict(res).items() if k_ not in ("theta", "history")}
        summary["stage"] = name
        _add(totals, summary)
        done_history.extend(res.history)
        write_json(out / HISTORY, done_history)
        if res.status == "succeeded":
            write_json(done, summary)
        return res.status, res.theta, summary

    def finish(status: str, summary: dict, net=None, theta=None) -> TrainResult:
        write_json(out / HISTORY, done_history)
        if net is not None:
            save_model(out / MODEL, net, theta, {**metadata, "stages": stages})
            from sae.display import save_filters_png

            W1 = net.unpack(theta)[0][0]
            save_filters_png(W1, info.sample_shape, out / FILTERS)
        if done_history:
            from sae.display import save_cost_png

            save_cost_png(done_history, out / COST)
        return TrainResult(
            status=status,
            out_dir=out,
            model_path=out / MODEL,
            history_path=out / HISTORY,
            state_path=out / FINETUNE / STATE,
            job_path=out / JOB,
            filters_path=(out / FILTERS) if (out / FILTERS).exists() else None,
            cost_path=(out / COST) if (out / COST).exists() else None,
            final_cost=summary.get("cost"),
            iterations=totals["iterations"],
            evaluations=totals["evaluations"],
            seconds=totals["seconds"],
            plan="deep",
            dashboard=dashboard,
            message=f"{summary.get('stage')}: {summary.get('message', '')}",
        )

    stage_thetas: list[np.ndarray] = []
    for k in range(1, plan.n_stages + 1):
        sn = plan.stage_network(k)
        enc = plan.stage_encoder(stage_thetas, k)
        target = plan.stage_target(k)

        def objective(sn=sn, enc=enc, target=target, k=k):
            return DistributedObjective(
                client,
                path,
                sn,
                passes=_passes(spec.passes, sn),
                dtype=spec.dtype,
                encoder=enc,
                target=target,
                job=f"{job}-stage{k}",
                should_stop=should_stop,
            )

        status, theta, summary = run(k, sn, sn.init_theta(spec.seed + k), objective, spec.max_iter)
        if status != "succeeded":
            return finish(status, summary)
        stage_thetas.append(theta)

    net = plan.network()
    theta0 = plan.assemble(stage_thetas, seed=spec.seed)

    def ft_objective():
        return DistributedObjective(
            client,
            path,
            net,
            passes=_passes(spec.passes, net),
            dtype=spec.dtype,
            job=f"{job}-finetune",
            should_stop=should_stop,
        )

    status, theta, summary = run(None, net, theta0, ft_objective, spec.finetune_iter)
    if status != "succeeded":
        return finish(status, summary)
    return finish(status, summary, net, theta)


class CheckpointError(RuntimeError):
    """A finished stage's parameters cannot be read back on resume (the message names the
    files)."""


def finished_theta(sdir: Path, net: Network) -> np.ndarray:
    """The parameters of a finished stage, for resume.

    Read from the stage's ``state.npz`` (fsynced by ``OptimizerState.save`` before
    ``done.json`` is written, and holding the final theta), else from its ``model.npz``
    (written without fsync: after a power loss it may be stale or torn).

    Raises
    ------
    CheckpointError
        If neither file holds ``net.n_params`` readable parameters.
    """
    from sae.optimize import OptimizerState

    reasons = []
    try:
        theta = np.asarray(OptimizerState.load(sdir / STATE).theta, dtype=np.float64)
        if theta.shape == (net.n_params,):
            return theta
        reasons.append(f"{STATE} holds {theta.shape[0]} parameters, not {net.n_params}")
    except Exception as exc:  # noqa: BLE001 - any unreadable state: try model.npz
        reasons.append(f"{STATE}: {type(exc).__name__}: {exc}")
    try:
        _, theta, _ = load_model(sdir / MODEL)
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape == (net.n_params,):
            return theta
        reasons.append(f"{MODEL} holds {theta.shape[0]} parameters, not {net.n_params}")
    except Exception as exc:  # noqa: BLE001 - reported below with the file's name
        reasons.append(f"{MODEL}: {type(exc).__name__}: {exc}")
    raise CheckpointError(
        f"resume: the finished stage in {sdir} cannot be read back ({'; '.join(reasons)}); "
        f"remove {sdir / DONE} to train that stage again, or start without resume"
    )


def _add(totals: dict, summary: dict) -> None:
    totals["iterations"] += int(summary.get("iterations", 0))
    totals["evaluations"] += int(summary.get("evaluations", 0))
    totals["seconds"] += float(summary.get("seconds", 0.0))


def _dashboard(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a scheduler without a dashboard
        return None
