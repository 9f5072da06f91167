"""Speed of the distributed objective against an in-memory numpy evaluation, in one run.

Figures (medians of ``--rounds`` evaluations; baseline and engine interleaved round by round;
the in-memory baseline is one process whose BLAS uses as many threads as the cluster has in
total, and both sides compute in the same dtype):

1. out-of-core (cache off): two-pass and fused, samples/s and ratio to in-memory;
2. cached (the dataset fits in the workers' memory): ratio to in-memory;
3. float32 against float64 (speed-up), out-of-core and cached;
4. scheduling overhead per evaluation on a tiny dataset;
5. small job: the UFLDL natural-image job (10,000 8x8 patches, 25 hidden units, 400 L-BFGS
   iterations) with ``worker.train.train`` (auto execution: one task next to its data) against a
   plain in-memory ``scipy.optimize.minimize(method="L-BFGS-B")`` run.

Beside every speed of 1. 2. and 5., its GFLOP/s (the matrix products of the objective,
``benchmarks/peak.py``: 12 m n h per evaluation of a sparse autoencoder) and its share of this
machine's matrix-multiply peak of the same dtype, measured at the start of the run (printed
first) with the thread count of that side: the in-memory baseline with T BLAS threads against
the T-thread peak, the engine's W workers x 1 thread against the W-thread peak (not W x the
1-thread peak), a one-task job against the 1-thread peak.

    python benchmarks/bench_engine.py [--rows 40000] [--features 784] [--hidden 196]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import blas_threads, measure_peaks, network_flops, share  # noqa: E402

#: Compute dtypes of the throughput figures (bfloat16 is timed, and its peak measured, only
#: when it is listed here).
DTYPES = ("float64", "float32")
try:  # the bfloat16 path, where PyTorch is installed
    import torch  # noqa: F401

    DTYPES += ("bfloat16",)
except ImportError:
    pass


def _read_rows(path: str, i: int, dtype: str) -> int:
    from worker.dataset import read_chunk

    return int(read_chunk(path, i, dtype).shape[0])


def read_bound(client, path: str, dtype: str, n_chunks: int, rounds: int) -> float:
    """Median seconds to read and decode every chunk once on the workers (no compute): the
    disk/decode bound of an out-of-core evaluation."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        futs = client.map(_read_rows, [path] * n_chunks, range(n_chunks), [dtype] * n_chunks,
                          pure=False)  # fmt: skip
        client.gather(futs)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _median(xs) -> float:
    return float(np.median(xs))


