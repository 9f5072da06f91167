"""Deep autoencoder on real MNIST digits: pretrained vs not pretrained vs PCA.

Setting: the 10,000 digits of ``t10k-images-idx3-ubyte.gz`` scaled to [0, 1]; the first
``--train`` (8,000) are written to a Zarr dataset and trained on with the distributed engine
(an embedded LocalCluster, 2 workers x 1 thread), the rest (2,000) are held out. Three models
with the same code size:

- the deep autoencoder with greedy pretraining (``--targets previous[,input]``: each stage
  reconstructs its input, or the digits; ``--max-iter`` iterations per stage) then
  ``--finetune-iter`` iterations of fine-tuning (decoders from the pretrained stages),
- the same network without pretraining (random init) given the same total iteration budget
  (``K * max_iter + finetune_iter`` fine-tuning iterations),
- PCA with as many components as the code has units (fitted on the training digits).

Prints the squared reconstruction error per image (sum over the 784 pixels of
``(x - x_hat)^2``, mean over images) on training and held-out digits, and the wall times;
PASS when the pretrained deep autoencoder beats PCA on the held-out digits. After each run,
the GFLOP/s of each stage's training (its evaluations x the flops of its network's objective,
``benchmarks/peak.py``; the frozen encoders recomputed in the tasks not counted) and of the
whole job, with their share of the matrix-multiply peak of the compute dtype: a stage run as
one task (``local``) against the 1-thread peak, a distributed one against the peak with as
many threads as workers.

``--cost`` instead times, per chunk of digits, the frozen encoder's forward pass that a
pretraining stage recomputes in its tasks against the stage's own two-pass evaluation, for
784-1000-500-250-30 (the figures behind docs/deep-autoencoders.md: why codes are computed in the
tasks instead of writing them to Zarr), on one BLAS thread (as in a task), each also in GFLOP/s
with its share of the 1-thread float64 peak.

Both measure the peaks once, at the start of the run.

    python benchmarks/bench_deep_mnist.py [--hidden 128,32,8] [--max-iter 40]
        [--finetune-iter 100] [--train 8000] [--targets previous,input]
        [--mnist DIR] [--cost]
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


def _table(rows: list[tuple]) -> str:
    head = ("model", "train err/img", "held-out err/img", "seconds")
    lines = [f"{head[0]:<34} {head[1]:>14} {head[2]:>17} {head[3]:>9}"]
    for name, tr, te, sec in rows:
        lines.append(f"{name:<34} {tr:>14.3f} {te:>17.3f} {sec:>9.1f}")
    return "\n".join(lines)


def _forward_flops(sizes, rows: int) -> float:
    """Flops of a forward pass through layers ``sizes`` over ``rows`` examples."""
    return sum(2.0 * rows * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def cost_figures(X: np.ndarray, chunk: int = 2000, repeat: int = 7) -> None:
    """Per-chunk seconds: frozen encoder forward vs the stage's own evaluation, one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        _cost_figures(X, chunk, repeat, measure_peaks([1]))


def _cost_figures(X: np.ndarray, chunk: int, repeat: int, peaks: dict) -> None:
    from sae import objective as obj
    from sae.deep import DeepArchitecture

    arch = DeepArchitecture(784, (1000, 500, 250, 30), code_activation="linear", rho=0.1, beta=3.0)
    Xc = np.ascontiguousarray(X[:chunk], dtype=np.float64)
    thetas = [arch.stage_network(k).init_theta(k) for k in range(1, 5)]

    def best(fn) -> float:
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    print(f"per chunk of {chunk} digits, one thread, float64, two passes (best of {repeat}):")
    print(f"{'stage':<22} {'encoder fwd':>12} {'stage eval':>11} {'ratio':>7} {'input B/ex':>11}")
    tot_enc = tot_stage = 0.0
    gflop = []
    for k in range(1, 5):
        sn = arch.stage_network(k)
        enc = arch.stage_encoder(thetas, k)
        A = Xc if enc is None else obj.forward(enc[0], enc[1], Xc)[-1]
        Y = Xc if arch.stage_target(k) == "input" else None
        t_enc = 0.0 if enc is None else best(lambda enc=enc: obj.forward(enc[0], enc[1], Xc))
        t_stage = best(lambda sn=sn, A=A, Y=Y, k=k: obj.cost(sn, thetas[k - 1], A, Y))
        tot_enc += t_enc
        tot_stage += t_stage
        print(
            f"{arch.stage_network(k).sizes!s:<22} {t_enc:>11.3f}s {t_stage:>10.3f}s "
            f"{t_enc / t_stage:>7.2f} {4 * sn.sizes[0]:>11d}"
        )
        f_enc = 0.0 if enc is None else _forward_flops(enc[0].sizes, chunk)
        f_stage = network_flops(sn, chunk)
        gflop.append((f_enc, f_stage))
        encoder = "-" if enc is None else share(f_enc, t_enc, peaks, "float64", 1)
        print(f"{'':<22}   encoder {encoder}; stage {share(f_stage, t_stage, peaks, 'float64', 1)}")
    print(
        f"all stages: encoder {tot_enc:.3f}s + stages {tot_stage:.3f}s per chunk: recomputing "
        f"adds {100 * tot_enc / tot_stage:.0f}% (x2 with two passes and no chunk cache); raw "
        "digit: 784 B/ex as uint8"
    )
    f_enc, f_stage = (sum(f) for f in zip(*gflop, strict=True))
    print(
        f"all stages: encoder {share(f_enc, tot_enc, peaks, 'float64', 1)}; "
        f"stages {share(f_stage, tot_stage, peaks, 'float64', 1)}"
    )


