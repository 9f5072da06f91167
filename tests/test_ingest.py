"""Ingest: IDX, .npy, image folders, photographs, out-of-core normalisation and whitening, CLI."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from sae.mnist import load_idx
from service.cli import main
from worker.array_files import ingest_idx, ingest_npy
from worker.dataset import DatasetError, open_dataset, read_all
from worker.images import ingest_images, ingest_photographs
from worker.preprocessing import load_whitening, normalize_dataset, whiten_dataset

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / ".." / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


def stored(path) -> np.ndarray:
    """The stored array itself (no scale), read with zarr directly."""
    return zarr.open_group(str(path), mode="r")["X"][...]


def leftovers(folder: Path) -> list[str]:
    """Hidden temp/scratch entries left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def write_idx(path: Path, data: np.ndarray, code: int = 0x08, claim_rows: int | None = None):
    """An IDX file (raw, or gzip if the name ends in .gz); claim_rows fakes the header count."""
    dims = list(data.shape)
    if claim_rows is not None:
        dims[0] = claim_rows
    head = bytes([0, 0, code, data.ndim]) + struct.pack(f">{data.ndim}I", *dims)
    big = data.astype(data.dtype.newbyteorder(">"))
    raw = head + big.tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)


# ------------------------------------------------------------------------------------ IDX
@pytest.mark.skipif(not MNIST.exists(), reason=f"real MNIST absent ({MNIST})")
def test_idx_round_trip_real_mnist(tmp_path):
    dest = tmp_path / "mnist"
    info = ingest_idx(MNIST, dest, chunk_rows=3000)
    images = load_idx(MNIST)
    assert info.shape == (10000, 784)
    assert info.dtype == "uint8"
    assert info.sample_shape == (28, 28)
    assert (info.chunk_rows, info.n_chunks) == (3000, 4)
    assert info.scale == 1 / 255
    assert info.preprocessing["value_range"] == [images.min() / 255, images.max() / 255]
    np.testing.assert_array_equal(stored(dest), images.reshape(10000, 784))
    # read back as floats: exactly images / 255, as the UFLDL exercises scale them
    assert np.array_equal(read_all(dest), images.reshape(10000, 784) / 255.0)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["small-idx3-ubyte", "small-idx3-ubyte.gz"])
def test_idx_small_raw_and_gzip(tmp_path, name):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(23, 3, 4), dtype=np.uint8)
    src = tmp_path / name
    write_idx(src, data)
    info = ingest_idx(src, tmp_path / "d", chunk_rows=5)
    assert info.shape == (23, 12)
    assert (info.chunk_rows, info.n_chunks) == (5, 5)
    assert info.sample_shape == (3, 4)
    np.testing.assert_array_equal(stored(tmp_path / "d"), data.reshape(23, 12))
    limited = ingest_idx(src, tmp_path / "l", chunk_rows=4, limit=9)
    assert limited.shape == (9, 12)
    np.testing.assert_array_equal(stored(tmp_path / "l"), data[:9].reshape(9, 12))


def test_idx_int16_stored_as_float32(tmp_path):
    data = np.arange(-30, 30, dtype=np.int16).reshape(10, 6)
    write_idx(tmp_path / "s.idx", data, code=0x0B)
    info = ingest_idx(tmp_path / "s.idx", tmp_path / "d", chunk_rows=3)
    assert (info.dtype, info.scale, info.sample_shape) == ("float32", 1.0, (6,))
    np.testing.assert_array_equal(read_all(tmp_path / "d"), data.astype(np.float64))
    assert info.preprocessing["value_range"] == [-30.0, 29.0]


@pytest.mark.parametrize("name", ["trunc-idx3-ubyte", "trunc-idx3-ubyte.gz"])
def test_truncated_idx_leaves_nothing(tmp_path, name):
    data = np.ones((6, 2, 2), dtype=np.uint8)
    src = tmp_path / name
    write_idx(src, data, claim_rows=10)  # the header promises 10 examples, the file holds 6
    dest = tmp_path / "d"
    with pytest.raises(ValueError, match="truncated") as err:
        ingest_idx(src, dest, chunk_rows=2)
    assert name in str(err.value)
    assert not dest.exists()
    with pytest.raises(DatasetError):
        open_dataset(dest)
    assert leftovers(tmp_path) == []


