"""Checks of a job spec against its dataset, made when the job is submitted.

Field-by-field validation (ranges, choices) is TrainSpec's; what needs the dataset is here, so
that every invalid job is refused at ``POST /jobs`` with a message naming the field, and never
reaches the runner.
"""

from __future__ import annotations

import os

from sae.network import Network
from service import datasets
from service.errors import clean_message
from service.store import ACTIVE, JobStore
from worker.spec import TrainSpec

MAX_PARAMS = 50_000_000
OUTPUT_RANGES = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


class InUse(RuntimeError):
    """A dataset is used by a queued or running job."""


def first_max_iter(spec: TrainSpec) -> int:
    """Maximum iterations of a job's first stage (what the status shows before it runs)."""
    if spec.is_deep and spec.pretrain == "none":
        return spec.finetune_iter
    return spec.max_iter


def layer_sizes(spec: TrainSpec, n_visible: int) -> list[int]:
    """Sizes of the whole (deep) autoencoder, input to reconstruction."""
    h = spec.hidden_sizes
    return [n_visible, *h, *reversed(h[:-1]), n_visible]


def _field_of(msg: str, default: str) -> str:
    head = msg.split(":", 1)[0].strip()
    return head if head.isidentifier() else default


def check_spec(spec: TrainSpec, data_root: str | os.PathLike) -> list[tuple[str, str]]:
    """Problems of a spec that only show with its dataset.

    Returns
    -------
    problems : list of (field, message)
        Empty when the job can run; the first entry is what to report.
    """
    try:
        path, info = datasets.get_dataset(data_root, spec.dataset)
    except (datasets.BadName, datasets.NotFound) as exc:  # "name: ..." / "dataset: ..."
        return [("dataset", clean_message(("dataset", "name"), str(exc)))]
    m, n = info.shape
    if m < 1:
        return [("dataset", f"dataset: {spec.dataset!r} has no examples")]
    sizes = layer_sizes(spec, n)
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    if n_params > MAX_PARAMS:
        return [
            (
                "hidden",
                f"hidden: {sizes} needs {n_params} parameters, more than the limit {MAX_PARAMS}",
            )
        ]
    if spec.code_activation is not None and not spec.is_deep:
        return [("code_activation", "code_activation: only for deep autoencoders (hidden list)")]
    if spec.is_deep and spec.pretrain == "none" and spec.finetune_iter == 0:
        msg = "finetune_iter: with pretrain 'none' give fine-tuning iterations"
        return [("finetune_iter", msg)]
    out = spec.output_activation or spec.activation
    if spec.is_deep:
        from worker.deep import validate_deep

        try:
            validate_deep(spec, n)
        except ValueError as exc:
            return [(_field_of(str(exc), "hidden"), str(exc))]
    try:  # the first layer's sparse autoencoder (units that can carry rho, ...)
        Network.autoencoder(
            n,
            spec.hidden_sizes[0],
            lam=spec.lam,
            rho=spec.rho,
            beta=spec.beta,
            activation=spec.activation,
            output_activation=out,
        )
    except ValueError as exc:
        return [(_field_of(str(exc), "hidden"), str(exc))]
    if not spec.is_deep:
        from worker.train import validate_spec

        try:
            validate_spec(spec, info)
        except ValueError as exc:
            return [(_field_of(str(exc), "dataset"), str(exc))]
    if out in OUTPUT_RANGES:
        lo, hi = OUTPUT_RANGES[out]
        try:
            dmin, dmax = datasets.value_range(path, info)
        except Exception as exc:  # noqa: BLE001 - an unreadable dataset is the dataset's fault
            return [("dataset", f"dataset: cannot be read ({exc})")]
        if dmin < lo or dmax > hi:
            return [
                (
                    "output_activation",
                    f"output_activation: {out} outputs lie in [{lo:g}, {hi:g}] but dataset "
                    f"{spec.dataset!r} holds values in [{dmin:.4g}, {dmax:.4g}]; use "
                    "output_activation 'linear' or rescale the data",
                )
            ]
    return []


def dataset_unused(store: JobStore, name: str) -> None:
    """Raise InUse if a queued or running job trains on dataset ``name``."""
    jobs, _ = store.list(ACTIVE, limit=10_000)
    users = [j.id for j in jobs if j.spec.get("dataset") == name]
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
    spec = TrainSpec(**job.spec)
    if max_iter is not None:
        if spec.is_deep:
            return ("max_iter", 422, "a deep job's stages cannot be extended; resume it as is")
        if max_iter < job.iteration:
            return ("max_iter", 422, f"the job ran {job.iteration} iterations already")
    target = max_iter if max_iter is not None else spec.max_iter
    if job.status == "succeeded" and (spec.is_deep or target <= job.iteration):
        return (
            "status",
            409,
            f"job {job.id} finished at iteration {job.iteration}; give a larger max_iter "
            "(sae resume ID --max-iter N) to train further",
        )
    return None
