"""Bytes written per optimizer checkpoint on the 784-196 MNIST network, L-BFGS memory 20.

Saves a sequence of L-BFGS states (random pairs of the network's size, as the training loop
does after every iteration) to one path and prints, once the memory is full, the bytes of
new or replaced files per save (in vectors of n float64), save and load times, and the
total for 400 iterations.

    python benchmarks/bench_checkpoint.py [--memory 20] [--saves 25]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import sae
from sae.optimize import OptimizerState


def _snapshot(folder: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=20)
    parser.add_argument("--saves", type=int, default=25)
    args = parser.parse_args(argv)
    net = sae.Network.autoencoder(784, 196, lam=3e-3, rho=0.1, beta=3)
    n, mem = net.n_params, args.memory
    rng = np.random.default_rng(0)
    state = OptimizerState.start("lbfgs", net.init_theta(0), {"memory": mem})
    state = state.replace(J=1.0, grad=rng.standard_normal(n), status="running")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state.npz")
        before, written, seconds = _snapshot(folder), [], []
        for k in range(1, args.saves + 1):
            s, y = rng.standard_normal(n), rng.standard_normal(n)
            state = state.replace(
                theta=state.theta + s,
                grad=state.grad + y,
                iteration=k,
                s=(*state.s, s)[-mem:],
                y=(*state.y, y)[-mem:],
            )
            t = time.perf_counter()
            state.save(path)
            seconds.append(time.perf_counter() - t)
            after = _snapshot(folder)
            written.append(sum(v[2] for p, v in after.items() if before.get(p) != v))
            before = after
        t = time.perf_counter()
        OptimizerState.load(path)
        load = time.perf_counter() - t
        on_disk = sum(v[2] for v in before.values())
    full = np.array(written[mem:], dtype=float)
    print(f"n = {n} parameters, one vector = {8 * n / 1e6:.2f} MB, L-BFGS memory {mem}")
    print(f"bytes written per save once the memory is full: {int(full.mean())}")
    print(f"  = {full.mean() / 1e6:.2f} MB = {full.mean() / (8 * n):.2f} vectors")
    print(f"on disk: {on_disk / 1e6:.1f} MB")
    print(f"save: median {np.median(seconds[mem:]) * 1e3:.0f} ms; load: {load * 1e3:.0f} ms")
    print(f"400 iterations write {400 * full.mean() / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
