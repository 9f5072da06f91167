"""``/datasets``: list, upload, sample photographs, describe and delete datasets.

Two routers: :data:`router`, and :data:`uploads` (``POST /datasets``), which the app includes
with the larger body limit of uploads (``Settings.max_upload_bytes``) in place of that of JSON
bodies.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Response, UploadFile

from service import datasets, validation
from service.deps import (
    API_RESPONSES,
    R400,
    R404,
    R409,
    R413,
    R422,
    SettingsDep,
    StoreDep,
    field_error,
    require_token,
)
from service.errors import clean_message
from service.faults import is_disk_full
from service.schemas import Dataset, PhotographPatches
from service.store import ACTIVE

router = APIRouter(
    tags=["datasets"], dependencies=[Depends(require_token)], responses=API_RESPONSES
)
#: ``POST /datasets``, to include with ``max_body_size=settings.max_upload_bytes``.
#: When a quarter of the free disk is less than this, a gzip upload is refused as a full
#: disk (507) rather than as too large for a limit the user never set (413).
MIN_FREE_TO_INFLATE = 1 << 20

uploads = APIRouter(
    tags=["datasets"], dependencies=[Depends(require_token)], responses=API_RESPONSES
)


@contextmanager
def _ingest_errors(name: str, value_field: Callable[[str], str]) -> Iterator[None]:
    """Answer the errors of making dataset ``name``: 409 if it exists, 413 naming the field for
    a size limit of the service, else a 422 naming the field (``value_field(message)`` for a
    ValueError)."""
    try:
        yield
    except datasets.Exists as exc:
        raise HTTPException(409, str(exc)) from None
    except datasets.TooLarge as exc:
        field = value_field(str(exc))
        detail = [
            {"loc": ["body", field], "msg": clean_message(field, str(exc)), "type": "too_large"}
        ]
        raise HTTPException(413, detail) from None
    except datasets.BadName as exc:
        raise field_error("name", str(exc)) from None
    except ValueError as exc:
        raise field_error(value_field(str(exc)), str(exc)) from None
    except OSError as exc:
        if is_disk_full(exc):
            raise HTTPException(507, f"storage: the disk is full ({exc.strerror})") from None
        raise field_error("name", f"name: cannot create {name!r} ({exc.strerror})") from None


def _upload_field(msg: str) -> str:
    """The field an upload's ValueError is about."""
    return "sample_shape" if msg.startswith("sample_shape") else "file"


def _leading_field(msg: str) -> str:
    """The field a message ``"field: ..."`` names (default ``name``)."""
    return msg.split(":")[0].strip() or "name"


@contextmanager
def _spooled(upload: IO[bytes], folder: Path) -> Iterator[Path]:
    """A copy of ``upload`` in a temporary file in ``folder`` (removed afterwards)."""
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".upload") as tmp:
        upload.seek(0)
        shutil.copyfileobj(upload, tmp, 1 << 20)
        tmp.flush()
        yield Path(tmp.name)


@router.get("/datasets", response_model=list[Dataset])
def list_datasets(settings: SettingsDep) -> list[dict[str, Any]]:
    """Every dataset under the data root."""
    return datasets.list_datasets(settings.data_root)


@uploads.post(
    "/datasets",
    response_model=Dataset,
    status_code=201,
    responses={**R400, **R409, **R413, **R422},
)
def upload_dataset(
    settings: SettingsDep,
    name: Annotated[str, Form(min_length=1, max_length=512)],
    file: Annotated[UploadFile, File(description=".npy or IDX file, gzip allowed")],
    sample_shape: Annotated[
        str | None,
        Form(
            max_length=64,
            pattern=r"^[1-9][0-9]*(x[1-9][0-9]*)*$",
            description="Shape of one example as a picture, e.g. 28x28 or 12x12x3",
        ),
    ] = None,
    compression: Annotated[
        Literal["auto", "zstd", "none"],
        Form(description="Codec of the chunks: auto is zstd for uint8 and none for floats"),
    ] = "auto",
) -> dict[str, Any]:
    """Ingest an uploaded `.npy` or IDX file (gzip allowed) as dataset `name`."""
    try:
        datasets.check_name(name)
    except datasets.BadName as exc:
        raise field_error("name", str(exc)) from None
    shape = tuple(int(d) for d in sample_shape.split("x")) if sample_shape else None
    filename = Path(file.filename or "").name[:200] or None
    with _spooled(file.file, settings.state_dir) as path:
        # the free disk after the spooled copy, read just before decompressing
        inflated = settings.max_decompressed_bytes
        if inflated is None:
            free = datasets.decompression_limit(settings.data_root, settings.state_dir, 1 << 62)
            if free < MIN_FREE_TO_INFLATE:  # the disk, not a limit the user set
                raise HTTPException(507, "storage: too little free disk to decompress an upload")
            inflated = min(free, settings.max_upload_bytes)
        with _ingest_errors(name, _upload_field):
            return datasets.ingest_upload(
                settings.data_root,
                name,
                path,
                settings.max_dataset_bytes,
                filename=filename,
                sample_shape=shape,
                max_inflated=inflated,
                max_chunk_bytes=settings.max_chunk_bytes,
                compression=compression,
            )


@router.post(
    "/datasets/photographs",
    response_model=Dataset,
    status_code=201,
    responses={**R409, **R413, **R422},
)
def ingest_photographs(settings: SettingsDep, body: PhotographPatches) -> dict[str, Any]:
    """Sample patches of the bundled sample photographs into a new dataset."""
    n_features = body.patch_size**2 * (1 if body.gray else 3)
    if body.n_patches * n_features * 8 > settings.max_dataset_bytes:
        raise field_error(
            "n_patches",
            f"n_patches: {body.n_patches} patches of {n_features} values would exceed "
            f"{settings.max_dataset_bytes} bytes",
        )
    with _ingest_errors(body.name, _leading_field):
        return datasets.ingest_photographs(
            settings.data_root, body.name, **body.model_dump(exclude={"name"})
        )


@router.get("/datasets/{name:path}", response_model=Dataset, responses={**R404})
def get_dataset(settings: SettingsDep, name: str) -> dict[str, Any]:
    """One dataset."""
    try:
        _, info = datasets.get_dataset(settings.data_root, name)
    except datasets.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    return datasets.describe(name, info)


@router.delete("/datasets/{name:path}", status_code=204, responses={**R404, **R409})
def delete_dataset(settings: SettingsDep, store: StoreDep, name: str) -> Response:
    """Delete a dataset (refused while a queued or running job uses it, by any name of its
    folder); a name that is a symbolic link is removed, never its target."""
    try:
        with datasets.guard(settings.data_root, name):  # no job is submitted on it meanwhile
            validation.dataset_unused(store, name)
            active, _ = store.list(ACTIVE, limit=10_000)
            datasets.delete_dataset(settings.data_root, name, [(j.id, j.spec) for j in active])
    except datasets.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except (validation.InUse, datasets.InUse) as exc:
        raise HTTPException(409, str(exc)) from None
    return Response(status_code=204)
