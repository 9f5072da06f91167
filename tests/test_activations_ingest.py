"""Ingest of activations (worker.activations): .npy / .safetensors shards into one dataset,
stored as float16 or bfloat16 and read as float32/float64; `sae ingest activations`."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from safetensors.numpy import save_file

from service.cli import main
from worker.activations import _pieces, ingest_activations
from worker.dataset import (
    ChunkError,
    DatasetError,
    open_dataset,
    read_all,
    read_chunk,
    write_dataset,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def rounded(x: np.ndarray, storage: str) -> np.ndarray:
    """``x`` rounded to ``storage`` and read back as float32 (what the dataset must hold)."""
    return x.astype(BF16 if storage == "bfloat16" else storage).astype(np.float32)


def chunk_bytes(path: Path) -> int:
    """Bytes on disk of a dataset's chunk files (the encoded, zstd-compressed values)."""
    return sum(p.stat().st_size for p in (path / "X" / "c").rglob("*") if p.is_file())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def shards(tmp_path) -> tuple[Path, np.ndarray]:
    """Four float32 .npy shards named so that only natural order is right, plus a stray
    file; and their rows in natural order."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "acts"
    folder.mkdir()
    parts = {
        n: rng.standard_normal((r, 12)).astype(np.float32)
        for n, r in [(10, 7), (2, 30), (1, 5), (3, 41)]
    }
    for n, a in parts.items():
        np.save(folder / f"shard_{n}.npy", a)
    (folder / "README.txt").write_text("not a shard")
    return folder, np.concatenate([parts[n] for n in sorted(parts)])


# ------------------------------------------------------------------------------------ .npy
@pytest.mark.parametrize("storage", [None, "float32", "float16", "bfloat16", "float64"])
def test_npy_shards_in_natural_order(tmp_path, shards, storage):
    folder, X = shards
    info = ingest_activations(folder, tmp_path / "d", storage=storage, chunk_rows=16)
    assert info.shape == X.shape == (83, 12)
    assert info.dtype == (storage or "float32")
    assert (info.chunk_rows, info.n_chunks, info.sample_shape) == (16, 6, None)
    expected = X if storage in (None, "float32", "float64") else rounded(X, storage)
    for dtype in ("float32", "float64"):
        got = read_all(tmp_path / "d", dtype)
        assert got.dtype == dtype
        assert np.array_equal(got, expected.astype(dtype))  # bitwise: every value is exact
    assert info.preprocessing["value_range"] == [float(expected.min()), float(expected.max())]
    assert info.preprocessing["source_dtype"] == "float32"
    assert "shard_1.npy ... shard_10.npy" in info.source
    assert leftovers(tmp_path) == []


def test_bfloat16_is_stored_as_its_bits(tmp_path, shards):
    folder, X = shards
    ingest_activations(folder, tmp_path / "d", storage="bfloat16", chunk_rows=16)
    arr = zarr.open_group(str(tmp_path / "d"), mode="r")["X"]
    assert (str(arr.dtype), arr.attrs["storage"]) == ("uint16", "bfloat16")
    assert np.array_equal(arr[...], X.astype(BF16).view(np.uint16))
    assert read_chunk(tmp_path / "d", 1).dtype == np.float64  # the engine's default
    # a storage attribute that does not describe the array is refused
    zarr.open_array(str(tmp_path / "d" / "X"), mode="r+").attrs["storage"] = "float8"
    with pytest.raises(DatasetError, match="storage"):
        open_dataset(tmp_path / "d")


def test_single_file_fortran_order_and_nd(tmp_path):
    a = np.asfortranarray(np.random.default_rng(1).standard_normal((6, 5, 4)))
    np.save(tmp_path / "f.npy", a)
    info = ingest_activations(tmp_path / "f.npy", tmp_path / "d", storage="float16", chunk_rows=4)
    assert (info.shape, info.dtype) == ((30, 4), "float16")
    np.testing.assert_array_equal(
        read_all(tmp_path / "d", "float32"), rounded(a.reshape(30, 4), "float16")
    )


def test_pieces_cover_rows_in_order_and_bounded():
    for lead in [(7,), (3, 5), (2, 3, 4), (4, 0, 3), (1, 13)]:
        rows = np.arange(math.prod(lead)).reshape(lead)
        for limit in (1, 2, 5, 6, 100):
            end = 0
            for index, r0, r1 in _pieces(lead, limit):
                assert r0 == end and 0 < r1 - r0 <= limit
                np.testing.assert_array_equal(rows[index].ravel(), np.arange(r0, r1))
                end = r1
            assert end == rows.size


# ------------------------------------------------------------------------------------ safetensors
def test_safetensors_3d_tensors_flattened(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "st"
    folder.mkdir()
    parts = [rng.standard_normal((b, 9, 8)).astype(np.float32) for b in (3, 1, 4)]
    for i, a in enumerate(parts):
        save_file({"resid": a}, str(folder / f"batch_{i}.safetensors"))
    X = np.concatenate([a.reshape(-1, 8) for a in parts])
    # chunk_rows 4 < seq 9: one batch entry is read in pieces
    info = ingest_activations(folder, tmp_path / "d", chunk_rows=4)
    assert (info.shape, info.dtype) == ((72, 8), "float32")
    assert np.array_equal(read_all(tmp_path / "d", "float32"), X)
    info = ingest_activations(folder, tmp_path / "h", storage="bfloat16", chunk_rows=20)
    assert np.array_equal(read_all(tmp_path / "h", "float32"), rounded(X, "bfloat16"))
    assert "key resid" in info.source


def test_safetensors_key_chooses_a_tensor(tmp_path):
    rng = np.random.default_rng(3)
    acts, other = rng.standard_normal((10, 6)), rng.standard_normal((4, 3))
    save_file({"mlp_out": acts, "attn_out": other}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"key: .*2 tensors \(attn_out, mlp_out\)"):
        ingest_activations(tmp_path / "two.safetensors", tmp_path / "d")
    with pytest.raises(ValueError, match="key: .*no tensor 'resid'; it holds attn_out, mlp_out"):
        ingest_activations(tmp_path / "two.safetensors", tmp_path / "d", key="resid")
    info = ingest_activations(tmp_path / "two.safetensors", tmp_path / "d", key="mlp_out")
    assert (info.shape, info.dtype) == ((10, 6), "float64")
    assert np.array_equal(read_all(tmp_path / "d"), acts)


def test_bfloat16_source_kept_bitwise(tmp_path):
    x = np.random.default_rng(4).standard_normal((5, 7, 16)).astype(BF16)
    save_file({"acts": x}, str(tmp_path / "bf.safetensors"))
    info = ingest_activations(tmp_path / "bf.safetensors", tmp_path / "d", chunk_rows=8)
    assert info.dtype == "bfloat16" and info.preprocessing["source_dtype"] == "bfloat16"
    flat = x.reshape(35, 16)
    stored = zarr.open_group(str(tmp_path / "d"), mode="r")["X"][...]
    assert np.array_equal(stored, flat.view(np.uint16))
    assert np.array_equal(read_all(tmp_path / "d", "float32"), flat.astype(np.float32))
    # widened to float32: the same values
    ingest_activations(tmp_path / "bf.safetensors", tmp_path / "w", storage="float32")
    assert np.array_equal(read_all(tmp_path / "w", "float32"), flat.astype(np.float32))


# ------------------------------------------------------------------------------------ size
def test_half_precision_halves_the_bytes_on_disk(tmp_path):
    """Chunks are zstd-compressed (zarr's default); random normal values barely compress, so
    the ratio on disk is the ratio of item sizes (bfloat16's 8-bit exponent compresses a little
    more)."""
    X = np.random.default_rng(5).standard_normal((20000, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    size = {}
    for storage in ("float32", "float16", "bfloat16"):
        info = ingest_activations(
            tmp_path / "x.npy", tmp_path / storage, storage=storage, chunk_rows=2500
        )
        size[storage] = chunk_bytes(tmp_path / storage)
        assert info.nbytes == X.size * (4 if storage == "float32" else 2)
    assert size["float32"] > 0.9 * X.nbytes  # barely compressed
    assert 0.45 < size["float16"] / size["float32"] < 0.55
    assert 0.35 < size["bfloat16"] / size["float32"] < 0.55


# ------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_memory_is_bounded_by_chunks_not_by_total_size(tmp_path, fmt):
    """tracemalloc's peak (numpy arrays, the bytes safetensors and zarr allocate) while ingesting
    32 chunks is that of ingesting 8 chunks: a few chunks, a small part of the data."""
    rows, d = 2000, 64  # a chunk: 512 KB as float32
    rng = np.random.default_rng(6)

    def folder(n_chunks: int) -> Path:
        out = tmp_path / f"{fmt}{n_chunks}"
        out.mkdir()
        for i in range(4):
            a = rng.standard_normal((n_chunks * rows // 4 // 50, 50, d)).astype(np.float32)
            if fmt == "npy":
                np.save(out / f"s{i}.npy", a)
            else:
                save_file({"a": a}, str(out / f"s{i}.safetensors"))
        return out

    def peak(src: Path) -> int:
        tracemalloc.start()
        try:
            ingest_activations(
                src, tmp_path / "d", storage="bfloat16", chunk_rows=rows, overwrite=True
            )
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, big = folder(8), folder(32)
    peak(small)  # warm up: imports and caches
    p8, p32 = peak(small), peak(big)
    chunk = rows * d * 4
    assert p32 < 1.25 * p8 + 2**18, (p8, p32)  # independent of the total
    assert p32 < 8 * chunk, (p32, chunk)  # a few chunks (read, rounded, encoded, compressed)
    assert p32 < 32 * chunk / 4, (p32, 32 * chunk)


# ------------------------------------------------------------------------------------ errors
def test_refusals_name_the_field_and_leave_nothing(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    a = np.ones((20, 4), dtype=np.float32)
    a[13, 1] = np.nan
    np.save(bad / "a.npy", a)
    with pytest.raises(ValueError, match=r"src: .*a.npy holds NaN or inf \(first at row 13\)"):
        ingest_activations(bad, tmp_path / "d", chunk_rows=5)
    np.save(bad / "a.npy", np.full((3, 4), 1e5))
    with pytest.raises(ValueError, match="storage: .*beyond the range of float16"):
        ingest_activations(bad, tmp_path / "d", storage="float16")
    np.save(bad / "a.npy", np.ones((3, 4), dtype=np.float32))
    np.save(bad / "b.npy", np.ones((3, 4), dtype=np.float16))
    with pytest.raises(ValueError, match="storage: .*float32 .*float16"):
        ingest_activations(bad, tmp_path / "d")
    assert ingest_activations(bad, tmp_path / "d", storage="float16").shape == (6, 4)
    with pytest.raises(ValueError, match="storage: choose one of"):
        ingest_activations(bad, tmp_path / "e", storage="int8")
    with pytest.raises(ValueError, match="key: only .safetensors"):
        ingest_activations(bad, tmp_path / "e", key="x")
    with pytest.raises(DatasetError, match="exists"):
        ingest_activations(bad, tmp_path / "d")
    assert not (tmp_path / "e").exists()
    assert leftovers(tmp_path) == []


def test_write_dataset_refuses_float16_overflow(tmp_path):
    x = np.array([[1.0, 7e4]])
    with pytest.raises(DatasetError, match="dtype: .*overflow float16"):
        write_dataset(tmp_path / "d", x, *x.shape, dtype="float16")
    assert not (tmp_path / "d").exists()
    write_dataset(tmp_path / "b", x, *x.shape, dtype="bfloat16")  # float32's range
    np.testing.assert_allclose(read_all(tmp_path / "b"), x, rtol=2**-8)
    # a stored inf is still refused when read
    write_dataset(tmp_path / "i", np.array([[np.inf]]), 1, 1, dtype="float16")
    with pytest.raises(ChunkError, match="chunk 0"):
        read_chunk(tmp_path / "i", 0)


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (SRC and options, expected start of the message)."""
    (tmp / "empty").mkdir()
    (tmp / "widths").mkdir()
    np.save(tmp / "widths" / "a_1.npy", np.ones((3, 4), dtype=np.float32))
    np.save(tmp / "widths" / "a_2.npy", np.ones((3, 5), dtype=np.float32))
    save_file({"x": np.ones((2, 3)), "y": np.ones((2, 3))}, str(tmp / "two.safetensors"))
    np.save(tmp / "ints.npy", np.ones((3, 4), dtype=np.int32))
    np.save(tmp / "none.npy", np.ones((0, 4), dtype=np.float32))
    np.save(tmp / "vector.npy", np.ones(4, dtype=np.float32))
    np.save(tmp / "big.npy", np.full((2, 2), 1e6, dtype=np.float32))
    (tmp / "junk.safetensors").write_bytes(b"not a safetensors file")
    return {
        "missing folder": ([str(tmp / "nowhere")], "Error: src: no such file or folder"),
        "no shards": ([str(tmp / "empty")], "Error: src: no .npy or .safetensors files"),
        "widths": ([str(tmp / "widths")], "Error: src: "),
        "no key": ([str(tmp / "two.safetensors")], "Error: key: "),
        "unknown key": ([str(tmp / "two.safetensors"), "--key", "z"], "Error: key: "),
        "non-float": ([str(tmp / "ints.npy")], "Error: src: "),
        "empty": ([str(tmp / "none.npy")], "Error: src: "),
        "1-D": ([str(tmp / "vector.npy")], "Error: src: "),
        "overflow": ([str(tmp / "big.npy"), "--storage", "float16"], "Error: storage: "),
        "unreadable": ([str(tmp / "junk.safetensors")], "Error: src: "),
    }


EXPECTED = {
    "widths": "a_2.npy has rows of 5 features",
    "no key": "holds 2 tensors (x, y); pass key=NAME (--key NAME)",
    "unknown key": "has no tensor 'z'; it holds x, y",
    "non-float": "holds int32, not floats",
    "empty": "holds no activations",
    "1-D": "2-D",
    "unreadable": "not a readable .safetensors file",
}


def test_cli_errors_are_one_line_exit_1(tmp_path):
    runner = CliRunner()
    for name, (args, start) in _cli_cases(tmp_path).items():
        dest = tmp_path / "out"
        result = runner.invoke(main, ["ingest", "activations", *args, str(dest)])
        out = result.output.strip()
        assert result.exit_code == 1, (name, result.output)
        assert out.startswith(start) and "\n" not in out, (name, out)
        assert EXPECTED.get(name, "") in out, (name, out)
        assert "Traceback" not in result.output
        assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_cli_ingest_and_info(tmp_path, shards):
    folder, X = shards
    runner = CliRunner()
    dest = str(tmp_path / "d")
    args = [
        "ingest",
        "activations",
        str(folder),
        dest,
        "--storage",
        "bfloat16",
        "--chunk-rows",
        "20",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "83 x 12" in result.output and "bfloat16" in result.output
    np.testing.assert_array_equal(read_all(dest, "float32"), rounded(X, "bfloat16"))
    result = runner.invoke(main, ["datasets", "info", dest, "--json"])
    d = json.loads(result.output)
    assert (d["dtype"], d["shape"], d["nbytes"]) == ("bfloat16", [83, 12], 83 * 12 * 2)
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and again.output.startswith("Error: dest: ")
    assert runner.invoke(main, [*args, "--overwrite", "--storage", "float16"]).exit_code == 0
    assert open_dataset(dest).dtype == "float16"


# ------------------------------------------------------------------------------------ training
def test_training_on_bfloat16_data_is_training_on_its_values(two_workers, tmp_path):
    """A job on a bfloat16 dataset runs on the cluster (tasks decode the bits) and gives, bit
    for bit, the history of the same job on a float32 dataset of the rounded values."""
    from worker.spec import TrainSpec
    from worker.train import train

    X = (np.random.default_rng(7).random((600, 16)) * 0.8 + 0.1).astype(np.float32)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        np.save(tmp_path / "parts" / f"part_{i}.npy", X[i * 200 : (i + 1) * 200])
    ingest_activations(tmp_path / "parts", tmp_path / "bf16", storage="bfloat16", chunk_rows=100)
    np.save(tmp_path / "rounded.npy", rounded(X, "bfloat16"))
    ingest_activations(tmp_path / "rounded.npy", tmp_path / "f32", chunk_rows=100)
    histories = []
    for name in ("bf16", "f32"):
        spec = TrainSpec(dataset=str(tmp_path / name), hidden=5, rho=0.1, max_iter=6, seed=1)
        res = train(
            spec,
            tmp_path / f"job-{name}",
            client=two_workers,
            execution="distributed",
            engine_options={"single_task": False},
        )
        assert res.status == "succeeded" and np.isfinite(res.final_cost)
        hist = json.loads(res.history_path.read_text())
        histories.append([(e["cost"], e["grad_norm"]) for e in hist])
    assert len(histories[0]) == 7
    assert histories[0] == histories[1]
    assert histories[0][-1][0] < histories[0][0][0]
