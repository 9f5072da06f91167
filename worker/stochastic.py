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
from collections import deque
from collections.abc import Callable
from functools import partial

import numpy as np

from worker import layout
from worker.checkpoint import CheckpointWriter
from worker.engine import Cancelled
from worker.stage import REFRESH_SECONDS, Hooks, Stage, StageResult, save_cost, write_model
from worker.threads import one_blas_thread

#: ``objective(theta, parts, rho_ema, decay, slots) -> (J, grad, rho_hat)``.
BatchFn = Callable[..., tuple[float, np.ndarray, dict | None]]
#: Steps sent to the workers ahead of the one the loop handles (:class:`_Chained`).
DEPTH = 2
#: Steps chained on the workers before the loop takes the state back to start a new chain.
CHAIN = 32
#: States (theta and two moments) larger than this are stepped here, not chained: a step's
#: compute then dwarfs its round trip, and the workers keep no extra states.
CHAIN_STATE_BYTES = 256 * 2**20
#: A lost scheduler: the chain is sent again this many times in a row at most.
RESENDS = 20
#: Seconds a stopped stage waits for the state of its last step, which the workers hold.
STOP_FETCH_SECONDS = 60.0


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


def advance(
    state,
    J: float,
    grad: np.ndarray,
    rho_hat: dict | None,
    lr: float,
    rows: int,
    *,
    network,
    per_epoch: int,
    rho_decay: float | None,
):
    """The state after one step of ``state``'s optimizer along a batch's ``grad`` with
    learning rate ``lr``: back on the unit-norm constraint of the decoder where the network
    has one, moved to the next batch, with the batch's ``J``, ``rows`` and (where
    ``rho_decay`` is set) ``rho_hat`` as the next running average. The same function runs
    here (:class:`_Here`) and on a worker (:class:`_Chained`)."""
    from sae.optimize.stochastic import step

    new = step(state, grad, lr)
    if network.unit_norm_decoder:
        new = new.replace(theta=network.project(new.theta))
    batch, epoch = state.batch + 1, state.epoch
    if batch == per_epoch:
        batch, epoch = 0, epoch + 1
    ema = state.rho_ema
    if rho_decay is not None and rho_hat is not None:
        ema = {str(k): np.asarray(v, dtype=np.float64) for k, v in rho_hat.items()}
    return new.replace(epoch=epoch, batch=batch, samples=state.samples + rows, J=J, rho_ema=ema)


def _position(stage: Stage, epoch: int, batch: int) -> tuple[int, int]:
    """The (epoch, batch) after the step on batch ``batch`` of ``epoch``."""
    batch += 1
    return (epoch + 1, 0) if batch == stage.batches.per_epoch else (epoch, batch)


class _Here:
    """Steps taken one at a time: the objective's ``(J, grad, rho_hat)`` of the batch, then
    :func:`advance` in this process."""

    def __init__(self, stage: Stage, objective: BatchFn, state, total: int) -> None:
        self.stage, self.f, self.state, self.total = stage, objective, state, total

    def next(self):
        """The state after the next step, and the step's learning rate."""
        from sae.optimize.stochastic import learning_rate

        st, stage, b = self.state, self.stage, self.stage.batches
        parts = b.parts(st.epoch, st.batch)
        slots = b.slots(st.epoch, parts)
        J, grad, rho_hat = self.f(st.theta, parts, _ema_in(st), stage.rho_decay, slots)
        lr = learning_rate(st.options, st.step, self.total)
        self.state = advance(
            st,
            J,
            grad,
            rho_hat,
            lr,
            sum(len(r) for _, r in parts),
            network=stage.network,
            per_epoch=b.per_epoch,
            rho_decay=stage.rho_decay,
        )
        return self.state, lr

    def full(self):
        """The whole state (theta, moments) after the last step :meth:`next` gave."""
        return self.state

    def held(self):
        """The latest whole state held here (that of :meth:`full`)."""
        return self.state

    def close(self) -> None:
        """Nothing runs ahead here."""


