"""The stochastic stage kind: Adam or SGD over shuffled minibatches of the chunks.

:func:`run_stochastic_stage` is to a stochastic stage what :func:`worker.stage.run_stage` is
to a full-batch one: one optimisation with the same hooks, files and result. Each step reads
one batch (:class:`worker.batches.Batches`), whose gradient the objective computes on the
workers (:class:`worker.engine.BatchObjective`). A history entry is written every
``log_every`` steps, a checkpoint (the whole :class:`~sae.optimize.stochastic.StochasticState`)
every ``checkpoint_every`` steps, at the end of each epoch, at the end and when stopped, so a
resumed stage follows the uninterrupted trajectory bitwise.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import numpy as np

from worker import layout
from worker.checkpoint import CheckpointWriter
from worker.engine import Cancelled
from worker.stage import REFRESH_SECONDS, Hooks, Stage, StageResult, save_cost, write_model
from worker.threads import one_blas_thread

#: ``objective(theta, parts, rho_ema, decay, slots) -> (J, grad, rho_hat)``.
BatchFn = Callable[..., tuple[float, np.ndarray, dict | None]]


def _start(stage: Stage, resume: bool):
    """The state to continue from, the history up to it, and its seconds."""
    from sae.optimize.stochastic import StochasticState

    state_path, history_path = stage.folder / layout.STATE, stage.folder / layout.HISTORY
    if resume and state_path.exists():
        state = StochasticState.load(state_path)
        history = [e for e in layout.read_history(history_path) if e["iteration"] <= state.step]
        return state, history, float(history[-1]["seconds"]) if history else 0.0
    for p in (state_path, history_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return StochasticState.start(stage.optimizer, stage.theta0, stage.options), [], 0.0


def _ema_in(state) -> dict | None:
    return {int(k): v for k, v in state.rho_ema.items()} if state.rho_ema else None


def _advance(stage: Stage, state, new, J: float, rows: int, rho_hat: dict | None):
    """``new`` (after the step) moved to the next batch, with the batch's figures."""
    batch, epoch = state.batch + 1, state.epoch
    if batch == stage.batches.per_epoch:
        batch, epoch = 0, epoch + 1
    ema = state.rho_ema
    if stage.rho_decay is not None and rho_hat is not None:
        ema = {str(k): np.asarray(v, dtype=np.float64) for k, v in rho_hat.items()}
    return new.replace(epoch=epoch, batch=batch, samples=state.samples + rows, J=J, rho_ema=ema)


def _judge(stage: Stage, state, val: float, writer: CheckpointWriter):
    """The state after a held-out cost ``val``: a new best is kept (its model in best.npz,
    written before the checkpoint that records it), else one more stale validation."""
    if state.best_val is None or val < state.best_val:
        theta = state.theta
        writer.call(
            lambda: layout.save_model(
                stage.folder / layout.BEST, stage.network, theta, stage.metadata
            )
        )
        return state.replace(best_val=val, best_step=state.step, stale=0)
    return state.replace(stale=state.stale + 1)


