"""One settings object for the service, read from arguments or ``SAE_*`` environment variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the service answers to besides localhost, 127.0.0.1, ::1 "
        "and the address it listens on (a foreign Host header is refused: DNS rebinding); "
        "'*.example.com' for its subdomains, '*' for any; SAE_ALLOWED_HOSTS=a,b",
    )
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

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment: comma-separated
            return [h for h in (p.strip() for p in v.split(",")) if h]
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            name = pattern.strip().lower()
            wild = name.startswith("*.") and "*" not in name[2:] and len(name) > 2
            if not name or (name != "*" and "*" in name and not wild):
                raise ValueError(
                    f"allowed_hosts: {pattern!r} is not a host name; give names such as "
                    "sae.example.com, *.example.com (its subdomains) or * (any host)"
                )
            if any(c in name for c in "/:@ ") and not _is_ip(name.strip("[]")):
                raise ValueError(
                    f"allowed_hosts: {pattern!r} is not a host name (no scheme, port or "
                    "path: sae.example.com, not http://sae.example.com:8000/)"
                )
        return [h.strip().lower() for h in v]

    @property
    def trusted_hosts(self) -> list[str]:
        """The host names of the Host header the service answers to: the loopback names, the
        address it listens on (unless a wildcard such as 0.0.0.0) and :attr:`allowed_hosts`.
        IPv6 addresses are given without brackets."""
        names = ["localhost", "127.0.0.1", "::1"]
        bound = self.host.strip("[]").lower()
        if bound not in ("", "0.0.0.0", "::"):
            names.append(bound)
        names += [h.strip("[]") for h in self.allowed_hosts]
        return list(dict.fromkeys(names))

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
    max_decompressed_bytes: int | None = Field(
        None,
        ge=1,
        description="Most bytes a gzip-compressed upload may decompress to, checked as it "
        "streams (413 beyond). None: max_upload_bytes, and at most a quarter of the free disk "
        "space of the data root and of the state folder when the upload arrives",
    )
    max_chunk_bytes: int = Field(
        64 << 20,
        ge=1,
        description="Most bytes one chunk of an uploaded dataset holds (rows per chunk are "
        "chosen to fit); a file one example of which is larger is refused (413)",
    )
    max_encode_rows: int = Field(10_000, ge=1, description="Most rows per encode request")
    max_concurrent_encodes: int = Field(
        2,
        ge=1,
        description="Encode requests computed at the same time, in threads of their own (the "
        "other routes never wait behind them)",
    )
    max_waiting_encodes: int = Field(
        8,
        ge=0,
        description="Encode requests waiting for one of those threads; beyond, 503 with "
        "Retry-After",
    )
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