def test_idx_bad_file(tmp_path):
    (tmp_path / "x").write_bytes(b"not an idx file at all")
    with pytest.raises(ValueError, match="IDX"):
        ingest_idx(tmp_path / "x", tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        ingest_idx(tmp_path / "missing", tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------ npy
@pytest.mark.parametrize(
    ("shape", "dtype", "stored_dtype", "sample_shape"),
    [
        ((1003, 12), np.uint8, "uint8", None),
        ((1003, 12), np.float64, "float64", None),
        ((1003, 3, 4), np.uint8, "uint8", (3, 4)),
        ((1003, 3, 4), np.float64, "float64", (3, 4)),
        ((257, 5), np.float16, "float32", None),
        ((257, 5), np.int64, "float32", None),
    ],
)
def test_npy_round_trip(tmp_path, shape, dtype, stored_dtype, sample_shape):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        arr = rng.standard_normal(shape).astype(dtype)
    else:
        arr = rng.integers(0, 200, size=shape).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    info = ingest_npy(tmp_path / "a.npy", tmp_path / "d", chunk_rows=100)
    m = shape[0]
    n = int(np.prod(shape[1:]))
    assert info.shape == (m, n)
    assert info.dtype == stored_dtype
    assert info.sample_shape == sample_shape
    assert (info.chunk_rows, info.n_chunks) == (100, -(-m // 100))
    flat = arr.reshape(m, n)
    np.testing.assert_array_equal(stored(tmp_path / "d"), flat.astype(stored_dtype))
    assert info.preprocessing["value_range"] == [float(flat.min()), float(flat.max())]
    assert leftovers(tmp_path) == []


def test_npy_fortran_order(tmp_path):
    b = np.random.default_rng(5).standard_normal((333, 2, 3))
    np.save(tmp_path / "f.npy", np.asfortranarray(b))
    info = ingest_npy(tmp_path / "f.npy", tmp_path / "d", chunk_rows=50)
    assert info.sample_shape == (2, 3)
    np.testing.assert_array_equal(read_all(tmp_path / "d"), b.reshape(333, 6))


def test_npy_scale_sample_shape_and_dtype(tmp_path):
    arr = np.arange(40 * 6, dtype=np.int32).reshape(40, 6) % 256
    np.save(tmp_path / "a.npy", arr)
    info = ingest_npy(
        tmp_path / "a.npy", tmp_path / "d", dtype="uint8", scale=1 / 255, sample_shape=(2, 3)
    )
    assert (info.dtype, info.scale, info.sample_shape) == ("uint8", 1 / 255, (2, 3))
    np.testing.assert_array_equal(stored(tmp_path / "d"), arr.astype(np.uint8))
    with pytest.raises(ValueError, match="sample_shape"):
        ingest_npy(tmp_path / "a.npy", tmp_path / "e", sample_shape=(4, 4))
    np.save(tmp_path / "big.npy", arr + 300)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        ingest_npy(tmp_path / "big.npy", tmp_path / "e", dtype="uint8")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.arange(10.0), "2-D"),
        (np.ones((4, 3), dtype=np.complex128), "complex128"),
        (np.array([[object(), 1]], dtype=object), "bad.npy"),
    ],
)
def test_npy_refused(tmp_path, arr, match):
    np.save(tmp_path / "bad.npy", arr, allow_pickle=True)
    with pytest.raises(ValueError, match=match) as err:
        ingest_npy(tmp_path / "bad.npy", tmp_path / "d")
    assert "bad.npy" in str(err.value)
    assert not (tmp_path / "d").exists()


def test_npy_nan_midway_leaves_nothing(tmp_path):
    arr = np.ones((500, 4))
    arr[333, 2] = np.nan
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(ValueError, match="row 333"):
        ingest_npy(tmp_path / "a.npy", tmp_path / "d", chunk_rows=50)
    assert not (tmp_path / "d").exists()
    assert leftovers(tmp_path) == []


def test_killed_ingest_leaves_no_dataset(tmp_path):
    """SIGKILL in the middle of a write: nothing at dest, the temp folder reads as incomplete."""
    np.save(tmp_path / "a.npy", np.ones((40000, 8)))
    dest = tmp_path / "d"
    code = (
        "from worker.array_files import ingest_npy; "
        f"ingest_npy({str(tmp_path / 'a.npy')!r}, {str(dest)!r}, chunk_rows=10)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        chunks: list[Path] = []
        while not chunks and proc.poll() is None:
            chunks = [p for p in tmp_path.glob(".*/X/c/**/*") if p.is_file()]
            time.sleep(0.01)
        assert chunks, "the writer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not dest.exists()
    with pytest.raises(DatasetError):
        open_dataset(dest)
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(DatasetError, match="incomplete|not an sae dataset"):
        open_dataset(temp)


def test_overwrite_needed_to_replace(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 3)))
    np.save(tmp_path / "b.npy", np.ones((7, 2)))
    ingest_npy(tmp_path / "a.npy", tmp_path / "d")
    with pytest.raises(DatasetError, match="exists"):
        ingest_npy(tmp_path / "b.npy", tmp_path / "d")
    assert open_dataset(tmp_path / "d").shape == (10, 3)
    info = ingest_npy(tmp_path / "b.npy", tmp_path / "d", overwrite=True)
    assert info.shape == (7, 2)
    np.testing.assert_array_equal(read_all(tmp_path / "d"), np.ones((7, 2)))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_destinations(tmp_path, scheme):
    arr = np.random.default_rng(2).standard_normal((55, 4))
    np.save(tmp_path / "a.npy", arr)
    url = f"file://{tmp_path}/d" if scheme == "file" else f"memory://ingest-{tmp_path.name}/d"
    info = ingest_npy(tmp_path / "a.npy", url, chunk_rows=10)
    assert info.shape == (55, 4)
    np.testing.assert_array_equal(read_all(url), arr)
    with pytest.raises(DatasetError, match="exists"):
        ingest_npy(tmp_path / "a.npy", url)
    if scheme == "file":
        assert (tmp_path / "d").is_dir()
        assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ images
