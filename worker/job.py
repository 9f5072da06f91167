"""One job loop: run a spec's schedule of stages, one stage after another.

A one-layer job is a schedule of one stage whose folder is the job folder; a deep job is K
pretraining stages and a fine-tuning stage, each in its own folder, with the job's history,
model, filters and cost curve gathered at the job's root (:mod:`worker.layout`). Each stage
runs where its execution says (:mod:`worker.execution`).

Resume skips the stages that hold ``done.json`` (their parameters are read back) and continues
the unfinished stage from its ``state.npz``, on the same trajectory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae.network import Network
from worker import layout
from worker.cluster import dashboard_link
from worker.execution import STRATEGIES
from worker.schedule import ExecutionChoice, Schedule, check_job, open_validation
from worker.spec import TrainSpec
from worker.stage import Hooks, Stage, StageResult, save_cost, save_filters


@dataclass
class TrainResult:
    """What a job ends with.

    Attributes
    ----------
    status : {"succeeded", "cancelled"}
    out_dir : Path
    model_path, history_path, state_path, job_path : Path
    filters_path, cost_path : Path or None
    final_cost : float or None
        Cost of the last stage that ran.
    iterations, evaluations : int
        Summed over the stages.
    seconds : float
        Training time summed over the stages (including earlier runs of a resumed job).
    execution : str
        Where the stages ran: ``"local"``, ``"distributed"``, or both joined by ``"+"``.
    dashboard : str or None
    message : str
        The last stage's stopping reason (after its label for a deep job).
    metrics : dict or None
        The final model's metrics (:func:`worker.evaluate.evaluate_job`, also in
        ``metrics.json``) of a job that succeeded; None otherwise.
    """

    status: str
    out_dir: Path
    model_path: Path
    history_path: Path
    state_path: Path
    job_path: Path
    filters_path: Path | None
    cost_path: Path | None
    final_cost: float | None
    iterations: int
    evaluations: int
    seconds: float
    execution: str
    dashboard: str | None = None
    message: str = ""
    metrics: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


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
    readers = (
        (layout.STATE, lambda: OptimizerState.load(sdir / layout.STATE).theta),
        (layout.MODEL, lambda: layout.load_model(sdir / layout.MODEL)[1]),
    )
    for name, read in readers:
        try:
            theta = np.asarray(read(), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: try the next
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if theta.shape == (net.n_params,):
            return theta
        reasons.append(f"{name} holds {theta.shape[0]} parameters, not {net.n_params}")
    raise CheckpointError(
        f"resume: the finished stage in {sdir} cannot be read back ({'; '.join(reasons)}); "
        f"remove {sdir / layout.DONE} to train that stage again, or start without resume"
    )


class JobHistory:
    """The job's history.json of a multi-stage job: the entries of the finished stages, then
    those of the running one (each stage also keeps its own)."""

    def __init__(self, root: Path) -> None:
        self.path = root / layout.HISTORY
        self.done: list[dict] = []
        self.current: list[dict] = []

    def start(self, stage: Stage, resume: bool) -> None:
        """A stage begins (with its own entries so far when it resumes)."""
        self.current = layout.read_history(stage.folder / layout.HISTORY) if resume else []

    def add(self, entry: dict) -> None:
        """An entry of the running stage."""
        kept = [e for e in self.current if e["iteration"] < entry["iteration"]]
        self.current = [*kept, entry]
        layout.write_json(self.path, self.done + self.current)

    def finish(self, entries: list[dict]) -> None:
        """A stage ended with ``entries``."""
        self.done.extend(entries)
        self.current = []
        layout.write_json(self.path, self.done)


@dataclass
class _Totals:
    iterations: int = 0
    evaluations: int = 0
    seconds: float = 0.0

    def add(self, summary: dict) -> None:
        self.iterations += int(summary.get("iterations", 0))
        self.evaluations += int(summary.get("evaluations", 0))
        self.seconds += float(summary.get("seconds", 0.0))


def write_job_file(
    root: Path, schedule: Schedule, dashboard: str | None, resume: bool
) -> list[str]:
    """Write ``job.json``; return the stages' executions."""
    executions = schedule.executions()
    layout.write_json(
        root / layout.JOB,
        {
            **schedule.metadata,
            "stages": schedule.labels,
            "execution": executions,
            "dashboard": dashboard,
            "n_params": schedule.network().n_params,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed": bool(resume),
        },
    )
    return executions


def _finished(stage: Stage) -> tuple[StageResult, dict] | None:
    """The saved result of a stage that finished in an earlier run (None: it did not)."""
    done = stage.folder / layout.DONE
    if stage.id.folder is None or not done.exists():
        return None
    summary = json.loads(done.read_text())
    theta = finished_theta(stage.folder, stage.network)
    history = layout.read_history(stage.folder / layout.HISTORY)
    result = StageResult(
        status="succeeded",
        theta=theta,
        cost=summary.get("cost"),
        iterations=int(summary.get("iterations", 0)),
        evaluations=int(summary.get("evaluations", 0)),
        seconds=float(summary.get("seconds", 0.0)),
        message=summary.get("message", ""),
        history=history,
    )
    return result, summary


