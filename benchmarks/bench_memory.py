"""Bounded memory: one evaluation over a dataset larger than the workers' total memory.

Writes a float32 dataset chunk by chunk from a generator (never whole in memory), starts
``--workers`` workers with ``--memory-limit`` each, evaluates the objective once (two passes,
out of core), and prints each worker's peak RSS (sampled every 20 ms on the worker), whether
anything was spilled, and whether a worker was restarted.

    python benchmarks/bench_memory.py [--rows 1000000] [--features 784] [--memory-limit 700MB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from dask.utils import parse_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="700MB")
    parser.add_argument("--passes", choices=["two", "fused"], default="two")
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args(argv)

    from sae.network import Network
    from worker.cluster import get_client
    from worker.dataset import write_dataset
    from worker.engine import DistributedObjective
    from worker.memwatch import start_rss_sampler, stop_rss_sampler

    m, n = args.rows, args.features
    limit = parse_bytes(args.memory_limit)
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.tmp))
    path = tmp / "big"
    rng = np.random.default_rng(0)
    block = 4096

    def blocks():
        for s in range(0, m, block):
            yield rng.random((min(block, m - s), n), dtype=np.float32)

    try:
        t = time.perf_counter()
        info = write_dataset(path, blocks(), m, n, dtype="float32")
        print(
            f"dataset: {m} x {n} float32 = {info.nbytes / 2**30:.2f} GiB in {info.n_chunks} "
            f"chunks of {info.chunk_rows} rows, written in {time.perf_counter() - t:.1f} s "
            f"(generator, chunk by chunk)"
        )
        total = args.workers * limit
        print(
            f"workers: {args.workers} x {limit / 2**20:.0f} MiB = {total / 2**20:.0f} MiB; "
            f"dataset / total memory limit = {info.nbytes / total:.2f}x "
            f"(decoded as float64: {2 * info.nbytes / total:.2f}x)"
        )
        net = Network.autoencoder(n, args.hidden, lam=1e-4, rho=0.05, beta=3.0)
        theta = net.init_theta(0)
        with get_client(workers=args.workers, memory_limit=limit) as (client, _):
            pids = client.run(os.getpid)
            f = DistributedObjective(
                client, str(path), net, passes=args.passes, dtype="float64", job="memory"
            )
            print(f"cache: {'on' if f.cache_bytes else 'off (does not fit: out of core)'}")
            base = client.run(start_rss_sampler, 0.02)
            t = time.perf_counter()
            J, grad = f(theta)
            dt = time.perf_counter() - t
            peaks = client.run(stop_rss_sampler)
            spilled = client.run(lambda dask_worker: len(dask_worker.data.slow))
            pids_after = client.run(os.getpid)
            print(
                f"one evaluation ({args.passes} passes): {dt:.1f} s, {m / dt:,.0f} samples/s, "
                f"J = {J:.6f}, finite gradient: {bool(np.all(np.isfinite(grad)))}"
            )
            for w in sorted(peaks):
                print(
                    f"  worker {w}: RSS at start {base[w] / 2**20:.0f} MiB, peak "
                    f"{peaks[w] / 2**20:.0f} MiB of limit {limit / 2**20:.0f} MiB "
                    f"({peaks[w] / limit:.0%}), spilled keys {spilled.get(w, 0)}"
                )
            ok = (
                all(p < limit for p in peaks.values())
                and not any(spilled.values())
                and sorted(pids.values()) == sorted(pids_after.values())
            )
            print(
                "workers restarted: "
                f"{'no' if sorted(pids.values()) == sorted(pids_after.values()) else 'YES'}"
            )
            print("PASS" if ok else "FAIL")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
