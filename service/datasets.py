"""Datasets under the data root: safe name resolution, listing, upload ingestion, deletion.

A dataset's name is its Zarr path relative to the data root, so a dataset written there by
``sae ingest`` is served at once. Names resolve inside the data root only: no ``..``, no
absolute paths, no symbolic link that leads outside.

A deletion (its check that no active job uses the dataset, and the removal) and a job's
submission (its check of the dataset, and the job's record) hold :func:`guard` of the folder
the name resolves to, so one of the two comes first, whichever names they use.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from worker import schedule
from worker.dataset import (
    DatasetError,
    DatasetInfo,
    dataset_version,
    open_dataset,
    read_chunk,
    stored_compression,
)

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # used with fullmatch
MAX_NAME_LENGTH = 512


class BadName(ValueError):
    """A dataset name is not allowed (outside the data root, or malformed)."""


class NotFound(LookupError):
    """No dataset of that name."""


class Exists(FileExistsError):
    """A dataset of that name exists already."""


class InUse(RuntimeError):
    """A queued or running job uses the dataset (maybe by another name of the same folder)."""


class TooLarge(ValueError):
    """An upload exceeds a size limit of the service (decompressed size, bytes per chunk)."""


def check_name(name: str) -> str:
    """Validate the form of a dataset name: ``a/b/c`` with plain segments, no ``.`` or ``..``.

    Raises
    ------
    BadName
        Naming the problem.
    """
    if not name or len(name) > MAX_NAME_LENGTH:
        raise BadName(f"name: must have 1 to {MAX_NAME_LENGTH} characters")
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise BadName("name: must be a relative path inside the data root")
    for seg in name.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg) or seg.startswith("."):
            raise BadName(
                f"name: segment {seg!r} is not allowed (letters, digits, '.', '_', '-'; "
                "no empty, '.' or '..' segments)"
            )
    return name


def resolve(data_root: str | os.PathLike, name: str) -> Path:
    """The path of dataset ``name``, checked to lie inside the data root after symlinks.

    Raises
    ------
    BadName
    """
    check_name(name)
    root = Path(data_root).resolve()
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise BadName("name: resolves outside the data root")
    return path


def _is_dataset_dir(p: Path) -> bool:
    zj = p / "zarr.json"
    if not zj.is_file():
        return False
    try:
        return '"sae_dataset"' in zj.read_text()
    except OSError:
        return False


def describe(name: str, info: DatasetInfo) -> dict[str, Any]:
    """The JSON summary of a dataset."""
    return {
        "name": name,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "chunks": [info.chunk_rows, info.shape[1]],
        "n_chunks": info.n_chunks,
        "bytes": info.nbytes,
        "compression": stored_compression(info.path),
        "sample_shape": list(info.sample_shape) if info.sample_shape else None,
        "scale": info.scale,
        "preprocessing": info.preprocessing,
        "source": info.source,
    }


def list_datasets(data_root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete dataset under the data root, by name."""
    root = Path(data_root).resolve()
    out = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here != root and _is_dataset_dir(here):
            dirnames[:] = []
            name = here.relative_to(root).as_posix()
            try:
                out.append(describe(name, open_dataset(here)))
            except (DatasetError, OSError):
                continue
    return out


def _existing(data_root: str | os.PathLike, name: str) -> Path:
    """The folder of dataset ``name``, which must exist (BadName, NotFound otherwise)."""
    path = resolve(data_root, name)
    if not _is_dataset_dir(path):
        raise NotFound(f"dataset: no dataset named {name!r}")
    return path


def get_dataset(data_root: str | os.PathLike, name: str) -> tuple[Path, DatasetInfo]:
    """Path and description of dataset ``name``.

    Raises
    ------
    BadName, NotFound
    """
    path = _existing(data_root, name)
    try:
        return path, open_dataset(path)
    except DatasetError as exc:
        raise NotFound(str(exc).replace(str(path), repr(name))) from None


#: The lock of each folder some request holds or waits for, and how many do (then dropped).
_GUARDS: dict[str, list] = {}
_GUARDS_LOCK = threading.Lock()