def run_job(
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    client,
    dataset_path: str | None = None,
    validation_path: str | None = None,
    hooks: Hooks | None = None,
    resume: bool = False,
    execution: ExecutionChoice = "auto",
    job: str | None = None,
    refresh_seconds: float | None = None,
    engine_options: dict | None = None,
) -> TrainResult:
    """Run the schedule of ``spec`` on ``client``'s cluster (see :func:`worker.train.train`)."""
    root = Path(out_dir)
    path = str(dataset_path or spec.dataset)
    info = check_job(spec, path, execution, validation_path)
    hooks = hooks or Hooks()
    validation = open_validation(spec, validation_path)
    schedule = Schedule(spec, info, root, execution, validation)
    root.mkdir(parents=True, exist_ok=True)
    if not resume:
        layout.reset(root)
    layout.clear_cancel(root)
    for name in (layout.METRICS, layout.DENSITY):  # of a model this run changes
        (root / name).unlink(missing_ok=True)
    dashboard = dashboard_link(client)
    executions = write_job_file(root, schedule, dashboard, resume)
    name = job or root.resolve().name or "sae"
    history = JobHistory(root) if schedule.multi_stage else None
    totals, trained = _Totals(), []
    result = summary = None
    for sid in schedule.ids:
        stage = schedule.stage(sid, trained)
        saved = _finished(stage) if resume else None
        if saved is not None:
            result, summary = saved
        else:
            result = _run(
                stage, client, path, name, hooks, history, resume, refresh_seconds, engine_options
            )
            summary = {**result.summary(), **({"stage": sid.label} if sid.label else {})}
            if result.status == "succeeded" and sid.folder is not None:
                layout.write_json(stage.folder / layout.DONE, summary)
        totals.add(summary)
        if history is not None:
            if saved is None:
                history.finish(result.history)
            else:
                history.done.extend(result.history)
        if result.status != "succeeded":
            break
        trained.append(result.theta)
    if schedule.multi_stage:
        _gather(root, schedule, history, result, stage)
    layout.clear_cancel(root)
    last = layout.stage_dir(root, schedule.ids[-1])
    label = summary.get("stage")
    message = f"{label}: {summary.get('message', '')}" if label else result.message
    metrics = None
    if result.status == "succeeded":
        metrics, problem = _metrics(root, client)
        if problem:
            message = f"{message}; {problem}"
    return TrainResult(
        status=result.status,
        out_dir=root,
        model_path=root / layout.MODEL,
        history_path=root / layout.HISTORY,
        state_path=last / layout.STATE,
        job_path=root / layout.JOB,
        filters_path=layout.artifact(root, layout.FILTERS),
        cost_path=layout.artifact(root, layout.COST),
        final_cost=summary.get("cost"),
        iterations=totals.iterations,
        evaluations=totals.evaluations,
        seconds=totals.seconds,
        execution="+".join(dict.fromkeys(executions)),
        dashboard=dashboard,
        message=message,
        metrics=metrics,
    )


def _metrics(root: Path, client) -> tuple[dict | None, str]:
    """The finished job's metrics (written as metrics.json and density.png), on its cluster;
    a failure to measure does not fail the trained job: it is said in the message."""
    from worker.evaluate import evaluate_job

    try:
        metrics = evaluate_job(root, client)
    except Exception as exc:  # noqa: BLE001 - the model is written; say why it is not measured
        return None, f"metrics: not measured ({type(exc).__name__}: {exc})"
    if metrics is None:
        return None, ""
    return {k: v for k, v in metrics.items() if k != "density"}, ""  # JSON-able, as the file


def _run(stage, client, path, name, hooks, history, resume, refresh_seconds, engine_options):
    """Run one stage with its execution, feeding the job's history."""
    if history is not None:
        history.start(stage, resume)
        outer = hooks

        def on_iteration(entry: dict) -> None:
            history.add(entry)
            if outer.on_iteration is not None:
                outer.on_iteration(entry)

        hooks = Hooks(on_iteration=on_iteration, should_stop=outer.should_stop)
    suffix = {"pretrain": f"-stage{stage.id.index}", "finetune": "-finetune"}.get(stage.id.kind, "")
    kwargs: dict = {"client": client, "dataset_path": path, "job": name + suffix}
    if refresh_seconds is not None:
        kwargs["refresh_seconds"] = refresh_seconds
    if stage.execution == "distributed":
        kwargs["engine_options"] = dict(engine_options or {})
    return STRATEGIES[stage.execution](**kwargs).run(stage, hooks, resume)


def _gather(root: Path, schedule: Schedule, history: JobHistory, result, stage: Stage) -> None:
    """The job-level files of a multi-stage job: its history, and once the last stage has
    finished, the whole network's model and filters; the cost curve of every stage."""
    layout.write_json(root / layout.HISTORY, history.done)
    if result.status == "succeeded" and stage.id == schedule.ids[-1]:
        meta = {**schedule.metadata, "stages": schedule.labels}
        layout.save_model(root / layout.MODEL, stage.network, result.theta, meta)
        save_filters(stage, result.theta, root / layout.FILTERS)
    save_cost(history.done, root / layout.COST)