def write_pngs(folder: Path, n: int, size=(6, 7), mode="L", seed=0) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    w, h = size
    arrays = []
    for i in range(n):
        shape = (h, w) if mode == "L" else (h, w, 3)
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(a, mode=mode).save(folder / f"img{i:02d}.png")
        arrays.append(a)
    return arrays


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_images_whole_round_trip(tmp_path, mode):
    arrays = write_pngs(tmp_path / "pics", 5, mode=mode)
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    info = ingest_images(tmp_path / "pics", tmp_path / "d", gray=mode == "L", chunk_rows=2)
    n = arrays[0].size
    assert info.shape == (5, n)
    assert (info.dtype, info.scale, info.n_chunks) == ("uint8", 1 / 255, 3)
    assert info.sample_shape == arrays[0].shape
    np.testing.assert_array_equal(stored(tmp_path / "d"), np.stack(arrays).reshape(5, n))


def test_images_of_different_sizes_refused(tmp_path):
    from PIL import Image

    write_pngs(tmp_path / "pics", 3)
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(tmp_path / "pics" / "zz.png")
    with pytest.raises(ValueError, match="zz.png"):
        ingest_images(tmp_path / "pics", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert leftovers(tmp_path) == []


def test_images_16_bit_refused(tmp_path):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.fromarray(np.full((4, 4), 5000, dtype=np.uint16)).save(tmp_path / "pics" / "a.png")
    with pytest.raises(ValueError, match="8-bit"):
        ingest_images(tmp_path / "pics", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_images_patches_match_sample_patches(tmp_path):
    preprocess = pytest.importorskip("sae.preprocess")
    arrays = write_pngs(tmp_path / "pics", 3, size=(12, 10))
    info = ingest_images(tmp_path / "pics", tmp_path / "d", patch_size=4, n_patches=50, seed=3)
    expected = preprocess.sample_patches([a / 255.0 for a in arrays], 4, 50, 3)
    assert info.shape == (50, 16)
    assert info.sample_shape == (4, 4)
    np.testing.assert_array_equal(read_all(tmp_path / "d"), expected)


def test_patches_drawn_in_bounded_blocks(tmp_path, monkeypatch):
    preprocess = pytest.importorskip("sae.preprocess")
    import worker.images

    monkeypatch.setattr(worker.images, "PATCH_BLOCK", 100)
    arrays = write_pngs(tmp_path / "pics", 2, size=(11, 13))
    info = ingest_images(tmp_path / "pics", tmp_path / "d", patch_size=5, n_patches=250, seed=7)
    X = read_all(tmp_path / "d")
    images = [a / 255.0 for a in arrays]
    expected = [
        preprocess.sample_patches(images, 5, 100, 7),
        preprocess.sample_patches(images, 5, 100, [7, 1]),
        preprocess.sample_patches(images, 5, 50, [7, 2]),
    ]
    assert info.shape == (250, 25)
    np.testing.assert_array_equal(X, np.concatenate(expected))
    with pytest.raises(ValueError, match="patch"):
        ingest_images(tmp_path / "pics", tmp_path / "e", patch_size=20)
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------ photographs
def test_photographs_normalised_patches(tmp_path):
    preprocess = pytest.importorskip("sae.preprocess")
    info = ingest_photographs(tmp_path / "p", n_patches=2000, chunk_rows=300)
    X = read_all(tmp_path / "p")
    assert info.shape == (2000, 64)
    assert info.sample_shape == (8, 8)
    assert X.min() >= 0.1 and X.max() <= 0.9
    assert info.preprocessing["value_range"] == [X.min(), X.max()]
    assert info.preprocessing["steps"] == ["patches", "normalize"]
    raw = preprocess.sample_patches(preprocess.photographs(), 8, 2000, 0)
    np.testing.assert_allclose(X, preprocess.normalize_patches(raw), rtol=0, atol=1e-12)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("method", "k"), [("zca", None), ("pca", None), ("pca", 10)])
def test_whitening_out_of_core_equals_in_memory(tmp_path, method, k):
    preprocess = pytest.importorskip("sae.preprocess")
    eps = 1e-8
    info = ingest_photographs(
        tmp_path / "w",
        n_patches=3000,
        normalize=False,
        whiten=method,
        epsilon=eps,
        k=k,
        chunk_rows=700,
    )
    Y = read_all(tmp_path / "w")
    raw = preprocess.sample_patches(preprocess.photographs(), 8, 3000, 0)
    w = preprocess.fit_whitening(preprocess.MomentSums.of(raw), method, eps, k)
    assert info.shape == (3000, k or 64)
    assert info.chunk_rows == 700
    np.testing.assert_allclose(Y, w.transform(raw), rtol=0, atol=1e-10)
    stored_w = load_whitening(tmp_path / "w")
    np.testing.assert_allclose(stored_w.transform(raw[:5]), Y[:5], rtol=0, atol=1e-10)
    assert info.preprocessing["whitening"]["method"] == method
    assert info.preprocessing["value_range"] == [Y.min(), Y.max()]
    assert Y.min() < 0  # whitened data is not in [0, 1]
    if method == "zca":
        assert info.sample_shape == (8, 8)
        cov = np.cov(Y, rowvar=False, bias=True)
        # exactly U diag(S / (S + eps)) U^T: the identity up to eps / S_min
        np.testing.assert_allclose(cov, (w.U * (w.S / (w.S + eps))) @ w.U.T, atol=1e-9)
        assert np.abs(cov - np.eye(64)).max() < 1e-4
    assert leftovers(tmp_path) == []


def test_normalize_and_whiten_stored_dataset(tmp_path):
    preprocess = pytest.importorskip("sae.preprocess")
    rng = np.random.default_rng(4)
    X = rng.standard_normal((900, 6)) @ rng.standard_normal((6, 6))
    np.save(tmp_path / "x.npy", X)
    ingest_npy(tmp_path / "x.npy", tmp_path / "x", dtype="float64", chunk_rows=128)
    normalize_dataset(tmp_path / "x", tmp_path / "n")
    np.testing.assert_allclose(
        read_all(tmp_path / "n"), preprocess.normalize_patches(X), rtol=0, atol=1e-12
    )
    info = whiten_dataset(tmp_path / "x", tmp_path / "z", method="zca", epsilon=1e-12)
    Z = read_all(tmp_path / "z")
    np.testing.assert_allclose(np.cov(Z, rowvar=False, bias=True), np.eye(6), atol=1e-8)
    assert info.preprocessing["steps"] == ["whiten"]
    with pytest.raises(DatasetError, match="not whitened"):
        load_whitening(tmp_path / "x")


def test_failed_preprocessing_leaves_nothing(tmp_path):
    pytest.importorskip("sae.preprocess")
    with pytest.raises(ValueError, match="k"):
        # ZCA keeps all components: fit_whitening refuses k after raw and normalised
        # intermediates were written
        ingest_photographs(tmp_path / "d", n_patches=200, whiten="zca", k=3)
    assert not (tmp_path / "d").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_whitening_pipeline(tmp_path, scheme):
    pytest.importorskip("sae.preprocess")
    import fsspec

    url = f"file://{tmp_path}/w" if scheme == "file" else f"memory://wp-{tmp_path.name}/w"
    info = ingest_photographs(url, n_patches=400, whiten="pca", k=5, chunk_rows=150)
    assert info.shape == (400, 5) and info.n_chunks == 3
    assert load_whitening(url).k == 5
    if scheme == "file":
        assert [p.name for p in tmp_path.iterdir()] == ["w"]
    else:
        fs = fsspec.filesystem("memory")
        assert [e.rsplit("/", 1)[1] for e in fs.ls(f"/wp-{tmp_path.name}", detail=False)] == ["w"]


# ------------------------------------------------------------------------------------ CLI
def test_cli_ingest_npy_and_info(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(250 * 6, dtype=np.uint8).reshape(250, 6))
    runner = CliRunner()
    dest = str(tmp_path / "d")
    args = ["ingest", "npy", str(tmp_path / "a.npy"), dest, "--chunk-rows", "100"]
    result = runner.invoke(main, [*args, "--scale", str(1 / 255), "--sample-shape", "2x3"])
    assert result.exit_code == 0, result.output
    assert f"wrote {dest}" in result.output
    result = runner.invoke(main, ["datasets", "info", dest])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "250 x 6" in out
    assert "uint8" in out
    assert "3 chunks of 100 rows (last one 50)" in out
    assert "sample shape:  2x3" in out
    assert "MB" in out
    result = runner.invoke(main, ["datasets", "info", dest, "--json"])
    d = json.loads(result.output)
    assert d["shape"] == [250, 6] and d["n_chunks"] == 3 and d["sample_shape"] == [2, 3]
    assert d["compression"] == "zstd"  # uint8

    # existing destination: a clean error, no traceback; --overwrite replaces
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert "exists" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0


def test_cli_errors_are_clean(tmp_path):
    runner = CliRunner()
    np.save(tmp_path / "v.npy", np.arange(5.0))
    result = runner.invoke(main, ["ingest", "npy", str(tmp_path / "v.npy"), str(tmp_path / "d")])
    assert result.exit_code == 1 and "2-D" in result.output
    assert isinstance(result.exception, SystemExit)
    result = runner.invoke(main, ["ingest", "mnist", str(tmp_path / "none.gz"), "d"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(main, ["datasets", "info", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no dataset" in result.output
    result = runner.invoke(
        main, ["ingest", "npy", str(tmp_path / "v.npy"), "x", "--sample-shape", "2xq"]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "d").exists()


def test_cli_mnist_raw_idx(tmp_path):
    data = np.arange(7 * 2 * 2, dtype=np.uint8).reshape(7, 2, 2)
    write_idx(tmp_path / "t-idx3-ubyte", data)
    result = CliRunner().invoke(
        main, ["ingest", "mnist", str(tmp_path / "t-idx3-ubyte"), str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.output
    assert "7 x 4" in result.output and "sample shape:  2x2" in result.output
    np.testing.assert_array_equal(stored(tmp_path / "d"), data.reshape(7, 4))


def test_cli_photographs_and_images(tmp_path):
    pytest.importorskip("sae.preprocess")
    runner = CliRunner()
    dest = str(tmp_path / "p")
    result = runner.invoke(main, ["ingest", "photographs", dest, "--n-patches", "300"])
    assert result.exit_code == 0, result.output
    assert "300 x 64" in result.output and "normalize" in result.output
    X = read_all(dest)
    assert X.min() >= 0.1 and X.max() <= 0.9
    arrays = write_pngs(tmp_path / "pics", 2, size=(9, 9))
    result = runner.invoke(
        main,
        [
            "ingest",
            "images",
            str(tmp_path / "pics"),
            str(tmp_path / "i"),
            "--patch-size",
            "3",
            "--n-patches",
            "40",
            "--whiten",
            "zca",
            "--epsilon",
            "0.01",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "40 x 9" in result.output and "whiten" in result.output
    assert len(arrays) == 2


def test_a_dataset_rewritten_in_place_is_read_with_its_new_shape(tmp_path):
    """A process that read a dataset before it was replaced (as a long-lived Dask worker does)
    reads the new one, not the old metadata."""
    from worker.dataset import read_chunk, write_dataset

    path = tmp_path / "d"
    old = np.arange(40, dtype=np.float64).reshape(10, 4)
    write_dataset(path, old, 10, 4, dtype="float64", chunk_rows=5)
    assert np.array_equal(read_chunk(path, 0), old[:5])
    new = -np.arange(42, dtype=np.float64).reshape(7, 6)
    # written by another process: this process's cache is not cleared by the write
    code = (
        "import numpy as np; from worker.dataset import write_dataset; "
        f"write_dataset({str(path)!r}, -np.arange(42.0).reshape(7, 6), 7, 6, "
        "dtype='float64', chunk_rows=3, overwrite=True)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert np.array_equal(read_chunk(path, 0), new[:3])
    assert np.array_equal(read_chunk(path, 2), new[6:])


# ------------------------------------------------------------------------- hardening
def _memory_leftovers(url: str) -> list[str]:
    import fsspec

    fs, p = fsspec.core.url_to_fs(url)
    parent = p.rstrip("/").rpartition("/")[0]
    return sorted(x for x in fs.ls(parent, detail=False) if x.rpartition("/")[2].startswith("."))


def test_failed_remote_overwrite_keeps_the_old_dataset(tmp_path):
    """--overwrite onto a remote URL that fails midway: the old dataset is intact and the
    scratch copy is gone."""
    from worker.dataset import write_dataset

    url = f"memory://ow-{tmp_path.name}/d"
    old = np.random.default_rng(1).random((30, 4))
    write_dataset(url, old, *old.shape, dtype="float64", chunk_rows=10)
    bad = np.ones((500, 4))
    bad[333, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="row 333"):
        ingest_npy(tmp_path / "bad.npy", url, chunk_rows=50, overwrite=True)
    assert open_dataset(url).shape == (30, 4)
    np.testing.assert_array_equal(read_all(url), old)

    def blocks():
        yield np.zeros((10, 4))
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="went away"):
        write_dataset(url, blocks(), 40, 4, dtype="float64", chunk_rows=10, overwrite=True)
    np.testing.assert_array_equal(read_all(url), old)
    assert _memory_leftovers(url) == []
    # A successful overwrite replaces it, leaving nothing beside it.
    new = np.full((12, 4), 3.0)
    np.save(tmp_path / "new.npy", new)
    ingest_npy(tmp_path / "new.npy", url, chunk_rows=5, overwrite=True)
    np.testing.assert_array_equal(read_all(url), new)
    assert _memory_leftovers(url) == []
    with pytest.raises(DatasetError, match="exists"):
        write_dataset(url, new, *new.shape)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_must_be_finite_and_positive(tmp_path, scale):
    from worker.dataset import write_dataset

    x = np.ones((4, 2))
    with pytest.raises(DatasetError, match="scale"):
        write_dataset(tmp_path / "d", x, *x.shape, scale=scale)
    assert not (tmp_path / "d").exists()
    write_dataset(tmp_path / "ok", x, *x.shape)
    zarr.open_group(str(tmp_path / "ok"), mode="r+").attrs["scale"] = scale
    with pytest.raises(DatasetError, match="scale"):
        open_dataset(tmp_path / "ok")


def test_cli_scale_range(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 2)))
    for bad in ("0", "-2"):
        r = CliRunner().invoke(
            main, ["ingest", "npy", str(tmp_path / "a.npy"), str(tmp_path / "d"), "--scale", bad]
        )
        assert r.exit_code == 2 and "scale" in r.output, r.output
    r = CliRunner().invoke(
        main, ["ingest", "npy", str(tmp_path / "a.npy"), str(tmp_path / "d"), "--scale", "inf"]
    )
    assert r.exit_code != 0 and "scale" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()


def test_read_chunk_refuses_overflow_of_any_stored_dtype(tmp_path):
    from worker.dataset import ChunkError, read_chunk, write_dataset

    x = np.full((6, 2), 255, dtype=np.uint8)
    write_dataset(tmp_path / "d", x, *x.shape, dtype="uint8", chunk_rows=3, scale=1e307)
    with pytest.raises(ChunkError, match="chunk 0"):
        read_chunk(tmp_path / "d", 0)


def test_image_patches_keep_pixels_as_uint8(tmp_path, monkeypatch):
    """Images stay uint8 in memory while patches are drawn (8x less than float64), and the
    patches are bitwise those of float64 images / 255."""
    import sae.preprocess as preprocess

    real = preprocess.sample_patches
    seen = []

    def recording(images, *args, **kwargs):
        seen.extend(np.asarray(a).dtype for a in images)
        return real(images, *args, **kwargs)

    monkeypatch.setattr(preprocess, "sample_patches", recording)
    arrays = write_pngs(tmp_path / "pics", 3, size=(40, 30), seed=5)
    assert {int(v) for a in arrays for v in np.unique(a)} >= {0, 255}
    for gray in (True, False):
        seen.clear()
        dest = tmp_path / f"d{gray}"
        ingest_images(tmp_path / "pics", dest, patch_size=6, n_patches=300, seed=4, gray=gray)
        assert seen and all(dt == np.uint8 for dt in seen)
        images = [_image(tmp_path / "pics", i, gray) / 255.0 for i in range(3)]
        np.testing.assert_array_equal(read_all(dest), real(images, 6, 300, 4))


def _image(folder: Path, i: int, gray: bool) -> np.ndarray:
    from PIL import Image

    path = sorted(folder.iterdir())[i]
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if gray else "RGB"))


# ------------------------------------------------------------------------- compression
def _codecs(path) -> list[str]:
    """The names of the compressors of the stored array, read from its Zarr metadata."""
    meta = json.loads((Path(path) / "X" / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"] if c["name"] not in ("bytes", "transpose")]


def test_compression_auto_keeps_floats_raw_and_compresses_pixels(tmp_path):
    """Raw float chunks read several times faster than Zstandard ones (README, benchmarks):
    "auto" stores floats raw and uint8 pixels compressed; either choice can be forced, and the
    values read back are the same bits."""
    from worker.activations import ingest_activations
    from worker.dataset import stored_compression

    rng = np.random.default_rng(3)
    floats = rng.standard_normal((300, 40)).astype(np.float32)
    pixels = np.zeros((300, 40), np.uint8)
    pixels[:, 10:20] = rng.integers(0, 256, (300, 10))  # a background of zeros
    np.save(tmp_path / "f.npy", floats)
    np.save(tmp_path / "p.npy", pixels)
    for name, compression, src, want in [
        ("f_auto", "auto", "f.npy", []),
        ("f_zstd", "zstd", "f.npy", ["zstd"]),
        ("p_auto", "auto", "p.npy", ["zstd"]),
        ("p_none", "none", "p.npy", []),
    ]:
        dest = tmp_path / name
        ingest_npy(tmp_path / src, dest, chunk_rows=100, compression=compression)
        assert _codecs(dest) == want, name
        assert stored_compression(dest) == (want[0] if want else "none")
        np.testing.assert_array_equal(stored(dest), floats if src == "f.npy" else pixels)
    disk = sum(
        p.stat().st_size for p in (tmp_path / "p_auto" / "X" / "c").rglob("*") if p.is_file()
    )
    assert 0 < disk < pixels.nbytes / 2  # the background compresses
    # activations, IDX and the preprocessing steps take the same option
    ingest_activations(tmp_path / "f.npy", tmp_path / "a", compression="zstd", chunk_rows=64)
    assert _codecs(tmp_path / "a") == ["zstd"]
    np.testing.assert_array_equal(stored(tmp_path / "a"), floats)
    write_idx(tmp_path / "p.idx", pixels)
    ingest_idx(tmp_path / "p.idx", tmp_path / "i", compression="none")
    assert _codecs(tmp_path / "i") == []
    normalize_dataset(tmp_path / "p_auto", tmp_path / "n", compression="zstd")
    assert _codecs(tmp_path / "n") == ["zstd"]
    normalize_dataset(tmp_path / "p_auto", tmp_path / "n_raw")
    assert _codecs(tmp_path / "n_raw") == []
    np.testing.assert_array_equal(read_all(tmp_path / "n"), read_all(tmp_path / "n_raw"))
    ingest_photographs(tmp_path / "ph", n_patches=50, compression="zstd", whiten="zca")
    assert _codecs(tmp_path / "ph") == ["zstd"]


@pytest.mark.parametrize(
    "fn",
    [
        lambda src, dest: ingest_npy(src, dest, compression="lz4"),
        lambda src, dest: ingest_idx(src, dest, compression="gzip"),
        lambda src, dest: normalize_dataset(src, dest, compression="Zstd"),
        lambda src, dest: ingest_photographs(dest, n_patches=10, compression=""),
    ],
)
def test_unknown_compression_is_refused_before_reading(tmp_path, fn):
    """The error names the field and lists the choices; nothing is written."""
    with pytest.raises(DatasetError, match=r"compression: choose one of \['auto', 'zstd'"):
        fn(tmp_path / "no-such-source", tmp_path / "d")
    assert not (tmp_path / "d").exists() and leftovers(tmp_path) == []


def test_cli_compression(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(60, dtype=np.float32).reshape(20, 3))
    runner = CliRunner()
    dest = str(tmp_path / "d")
    result = runner.invoke(main, ["ingest", "npy", str(tmp_path / "a.npy"), dest, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "compression:   none" in result.output
    result = runner.invoke(
        main, ["ingest", "npy", str(tmp_path / "a.npy"), dest + "z", "--compression", "zstd"]
    )
    assert result.exit_code == 0 and "compression:   zstd" in result.output, result.output
    assert "compression:   zstd" in runner.invoke(main, ["datasets", "info", dest + "z"]).output
    result = runner.invoke(
        main, ["ingest", "npy", str(tmp_path / "a.npy"), dest + "x", "--compression", "lz4"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'--compression'" in result.output and "'auto', 'zstd', 'none'" in result.output
    assert not (tmp_path / "dx").exists()
