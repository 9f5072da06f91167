"""A typed Python client of the training service's REST API (the `sae` CLI client uses it).

    from service.client import Client

    with Client("http://127.0.0.1:8000", token=None) as sae:
        job = sae.submit({"dataset": "mnist", "hidden": 196, "max_iter": 400})
        job = sae.wait(job["id"], on_update=lambda j: print(j["iteration"], j["cost"]))
        files = sae.download(job["id"], "out/")          # model.npz, history.json, pictures
        hidden, recon = sae.encode(job["id"], X[:10])     # ndarray of shape (10, 196), (10, 784)

Every method returns the API's JSON (dicts as ``GET /openapi.json`` describes them) or
numpy arrays; every failure raises :class:`ServiceError` whose message names the field or
the reason once (``422: dataset: no dataset named 'nope'``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from service.errors import describe_errors

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
#: Artifact file name -> API path (``{id}`` is the job id).
ARTIFACTS = {
    "model.npz": "/jobs/{id}/model.npz",
    "history.json": "/jobs/{id}/history",
    "filters.png": "/jobs/{id}/filters.png",
    "cost.png": "/jobs/{id}/cost.png",
}


class ServiceError(Exception):
    """A request the service refused or could not answer.

    Attributes
    ----------
    status : int
        The HTTP status, 0 when the service could not be reached.
    message : str
        What went wrong, naming the field once.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class Client:
    """The service at ``url``, with a bearer ``token`` when it has one.

    Parameters
    ----------
    url : str
    token : str, optional
    timeout : float
        Seconds per request.
    busy_retries : int
        Times a read or an encode answered 503 with ``Retry-After`` (a busy service) is sent
        again after the wait it asks for (at most 5 s each).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 30.0,
        busy_retries: int = 5,
    ):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.busy_retries = int(busy_retries)
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any):
        """One request; the ``httpx.Response`` when it succeeded.

        Raises
        ------
        ServiceError
            For a 4xx/5xx answer (its detail in words) or an unreachable service.
        """
        import httpx

        retryable = method in ("GET", "HEAD") or path.endswith("/encode")  # no side effect
        for attempt in range(self.busy_retries + 1):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                raise ServiceError(0, f"cannot reach {self.url}: {exc}") from None
            wait = r.headers.get("Retry-After")
            if not (r.status_code == 503 and retryable and wait and attempt < self.busy_retries):
                break
            try:  # a busy service (its encode threads full): wait as it asks, a little at most
                time.sleep(min(max(float(wait), 0.1), 5.0))
            except ValueError:
                break
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            if isinstance(detail, list):
                detail = describe_errors(detail)
            raise ServiceError(r.status_code, str(detail))
        return r

    # ------------------------------------------------------------------ service, datasets
    def health(self) -> dict[str, Any]:
        """``GET /health``: liveness, and with the token the cluster and running jobs."""
        return self.request("GET", "/health").json()

    def datasets(self) -> list[dict[str, Any]]:
        """Every dataset under the service's data root."""
        return self.request("GET", "/datasets").json()

    def upload(
        self,
        name: str,
        path: str | Path,
        sample_shape: Iterable[int] | None = None,
        compression: str = "auto",
    ) -> dict[str, Any]:
        """Upload a ``.npy`` or IDX file (gzip allowed) as dataset ``name``; ``compression``
        ("auto", "zstd" or "none") is the codec of its chunks."""
        data = {"name": name, "compression": compression}
        if sample_shape is not None:
            data["sample_shape"] = "x".join(str(int(d)) for d in sample_shape)
        path = Path(path)
        with open(path, "rb") as f:
            return self.request(
                "POST", "/datasets", data=data, files={"file": (path.name, f)}
            ).json()

    # ------------------------------------------------------------------ jobs
    def submit(self, spec: Mapping[str, Any] | Any, idempotency_key: str | None = None) -> dict:
        """Queue a job; ``spec`` is a dict of the fields of `sae train` or a ``TrainSpec``.

        A retry with the same ``idempotency_key`` returns the same job.
        """
        # (anything else JSON goes as it is: the service says what is wrong with it)
        body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's status, progress, cost and error."""
        return self.request("GET", f"/jobs/{job_id}").json()

    def jobs(
        self, status: Iterable[str] | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"items": [...], "total": n, ...}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = list(status)
        return self.request("GET", "/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job."""
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def resume(self, job_id: str, max_iter: int | None = None) -> dict[str, Any]:
        """Continue a cancelled, failed or finished job (to ``max_iter``) from its checkpoint."""
        body = {"max_iter": max_iter} if max_iter is not None else {}
        return self.request("POST", f"/jobs/{job_id}/resume", json=body).json()

    def retry(self, job_id: str) -> dict[str, Any]:
        """Run a failed job again from its last checkpoint."""
        return self.request("POST", f"/jobs/{job_id}/retry").json()

    def delete(self, job_id: str) -> None:
        """Delete a job and its artifacts (cancelling it first)."""
        self.request("DELETE", f"/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        interval: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it ends; return its last record.

        Parameters
        ----------
        interval : float
            Seconds between polls.
        timeout : float, optional
            Give up after this many seconds (``TimeoutError``).
        on_update : callable, optional
            Called with every record polled (a progress bar, a log line).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if on_update is not None:
                on_update(j)
            if j["status"] in TERMINAL:
                return j
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {j['status']} after {timeout:g} s")
            time.sleep(interval)

    # ------------------------------------------------------------------ artifacts
    def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's history, one entry per iteration."""
        return self.request("GET", f"/jobs/{job_id}/history").json()

    def download(self, job_id: str, directory: str | Path) -> dict[str, dict[str, Any]]:
        """Write the job's artifacts into ``directory`` (each atomically).

        Returns
        -------
        files : dict
            File name -> ``{"path": Path, "bytes": int, "partial": bool}``; ``partial`` marks
            the last checkpoint of a cancelled or failed job.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, path in ARTIFACTS.items():
            r = self.request("GET", path.format(id=job_id))
            tmp = out / f".{name}.part"
            tmp.write_bytes(r.content)
            tmp.replace(out / name)
            files[name] = {
                "path": out / name,
                "bytes": len(r.content),
                "partial": r.headers.get("X-SAE-Partial") == "true",
            }
        return files

    def encode(self, job_id: str, X, reconstruct: bool = True):
        """Hidden features and reconstructions of rows with a finished job's model.

        Parameters
        ----------
        X : array_like of shape (m, n_features)

        Returns
        -------
        hidden : ndarray of shape (m, n_code)
        reconstruction : ndarray of shape (m, n_features), or None
        """
        import numpy as np

        rows = np.asarray(X, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None, :]
        body = {"X": rows.tolist(), "reconstruct": reconstruct}
        out = self.request("POST", f"/jobs/{job_id}/encode", json=body).json()
        recon = out.get("reconstruction")
        return np.asarray(out["hidden"]), None if recon is None else np.asarray(recon)
