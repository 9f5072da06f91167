"""The web page: the job list (``/``) and one job's page (``/ui/jobs/{job_id}``); public.

The pages are static; their scripts call the API (with the token the user gives).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

#: The web page's files (also served under ``/static``).
STATIC = Path(__file__).parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index() -> FileResponse:
    """The job list."""
    return FileResponse(STATIC / "index.html")


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> FileResponse:
    """One job's page (its script reads the job id from the address)."""
    return FileResponse(STATIC / "job.html")