class _Chained:
    """Steps chained on the workers: each step's graph (:meth:`worker.engine.BatchObjective.
    submit_step`) takes the previous step's state where it is and leaves the new one there,
    so :data:`DEPTH` steps run ahead of the loop, which takes just each step's record (a few
    scalars) in turn, and the whole state only where it needs it (a checkpoint, a held-out
    cost, a refresh of the model, the end).

    Every :data:`CHAIN` steps the loop takes the state back and the next chain starts from it:
    a lost state is recomputed by Dask from the start of its chain, and the scheduler's record
    of how stays bounded. Each step computes what :class:`_Here`'s does, from the same state:
    the same bits. If the scheduler is lost, the steps are sent again from the start of the
    chain once the client has reconnected.
    """

    def __init__(self, stage: Stage, objective, state, total: int) -> None:
        self.stage, self.f, self.total = stage, objective, total
        self.advance = partial(
            advance,
            network=stage.network,
            per_epoch=stage.batches.per_epoch,
            rho_decay=stage.rho_decay,
        )
        self._start_chain(state)
        self.done = state.step  # the last step handed to the loop
        self.lost = 0  # the scheduler lost in a row

    def _start_chain(self, state) -> None:
        self.root = state  # held here: the start of the chain
        self.queue: deque = deque()  # (step, future of the state, future of its record)
        self.last, self.last_step = None, state.step  # the future of the latest state taken
        self.last_full = None
        self.sub = (state.step, state.epoch, state.batch)  # after the last step sent

    def _fill(self) -> None:
        from sae.optimize.stochastic import learning_rate

        b = self.stage.batches
        while len(self.queue) < DEPTH:
            k, epoch, batch = self.sub
            if k >= self.total or k - self.root.step >= CHAIN:
                return
            src = self.queue[-1][1] if self.queue else (self.last or self.root)
            parts = b.parts(epoch, batch)
            slots = b.slots(epoch, parts)
            lr = learning_rate(self.root.options, k, self.total)
            new, record = self.f.submit_step(
                src, parts, slots, self.stage.rho_decay, self.advance, lr
            )
            self.queue.append((k + 1, new, record))
            self.sub = (k + 1, *_position(self.stage, epoch, batch))

    def _wait(self, future, release: bool):
        """The future's value; None if the scheduler was lost (the chain is then sent again
        from its start once the client has reconnected)."""
        from worker.engine import lost_with_scheduler, wait_reconnected

        try:
            return self.f.result(future, release=release)
        except Exception as exc:
            if not lost_with_scheduler(exc, future):
                raise
            self.lost += 1
            if self.lost > RESENDS:
                raise
            time.sleep(0.2)  # the client may not have noticed the loss yet
            wait_reconnected(self.f.client, self.f.should_stop)
            self._start_chain(self.root)
            return None

    def _take(self):
        """The record of the oldest step sent (None: sent again, see :meth:`_wait`)."""
        self._fill()
        if not self.queue:  # the end of a chain: the next starts from the last state
            self._start_chain(self.full())
            self._fill()
        k, new, record = self.queue.popleft()
        rec = self._wait(record, release=True)
        if rec is None:
            return None, k
        if self.last is not None:
            self.last.release()
        self.last, self.last_step, self.last_full = new, k, None
        self.lost = 0
        return rec, k

    def next(self):
        """The record of the next step (its state without the arrays), and its learning
        rate."""
        from sae.optimize.stochastic import learning_rate

        while True:
            rec, k = self._take()
            if rec is None or k <= self.done:  # a step sent again: handed out already
                continue
            self.done = k
            self._fill()  # keep the workers busy while the loop handles this step
            return rec, learning_rate(self.root.options, k - 1, self.total)

    def full(self):
        """The whole state after the last step :meth:`next` gave (fetched once)."""
        while self.last_full is None:
            if self.done == self.root.step:
                return self.root
            if self.last_step != self.done:  # sent again: compute the chain up to ``done``
                self._take()
                continue
            state = self._wait(self.last.first, release=False)
            if state is not None:
                self.last_full = state
        return self.last_full

    def held(self):
        """The latest whole state held here, without waiting: the last one fetched, or the
        start of the chain."""
        if self.last_full is not None and self.last_full.step >= self.root.step:
            return self.last_full
        return self.root

    def close(self) -> None:
        """Release the steps sent ahead (nobody wants them: the scheduler drops those not
        run yet) and the last state."""
        futures = [f for _, a, b in self.queue for f in (*a.futures.values(), b)]
        if self.last is not None:
            futures.extend(self.last.futures.values())
        for f in reversed(futures):  # the latest first: nothing then waits on a dropped state
            with contextlib.suppress(Exception):
                f.release()
        self.queue.clear()
        self.last, self.last_full = None, None


def _stepper(stage: Stage, objective, state, total: int):
    """:class:`_Chained` for an objective on the workers that can chain steps (and states
    up to :data:`CHAIN_STATE_BYTES`), else :class:`_Here`."""
    chains = hasattr(objective, "submit_step") and getattr(objective, "client", None) is not None
    if chains and 3 * state.theta.nbytes <= CHAIN_STATE_BYTES:
        return _Chained(stage, objective, state, total)
    return _Here(stage, objective, state, total)