@contextlib.contextmanager
def guard(data_root: str | os.PathLike, *names: str | None) -> Iterator[None]:
    """Hold the locks of datasets ``names`` (None and names that cannot resolve are skipped).

    A lock belongs to the folder a name resolves to, so two names of one folder (one of them a
    symbolic link) share it; locks are taken in one order, so holders of several never
    deadlock. Held by a deletion across "no active job uses it" and the removal, and by a job's
    submission across "the dataset exists and fits" and the job's record. (Within one service
    process: the locks are threads'.)
    """
    keys = set()
    for name in names:
        if name is not None:
            with contextlib.suppress(BadName):
                keys.add(str(resolve(data_root, name)))
    keys = sorted(keys)
    with _GUARDS_LOCK:
        entries = [_GUARDS.setdefault(key, [threading.Lock(), 0]) for key in keys]
        for entry in entries:
            entry[1] += 1
    try:
        with contextlib.ExitStack() as stack:
            for lock, _ in entries:
                stack.enter_context(lock)
            yield
    finally:
        with _GUARDS_LOCK:
            for key, entry in zip(keys, entries, strict=True):
                entry[1] -= 1
                if entry[1] == 0:
                    del _GUARDS[key]


def _link(data_root: str | os.PathLike, name: str) -> Path | None:
    """``name`` in the data root if it is a symbolic link itself (its parents resolved)."""
    root = Path(data_root).resolve()
    lexical = root / check_name(name)
    parent = lexical.parent.resolve()
    if not parent.is_relative_to(root):
        return None  # resolve() refuses it
    path = parent / lexical.name
    return path if path.is_symlink() else None


def users(
    data_root: str | os.PathLike, name: str, jobs: Iterable[tuple[str, Mapping[str, Any]]]
) -> list[str]:
    """Ids of the jobs of ``jobs`` (``(id, spec)`` pairs) that train on, or measure on, the
    folder ``name`` resolves to, by whatever name."""
    target = resolve(data_root, name)
    out = []
    for job_id, spec in jobs:
        for used in (spec.get("dataset"), spec.get("validation_dataset")):
            if not isinstance(used, str):
                continue
            with contextlib.suppress(BadName):
                if resolve(data_root, used) == target:
                    out.append(job_id)
                    break
    return out


def delete_dataset(
    data_root: str | os.PathLike,
    name: str,
    jobs: Iterable[tuple[str, Mapping[str, Any]]] = (),
) -> None:
    """Remove dataset ``name`` from disk; if ``name`` is a symbolic link (to a dataset inside
    the data root: like every name, one leading outside is refused), only the link.

    Call it under :func:`guard` of ``name``, with the active jobs read under that guard.

    Parameters
    ----------
    data_root : path
    name : str
    jobs : iterable of (id, spec)
        The active jobs: the deletion is refused if one uses the folder ``name`` resolves to,
        by any name (compared as resolved paths).

    Raises
    ------
    BadName, NotFound, InUse
    """
    path = _existing(data_root, name)
    link = _link(data_root, name)
    jobs = list(jobs)
    ids = users(data_root, name, jobs) if jobs else []
    if ids:
        raise InUse(f"name: dataset {name!r} is used by active jobs {ids}")
    if link is not None:
        link.unlink()
        return
    shutil.rmtree(path)
    _RANGES.pop(str(path), None)


# ------------------------------------------------------------------------------ value range

_RANGES: dict[str, tuple[float, float, str | None]] = {}
_RANGES_LOCK = threading.Lock()


def value_range(path: Path, info: DatasetInfo) -> tuple[float, float]:
    """Smallest and largest value of a dataset (scaled), read chunk by chunk once and cached.

    What is known without reading the data is trusted (:func:`worker.schedule.value_range`:
    the range the ingestion recorded, or the bound of ``uint8`` pixels).
    """
    known = schedule.value_range(info)
    if known is not None:
        return known
    stamp = dataset_version(path)
    with _RANGES_LOCK:
        hit = _RANGES.get(str(path))
    if hit and stamp is not None and hit[2] == stamp:
        return hit[0], hit[1]
    lo, hi = float("inf"), float("-inf")
    for i in range(info.n_chunks):
        x = read_chunk(path, i, "float64", info.scale)
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    with _RANGES_LOCK:
        _RANGES[str(path)] = (lo, hi, stamp)
    return lo, hi


# ------------------------------------------------------------------------------ uploads


def sniff_format(path: Path) -> str:
    """``"npy"`` or ``"idx"`` from the file's first bytes (gzip-compressed or raw).

    Raises
    ------
    ValueError
        If the file is neither.
    """
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = f.read(6)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"file: cannot read the upload ({exc})") from None
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in (8, 9, 11, 12, 13, 14):
        return "idx"
    raise ValueError("file: not a .npy or IDX file (gzip allowed)")


