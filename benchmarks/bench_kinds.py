"""The model kinds side by side: the L0 - explained-variance frontier, and evaluation speed.

    python benchmarks/bench_kinds.py frontier [--activations DIR] [--epochs 30]
    python benchmarks/bench_kinds.py throughput

``frontier`` trains ``sigmoid-kl``, ``relu-l1`` and ``topk`` over a sweep of their sparsity
knob (rho, l1, k) on three real datasets and measures each model on held-out rows:

- the MNIST test set's digits (``../shared/data/mnist/``; 8,000 to train, 2,000 held out);
- 8x8 patches of the photographs that ship with scikit-image (20,000 + 5,000);
- the ReLU hidden layer (256 units) of a small classifier trained on the digits, written by
  ``benchmarks/make_activations.py --out DIR`` (8,000 + 2,000 rows), given as ``--activations``.

Each dataset is scaled (not centred) so that ``E ||x||^2 = d_in``, as SAELens's
``normalize_activations="expected_average_only_in"``, so the knobs mean the same on each.
Every model is trained the same way: Adam, batch 256, learning rate 1e-3 with a cosine decay,
``--epochs`` epochs, float32, in this process with the very chunk functions the engine ships
to workers (:mod:`sae.objective`). ``topk+auxk`` adds AuxK with ``k_aux = latents / 2``, a
latent being dead after an epoch's rows without firing. The figures are the held-out L0 (mean
active latents; for sigmoid units, those above 0.1), explained variance and dead latents
(:mod:`sae.metrics`). It prints a table, a verdict on "TopK beats L1 at low L0" per dataset
(the explained-variance gap at the L0 values both reach, interpolated on log L0), and draws
``docs/frontier.png``. Beside each model's training seconds, its GFLOP/s and their share of the
float32 matrix-multiply peak with the BLAS threads the training uses (its default).

``throughput`` times one full-batch evaluation (cost and gradient) of each kind on 10,000 x
784 float64 rows, 256 latents, in one thread, and prints samples/s, the ratio to the classic
kind, GFLOP/s and their share of the 1-thread float64 peak.

Both measure the peak once at their start (``benchmarks/peak.py``) and count the flops of the
objective's matrix products: 12 m n h per evaluation of the sigmoid-kl kind (two passes) and of
topk with AuxK (its products on the dead latents not counted), 10 m n h for relu-l1 and topk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peak import blas_threads, measure_peaks, network_flops, share  # noqa: E402

from sae import objective as obj  # noqa: E402
from sae.dictionary import Dictionary  # noqa: E402
from sae.network import Network  # noqa: E402
from sae.optimize.stochastic import StochasticState, learning_rate, step  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
SWEEPS = {
    "sigmoid-kl": ("rho", [0.01, 0.03, 0.1, 0.3]),
    "relu-l1": ("l1", [0.3, 1.0, 3.0, 10.0, 30.0]),
    "topk": ("k", [4, 8, 16, 32, 64]),
    "topk+auxk": ("k", [4, 8, 16, 32, 64]),
}


# ----------------------------------------------------------------------------- data


def _normalised(X: np.ndarray) -> np.ndarray:
    """``X`` scaled so that the mean squared norm of a row is its width."""
    return X * np.sqrt(X.shape[1] / np.mean(np.einsum("ij,ij->i", X, X)))


def mnist() -> tuple[np.ndarray, np.ndarray]:
    from sae.mnist import mnist_images

    X = _normalised(mnist_images(MNIST))
    return X[:8000], X[8000:]


def patches() -> tuple[np.ndarray, np.ndarray]:
    from sae.preprocess import photographs, sample_patches

    P = sample_patches(photographs(), 8, 25_000, seed=0)
    P = P - P.mean(axis=1, keepdims=True)  # each patch's brightness removed, as UFLDL does
    P = _normalised(P)
    return P[:20_000], P[20_000:]


def activations(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    shards = sorted(folder.glob("*.npy"), key=lambda p: (len(p.name), p.name))
    A = _normalised(np.concatenate([np.load(p) for p in shards]).astype(np.float64))
    return A[:8000], A[8000:]


# ----------------------------------------------------------------------------- training


def network(kind: str, d: int, h: int, knob) -> Network:
    if kind == "sigmoid-kl":
        return Network.autoencoder(
            d, h, lam=1e-5, rho=knob, beta=3.0, activation="sigmoid", output_activation="linear"
        )
    if kind == "relu-l1":
        return Dictionary.of("relu-l1", d, h, l1=knob)
    if kind == "topk+auxk":  # dead: inactive for an epoch (set in fit)
        return Dictionary.of("topk", d, h, k=knob, k_aux=h // 2)
    return Dictionary.of("topk", d, h, k=knob)


def fit(net: Network, X: np.ndarray, epochs: int, seed: int = 0, batch: int = 256) -> np.ndarray:
    """Adam over shuffled minibatches, in memory, with the engine's chunk functions."""
    if isinstance(net, Dictionary):
        theta = net.init_theta(seed, mean=X.mean(axis=0))
        if net.uses_aux:
            net = dataclasses.replace(net, dead_after=len(X))
    else:
        theta = net.init_theta(seed)
    state = StochasticState.start("adam", theta, {"learning_rate": 1e-3, "schedule": "cosine"})
    rng = np.random.default_rng(seed)
    per_epoch = -(-len(X) // batch)
    total = epochs * per_epoch
    carried = None  # AuxK's counters of examples since each latent was last active
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for b in range(per_epoch):
            Xb = X[order[b * batch : (b + 1) * batch]]
            th = state.theta
            s1 = obj.pass1(net, th, Xb, dtype="float32")
            if net.uses_aux if isinstance(net, Dictionary) else False:
                stats = carried = obj.batch_stats(net, s1, carried, 0.0)
            else:
                stats = obj.rho_hat(net, s1)
            s2 = obj.pass2(net, th, Xb, stats, dtype="float32")
            _, grad = obj.finalize(net, th, obj.merge_sums(s1, s2))
            state = step(state, grad, learning_rate(state.options, state.step, total))
            if net.unit_norm_decoder:
                state = state.replace(theta=net.project(state.theta))
    return state.theta


def measure(net: Network, theta: np.ndarray, X: np.ndarray) -> dict:
    from sae.metrics import finalize_metrics, metric_sums

    return finalize_metrics(net, metric_sums(net, theta, X))


def frontier(args) -> None:
    datasets = {"MNIST digits": (mnist, 256), "8x8 photo patches": (patches, 256)}
    if args.activations:
        folder = Path(args.activations)
        datasets["MLP hidden layer (MNIST)"] = (lambda: activations(folder), 512)
    elif not args.quiet:
        print("(no --activations DIR: the classifier's activations are left out)")
    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        print(f"MNIST not found at {MNIST}: get t10k-images-idx3-ubyte.gz from the MNIST site")
        datasets.pop("MNIST digits")
    results = []
    threads = blas_threads()  # fit's products run on BLAS's default threads
    peak = measure_peaks([threads])[threads].get("float32")
    print(
        f"{'dataset':26s} {'kind':10s} {'knob':>9s} {'L0':>7s} {'EV':>7s} {'dead':>6s} {'s':>6s} "
        f"{'GFLOP/s':>8s} {'peak':>5s}  (peak: the {threads}-thread float32 peak)"
    )
    for name, (load, h) in datasets.items():
        train, held = load()
        for kind, (knob_name, values) in SWEEPS.items():
            for v in values:
                net = network(kind, train.shape[1], h, v)
                t0 = time.perf_counter()
                theta = fit(net, train, args.epochs)
                seconds = time.perf_counter() - t0
                gflops = args.epochs * len(train) * network_flops(net, 1) / seconds / 1e9
                m = measure(net, theta, held)
                row = dict(
                    dataset=name,
                    kind=kind,
                    knob=knob_name,
                    value=v,
                    latents=h,
                    l0=m["l0"],
                    explained_variance=m["explained_variance"],
                    dead_fraction=m["dead_fraction"],
                    seconds=seconds,
                )
                results.append(row)
                print(
                    f"{name:26s} {kind:10s} {knob_name + '=' + format(v, 'g'):>9s} "
                    f"{m['l0']:7.2f} {m['explained_variance']:7.4f} "
                    f"{100 * m['dead_fraction']:5.1f}% {seconds:6.1f} "
                    f"{gflops:8.1f} {gflops / peak:5.0%}",
                    flush=True,
                )
    print()
    for name in datasets:
        print(verdict(name, [r for r in results if r["dataset"] == name]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    plot(results, list(datasets), Path(args.out))
    print(f"wrote {args.out}")


def _curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted(rows, key=lambda r: r["l0"])
    return np.log([max(r["l0"], 1e-3) for r in rows]), np.array(
        [r["explained_variance"] for r in rows]
    )


def verdict(name: str, rows: list[dict]) -> str:
    """Explained variance of topk minus relu-l1 at the L0 values both curves span."""
    top = _curve([r for r in rows if r["kind"] == "topk"])
    l1 = _curve([r for r in rows if r["kind"] == "relu-l1"])
    lo, hi = max(top[0].min(), l1[0].min()), min(top[0].max(), l1[0].max())
    if lo >= hi:
        return f"{name}: the topk and relu-l1 curves span no common L0; no verdict"
    grid = np.linspace(lo, hi, 5)
    gap = np.interp(grid, *top) - np.interp(grid, *l1)
    at = ", ".join(f"L0 {np.exp(g):.0f}: {d:+.3f}" for g, d in zip(grid, gap, strict=True))
    word = "beats" if np.all(gap > 0) else ("loses to" if np.all(gap < 0) else "crosses")
    return f"{name}: topk {word} relu-l1 (EV gap {at})"


def plot(results: list[dict], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for kind, marker in (
            ("sigmoid-kl", "s"),
            ("relu-l1", "o"),
            ("topk", "^"),
            ("topk+auxk", "v"),
        ):
            rows = sorted(
                (r for r in results if r["dataset"] == name and r["kind"] == kind),
                key=lambda r: r["l0"],
            )
            ax.plot(
                [r["l0"] for r in rows],
                [r["explained_variance"] for r in rows],
                marker=marker,
                label=kind,
            )
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per example, held out)")
        ax.set_ylabel("explained variance (held out)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


# ----------------------------------------------------------------------------- throughput


def throughput(args) -> None:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    X = rng.random((10_000, 784))
    h = 256
    nets = {
        "sigmoid-kl (two passes)": Network.autoencoder(784, h, lam=1e-4, rho=0.05, beta=3),
        "relu-l1": Dictionary.of("relu-l1", 784, h, l1=0.1),
        "topk k=32": Dictionary.of("topk", 784, h, k=32),
        "topk k=32 + AuxK": Dictionary.of("topk", 784, h, k=32, k_aux=64),
    }
    base = None
    peaks = measure_peaks([1])
    print(f"one evaluation of 10,000 x 784 rows, {h} latents, float64, 1 thread")
    with threadpool_limits(1):
        for name, net in nets.items():
            theta = net.init_theta(0)
            if isinstance(net, Dictionary):  # a few latents dead, so AuxK has work
                theta = net.init_theta(0, mean=X.mean(axis=0))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                obj.cost(net, theta, X)
                times.append(time.perf_counter() - t0)
            t = float(np.median(times))
            rate = len(X) / t
            base = base or rate
            print(
                f"  {name:26s} {t:7.3f} s  {rate:9.0f} samples/s  {rate / base:5.2f}x  "
                f"{share(network_flops(net, len(X)), t, peaks, 'float64', 1)}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("frontier")
    f.add_argument("--activations", help="folder of .npy shards from make_activations.py")
    f.add_argument("--epochs", type=int, default=30)
    f.add_argument("--out", default=str(ROOT / "docs" / "frontier.png"))
    f.add_argument("--json", default=None, help="also write the figures as JSON")
    f.add_argument("--quiet", action="store_true")
    t = sub.add_parser("throughput")
    t.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    frontier(args) if args.what == "frontier" else throughput(args)


if __name__ == "__main__":
    main()