def _validates(stage: Stage, state, total: int) -> bool:
    """Whether the held-out cost is computed after ``state``'s step: every
    ``stage.validate_every`` steps, at each epoch's end and at the last step."""
    return state.step % stage.validate_every == 0 or state.batch == 0 or state.step == total


@contextlib.contextmanager
def _patient(objective, seconds: float):
    """Waits of ``objective`` (for a state the workers hold) that a stop request does not cut
    short for ``seconds``: what a stopped stage still needs to fetch to save its last step."""
    if not hasattr(objective, "should_stop"):
        yield
        return
    before, deadline = objective.should_stop, time.monotonic() + seconds
    objective.should_stop = lambda: time.monotonic() > deadline
    try:
        yield
    finally:
        objective.should_stop = before


def _judge(stage: Stage, best: dict, step: int, theta, val: float, writer: CheckpointWriter):
    """The validation bookkeeping after a held-out cost ``val`` at ``step``: a new best is
    kept (its model ``theta`` in best.npz, written before the checkpoint that records it),
    else one more stale validation."""
    if best["best_val"] is None or val < best["best_val"]:
        writer.call(
            lambda: layout.save_model(
                stage.folder / layout.BEST, stage.network, theta, stage.metadata
            )
        )
        return {"best_val": val, "best_step": step, "stale": 0}
    return {**best, "stale": best["stale"] + 1}


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
    from sae.optimize.stochastic import learning_rate

    stage.folder.mkdir(parents=True, exist_ok=True)
    state, history, offset = _start(stage, resume)
    best = {"best_val": state.best_val, "best_step": state.best_step, "stale": state.stale}
    # Stopped during the held-out cost of its last step (its entry has none): computed now,
    # as the uninterrupted stage did, before the next step
    validate_first = (
        validate is not None
        and state.step > 0
        and bool(history)
        and history[-1]["iteration"] == state.step
        and "val_cost" not in history[-1]
        and _validates(stage, state, stage.max_iter)
    )
    if validate_first:
        history.pop()
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

    steps = _stepper(stage, objective, state, total)

    def full():  # the whole state after the last step, with the loop's validation record
        return steps.full().replace(**best)

    try:
        with one_blas_thread():
            if validate_first:
                val = validate(state.theta)
                best = _judge(stage, best, state.step, state.theta, val, writer)
                state = state.replace(**best)
                entry = entry_of(state, learning_rate(state.options, state.step - 1, total))
                entry["val_cost"] = val
                history.append(entry)
                writer.put(entry, state)
                if hooks.on_iteration is not None:
                    hooks.on_iteration(dict(entry))
            stopped = stage.early_stopping is not None and state.stale >= stage.early_stopping
            if stopped:  # a resumed stage that had stopped early stays stopped
                message = f"stopped early at step {state.step} (best at {state.best_step})"
            while state.step < total and not stopped:
                if hooks.stop():
                    status, message = "cancelled", f"cancelled at step {state.step}"
                    break
                record, lr = steps.next()
                state = record.replace(**best)
                end_of_epoch, last = state.batch == 0, state.step == total
                val = None
                if validate is not None and _validates(stage, state, total):
                    theta = steps.full().theta
                    val = validate(theta)
                    best = _judge(stage, best, state.step, theta, val, writer)
                    state = state.replace(**best)
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
                    writer.put(entry, full() if checkpoint else None)
                now = time.perf_counter()
                if now - last_refresh >= refresh_seconds:
                    last_refresh = now
                    theta = steps.full().theta
                    writer.call(lambda th=theta: write_model(stage, th))
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
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        steps.close()
        raise
    try:
        theta = None
        if status == "cancelled" and state.step > 0:  # exact resume from this very step
            try:
                with _patient(objective, STOP_FETCH_SECONDS):  # the workers hold it
                    state, theta = full(), steps.full().theta
            except Exception:  # the scheduler or the workers are gone: the last checkpoint
                # (exact, at an earlier step) is where the stage resumes
                message += "; its state was out of reach: it resumes from its last checkpoint"
                state = steps.held()
                theta = state.theta
            else:
                if not history or history[-1]["iteration"] < state.step:
                    entry = entry_of(state, learning_rate(state.options, state.step - 1, total))
                    history.append(entry)
                    writer.put(history[-1], state)
                else:
                    writer.put(None, state)
        if theta is None:
            theta = steps.full().theta
    finally:
        writer.close()
        steps.close()
    write_model(stage, theta)
    if write_cost:
        save_cost(history, stage.folder / layout.COST)
    return StageResult(
        status=status,
        theta=np.asarray(theta, dtype=np.float64),
        cost=state.J,
        iterations=state.step,
        evaluations=state.step,
        seconds=float(history[-1]["seconds"] if history else offset),
        message=message,
        history=history,
    )