def _interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Time each callable once per round, in turn, ``rounds`` times (after one warm-up)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def bench_throughput(client, tmp: Path, args, total_threads: int, peaks: dict) -> None:
    from threadpoolctl import threadpool_limits

    from sae import objective as obj
    from sae.network import Network
    from worker.dataset import open_dataset, read_all, write_dataset
    from worker.engine import DistributedObjective

    m, n, h = args.rows, args.features, args.hidden
    rng = np.random.default_rng(0)
    path = tmp / "throughput"
    rows = 2048

    def blocks():
        for s in range(0, m, rows):
            yield rng.random((min(rows, m - s), n), dtype=np.float32)

    write_dataset(path, blocks(), m, n, dtype="float32", sample_shape=None)
    net = Network.autoencoder(n, h, lam=3e-3, rho=0.1, beta=3.0)
    theta = net.init_theta(0)
    print(
        f"\n== throughput: {m} x {n} float32 stored ({m * n * 4 / 2**20:.0f} MB), network "
        f"{net.sizes}, {total_threads} threads in total on both sides, {args.rounds} rounds"
    )
    engine = f" ({total_threads} workers x 1 thread)"
    for dtype in DTYPES:
        X = read_all(path, dtype=dtype)
        fns = {}
        for passes in ("two", "fused"):
            fns[f"inmem-{passes}"] = lambda p=passes, X=X, dt=dtype: obj.cost(
                net, theta, X, passes=p, dtype=dt
            )
            for cache in (False, True):
                f = DistributedObjective(
                    client, str(path), net, passes=passes, dtype=dtype, cache=cache, job="bench"
                )
                if cache and f.cache_bytes == 0:
                    print("  (cache does not fit: skipped)")
                    continue
                fns[f"{'cached' if cache else 'ooc'}-{passes}"] = lambda f=f: f(theta)
        with threadpool_limits(total_threads, user_api="blas"):  # the in-memory side's BLAS
            times = _interleaved(fns, args.rounds)
        n_chunks = open_dataset(path).n_chunks
        bound = read_bound(client, str(path), dtype, n_chunks, args.rounds)
        limit = network_flops(net, m) / (peaks[total_threads][dtype] * 1e9)
        print(f"-- dtype {dtype}")
        print(
            f"  bounds of one evaluation: GEMM-bound {limit * 1000:.1f} ms (12 m n h flops at the "
            f"{total_threads}-thread {dtype} peak); reading and decoding every chunk once on the "
            f"workers {bound * 1000:.1f} ms"
        )
        for passes in ("two", "fused"):
            # the flops each path does: with two passes, pass 2 takes up the activations pass
            # 1 kept (in memory, and on the workers where chunks are cached): 10 m n h
            kept = passes == "two"
            flops = network_flops(net, m, kept=kept)
            base = _median(times[f"inmem-{passes}"])
            print(
                f"  in-memory {passes:5s}: {base * 1000:8.1f} ms/eval  {m / base:12,.0f} "
                f"samples/s  {share(flops, base, peaks, dtype, total_threads)}; "
                f"{limit / base:.2f}x the GEMM-bound limit"
            )
            for kind in ("ooc", "cached"):
                key = f"{kind}-{passes}"
                if key not in times:
                    continue
                t = _median(times[key])
                label = "out-of-core" if kind == "ooc" else "cached"
                done = network_flops(net, m, kept=kept and kind == "cached")
                print(
                    f"  {label:11s} {passes:5s}: {t * 1000:8.1f} ms/eval  {m / t:12,.0f} "
                    f"samples/s  ratio to in-memory {base / t:.2f}x  "
                    f"{share(done, t, peaks, dtype, total_threads, engine)}; "
                    f"{limit / t:.2f}x the GEMM-bound limit"
                    + (f"; {bound / t:.2f}x the read bound" if kind == "ooc" else "")
                )
        RESULTS[dtype] = {k: _median(v) for k, v in times.items()}
        del X
    print("-- float32 speed-up over float64 (median time float64 / float32)")
    for k in RESULTS["float64"]:
        if k in RESULTS["float32"]:
            print(f"  {k:14s}: {RESULTS['float64'][k] / RESULTS['float32'][k]:.2f}x")
    if "bfloat16" in RESULTS:
        print("-- bfloat16 speed-up over float32 (median time float32 / bfloat16)")
        for k in RESULTS["float32"]:
            if k in RESULTS["bfloat16"]:
                print(f"  {k:14s}: {RESULTS['float32'][k] / RESULTS['bfloat16'][k]:.2f}x")


RESULTS: dict = {}


def bench_overhead(client, tmp: Path, args) -> None:
    from sae import objective as obj
    from sae.network import Network
    from worker.dataset import write_dataset
    from worker.engine import DistributedObjective

    X = np.random.default_rng(1).random((200, 64))
    path = tmp / "tiny"
    write_dataset(path, X, *X.shape, dtype="float64")
    net = Network.autoencoder(64, 25, lam=1e-4, rho=0.01, beta=3.0)
    theta = net.init_theta(0)
    print(f"\n== scheduling overhead: tiny dataset {X.shape}, one chunk, {args.rounds * 4} evals")
    for passes in ("two", "fused"):
        f = DistributedObjective(client, str(path), net, passes=passes, job="tiny")
        times = _interleaved(
            {
                "inmem": lambda p=passes: obj.cost(net, theta, X, passes=p),
                "dist": lambda f=f: f(theta),
            },
            args.rounds * 4,
        )
        over = _median(times["dist"]) - _median(times["inmem"])
        print(
            f"  {passes:5s}: evaluation {_median(times['dist']) * 1000:.1f} ms, in-memory "
            f"{_median(times['inmem']) * 1000:.2f} ms, overhead per evaluation "
            f"{over * 1000:.1f} ms"
        )


def _scipy_job(path: str, max_iter: int) -> dict:
    """The plain in-memory scipy L-BFGS-B run of the small job (timed without start-up)."""
    import scipy.optimize

    from sae import objective as obj
    from sae.network import Network
    from worker.dataset import read_all

    X = read_all(path)
    net = Network.autoencoder(64, 25, lam=1e-4, rho=0.01, beta=3.0)
    theta0 = net.init_theta(0)
    t = time.perf_counter()
    res = scipy.optimize.minimize(
        lambda th: obj.cost(net, th, X),
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter},
    )
    return {"seconds": time.perf_counter() - t, "nit": res.nit, "nfev": res.nfev, "fun": res.fun}