def _speeds(spec, info, root: Path, hist: list[dict], seconds: float, peaks, workers: int) -> str:
    """GFLOP/s and share of the peak of each stage of a finished job, and of the whole job."""
    from worker.schedule import Schedule, training_rows

    schedule = Schedule(spec, info, root)
    ids = {sid.label: sid for sid in schedule.ids}
    work = stage_work(
        hist,
        lambda label: schedule.stage_network(ids[label]),
        training_rows(spec, info),
    )
    execution = {label: schedule.stage_execution(ids[label]) for label in work}
    threads = {label: 1 if e == "local" else workers for label, e in execution.items()}
    parts = [
        f"{label} ({execution[label]}): {share(f, s, peaks, spec.dtype, threads[label])}"
        for label, (f, s) in work.items()
    ]
    total = sum(f for f, _ in work.values())
    t = max(threads.values(), default=1)  # the stages run one after the other
    return "; ".join(parts) + f"; whole job (wall): {share(total, seconds, peaks, spec.dtype, t)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--hidden", default="128,32,8")
    ap.add_argument("--max-iter", type=int, default=40, help="iterations per pretraining stage")
    ap.add_argument("--finetune-iter", type=int, default=100)
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--lam", type=float, default=1e-5)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="job folders (default: a temporary folder)")
    ap.add_argument("--skip-none", action="store_true", help="skip the no-pretraining run")
    ap.add_argument(
        "--targets",
        default="previous",
        help="pretraining targets to run, comma-separated: previous,input",
    )
    ap.add_argument("--cost", action="store_true", help="time encoder recompute vs stages")
    args = ap.parse_args(argv)

    from sae.deep import pca_reconstruction_error, squared_error_per_example
    from sae.mnist import mnist_images

    folder = Path(args.mnist)
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        print(f"SKIP: no MNIST digits in {folder}")
        return 0
    X = mnist_images(folder)
    if args.cost:
        cost_figures(X)
        return 0
    from worker.cluster import get_client
    from worker.dataset import open_dataset, write_dataset
    from worker.layout import load_model
    from worker.spec import TrainSpec
    from worker.train import train

    peaks = measure_peaks([1, args.workers], bf16=args.dtype == "bfloat16")

    hidden = [int(h) for h in args.hidden.split(",")]
    K = len(hidden)
    X_tr, X_te = X[: args.train], X[args.train :]
    print(
        f"MNIST t10k: train {len(X_tr)}, held out {len(X_te)}; deep autoencoder 784-"
        + "-".join(map(str, hidden))
        + f" (linear code, sigmoid elsewhere), lam={args.lam:g}, stage rho={args.rho:g} "
        f"beta={args.beta:g}, no sparsity in fine-tuning, L-BFGS, {args.dtype}; "
        f"{args.workers} workers x 1 thread"
    )
    rows = []
    t = time.perf_counter()
    pca_tr = pca_reconstruction_error(X_tr, X_tr, hidden[-1]).mean()
    pca_te = pca_reconstruction_error(X_tr, X_te, hidden[-1]).mean()
    rows.append((f"PCA, {hidden[-1]} components", pca_tr, pca_te, time.perf_counter() - t))

    tmp = tempfile.TemporaryDirectory(prefix="bench-deep-")
    base = Path(args.out or tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    ds = base / "mnist-train"
    pixels = np.rint(X_tr * 255).astype(np.uint8)
    write_dataset(
        ds,
        pixels,
        *pixels.shape,
        dtype="uint8",
        chunk_rows=1000,
        scale=1 / 255,
        sample_shape=(28, 28),
        overwrite=True,
    )
    common = dict(
        dataset=str(ds),
        hidden=hidden,
        code_activation="linear",
        lam=args.lam,
        rho=args.rho,
        beta=args.beta,
        dtype=args.dtype,
        seed=args.seed,
    )
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if "previous" not in targets:
        targets.insert(0, "previous")
    runs = [
        (
            f"deep AE, pretrained ({t})",
            dict(pretrain=t, max_iter=args.max_iter, finetune_iter=args.finetune_iter),
        )
        for t in targets
    ]
    if not args.skip_none:
        runs.append(
            (
                "deep AE, no pretraining",
                dict(
                    pretrain="none",
                    max_iter=0,
                    finetune_iter=K * args.max_iter + args.finetune_iter,
                ),
            )
        )
    results = {}
    with get_client(workers=args.workers, threads_per_worker=1) as (client, _):
        for name, kw in runs:
            spec = TrainSpec(**common, **kw)
            t = time.perf_counter()
            res = train(spec, base / kw["pretrain"], client=client)
            sec = time.perf_counter() - t
            net, theta, _ = load_model(res.model_path)
            tr = squared_error_per_example(net, theta, X_tr).mean()
            te = squared_error_per_example(net, theta, X_te).mean()
            hist = json.loads(Path(res.history_path).read_text())
            per_stage = {}
            for e in hist:
                per_stage.setdefault(e["stage"], []).append(e)
            detail = ", ".join(
                f"{s}: {len(v) - 1} it {v[-1]['seconds']:.0f}s" for s, v in per_stage.items()
            )
            print(f"{name}: {res.status}, {res.evaluations} evaluations ({detail})", flush=True)
            speeds = _speeds(
                spec, open_dataset(ds), base / kw["pretrain"], hist, sec, peaks, args.workers
            )
            print(f"  {speeds}")
            rows.append((name, tr, te, sec))
            results[kw["pretrain"]] = te
    print()
    print("squared reconstruction error per image (sum over 784 pixels, mean over images):")
    print(_table(rows))
    ok = results["previous"] < pca_te
    verdict = "PASS" if ok else "FAIL"
    print(
        f"{verdict}: pretrained deep autoencoder {results['previous']:.3f} vs PCA {pca_te:.3f} "
        "on held-out digits"
    )
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