def _inside_dataset(data_root: str | os.PathLike, dest: Path) -> str | None:
    """Name of a dataset that ``dest`` would lie inside, if any."""
    root = Path(data_root).resolve()
    for parent in dest.parents:
        if parent == root or not parent.is_relative_to(root):
            return None
        if _is_dataset_dir(parent):
            return parent.relative_to(root).as_posix()
    return None


def _check_new(data_root: str | os.PathLike, name: str) -> Path:
    dest = resolve(data_root, name)
    root = Path(data_root).resolve()
    for parent in dest.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        if parent.exists() and not parent.is_dir():
            rel = parent.relative_to(root).as_posix()
            raise BadName(f"name: {rel!r} is a file, so {name!r} cannot be made under it")
    if dest.exists():
        raise Exists(f"name: a dataset named {name!r} exists already")
    outer = _inside_dataset(data_root, dest)
    if outer is not None:
        raise BadName(f"name: {name!r} would lie inside dataset {outer!r}")
    return dest


_CREATING: dict[str, threading.Lock] = {}
_CREATING_LOCK = threading.Lock()


@contextlib.contextmanager
def _creating(name: str) -> Iterator[None]:
    """Hold the lock of dataset ``name`` while it is made, so a second maker sees it exist."""
    with _CREATING_LOCK:
        lock = _CREATING.setdefault(name, threading.Lock())
    with lock:
        yield


#: A write in progress: the hidden sibling :func:`worker.dataset.scratch_path` makes.
_SCRATCH = re.compile(r"^\..+\.(tmp|raw|norm|old)-[0-9a-f]{8}$")
#: An upload's spooled copy in the state folder, and its decompressed twin.
_SPOOLED = re.compile(r"^tmp[^/]*\.upload(\.raw)?$")
#: A scratch folder untouched this long is not an ingest still running in another process
#: (whose passes over a large dataset may read one for hours without writing to it).
STALE_SECONDS = 24 * 3600.0


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for sub in path.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, sub.lstat().st_mtime)
    return newest


