"""Stochastic training over chunks (Adam): throughput, out of core, and quality per second.

``throughput``: samples/s of Adam steps on a 784-196 sparse autoencoder, batch 4,096, on an
embedded cluster of 2 workers x 1 thread, against a plain in-memory numpy loop over the same
batches (the same objective and Adam step, 2 BLAS threads, the data already in memory),
measured in the same run; both in samples/s and in GFLOP/s with their share of this machine's
matrix-multiply peak of the same dtype on 2 threads (``benchmarks/peak.py``, measured at the
start of the run: 2 workers x 1 thread and 2 BLAS threads both against the 2-thread peak),
counting 12 B n h flops per step (forward twice, backward three products).

``out-of-core``: one epoch over ``--rows`` x 784 float32 rows (default 1,000,000: 3.1 GB) on 2
workers of ``--memory-limit`` (default 670 MB: the data do not fit), against the time to read
the dataset once (every chunk, decoded, in one task per chunk) and against the compute time
(the steps' work on data already in memory, the throughput measured on a dataset that fits);
the epoch's samples/s and the compute rate also as GFLOP/s and share of the 2-thread float32
peak.

``quality``: the UFLDL MNIST setting (784-196, rho 0.1, lambda 3e-3, beta 3, the 10,000 test
digits): the full-dataset cost against wall time for Adam and for 400 iterations of L-BFGS,
both on the cluster, with each one's training GFLOP/s and share of the float64 peak (L-BFGS
runs as one task on 1 thread when the digits fit ``LOCAL_BYTES``, Adam on 2 workers x 1
thread); writes ``--plot`` (PNG).

    python benchmarks/bench_stochastic.py throughput [--steps 20]
    python benchmarks/bench_stochastic.py out-of-core [--rows 1000000]
    python benchmarks/bench_stochastic.py quality [--mnist DIR] [--plot docs/adam-vs-lbfgs.png]
    python benchmarks/bench_stochastic.py deep [--hidden 256,128,30] [--lam 1e-4] [--epochs 150]

``deep``: the deep autoencoder with a 30-unit linear code, sigmoid units elsewhere, trained with
Adam on the first 8,000 test digits (1,000 of them, two chunks, held out for early stopping at
each epoch's end), measured on the other 2,000: squared error per digit of the best model
(``best.npz``) against PCA with 30 components fitted on the same 8,000; the training GFLOP/s
of each stage and of the whole job and their share of the 2-thread float32 peak.

Every mode measures the peaks it compares against once, at its start (``benchmarks/peak.py``;
bfloat16 only for a path that computes in it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import measure_peaks, network_flops, share, stage_work  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: Threads of the embedded cluster (2 workers x 1 thread) and of the in-memory numpy loop.
THREADS = 2
CLUSTER = f" ({THREADS} workers x 1 thread)"
#: Compute dtypes of ``throughput`` (bfloat16's peak is measured only when it is listed).
DTYPES = ("float64", "float32")
try:  # and the bfloat16 path where PyTorch is installed
    import torch  # noqa: F401

    DTYPES += ("bfloat16",)
except ImportError:
    pass


def _write(path: Path, rows: int, dtype: str, chunk_rows: int, seed: int = 0) -> None:
    from worker.dataset import write_dataset

    rng = np.random.default_rng(seed)

    def blocks():
        for start in range(0, rows, chunk_rows):
            k = min(chunk_rows, rows - start)
            yield (rng.random((k, 784), dtype=np.float32) * 0.9 + 0.05).astype(dtype)

    write_dataset(path, blocks(), rows, 784, dtype=dtype, chunk_rows=chunk_rows)


def _spec(path: Path, dtype: str, **kw):
    from worker.spec import TrainSpec

    base = dict(
        dataset=str(path),
        hidden=196,
        lam=3e-3,
        rho=0.1,
        beta=3.0,
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=4096,
        dtype=dtype,
        log_every=1,
        checkpoint_every=1000,
    )
    base.update(kw)
    return TrainSpec(**base)


def _rates(history: list[dict], skip: int = 2) -> list[float]:
    """Samples/s of every logged step after the first ``skip`` (warm-up)."""
    out = []
    for a, b in zip(history[skip:], history[skip + 1 :], strict=False):
        out.append((b["samples"] - a["samples"]) / (b["seconds"] - a["seconds"]))
    return out


def numpy_loop(X: np.ndarray, spec, steps: int) -> list[float]:
    """Samples/s of the same batches through obj.cost and the Adam step, in memory."""
    from threadpoolctl import threadpool_limits

    from sae import objective as obj
    from sae.optimize.stochastic import StochasticState, learning_rate, step
    from worker.batches import Batches
    from worker.schedule import build_network, optimizer_options

    net = build_network(spec, 784)
    b = Batches.of(X.shape[0], 2048, spec.batch_size, spec.seed + 0, spec.shuffle_window)
    st = StochasticState.start("adam", net.init_theta(spec.seed), optimizer_options(spec))
    rates = []
    with threadpool_limits(THREADS, user_api="blas"):
        for t in range(steps):
            parts = b.parts(0, t % b.per_epoch)
            t0 = time.perf_counter()
            rows = np.concatenate([c * 2048 + r for c, r in parts])
            _, g = obj.cost(net, st.theta, X[rows], passes=spec.passes, dtype=spec.dtype)
            st = step(st, g, learning_rate(st.options, t, steps))
            rates.append(len(rows) / (time.perf_counter() - t0))
    return rates[2:]


def throughput(args) -> None:
    from worker.cluster import get_client
    from worker.schedule import build_network
    from worker.train import train

    dtypes = args.dtypes.split(",")
    peaks = measure_peaks([THREADS], bf16="bfloat16" in dtypes)
    rows = 4096 * 10
    with (
        tempfile.TemporaryDirectory() as tmp,
        get_client(scheduler=args.scheduler, workers=2, threads_per_worker=1) as (client, _),
    ):
        for dtype in dtypes:
            path = Path(tmp) / dtype
            from sae.objective import array_dtype
            from worker.dataset import read_all

            _write(path, rows, array_dtype(dtype), 2048)
            X = read_all(path).astype(array_dtype(dtype))
            warm = args.warm_epochs * (rows // 4096)
            spec = _spec(path, dtype, max_steps=warm + args.steps, passes=args.passes)
            res = train(spec, Path(tmp) / f"job-{dtype}", client=client)
            hist = json.loads(Path(res.history_path).read_text())
            cold = float(np.median(_rates(hist[: rows // 4096])))
            ours = float(np.median(_rates(hist, skip=warm)))
            base = float(np.median(numpy_loop(X, spec, args.steps)))
            # per sample: 10 n h with two passes (pass 2 takes up what pass 1 kept), else 12
            flops = network_flops(build_network(spec, 784), 1, kept=spec.passes == "two")
            print(
                f"{dtype}: ours {ours:,.0f} samples/s "
                f"({share(ours * flops, 1.0, peaks, dtype, THREADS, CLUSTER)}), "
                f"in-memory numpy loop {base:,.0f} samples/s "
                f"({share(base * flops, 1.0, peaks, dtype, THREADS, f' ({THREADS} BLAS threads)')})"
                f": ratio {ours / base:.2f}x (median of {args.steps - 1} steps after "
                f"{args.warm_epochs} epochs; the first epoch, chunks read into the caches: "
                f"{cold:,.0f} samples/s)"
            )


def out_of_core(args) -> None:
    from distributed import wait

    from worker.cluster import get_client
    from worker.dataset import open_dataset, read_chunk
    from worker.schedule import build_network
    from worker.train import train

    peaks = measure_peaks([THREADS])
    root = Path(args.dir)
    path = root / f"ooc-{args.rows}"
    if not path.exists():
        t = time.perf_counter()
        _write(path, args.rows, "float32", 8192)
        print(f"wrote {args.rows:,} x 784 float32 in {time.perf_counter() - t:.0f} s")
    info = open_dataset(path)
    gb = info.shape[0] * 784 * 4 / 1e9
    limit = args.memory_limit
    with get_client(workers=THREADS, threads_per_worker=1, memory_limit=limit) as (c, _):
        t = time.perf_counter()
        futs = [
            c.submit(lambda i: read_chunk(str(path), i, "float32").shape, i, pure=False)
            for i in range(info.n_chunks)
        ]
        wait(futs)
        read_s = time.perf_counter() - t
        print(f"read once: {gb:.2f} GB in {read_s:.1f} s ({gb / read_s:.2f} GB/s)")
        spec = _spec(path, "float32", epochs=1, log_every=10)
        t = time.perf_counter()
        res = train(spec, root / "ooc-job", client=c)
        wall = time.perf_counter() - t
        hist = json.loads(Path(res.history_path).read_text())
        steps = res.iterations
    flops = network_flops(build_network(spec, 784), 1, kept=True)  # per sample (two passes)
    print(
        f"one epoch: {steps} steps of 4,096 rows in {wall:.1f} s "
        f"({info.shape[0] / wall:,.0f} samples/s, "
        f"{share(info.shape[0] * flops, wall, peaks, 'float32', THREADS, CLUSTER)}), "
        f"status {res.status}"
    )
    print(
        f"  compute at the in-memory throughput ({args.compute_rate:,.0f} samples/s, "
        f"{share(args.compute_rate * flops, 1.0, peaks, 'float32', THREADS)}, from "
        f"`throughput`): {info.shape[0] / args.compute_rate:.1f} s"
    )
    bound = max(read_s, info.shape[0] / args.compute_rate)
    print(f"  wall / max(read, compute) = {wall / bound:.2f} (goal <= 1.2)")
    print(f"  last cost {hist[-1]['cost']:.5g}")


def quality(args) -> None:
    import dataclasses

    from sae.mnist import load_idx
    from worker.cluster import get_client
    from worker.dataset import open_dataset, write_dataset
    from worker.engine import BatchObjective
    from worker.layout import read_history
    from worker.schedule import Schedule, build_network
    from worker.spec import TrainSpec
    from worker.stage import Hooks
    from worker.stage_id import StageId
    from worker.stochastic import run_stochastic_stage
    from worker.train import train

    images = load_idx(Path(args.mnist) / "t10k-images-idx3-ubyte.gz")
    X = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    curves: dict[str, tuple[list[float], list[float]]] = {}
    peaks = measure_peaks([1, THREADS])
    with (
        tempfile.TemporaryDirectory() as tmp,
        get_client(workers=THREADS, threads_per_worker=1) as (
            c,
            _,
        ),
    ):
        path = Path(tmp) / "mnist"
        write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=1000, sample_shape=(28, 28))
        common = dict(dataset=str(path), hidden=196, lam=3e-3, rho=0.1, beta=3.0, passes="fused")
        info = open_dataset(path)
        lbfgs_spec = TrainSpec(**common, max_iter=args.lbfgs_iter)
        net = build_network(lbfgs_spec, X.shape[1])  # Adam's too
        execution = Schedule(lbfgs_spec, info, Path(tmp) / "lbfgs").executions()[0]
        lbfgs_threads = 1 if execution == "local" else THREADS  # one task, or every worker
        lbfgs_history = Path(args.lbfgs_history) if args.lbfgs_history else None
        if lbfgs_history is None or not lbfgs_history.exists():
            out = Path(tmp) / "lbfgs"
            train(lbfgs_spec, out, client=c, refresh_seconds=1e9)
            h = read_history(out / "history.json")
            if lbfgs_history is not None:  # kept for later runs that tune Adam alone
                lbfgs_history.write_text(json.dumps(h))
        else:
            h = read_history(lbfgs_history)
        curves["L-BFGS"] = ([e["seconds"] for e in h], [e["cost"] for e in h])
        flops, seconds = stage_work(h, lambda _: net, X.shape[0])[None]
        note = f" ({execution} execution)"
        print(
            f"L-BFGS: {len(h) - 1} iterations, cost {h[-1]['cost']:.5f}, "
            f"{h[-1]['seconds']:.1f} s training "
            f"({h[-1]['evaluations']} evaluations, "
            f"{share(flops, seconds, peaks, 'float64', lbfgs_threads, note)})"
        )

        spec = TrainSpec(
            **common,
            optimizer="adam",
            learning_rate=args.lr,
            batch_size=args.batch,
            epochs=args.epochs,
            lr_schedule="cosine",
            log_every=args.log_every,
            checkpoint_every=10**6,
        )
        stage = Schedule(spec, info, Path(tmp) / "adam").stage(StageId.single(), [])
        every = [(i, np.arange(1000)) for i in range(info.n_chunks)]  # all rows: the full cost
        stage = dataclasses.replace(
            stage, pictures=False, validation=every, validate_every=args.eval_every
        )
        f = BatchObjective(c, str(path), stage.network, passes=stage.passes, job="adam")
        spent = [0.0]  # seconds of full-dataset evaluations, not training

        def full_cost(theta):
            t0 = time.perf_counter()
            J = f(theta, every)[0]
            spent[0] += time.perf_counter() - t0
            return J

        marks = []
        res = run_stochastic_stage(
            stage,
            f,
            Hooks(on_iteration=lambda e: "val_cost" in e and marks.append((e, spent[0]))),
            validate=full_cost,
            refresh_seconds=1e9,
        )
        xs = [e["seconds"] - s for e, s in marks]
        ys = [e["val_cost"] for e, _ in marks]
        curves[f"Adam (batch {args.batch}, cosine)"] = (xs, ys)
        adam = share(
            marks[-1][0]["samples"] * network_flops(net, 1),
            xs[-1],
            peaks,
            "float64",
            THREADS,
            CLUSTER,
        )
        print(
            f"Adam: {res.iterations} steps, full cost {ys[-1]:.5f}, {xs[-1]:.1f} s training "
            f"({adam}; the full-cost evaluations not counted)"
        )
    lb_cost, lb_time = curves["L-BFGS"][1][-1], curves["L-BFGS"][0][-1]
    for x, y in zip(*curves[f"Adam (batch {args.batch}, cosine)"], strict=True):
        if y <= 1.01 * lb_cost:
            print(f"Adam within 1% of L-BFGS's cost after {x:.1f} s ({x / lb_time:.2f}x its time)")
            break
    else:
        best = min(curves[f"Adam (batch {args.batch}, cosine)"][1])
        print(
            f"Adam's best full cost {best:.5f} is {best / lb_cost - 1:+.1%} from L-BFGS's "
            f"{lb_cost:.5f}"
        )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training seconds (2 workers x 1 thread)")
    ax.set_ylabel("cost on all 10,000 digits")
    ax.set_title("MNIST 784-196 sparse autoencoder (UFLDL setting)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")


def deep(args) -> None:
    """The deep autoencoder with a 30-unit code on 8,000 digits, against PCA (same split)."""
    from sae.deep import reconstruct
    from sae.mnist import load_idx
    from worker.cluster import get_client
    from worker.dataset import open_dataset, write_dataset
    from worker.layout import load_model
    from worker.schedule import Schedule
    from worker.spec import TrainSpec
    from worker.stage_id import StageId
    from worker.train import train

    images = load_idx(Path(args.mnist) / "t10k-images-idx3-ubyte.gz")
    X = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    peaks = measure_peaks([THREADS])
    train_X, held = X[:8000], X[8000:]
    mean = train_X.mean(axis=0)
    _, _, Vt = np.linalg.svd(train_X - mean, full_matrices=False)
    P = Vt[:30]
    pca = (held - mean) @ P.T @ P + mean
    pca_err = float(np.mean(np.sum((held - pca) ** 2, axis=1)))
    print(f"PCA, 30 components: {pca_err:.3f} squared error per held-out digit")
    hidden = [int(h) for h in args.hidden.split(",")]
    with (
        tempfile.TemporaryDirectory() as tmp,
        get_client(workers=THREADS, threads_per_worker=1) as (c, _),
    ):
        path = Path(tmp) / "digits"
        # 16 chunks of 500: a validation_fraction of 1/8 holds out 2 chunks = 1,000 digits
        write_dataset(path, train_X, *train_X.shape, dtype="float32", chunk_rows=500)
        spec = TrainSpec(
            dataset=str(path),
            hidden=hidden,
            code_activation="linear",
            rho=None,
            beta=0.0,
            lam=args.lam,
            optimizer="adam",
            learning_rate=args.lr,
            batch_size=args.batch,
            pretrain=args.pretrain,
            epochs=args.pretrain_epochs,
            finetune_epochs=args.epochs,
            lr_schedule="cosine",
            dtype="float32",
            validation_fraction=0.125,
            validate_every=10**6,  # at each epoch's end
            early_stopping=args.patience,
            log_every=50,
            checkpoint_every=500,
        )
        t0 = time.perf_counter()
        res = train(spec, Path(tmp) / "job", client=c, refresh_seconds=1e9)
        seconds = time.perf_counter() - t0
        best = Path(tmp) / "job" / "finetune" / "best.npz"
        net, theta, _ = load_model(best if best.exists() else res.model_path)
        err = float(np.mean(np.sum((held - reconstruct(net, theta, held)) ** 2, axis=1)))
        tr = float(np.mean(np.sum((train_X - reconstruct(net, theta, train_X)) ** 2, axis=1)))
        schedule = Schedule(spec, open_dataset(path), Path(tmp) / "job")
        K = len(schedule.ids) - 1
        work = stage_work(
            json.loads(Path(res.history_path).read_text()),
            lambda label: schedule.stage_network(StageId.from_label(label, K)),
            rows=0,  # Adam: the entries count samples
        )
    sizes = "-".join(str(n) for n in net.sizes[: len(net.sizes) // 2 + 1])
    print(
        f"deep {sizes} (adam, lam {args.lam:g}, lr {args.lr:g}, batch {args.batch}, "
        f"pretrain {args.pretrain}): {err:.3f} held out ({err / pca_err:.2f}x PCA), "
        f"{tr:.3f} on training digits, {seconds:.0f} s ({res.message})"
    )
    stages = "; ".join(
        f"{label}: {share(f, s, peaks, spec.dtype, THREADS)}" for label, (f, s) in work.items()
    )
    total = sum(f for f, _ in work.values())
    print(
        f"  training GFLOP/s{CLUSTER}: {stages}; whole job ({seconds:.0f} s wall): "
        f"{share(total, seconds, peaks, spec.dtype, THREADS)} (held-out checks not counted)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--steps", type=int, default=20, help="steps measured")
    t.add_argument(
        "--warm-epochs",
        type=int,
        default=3,
        help="epochs before (each worker caches the chunks its parts are pinned to: the "
        "epoch's chunk order places them, so a chunk is read by both workers in the first "
        "epochs)",
    )
    t.add_argument("--passes", choices=["two", "fused"], default="two")
    t.add_argument("--dtypes", default=",".join(DTYPES), help="compute dtypes measured")
    t.add_argument(
        "--scheduler",
        default=None,
        help="address of a running scheduler with 2 workers x 1 thread (default: embedded)",
    )
    o = sub.add_parser("out-of-core")
    o.add_argument("--rows", type=int, default=1_000_000)
    o.add_argument("--memory-limit", default="670MB")
    o.add_argument("--dir", default="/tmp/sae-bench")
    o.add_argument("--compute-rate", type=float, default=30_000.0)
    q = sub.add_parser("quality")
    q.add_argument("--mnist", default=str(REPO / ".." / "shared" / "data" / "mnist"))
    q.add_argument("--lbfgs-iter", type=int, default=400)
    q.add_argument("--batch", type=int, default=256)
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--lr", type=float, default=3e-3)
    q.add_argument("--log-every", type=int, default=20)
    q.add_argument("--eval-every", type=int, default=40)
    q.add_argument("--warmup", type=int, default=0)
    q.add_argument("--sparsity", choices=["batch", "ema"], default="batch")
    q.add_argument("--lbfgs-history", default=None, help="Reuse (or keep) L-BFGS's history")
    q.add_argument("--plot", default=str(REPO / "docs" / "adam-vs-lbfgs.png"))
    d = sub.add_parser("deep")
    d.add_argument("--mnist", default=str(REPO / ".." / "shared" / "data" / "mnist"))
    d.add_argument("--hidden", default="256,128,30")
    d.add_argument("--lam", type=float, default=1e-4)
    d.add_argument("--lr", type=float, default=1e-2)
    d.add_argument("--batch", type=int, default=128)
    d.add_argument("--epochs", type=int, default=150, help="fine-tuning epochs")
    d.add_argument("--pretrain", choices=["none", "previous", "input"], default="none")
    d.add_argument("--pretrain-epochs", type=int, default=5)
    d.add_argument("--patience", type=int, default=20, help="epochs without a better val cost")
    args = p.parse_args(argv)
    run = {"throughput": throughput, "out-of-core": out_of_core, "quality": quality, "deep": deep}
    run[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
