"""Helpers for the service tests: a real `sae serve` process, tiny datasets, polling.

The server runs in its own process group, so stopping it (or killing it with SIGKILL to
simulate a crash) also ends the LocalCluster's worker processes it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from worker.dataset import write_dataset

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process that imports this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env.update(extra)
    return env


SAE = [sys.executable, "-c", "from service.cli import main; main()"]


def tiny_data(m: int = 200, n: int = 16, seed: int = 0, low: float = 0.0, high: float = 1.0):
    """Seeded uniform data of shape (m, n) in [low, high]."""
    rng = np.random.default_rng(seed)
    return low + (high - low) * rng.random((m, n))


def write_tiny(root: Path, name: str, X: np.ndarray | None = None, chunk_rows: int = 50) -> Path:
    """Write a small dataset (default 200 x 16 in [0, 1], 4 x 4 pictures) under ``root``."""
    X = tiny_data() if X is None else X
    side = int(round(np.sqrt(X.shape[1])))
    sample_shape = (side, side) if side * side == X.shape[1] else None
    path = root / name
    write_dataset(
        path,
        X,
        X.shape[0],
        X.shape[1],
        dtype="float64",
        chunk_rows=chunk_rows,
        sample_shape=sample_shape,
        source="test",
    )
    return path


class Server:
    """A `sae serve` process under uvicorn with its embedded LocalCluster (or a scheduler).

    Parameters
    ----------
    data_root, state_dir : Path
    token : str, optional
    args : extra command-line options of ``sae serve``
    env : extra environment variables (``SAE_*`` settings without an option)
    """

    def __init__(
        self,
        data_root: Path,
        state_dir: Path,
        token: str | None = None,
        args: Sequence[str] = (),
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.data_root, self.state_dir, self.token = data_root, state_dir, token
        self.args = list(args)
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or state_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Server:
        """Start the process and wait until /health answers."""
        cmd = [
            *SAE,
            "serve",
            "--data-root",
            str(self.data_root),
            "--state-dir",
            str(self.state_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
            "--log-level",
            "warning",
            *(["--token", self.token] if self.token else []),
            *self.args,
        ]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(**self.env),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sae serve exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"sae serve did not answer:\n{self.log.read_text()[-3000:]}")

    def client(self, token: str | None = "default", **kw: Any) -> httpx.Client:
        """An HTTP client of the server (with its token unless told otherwise)."""
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def _killpg(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash)."""
        self._killpg(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (clean shutdown), then SIGKILL whatever of its process group is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._killpg(signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_job(
    client: httpx.Client,
    job_id: str,
    until: Callable[[dict], bool] = lambda j: j["status"] in TERMINAL,
    timeout: float = 90.0,
    interval: float = 0.1,
) -> dict:
    """Poll GET /jobs/{id} until ``until(job)``; return the job."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/jobs/{job_id}")
        r.raise_for_status()
        job = r.json()
        if until(job):
            return job
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached the condition: {job}")
        time.sleep(interval)


def load_model(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a model.npz."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), written out for independent checks."""
    return 1.0 / (1.0 + np.exp(-z))
