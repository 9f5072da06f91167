"""The chunk kernels of the objective against this machine's matrix-multiply peak, on one core.

784-196 sparse autoencoder (UFLDL's MNIST setting), ``--rows`` x 784 rows uniform in [0, 1)
(the time does not depend on the values), one BLAS thread (as a Dask worker runs). Prints,
with medians of ``--repeat`` runs:

1. the float64, float32 and bfloat16 peaks (3000 x 3000 products) measured in this run;
2. pass 1, pass 2, the fused pass and the in-memory cost in float64, float32 and bfloat16
   (the latter with PyTorch installed): ms, GFLOP/s of their matrix products, share of the
   peak, and the share of the GEMM-bound limit (12 m n h flops at the float32 peak);
3. ``--block-rows``: the fused float32 pass for several row blocks (``sae.blocks.BLOCK_ROWS``);
4. where one chunk's time goes: the matrix products alone against the elementwise rest, and,
   for a real dataset (``--dataset``, e.g. MNIST ingested with ``sae ingest mnist``), reading
   a chunk from the store and decoding it;
5. PyTorch's CPU autograd on the same objective in float32 (one thread), and the ratio;
6. the bfloat16 path's accuracy: relative error of J and of the gradient against float64 at
   the same theta.

    python benchmarks/bench_objective.py [--rows 10000] [--repeat 7] [--block-rows 256,1024]
        [--dataset mnist.zarr]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peak import describe, median_seconds, objective_flops, peaks, print_peaks  # noqa: E402

import sae  # noqa: E402
import sae.blocks  # noqa: E402
from sae import objective as obj  # noqa: E402


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_objective(net: sae.Network, theta: np.ndarray, X: np.ndarray):
    """A function that evaluates J and its gradient with PyTorch autograd in float32: the script
    a user would write by hand (sigmoid units, squared error, weight decay, KL sparsity)."""
    import torch

    (W1, W2), (b1, b2) = net.unpack(theta)
    params = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in (W1, b1, W2, b2)]
    Xt = torch.from_numpy(X.astype(np.float32))
    lam, rho, beta = net.lam, net.rho[0], net.beta[0]
    m = X.shape[0]

    def f():
        for p in params:
            p.grad = None
        w1, c1, w2, c2 = params
        a1 = torch.sigmoid(Xt @ w1.T + c1)
        a2 = torch.sigmoid(a1 @ w2.T + c2)
        rh = a1.mean(0)
        kl = rho * torch.log(rho / rh) + (1 - rho) * torch.log((1 - rho) / (1 - rh))
        J = 0.5 * ((a2 - Xt) ** 2).sum() / m + 0.5 * lam * ((w1**2).sum() + (w2**2).sum())
        J = J + beta * kl.sum()
        J.backward()
        return float(J.detach())

    return f


def _split(net, theta, X, dtype: str, repeat: int) -> tuple[float, float]:
    """(products, total) seconds of one fused pass: the products timed inside the kernel."""
    spent = [0.0]
    inner = sae.blocks.matmul(dtype)

    def timed(a, b):
        t = time.perf_counter()
        out = inner(a, b)
        spent[0] += time.perf_counter() - t
        return out

    original = obj.matmul
    obj.matmul = lambda _dtype: timed
    try:
        products, totals = [], []
        for _ in range(repeat):
            spent[0] = 0.0
            t = time.perf_counter()
            obj.fused(net, theta, X, dtype=dtype)
            totals.append(time.perf_counter() - t)
            products.append(spent[0])
    finally:
        obj.matmul = original
    return float(np.median(products)), float(np.median(totals))


def _dataset_profile(path: str, net, theta, repeat: int) -> None:
    """Read (store + decompression), decode and compute times of chunk 0 of a real dataset."""
    from worker.dataset import _decode, _open_array, read_chunk

    X = _open_array(path)
    rows = X.chunks[0]
    t_read = median_seconds(lambda: X[0:rows], repeat)
    raw = X[0:rows]
    t_decode = median_seconds(lambda: _decode(raw, X).astype(np.float32), repeat)
    t_all = median_seconds(lambda: read_chunk(path, 0, "float32"), repeat)
    chunk = read_chunk(path, 0, "float32")
    t_fused = median_seconds(lambda: obj.fused(net, theta, chunk, dtype="float32"), repeat)
    print(
        f"chunk 0 of {path} ({rows} rows, stored {raw.dtype}): read from the store "
        f"{t_read * 1e3:.1f} ms, decode to float32 {t_decode * 1e3:.1f} ms (read_chunk in all "
        f"{t_all * 1e3:.1f} ms), fused float32 pass {t_fused * 1e3:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--block-rows", default="256,512,1024,2048,4096")
    parser.add_argument("--dataset", default=None, help="A dataset to profile a chunk of")
    args = parser.parse_args(argv)
    threadpool_limits(1, user_api="blas")
    torch_ok = _has_torch()
    if torch_ok:
        import torch

        torch.set_num_threads(1)
    p = peaks(threads=1)
    print_peaks(p, 1)
    m, n, h = args.rows, 784, 196
    net = sae.Network.autoencoder(n, h, lam=3e-3, rho=0.1, beta=3)
    X = np.random.default_rng(0).random((m, n))
    theta = net.init_theta(0)
    flops = {
        "pass1": 2.0 * m * n * h,
        "pass2": objective_flops(net.sizes, m, first_layer_twice=False),
        "fused": objective_flops(net.sizes, m),
        # pass 2 takes up the activations pass 1 kept: the first layer's product counts once
        "cost two": objective_flops(net.sizes, m, first_layer_twice=False),
        "cost fused": objective_flops(net.sizes, m),
    }
    limit = objective_flops(net.sizes, m) / (p["float32"] * 1e9)
    print(
        f"GEMM-bound limit of one evaluation ({m} rows, 12 m n h flops at the float32 peak): "
        f"{limit * 1e3:.1f} ms; block rows {sae.blocks.BLOCK_ROWS}"
    )
    dtypes = ["float64", "float32"] + (["bfloat16"] if torch_ok else [])
    fused_ms = {}
    for dtype in dtypes:
        Xd = X.astype(obj.array_dtype(dtype))
        rh = obj.rho_hat(net, obj.pass1(net, theta, Xd, dtype=dtype))
        cases = {
            "pass1": lambda Xd=Xd, dtype=dtype: obj.pass1(net, theta, Xd, dtype=dtype),
            "pass2": lambda Xd=Xd, dtype=dtype, rh=rh: obj.pass2(net, theta, Xd, rh, dtype=dtype),
            "fused": lambda Xd=Xd, dtype=dtype: obj.fused(net, theta, Xd, dtype=dtype),
            "cost two": lambda Xd=Xd, dtype=dtype: obj.cost(net, theta, Xd, dtype=dtype),
            "cost fused": lambda Xd=Xd, dtype=dtype: obj.cost(
                net, theta, Xd, passes="fused", dtype=dtype
            ),
        }
        for name, f in cases.items():
            t = median_seconds(f, args.repeat)
            if name == "fused":
                fused_ms[dtype] = t
            line = f"{dtype:8s} {name:10s} {t * 1e3:7.1f} ms  {m / t:9,.0f} samples/s  "
            line += describe(flops[name], t, p[dtype], f"the {dtype} peak")
            if name.startswith("cost"):
                line += f"; {limit / t:.2f}x the GEMM-bound limit"
            print(line, flush=True)
    if torch_ok:
        print(f"bfloat16 fused against float32: {fused_ms['float32'] / fused_ms['bfloat16']:.2f}x")

    X32 = X.astype(np.float32)
    blocks = [int(b) if b != "all" else m for b in args.block_rows.split(",") if b]
    before = sae.blocks.BLOCK_ROWS
    try:
        for b in blocks:
            sae.blocks.BLOCK_ROWS = b
            t = median_seconds(lambda: obj.fused(net, theta, X32, dtype="float32"), args.repeat)
            print(
                f"block rows {b:6d}: fused float32 {t * 1e3:7.1f} ms  "
                f"{describe(flops['fused'], t, p['float32'], 'the float32 peak')}; "
                f"{limit / t:.2f}x the GEMM-bound limit",
                flush=True,
            )
    finally:
        sae.blocks.BLOCK_ROWS = before

    for dtype in dtypes:
        prod, total = _split(net, theta, X.astype(obj.array_dtype(dtype)), dtype, args.repeat)
        print(
            f"where a fused {dtype} pass goes: matrix products {prod * 1e3:.1f} ms "
            f"({describe(flops['fused'], prod, p[dtype], f'the {dtype} peak')}), elementwise "
            f"and the rest {(total - prod) * 1e3:.1f} ms ({(total - prod) / total:.0%})"
        )
    if args.dataset:
        _dataset_profile(args.dataset, net, theta, args.repeat)

    if torch_ok:
        f = torch_objective(net, theta, X)
        t_torch = median_seconds(f, args.repeat)
        ours = {
            passes: median_seconds(
                lambda p=passes: obj.cost(net, theta, X32, passes=p, dtype="float32"),
                args.repeat,
            )
            for passes in ("two", "fused")
        }
        print(
            f"PyTorch autograd float32 (1 thread): {t_torch * 1e3:.1f} ms "
            f"({describe(flops['cost two'], t_torch, p['float32'], 'the float32 peak')}); ours "
            + ", ".join(f"{k} {v * 1e3:.1f} ms: {t_torch / v:.2f}x" for k, v in ours.items())
        )
        J64, g64 = obj.cost(net, theta, X)
        for dtype in ("float32", "bfloat16"):
            J, g = obj.cost(net, theta, X32, dtype=dtype)
            print(
                f"{dtype} against float64 at the same theta: J relative error "
                f"{abs(J - J64) / abs(J64):.1e}, gradient relative error "
                f"{np.linalg.norm(g - g64) / np.linalg.norm(g64):.1e}"
            )
    else:
        print("PyTorch is not installed: no bfloat16 figures and no autograd comparison")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
