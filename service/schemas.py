"""Request and response bodies of the REST API (the training spec itself is TrainSpec)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.spec import MAX_ITER

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Message(BaseModel):
    """An error or a short answer."""

    detail: str


class ValidationItem(BaseModel):
    """One invalid field (FastAPI's shape)."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationFailed(BaseModel):
    """422: which fields are invalid and why."""

    detail: list[ValidationItem]


class Dataset(BaseModel):
    """A dataset under the data root."""

    name: str = Field(description="Zarr path relative to the data root")
    shape: list[int] = Field(description="(m examples, n features)")
    dtype: str
    chunks: list[int] = Field(description="(rows per chunk, n)")
    n_chunks: int
    bytes: int = Field(description="Uncompressed size")
    compression: str = Field("none", description="Codec of the chunks: none or zstd")
    sample_shape: list[int] | None = None
    scale: float = 1.0
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    source: str = ""


class PhotographPatches(BaseModel):
    """Ingest patches sampled from the bundled sample photographs."""

    name: str = Field(min_length=1, max_length=512, description="Dataset name to create")
    patch_size: int = Field(8, ge=2, le=64)
    n_patches: int = Field(10000, ge=1, le=1_000_000)
    gray: bool = True
    normalize: bool = True
    whiten: Literal["pca", "zca"] | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)
    compression: Literal["auto", "zstd", "none"] = Field(
        "auto", description="Codec of the chunks (auto: zstd for uint8, none for floats)"
    )


class JobLinks(BaseModel):
    """Where to find a job and its artifacts."""

    self: str
    cancel: str
    history: str
    filters: str
    cost: str
    model: str
    encode: str
    page: str
    metrics: str = Field(description="metrics.json (404 until the job's model is evaluated)")
    density: str = Field(description="density.png, the latents' firing-frequency histogram")


class JobMetrics(BaseModel):
    """The final model's metrics on the held-out chunks (or all), from metrics.json
    (:mod:`sae.metrics`); more fields may be present."""

    model_config = ConfigDict(extra="allow")

    examples: int | None = Field(None, description="Examples evaluated")
    split: str | None = Field(None, description='"held-out" or "all" chunks')
    mse: float | None = Field(None, description="Mean squared error per element")
    fvu: float | None = Field(
        None,
        description="Fraction of variance unexplained: sum ||x - x_hat||^2 over the "
        "data's sum of squares about its mean",
    )
    explained_variance: float | None = Field(None, description="1 - fvu")
    l0: float | None = Field(None, description="Active latents per example")
    latents: int | None = Field(None, description="Latents (hidden or code units)")
    dead: int | None = Field(None, description="Latents never active on the evaluated data")
    dead_fraction: float | None = None
    cosine: float | None = Field(None, description="Mean cosine of x and x_hat")
    shrinkage: float | None = Field(None, description="Mean ||x_hat|| / ||x||")
    active: str | None = Field(None, description="When a latent counts as active")
    threshold: float | None = Field(None, description="Activity threshold (sigmoid-kl units)")


class JobCreated(BaseModel):
    """202: the job is queued."""

    id: str
    status: JobStatus
    links: JobLinks


class JobOut(BaseModel):
    """A job's status and progress."""

    id: str
    status: JobStatus
    spec: dict[str, Any]
    stage: str | None = Field(None, description='"pretrain k of K" or "fine-tune" for deep jobs')
    iteration: int
    max_iter: int = Field(description="Maximum iterations of the current stage")
    cost: float | None = None
    grad_norm: float | None = None
    progress: float = Field(ge=0, le=1)
    eta_seconds: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float
    attempts: int = Field(description="Times the job was started (more than 1 after resumes)")
    error: str | None = None
    dashboard_url: str | None = None
    metrics: JobMetrics | None = Field(
        None, description="The final model's metrics, once evaluated (null before)"
    )
    links: JobLinks


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobOut]
    total: int
    limit: int
    offset: int


class ResumeRequest(BaseModel):
    """How far to continue a job (default: to its own max_iter)."""

    max_iter: int | None = Field(
        None, ge=1, le=MAX_ITER, description="A new max_iter (one-layer jobs), to extend it"
    )


class EncodeRequest(BaseModel):
    """Inputs to encode with a finished model."""

    X: list[list[float]] = Field(min_length=1, description="Rows of n features, as the dataset")
    reconstruct: bool = Field(True, description="Also return the reconstructions")


class EncodeResponse(BaseModel):
    """Hidden features (of the innermost code layer) and reconstructions."""

    hidden: list[list[float]]
    reconstruction: list[list[float]] | None = None


class Health(BaseModel):
    """Liveness and what the service is connected to."""

    status: Literal["ok"]
    scheduler: str | None = Field(
        None, description="Address of the Dask scheduler (embedded or not); token holders only"
    )
    embedded: bool | None = Field(None, description="True for the service's own LocalCluster")
    workers: int | None = Field(None, description="Dask workers connected now")
    threads: int | None = Field(None, description="Worker threads in total")
    memory_limit_bytes: int | None = Field(None, description="Workers' memory limits in total")
    dashboard_url: str | None = Field(None, description="Only shown to holders of the token")
    running: list[str] | None = Field(None, description="Only shown to holders of the token")
    cluster_error: str | None = None
