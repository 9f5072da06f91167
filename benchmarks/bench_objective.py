"""Time the objective's chunk functions on MNIST-sized data: 784-196 SAE, 10000 x 784.

Random data uniform in [0, 1) stands in for the digits (the time does not depend on the
values). Prints the best and median of ``--repeat`` runs of pass1, pass2, fused and the
in-memory cost (two passes and fused), in float64 and float32. Set OPENBLAS_NUM_THREADS=1
(as Dask workers run) for stable figures.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_objective.py [--rows 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sae
from sae import objective as obj


def _time(f, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    net = sae.Network.autoencoder(784, 196, lam=3e-3, rho=0.1, beta=3)
    X = np.random.default_rng(0).random((args.rows, 784))
    theta = net.init_theta(0)
    for dtype in ("float64", "float32"):
        Xd = X.astype(dtype)
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
            best, median = _time(f, args.repeat)
            print(f"{dtype:8s} {name:11s} best {best * 1e3:7.1f} ms  median {median * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