def _scipy_job_subprocess(path: str, max_iter: int, blas_threads: int | None) -> dict:
    env = dict(os.environ)
    if blas_threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(blas_threads)
    out = subprocess.run(
        [sys.executable, __file__, "--scipy-job", path, "--max-iter", str(max_iter)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_small_job(client, tmp: Path, args, peaks: dict) -> None:
    from sae.network import Network
    from sae.preprocess import normalize_patches, photographs, sample_patches
    from worker.dataset import write_dataset
    from worker.spec import TrainSpec
    from worker.train import train

    X = normalize_patches(sample_patches(photographs(gray=True), 8, 10_000, seed=0))
    path = tmp / "patches"
    write_dataset(path, X, *X.shape, dtype="float64", sample_shape=(8, 8))
    spec = TrainSpec(
        dataset=str(path), hidden=25, lam=1e-4, rho=0.01, beta=3.0, max_iter=args.max_iter
    )
    net = Network.autoencoder(64, 25, lam=1e-4, rho=0.01, beta=3.0)
    print(
        f"\n== small job: UFLDL natural images {X.shape}, {net.sizes}, {args.max_iter} L-BFGS "
        f"iterations, {args.job_rounds} runs each"
    )
    base: dict[str, list[float]] = {"default": [], "1": []}
    ours, info = [], {}
    for r in range(args.job_rounds):
        for threads in ("default", "1"):
            res = _scipy_job_subprocess(
                str(path), args.max_iter, None if threads == "default" else 1
            )
            base[threads].append(res["seconds"])
            info["scipy"] = (res["nit"], res["nfev"], res["fun"])
        out = tmp / f"job-{r}"
        t = time.perf_counter()
        tr = train(spec, out, client=client)
        ours.append(time.perf_counter() - t)
        info["ours"] = (tr.iterations, tr.evaluations, tr.final_cost, tr.execution)
        shutil.rmtree(out, ignore_errors=True)
    o = _median(ours)
    nit, nfev, fun = info["scipy"]
    it, ev, cost, execution = info["ours"]
    per_eval = network_flops(net, X.shape[0])
    for threads, label in (("default", "BLAS default threads"), ("1", "BLAS 1 thread")):
        b = _median(base[threads])
        t = blas_threads() if threads == "default" else 1
        print(
            f"  scipy L-BFGS-B in memory ({label:20s}): {b:6.2f} s  ({nit} iterations, "
            f"{nfev} evals, J {fun:.6f})  {share(nfev * per_eval, b, peaks, 'float64', t)}"
        )
    t = 1 if execution == "local" else args.workers  # one task on one worker, or all workers
    print(
        f"  sae train ({execution} execution, whole job: artifacts, checkpoints)  : {o:6.2f} s  "
        f"({it} iterations, {ev} evals, J {cost:.6f})  "
        f"{share(ev * per_eval, o, peaks, spec.dtype, t)}"
    )
    best = min(_median(base["default"]), _median(base["1"]))
    print(
        f"  time ratio sae / fastest scipy run: {o / best:.2f}x   per evaluation: "
        f"{(o / ev) / (best / nfev):.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=196)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=400)
    parser.add_argument("--job-rounds", type=int, default=3)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--tmp", type=Path, default=None)
    parser.add_argument(
        "--only", choices=["throughput", "overhead", "job"], action="append", default=None
    )
    parser.add_argument("--scipy-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scipy_job:
        print(json.dumps(_scipy_job(args.scipy_job, args.max_iter)))
        return 0
    from worker.cluster import get_client

    only = set(args.only or ["throughput", "overhead", "job"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-", dir=args.tmp))
    print(
        f"bench_engine: {os.cpu_count()} CPUs, {args.workers} workers x 1 thread, "
        f"memory limit {args.memory_limit} per worker, load {os.getloadavg()}"
    )
    threads = set()
    if "throughput" in only:
        threads.add(args.workers)
    if "job" in only:
        threads |= {1, blas_threads(), args.workers}
    peaks = measure_peaks(threads, bf16="bfloat16" in DTYPES)  # before the cluster starts
    try:
        with get_client(workers=args.workers, memory_limit=args.memory_limit) as (client, _):
            print(f"dashboard: {client.dashboard_link}")
            if "throughput" in only:
                bench_throughput(client, tmp, args, args.workers, peaks)
            if "overhead" in only:
                bench_overhead(client, tmp, args)
            if "job" in only:
                bench_small_job(client, tmp, args, peaks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
