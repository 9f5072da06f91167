"""The bfloat16 compute path (``--compute bf16``, ``"dtype": "bfloat16"``): matrix products in
bfloat16 through PyTorch with float32 accumulation, the rest in float32, sums in float64.

PyTorch is an optional install: these tests skip where it is absent, except where ``.ci/run``
installed it for them (``SAE_REQUIRE_TORCH=1``: then its absence is a failure). The test of the
error without PyTorch runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import sae
import sae.blocks
from sae import objective as obj
from sae.dictionary import Dictionary
from worker.dataset import write_dataset
from worker.spec import TrainSpec


def _torch():
    if os.environ.get("SAE_REQUIRE_TORCH") == "1":
        import torch

        return torch
    return pytest.importorskip("torch", reason="PyTorch is not installed (the bf16 path's extra)")


def _bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (to nearest, by ml_dtypes), back in float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_products_round_the_operands_and_accumulate_in_float32():
    _torch()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 70)).astype(np.float32)
    mm = sae.blocks.matmul("bfloat16")
    out = mm(a, b.T.copy().T)  # a transposed view, as the kernels pass them
    assert out.dtype == np.float32 and out.shape == (300, 70)
    exact = _bf16(a) @ _bf16(b)  # the products of the rounded operands, in float64
    # float32 accumulation of 200 terms and one rounding of the result to bfloat16 (8 bits)
    assert _rel(out, exact) < 2**-8
    assert _rel(out, a.astype(np.float64) @ b) > 1e-4  # it is not a float32 product
    assert sae.blocks.matmul("float32") is np.matmul


def _nets():
    yield "sigmoid-kl", sae.Network.autoencoder(64, 24, lam=3e-3, rho=0.1, beta=3.0)
    yield (
        "deep",
        sae.Network(
            sizes=(64, 32, 8, 32, 64),
            activations=("sigmoid", "sigmoid", "sigmoid", "sigmoid"),
            lam=1e-4,
            rho=(0.1, None, None, None),
            beta=(3.0, 0.0, 0.0, 0.0),
        ),
    )
    yield "relu-l1", Dictionary.of("relu-l1", 64, 128, l1=1e-3)


@pytest.mark.parametrize("name", [n for n, _ in _nets()])
def test_bf16_cost_and_gradient_are_close_to_float64(name, monkeypatch):
    """At the same theta, across several row blocks: J within 1e-3 and the gradient within 2e-2
    of float64 (relative), while float32 stays within 1e-5."""
    _torch()
    monkeypatch.setattr(sae.blocks, "BLOCK_ROWS", 128)
    net = dict(_nets())[name]
    X = np.random.default_rng(1).random((600, 64))
    theta = (
        net.init_theta(0, mean=X.mean(axis=0)) if isinstance(net, Dictionary) else net.init_theta(0)
    )
    J64, g64 = obj.cost(net, theta, X)
    J32, g32 = obj.cost(net, theta, X.astype(np.float32), dtype="float32")
    Jb, gb = obj.cost(net, theta, X.astype(np.float32), dtype="bfloat16")
    assert abs(J32 - J64) / J64 < 1e-5 and _rel(g32, g64) < 1e-5
    assert abs(Jb - J64) / J64 < 1e-3 and _rel(gb, g64) < 2e-2
    assert Jb != J32  # the products really ran in bfloat16


def test_bf16_needs_torch_and_says_so(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"dtype[\s\S]*bfloat16[\s\S]*PyTorch"):
        TrainSpec(dataset="x.zarr", hidden=4, dtype="bfloat16")
    from service.cli import main

    r = CliRunner().invoke(main, ["train", "x.zarr", "--hidden", "4", "--compute", "bf16"])
    assert r.exit_code != 0 and "dtype" in r.output and "PyTorch" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(
        main, ["train", "x.zarr", "--compute", "bf16", "--dtype", "float32", "--hidden", "4"]
    )
    assert r.exit_code == 2 and "--compute bf16" in r.output


def test_bf16_job_from_the_cli_trains_and_resumes_on_the_same_trajectory(tmp_path, two_workers):
    """``sae train --compute bf16`` on 2 workers: the job records dtype bfloat16, ends near the
    float32 job's cost, and a job stopped after 3 iterations and resumed ends with the bits of
    the uninterrupted one. (The four runs share the session's cluster: ``--scheduler``.)"""
    _torch()
    from service.cli import main

    X = np.random.default_rng(0).random((900, 36)) * 0.8 + 0.1
    path = tmp_path / "ds"
    write_dataset(path, X, *X.shape, dtype="float32", chunk_rows=300, sample_shape=(6, 6))
    base = [str(path), "--hidden", "9", "--lam", "1e-4", "--rho", "0.05", "--beta", "3"]
    base += ["--scheduler", two_workers.scheduler.address, "--seed", "3"]
    runner = CliRunner()

    def run(out, *extra):
        r = runner.invoke(main, ["train", *base, "--out", str(tmp_path / out), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / out / "history.json").read_text())

    hb = run("bf16", "--compute", "bf16", "--max-iter", "8")
    h32 = run("f32", "--dtype", "float32", "--max-iter", "8")
    spec = json.loads((tmp_path / "bf16" / "job.json").read_text())["spec"]
    assert spec["dtype"] == "bfloat16"
    assert hb[-1]["iteration"] == 8
    assert hb[-1]["cost"] < hb[0]["cost"]
    assert abs(hb[-1]["cost"] - h32[-1]["cost"]) / h32[-1]["cost"] < 1e-2
    assert hb[-1]["cost"] != h32[-1]["cost"]
    run("part", "--compute", "bf16", "--max-iter", "3")
    resume = ["--resume", str(tmp_path / "part"), "--max-iter", "8"]
    r = runner.invoke(main, ["train", *resume, "--scheduler", two_workers.scheduler.address])
    assert r.exit_code == 0, r.output
    with (
        np.load(tmp_path / "bf16" / "model.npz") as a,
        np.load(tmp_path / "part" / "model.npz") as b,
    ):
        for k in ("W1", "W2", "b1", "b2"):
            assert np.array_equal(a[k], b[k]), k


def test_the_engine_pin_holds_pytorch_to_one_thread_per_thread_and_restores_it():
    """Inside the engine's one-BLAS-thread pin, a bfloat16 product runs on one PyTorch thread
    (torch's count belongs to the calling thread, so each thread is pinned on its own), and
    the count before comes back when the pin ends, even where PyTorch was loaded inside it."""
    import threading

    torch = _torch()
    from worker.threads import one_blas_thread

    a = np.ones((64, 32), np.float32)
    mm = sae.blocks.matmul("bfloat16")
    seen: dict[str, tuple[int, int]] = {}

    def work(name: str) -> None:
        torch.set_num_threads(2)
        with one_blas_thread():
            with one_blas_thread():  # re-entrant
                mm(a, a.T)
                inner = torch.get_num_threads()
        seen[name] = (inner, torch.get_num_threads())

    for i in range(2):  # threads of their own, one after the other (as a worker's task threads)
        t = threading.Thread(target=work, args=(f"t{i}",))
        t.start()
        t.join()
    work("main")
    assert seen == {"t0": (1, 2), "t1": (1, 2), "main": (1, 2)}, seen


def test_resuming_a_bfloat16_job_where_pytorch_is_gone_is_a_422_naming_dtype(monkeypatch):
    from types import SimpleNamespace

    from service.validation import resume_problem

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    job = SimpleNamespace(
        id="j1",
        status="failed",
        iteration=3,
        spec={"dataset": "x", "hidden": 4, "dtype": "bfloat16"},
    )
    field, status, msg = resume_problem(job, None)
    assert (field, status) == ("dtype", 422) and "PyTorch" in msg


def test_gradcheck_refuses_bfloat16_and_says_why():
    _torch()
    from service.cli import main

    r = CliRunner().invoke(main, ["gradcheck", "x.zarr", "--hidden", "4", "--compute", "bf16"])
    assert r.exit_code == 1 and "dtype: gradcheck needs float64 or float32" in r.output, r.output
