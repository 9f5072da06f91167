"""This machine's matrix-multiply peak, measured in the benchmark's own run, and figures as
GFLOP/s and shares of it.

Every benchmark that reports a speed also prints its GFLOP/s and the share of the peak of the
same dtype measured in the same run (``a @ b`` of two 3000 x 3000 matrices: numpy's BLAS for
float64 and float32, PyTorch's CPU build for bfloat16 when it is installed), so figures from a
loaded machine and a quiet one can be compared. The flop counts of one evaluation of an
autoencoder's objective are those of its matrix products (:func:`objective_flops`;
:func:`network_flops` for a network object, :func:`share` for a figure's line).

    python benchmarks/peak.py [--threads 1]      # print the peaks
"""

from __future__ import annotations

import argparse
import time

import numpy as np

#: Side of the square matrices of the peak measurement.
PEAK_SIZE = 3000


def median_seconds(f, repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``f`` (after one warm-up call)."""
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def gemm_peak(dtype: str = "float32", threads: int = 1, repeat: int = 5) -> float | None:
    """Median GFLOP/s of a ``PEAK_SIZE`` square matrix product on ``threads`` threads.

    Parameters
    ----------
    dtype : {"float64", "float32", "bfloat16"}
        bfloat16 runs through PyTorch (None when it is not installed).
    threads : int
    repeat : int

    Returns
    -------
    gflops : float or None
    """
    n = PEAK_SIZE
    flops = 2.0 * n**3
    if dtype == "bfloat16":
        try:
            import torch
        except ImportError:
            return None
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            a = torch.rand(n, n, dtype=torch.bfloat16)
            b = torch.rand(n, n, dtype=torch.bfloat16)
            return flops / median_seconds(lambda: a @ b, repeat) / 1e9
        finally:
            torch.set_num_threads(before)
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.random((n, n)).astype(dtype)
    b = rng.random((n, n)).astype(dtype)
    with threadpool_limits(threads, user_api="blas"):
        return flops / median_seconds(lambda: a @ b, repeat) / 1e9


def peaks(threads: int = 1, repeat: int = 5, bf16: bool = True) -> dict[str, float]:
    """``{"float64": GFLOP/s, "float32": ..., "bfloat16": ...}`` (bfloat16 only with torch)."""
    out = {dt: gemm_peak(dt, threads, repeat) for dt in ("float64", "float32")}
    if bf16:
        b = gemm_peak("bfloat16", threads, repeat)
        if b is not None:
            out["bfloat16"] = b
    return out


def objective_flops(sizes, rows: int, first_layer_twice: bool = True) -> float:
    """Flops of the matrix products of one evaluation of the objective over ``rows`` examples.

    A layer ``n_in -> n_out`` costs ``2 rows n_in n_out`` per product: forward, delta times
    activations, and the delta sent back (not for the first layer). With
    ``first_layer_twice``, one more product on the first layer: pass 1's forward (two passes)
    or the fused pass's ``f'(z_1) x^T`` (a sparsity target on layer 1). For a 784-196 sparse
    autoencoder: ``12 m n h``; for a dictionary without AuxK: ``10 m n h``.

    Parameters
    ----------
    sizes : sequence of int
        Layer sizes ``(n_0, ..., n_L)``.
    rows : int
    first_layer_twice : bool

    Returns
    -------
    flops : float
    """
    layers = list(zip(sizes[:-1], sizes[1:], strict=False))
    flops = 0.0
    for i, (a, b) in enumerate(layers):
        flops += (2 if i == 0 else 3) * 2.0 * rows * a * b
    if first_layer_twice:
        a, b = layers[0]
        flops += 2.0 * rows * a * b
    return flops


def describe(flops: float, seconds: float, peak: float | None, label: str = "peak") -> str:
    """``"123.4 GFLOP/s, 45% of the float32 peak"`` for ``flops`` done in ``seconds``."""
    g = flops / seconds / 1e9
    if not peak:
        return f"{g:.1f} GFLOP/s"
    return f"{g:.1f} GFLOP/s, {g / peak:.0%} of {label}"


def network_flops(net, rows: int, kept: bool = False) -> float:
    """:func:`objective_flops` of ``net`` (a Network or a Dictionary) as the kernels run it.

    The first layer counts twice when the network has a sparse layer (a sparsity target, or
    AuxK's firing counts): with two passes, pass 1 runs the forward pass up to the last sparse
    layer (every layer up to it counts once more); fused (sparse layer 1 only, else the engine
    runs two passes), ``f'(z_1) x^T`` costs that same product. A 784-196 sparse autoencoder:
    ``12 m n h``; relu-l1 or topk without AuxK: ``10 m n h``; topk with AuxK: ``12 m n h``
    (its products on the dead latents are not counted).

    Parameters
    ----------
    net : Network or Dictionary
        Anything with ``sizes`` and ``sparse_layers``.
    rows : int
    kept : bool
        Pass 2 takes the activations pass 1 kept (``sae.objective.cost`` and the minibatch
        engine with two passes, for a sigmoid-KL network): the forward products up to the
        last sparse layer count once (``10 m n h`` for 784-196).

    Returns
    -------
    flops : float
    """
    sizes = tuple(net.sizes)
    upto = max(net.sparse_layers, default=0)
    if kept and getattr(net, "kind", "sigmoid-kl") == "sigmoid-kl":
        upto = 0
    extra = sum(2.0 * rows * a * b for a, b in zip(sizes[:upto], sizes[1 : upto + 1], strict=True))
    return objective_flops(sizes, rows, first_layer_twice=False) + extra


def stage_work(history: list[dict], network_of, rows: int) -> dict:
    """Flops and training seconds of each stage of a job's history.

    A stage's work is its last entry's ``"samples"`` (Adam, SGD) or ``"evaluations"`` times
    ``rows`` (full-batch optimizers), times :func:`network_flops` per row of its network
    (a deep stage's frozen encoder, recomputed in the tasks, is not counted).

    Parameters
    ----------
    history : list of dict
        The job's ``history.json`` (entries with ``"seconds"``, and ``"stage"`` in a deep job).
    network_of : callable
        Stage label (None for a one-layer job) -> the network it trains.
    rows : int
        Rows of one full-batch evaluation.

    Returns
    -------
    work : dict
        label -> ``(flops, seconds)``, in the order of the history.
    """
    last: dict = {}
    for e in history:
        last[e.get("stage")] = e
    out = {}
    for label, e in last.items():
        n = e["samples"] if "samples" in e else e["evaluations"] * rows
        out[label] = (network_flops(network_of(label), 1) * n, float(e["seconds"]))
    return out


def blas_threads() -> int:
    """Threads numpy's BLAS uses now: its default (what a process started with the same
    environment gets) when nothing limits it."""
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)


def measure_peaks(threads, bf16: bool = False, repeat: int = 5) -> dict[int, dict[str, float]]:
    """:func:`peaks` for each thread count of ``threads`` (once each), printed as measured.

    Parameters
    ----------
    threads : iterable of int
    bf16 : bool
        Also bfloat16 (when a path computes in it and PyTorch is installed).
    repeat : int

    Returns
    -------
    peaks : dict
        thread count -> ``{dtype: GFLOP/s}``.
    """
    out = {}
    for t in sorted(set(threads)):
        out[t] = peaks(t, repeat, bf16=bf16)
        print_peaks(out[t], t)
    return out


def share(
    flops: float,
    seconds: float,
    p: dict[int, dict[str, float]],
    dtype: str,
    threads: int,
    note: str = "",
) -> str:
    """:func:`describe` against the ``threads``-thread peak of compute dtype ``dtype``:
    ``"12.3 GFLOP/s, 45% of the 2-thread float32 peak"`` (+ ``note``).

    Parameters
    ----------
    flops, seconds : float
        The work done and the time it took (``flops`` per second with ``seconds=1``).
    p : dict
        From :func:`measure_peaks`.
    dtype : {"float64", "float32", "bfloat16"}
    threads : int
        A key of ``p`` (GFLOP/s alone when it is not one).
    note : str
        Appended to the label, e.g. ``" (2 workers x 1 thread)"``.
    """
    return describe(
        flops, seconds, p.get(threads, {}).get(dtype), f"the {threads}-thread {dtype} peak{note}"
    )


def print_peaks(p: dict[str, float], threads: int) -> None:
    """One line: the peaks measured in this run."""
    parts = [f"{dt} {v:.0f}" for dt, v in p.items()]
    print(
        f"matrix-multiply peak ({PEAK_SIZE}x{PEAK_SIZE} @ {PEAK_SIZE}x{PEAK_SIZE}, "
        f"{threads} thread{'s' if threads > 1 else ''}): " + ", ".join(parts) + " GFLOP/s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print_peaks(peaks(args.threads, args.repeat), args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
