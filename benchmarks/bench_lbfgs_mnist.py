"""Our L-BFGS against scipy's L-BFGS-B on the UFLDL MNIST sparse autoencoder.

Setting: 784-196-784 sigmoid autoencoder, rho = 0.1, lambda = 3e-3, beta = 3, the 10,000
digits of ``t10k-images-idx3-ubyte.gz`` scaled to [0, 1], 400 iterations, the same initial
theta for both. Prints final costs, their ratio, iterations, evaluations and wall times, and
PASS when our cost is within 1% of scipy's (or lower). Beside each wall time, the GFLOP/s of
the evaluations (12 m n h each: ``benchmarks/peak.py``) and their share of the float64
matrix-multiply peak with BLAS's default threads (both runs use them), measured at the start.

    python benchmarks/bench_lbfgs_mnist.py [--mnist DIR] [--max-iter 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize

import sae
from sae.mnist import load_idx
from sae.optimize import OptimizerState, minimize

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import blas_threads, measure_peaks, network_flops, share  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO / ".." / "shared" / "data" / "mnist")
    parser.add_argument("--max-iter", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=196)
    parser.add_argument("--passes", choices=["two", "fused"], default="fused")
    args = parser.parse_args(argv)
    threads = blas_threads()  # both runs' products: numpy's BLAS, default threads
    peaks = measure_peaks([threads])

    images = load_idx(args.mnist / "t10k-images-idx3-ubyte.gz")
    X = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    net = sae.Network.autoencoder(X.shape[1], args.hidden, lam=3e-3, rho=0.1, beta=3)
    theta0 = net.init_theta(args.seed)
    per_eval = network_flops(net, X.shape[0])
    print(
        f"MNIST {X.shape[0]} x {X.shape[1]}, network {net.sizes}, {net.n_params} parameters, "
        f"max_iter {args.max_iter}, seed {args.seed}, passes {args.passes}"
    )

    calls = [0]

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        calls[0] += 1
        return sae.cost(net, theta, X, passes=args.passes)

    J0 = f(theta0)[0]
    print(f"initial cost {J0:.6f}")

    t0 = time.perf_counter()
    ours = minimize(f, OptimizerState.start("lbfgs", theta0), max_iter=args.max_iter)
    t_ours = time.perf_counter() - t0
    print(
        f"ours  lbfgs     : cost {ours.J:.6f}  iterations {ours.iteration}  "
        f"evaluations {ours.n_evals}  wall {t_ours:.1f} s  ({ours.status}: {ours.message})"
    )
    print(f"                  {share(ours.n_evals * per_eval, t_ours, peaks, 'float64', threads)}")

    calls[0] = 0
    t0 = time.perf_counter()
    ref = scipy.optimize.minimize(
        f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": args.max_iter}
    )
    t_ref = time.perf_counter() - t0
    print(
        f"scipy L-BFGS-B  : cost {ref.fun:.6f}  iterations {ref.nit}  "
        f"evaluations {calls[0]}  wall {t_ref:.1f} s  ({ref.message})"
    )
    print(f"                  {share(calls[0] * per_eval, t_ref, peaks, 'float64', threads)}")

    ratio = ours.J / ref.fun
    ok = ours.J <= 1.01 * ref.fun
    print(f"ratio ours/scipy: {ratio:.4f}")
    print(f"{'PASS' if ok else 'FAIL'}: ours within 1% of scipy's (or lower)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