def remove_leftovers(
    data_root: str | os.PathLike, state_dir: str | os.PathLike, now: float | None = None
) -> list[Path]:
    """Remove what uploads and ingests killed mid-way left behind: the spooled uploads in
    ``state_dir`` (only the service writes them: all of them, at its start) and the hidden
    scratch folders of writes in progress under ``data_root`` that nothing has touched for
    :data:`STALE_SECONDS` (a younger one may be an ingest still running in another process).
    A dataset's previous version (``.X.old-*``) whose replacement never arrived (a kill
    between the two renames of an overwrite) is put back as ``X``, never removed.

    Returns
    -------
    removed : list of Path
    """
    import time

    now = time.time() if now is None else now
    removed: list[Path] = []
    state = Path(state_dir)
    if state.is_dir():
        for p in state.iterdir():
            if _SPOOLED.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    root = Path(data_root)
    if root.is_dir():
        for p in sorted(root.rglob(".*"), key=lambda q: len(q.parts)):
            m = _SCRATCH.match(p.name)
            if not m or not p.exists() or p.is_symlink():
                continue
            live = p.with_name(p.name[1 : -len(f".{m.group(1)}-00000000")])
            if m.group(1) == "old" and not live.exists():  # the only copy: put it back
                with contextlib.suppress(OSError):
                    os.replace(p, live)
                    removed.append(p)
                continue
            try:
                stale = now - _newest_mtime(p) > STALE_SECONDS
            except OSError:
                continue
            if stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def decompression_limit(
    data_root: str | os.PathLike, state_dir: str | os.PathLike, at_most: int
) -> int:
    """The default most bytes a gzip-compressed upload may decompress to: ``at_most`` (the
    largest upload), and at most a quarter of the free space of the data root (where the
    dataset goes) and of the state folder (where the decompressed copy goes), now."""
    limit = at_most
    for folder in (data_root, state_dir):
        with contextlib.suppress(OSError):
            limit = min(limit, shutil.disk_usage(folder).free // 4)
    return max(1, limit)


class _WriteError(Exception):
    """Wraps an OSError of writing the decompressed copy (told apart from reading errors)."""


def _gunzip(src: Path, max_bytes: int, max_inflated: int | None = None) -> Path:
    """Decompress ``src`` next to itself in 1 MiB steps, refusing (as it streams) more than
    ``max_bytes`` (the largest dataset: ValueError) or ``max_inflated`` (the most an upload
    may decompress to: :class:`TooLarge`)."""
    out = src.with_name(src.name + ".raw")
    done = 0
    try:
        with gzip.open(src, "rb") as fin, open(out, "wb") as fout:
            while block := fin.read(1 << 20):
                done += len(block)
                if done > max_bytes:
                    raise ValueError(f"file: decompresses to more than {max_bytes} bytes")
                if max_inflated is not None and done > max_inflated:
                    raise TooLarge(
                        f"file: decompresses to more than {max_inflated} bytes, the most an "
                        "upload may decompress to (max_decompressed_bytes)"
                    )
                try:
                    fout.write(block)
                except OSError as exc:  # our disk, not the upload: raised as it is (507)
                    raise _WriteError(exc) from exc
    except _WriteError as exc:
        out.unlink(missing_ok=True)
        raise exc.__cause__ from None
    except (OSError, EOFError, zlib.error) as exc:
        out.unlink(missing_ok=True)
        raise ValueError(f"file: cannot decompress the upload ({exc})") from None
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def ingest_upload(
    data_root: str | os.PathLike,
    name: str,
    src: Path,
    max_bytes: int = 1 << 40,
    filename: str | None = None,
    sample_shape: tuple[int, ...] | None = None,
    max_inflated: int | None = None,
    max_chunk_bytes: int | None = None,
    compression: str = "auto",
) -> dict[str, Any]:
    """Write an uploaded ``.npy`` or IDX file (gzip allowed) as dataset ``name``.

    The file is streamed into the Zarr store block by block by :mod:`worker.array_files` (a
    gzip-compressed upload, of either format, is first decompressed to disk, at most
    ``max_bytes`` and ``max_inflated``, checked as it streams). Chunks hold at most
    ``max_chunk_bytes`` (default :data:`worker.array_files.MAX_CHUNK_BYTES`). The dataset's
    source names the uploaded file (``filename``, as the client sent it), not the temporary
    copy; ``sample_shape`` (e.g. (28, 28)) makes its examples pictures. A refused upload
    leaves nothing behind: no decompressed copy, no scratch folder, no empty parent folder
    made for it. ``compression`` is the chunks' codec (:func:`worker.dataset.compressors`).

    Raises
    ------
    BadName, Exists, ValueError
    TooLarge
        If the upload decompresses to more than ``max_inflated``, or one example is larger
        than ``max_chunk_bytes``.
    """
    fmt = sniff_format(src)
    from worker import array_files

    chunk_bytes = array_files.MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    with _creating(name):
        dest = _check_new(data_root, name)
        made = _missing_parents(data_root, dest)
        raw = None
        try:
            with open(src, "rb") as f:
                if f.read(2) == b"\x1f\x8b":  # either format: decompress under the caps
                    raw = src = _gunzip(src, max_bytes, max_inflated)
            source = f"upload:{filename or 'file'} ({fmt})"
            ingest = array_files.ingest_npy if fmt == "npy" else array_files.ingest_idx
            info = ingest(
                src,
                dest,
                sample_shape=sample_shape,
                source=source,
                max_chunk_bytes=chunk_bytes,
                compression=compression,
            )
        except (DatasetError, ValueError) as exc:
            _remove_empty(made)
            if dest.exists():  # another process made it meanwhile
                raise Exists(f"name: a dataset named {name!r} exists already") from None
            msg = str(exc).replace(str(src), "the upload").replace(str(dest), repr(name))
            field = "sample_shape" if msg.startswith("sample_shape") else "file"
            kind = TooLarge if isinstance(exc, TooLarge | array_files.TooLarge) else ValueError
            raise kind(msg if msg.startswith(field) else f"file: {msg}") from None
        except BaseException:
            _remove_empty(made)
            raise
        finally:
            if raw is not None:
                raw.unlink(missing_ok=True)
    return describe(name, info)


def _missing_parents(data_root: str | os.PathLike, dest: Path) -> list[Path]:
    """The folders between the data root and ``dest`` that do not exist yet, innermost first."""
    root = Path(data_root).resolve()
    return [p for p in dest.parents if p.is_relative_to(root) and p != root and not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (innermost first) that are empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def ingest_photographs(data_root: str | os.PathLike, name: str, **options: Any) -> dict[str, Any]:
    """Sample patches of the bundled photographs into dataset ``name``.

    Raises
    ------
    BadName, Exists, ValueError
    """
    from worker import images

    with _creating(name):
        dest = _check_new(data_root, name)
        try:
            info = images.ingest_photographs(dest, **options)
        except DatasetError:
            if dest.exists():
                raise Exists(f"name: a dataset named {name!r} exists already") from None
            raise
    return describe(name, info)