def run_stochastic_stage(
    stage: Stage,
    objective: BatchFn,
    hooks: Hooks,
    *,
    resume: bool = False,
    refresh_seconds: float = REFRESH_SECONDS,
    write_cost: bool = True,
    validate: Callable[[np.ndarray], float] | None = None,
) -> StageResult:
    """Train ``stage`` by ``stage.max_iter`` steps of its stochastic optimizer.

    Parameters
    ----------
    stage : Stage
        With ``batches`` set; ``optimizer`` "adam" or "sgd".
    objective : callable
        ``objective(theta, parts, rho_ema, decay, slots) -> (J, grad, rho_hat)`` of one batch
        (``slots``: where its parts run, :meth:`worker.batches.Batches.slots`).
    hooks : Hooks
    resume : bool
        Continue from the stage's ``state.npz`` (bitwise the uninterrupted trajectory).
    validate : callable, optional
        ``validate(theta) -> J`` on the held-out rows, every ``stage.validate_every`` steps
        and at each epoch's end: its value is the entry's ``val_cost``; the best model is
        kept as ``best.npz``; ``stage.early_stopping`` held-out costs without a new best
        end the stage.

    Returns
    -------
    StageResult
        ``iterations`` and ``evaluations`` are steps; ``cost`` the last batch's.
    """
    from sae.optimize.stochastic import learning_rate, step

    stage.folder.mkdir(parents=True, exist_ok=True)
    state, history, offset = _start(stage, resume)
    writer = CheckpointWriter(stage.folder / layout.HISTORY, stage.folder / layout.STATE, history)
    total, b = stage.max_iter, stage.batches
    t_start, last_refresh = time.perf_counter(), -math.inf
    extra = {} if stage.id.label is None else {"stage": stage.id.label}
    status, message = "succeeded", f"{total} steps"

    def entry_of(st, lr: float) -> dict:
        return {
            "iteration": st.step,
            "epoch": st.epoch if st.batch else st.epoch - 1,
            "batch": (st.batch or b.per_epoch) - 1,
            "cost": float(st.J),
            "grad_norm": float(st.grad_norm),
            "evaluations": st.step,
            "samples": st.samples,
            "learning_rate": lr,
            "seconds": offset + (time.perf_counter() - t_start),
            **extra,
        }

    try:
        with one_blas_thread():
            stopped = stage.early_stopping is not None and state.stale >= stage.early_stopping
            if stopped:  # a resumed stage that had stopped early stays stopped
                message = f"stopped early at step {state.step} (best at {state.best_step})"
            while state.step < total and not stopped:
                if hooks.stop():
                    status, message = "cancelled", f"cancelled at step {state.step}"
                    break
                parts = b.parts(state.epoch, state.batch)
                slots = b.slots(state.epoch, parts)
                J, grad, rho_hat = objective(
                    state.theta, parts, _ema_in(state), stage.rho_decay, slots
                )
                lr = learning_rate(state.options, state.step, total)
                rows = sum(len(r) for _, r in parts)
                new = step(state, grad, lr)
                if stage.network.unit_norm_decoder:  # back on the constraint (unit columns)
                    new = new.replace(theta=stage.network.project(new.theta))
                state = _advance(stage, state, new, J, rows, rho_hat)
                end_of_epoch, last = state.batch == 0, state.step == total
                val = None
                if validate is not None and (
                    state.step % stage.validate_every == 0 or end_of_epoch or last
                ):
                    val = validate(state.theta)
                    state = _judge(stage, state, val, writer)
                stop_early = (
                    stage.early_stopping is not None and state.stale >= stage.early_stopping
                )
                logged = state.step % stage.log_every == 0 or end_of_epoch or last
                logged = logged or val is not None
                checkpoint = state.step % stage.checkpoint_every == 0 or end_of_epoch or last
                checkpoint = checkpoint or val is not None
                entry = entry_of(state, lr) if logged else None
                if val is not None:
                    entry["val_cost"] = val
                if entry is not None:
                    history.append(entry)
                if entry is not None or checkpoint:
                    writer.put(entry, state if checkpoint else None)
                now = time.perf_counter()
                if now - last_refresh >= refresh_seconds:
                    last_refresh = now
                    writer.call(lambda th=state.theta: write_model(stage, th))
                if entry is not None and hooks.on_iteration is not None:
                    hooks.on_iteration(dict(entry))
                if stop_early:
                    message = (
                        f"early stopping at step {state.step}: no better held-out cost in "
                        f"{state.stale} validations (best {state.best_val:.6g} at step "
                        f"{state.best_step}, in {layout.BEST})"
                    )
                    break
    except Cancelled:
        status, message = "cancelled", f"cancelled during step {state.step + 1}"
    finally:
        if status == "cancelled" and state.step > 0:  # exact resume from this very step
            if not history or history[-1]["iteration"] < state.step:
                history.append(entry_of(state, learning_rate(state.options, state.step - 1, total)))
                writer.put(history[-1], state)
            else:
                writer.put(None, state)
        writer.close()
    if status == "succeeded":
        state = state.replace(status="max_iter", message=message)
    write_model(stage, state.theta)
    if write_cost:
        save_cost(history, stage.folder / layout.COST)
    return StageResult(
        status=status,
        theta=np.asarray(state.theta, dtype=np.float64),
        cost=state.J,
        iterations=state.step,
        evaluations=state.step,
        seconds=float(history[-1]["seconds"] if history else offset),
        message=message,
        history=history,
    )
