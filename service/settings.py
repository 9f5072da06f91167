"""One settings object for the service, read from arguments or ``SAE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of ``sae serve``.

    Every field can be set from the environment with the prefix ``SAE_``, for example
    ``SAE_DATA_ROOT=/data SAE_TOKEN=secret sae serve``; command-line options win.
    """

    model_config = SettingsConfigDict(env_prefix="SAE_", extra="ignore")

    data_root: Path = Field(Path("data"), description="Folder holding the datasets (Zarr)")
    state_dir: Path = Field(Path("state"), description="Folder holding jobs.db and job folders")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(None, description="Bearer token required on the API (none: open)")
    scheduler: str | None = Field(
        None, description="Dask scheduler address tcp://...; none: an embedded LocalCluster"
    )
    workers: int = Field(2, ge=1, description="Workers of the embedded LocalCluster")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    dashboard_host: str = Field(
        "127.0.0.1",
        description="Interface of the embedded cluster's Dask dashboard (it has no "
        "authentication; 0.0.0.0 to serve it on every interface)",
    )
    plan: Literal["auto", "local", "distributed"] = Field(
        "auto",
        description="Where the stages of jobs run (SAE_PLAN, like sae train --plan): "
        "distributed: every evaluation is one Dask graph driven from the service; local: a "
        "stage trains as one task next to its data; auto: local when its data are small",
    )

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                "token: an empty token would leave the API open without a word; give a "
                "non-empty token, or none (no --token, SAE_TOKEN unset) for an open service"
            )
        return v

    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs running at the same time")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest JSON request body")
    max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest dataset upload")
    max_dataset_bytes: int = Field(
        1 << 36, ge=1, description="Largest dataset made by an upload (after gunzip) or ingest"
    )
    max_encode_rows: int = Field(10_000, ge=1, description="Most rows per encode request")
    max_encode_values: int = Field(
        5_000_000,
        ge=1,
        description="Most values an encode request computes: rows x (largest hidden + outputs)",
    )
    public_dashboard_url: str | None = Field(
        None, description="Dask dashboard link shown to users (default: the client's link)"
    )

    @property
    def db_path(self) -> Path:
        """The SQLite job database."""
        return self.state_dir / "jobs.db"

    @property
    def jobs_dir(self) -> Path:
        """Folder of the per-job folders (artifacts and checkpoints)."""
        return self.state_dir / "jobs"
