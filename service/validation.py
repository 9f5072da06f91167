"""Checks of a job spec against its dataset, made when the job is submitted.

Field-by-field validation (ranges, choices) is TrainSpec's; what needs the dataset is here, so
that every invalid job is refused at ``POST /jobs`` with a message naming the field, and never
reaches the runner.
"""

from __future__ import annotations

import os

from pydantic import ValidationError

from service import datasets
from service.errors import clean_message
from service.faults import redact_paths
from service.store import ACTIVE, JobStore
from worker import schedule
from worker.spec import TrainSpec

#: Largest network a job of the service may train (parameters of the whole network).
MAX_PARAMS = 50_000_000


class InUse(RuntimeError):
    """A dataset is used by a queued or running job."""


def first_max_iter(spec: TrainSpec, data_root: str | os.PathLike | None = None) -> int:
    """Maximum iterations (steps, for adam and sgd) of a job's first stage (what the status
    shows before it runs); the steps of a stochastic job need its dataset under
    ``data_root``."""
    rows = None
    if spec.is_stochastic:
        rows = schedule.training_rows(spec, datasets.get_dataset(data_root, spec.dataset)[1])
    return spec.stage_iterations(rows, finetune=spec.is_deep and spec.pretrain == "none")


def _field_of(msg: str, default: str) -> str:
    head = msg.split(":", 1)[0].strip()
    return head if head.isidentifier() else default


def check_spec(spec: TrainSpec, data_root: str | os.PathLike) -> list[tuple[str, str]]:
    """Problems of a spec that only show with its dataset (:func:`worker.schedule.check_spec`,
    the service's size limit, and the data's range read from the chunks when no range was
    recorded).

    Returns
    -------
    problems : list of (field, message)
        Empty when the job can run; the first entry is what to report.
    """
    if spec.init_model is not None:  # a path on the server's disk: not the client's to name
        return [("init_model", "init_model: not accepted over REST (a CLI and library option)")]
    try:
        path, info = datasets.get_dataset(data_root, spec.dataset)
    except (datasets.BadName, datasets.NotFound) as exc:  # "name: ..." / "dataset: ..."
        return [("dataset", clean_message(("dataset", "name"), str(exc)))]
    if info.shape[0] < 1:
        return [("dataset", f"dataset: {spec.dataset!r} has no examples")]
    n = info.shape[1]
    total = schedule.n_params(spec, n)
    if total > MAX_PARAMS:
        sizes = schedule.layer_sizes(spec, n)
        msg = f"hidden: {sizes} needs {total} parameters, more than the limit {MAX_PARAMS}"
        return [("hidden", msg)]
    if spec.validation_dataset is not None:
        try:
            _, vinfo = datasets.get_dataset(data_root, spec.validation_dataset)
            schedule.check_validation(info, vinfo)
        except (datasets.BadName, datasets.NotFound) as exc:
            msg = clean_message(("validation_dataset", "dataset", "name"), str(exc))
            return [("validation_dataset", msg)]
        except ValueError as exc:
            return [("validation_dataset", str(exc))]
    try:
        schedule.check_spec(spec, info)
        if schedule.output_bounded(spec):
            try:
                vr = datasets.value_range(path, info)
            except Exception as exc:  # noqa: BLE001 - an unreadable dataset is the dataset's fault
                why = redact_paths(str(exc), [data_root])  # the chunk, not the server's path
                return [("dataset", f"dataset: cannot be read ({why})")]
            schedule.check_output_range(spec, vr)
    except ValueError as exc:
        return [(_field_of(str(exc), "hidden"), str(exc))]
    return []


def dataset_unused(store: JobStore, name: str) -> None:
    """Raise InUse if a queued or running job trains on dataset ``name`` or measures its
    held-out cost on it (``validation_dataset``)."""
    jobs, _ = store.list(ACTIVE, limit=10_000)
    users = [
        j.id for j in jobs if name in (j.spec.get("dataset"), j.spec.get("validation_dataset"))
    ]
    if users:
        raise InUse(f"name: dataset {name!r} is used by active jobs {users}")


def resume_problem(job, max_iter: int | None) -> tuple[str, int, str] | None:
    """Why ``POST /jobs/ID/resume`` cannot continue ``job`` (to ``max_iter``), or None.

    Returns
    -------
    problem : (field, HTTP status, message) or None
    """
    if job.status in ACTIVE:
        return ("status", 409, f"job {job.id} is {job.status}: nothing to resume yet")
    try:
        spec = TrainSpec(**job.spec)
    except ValidationError as exc:  # e.g. a bfloat16 job where PyTorch is gone
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "spec"
        return (field, 422, f"the job's spec no longer validates here: {err.get('msg')}")
    if max_iter is not None:
        if spec.is_stochastic:
            return ("max_iter", 422, "adam and sgd jobs run epochs, not iterations; resume as is")
        if spec.is_deep:
            return ("max_iter", 422, "a deep job's stages cannot be extended; resume it as is")
        if max_iter < job.iteration:
            return ("max_iter", 422, f"the job ran {job.iteration} iterations already")
    target = max_iter if max_iter is not None else spec.max_iter
    if job.status == "succeeded" and (
        spec.is_deep or spec.is_stochastic or target <= job.iteration
    ):
        return (
            "status",
            409,
            f"job {job.id} finished at iteration {job.iteration}; give a larger max_iter "
            "(sae resume ID --max-iter N) to train further",
        )
    return None
