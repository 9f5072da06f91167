"""Checkpoints written in order on a background thread, overlapping the next evaluations."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker import layout


class CheckpointWriter:
    """Writes checkpoints (and other artifacts) in order on a background thread.

    Every iteration's checkpoint is written - history.json first (atomic rename), then
    state.npz (atomic and fsynced, :meth:`OptimizerState.save`) - in order; the optimizer
    only waits when ``max_pending`` items are queued, so disk work overlaps the next
    evaluations. History entries are serialised once each (the file is the join of them).
    :meth:`flush` waits for all items and re-raises a write error.
    """

    def __init__(
        self,
        history_path: Path,
        state_path: Path,
        history: list[dict] | None = None,
        max_pending: int = 8,
    ) -> None:
        self.history_path, self.state_path = history_path, state_path
        self._parts = [json.dumps(e, allow_nan=True) for e in (history or [])]
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    if callable(item):
                        item()
                    else:
                        n, state = item
                        data = ("[" + ",".join(self._parts[:n]) + "]").encode()
                        layout.write_bytes(self.history_path, lambda fh, d=data: fh.write(d))
                        if state is not None:
                            state.save(self.state_path)
            except BaseException as exc:  # noqa: BLE001 - re-raised by flush()
                self._error = exc
            finally:
                self._queue.task_done()

    def put(self, entry: dict | None, state) -> None:
        """Queue the checkpoint of one iteration: its history entry (None: none new) and
        optimizer state (None: the history alone)."""
        if self._error is not None:
            raise self._error
        if entry is not None:
            self._parts.append(json.dumps(entry, allow_nan=True))
        self._queue.put((len(self._parts), state))

    def call(self, fn: Callable[[], Any]) -> None:
        """Queue another write (run in order with the checkpoints)."""
        if self._error is not None:
            raise self._error
        self._queue.put(fn)

    def flush(self) -> None:
        """Wait until every queued item is written."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Flush and stop the thread."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
