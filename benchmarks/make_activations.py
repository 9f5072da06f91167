"""Real activations to ingest: the ReLU hidden layer of a small MNIST classifier, as shards.

Setting: the 10,000 digits of ``t10k-images-idx3-ubyte.gz`` scaled to [0, 1]. A scikit-learn
``MLPClassifier`` (one ReLU hidden layer of ``--hidden`` 256 units, Adam, ``--epochs`` passes,
seeded) is trained on the first ``--train`` (8,000) digits; its hidden-layer activations
``relu(x W1 + b1)`` of all 10,000 digits are written as ``--shards`` (4) float32 ``.npy`` shards
``acts_0.npy`` ... into ``--out``, in digit order.

Prints the classifier's accuracy on the 2,000 held-out digits, the activations' shape and
size, and their mean L0 (non-zero units per digit). Ingest them with, for instance::

    python benchmarks/make_activations.py --out /tmp/mnist-acts
    sae ingest activations /tmp/mnist-acts /tmp/mnist-acts.zarr --storage bfloat16
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def hidden_activations(clf, X: np.ndarray) -> np.ndarray:
    """The ReLU hidden layer of a fitted one-hidden-layer ``MLPClassifier``.

    Parameters
    ----------
    clf : sklearn.neural_network.MLPClassifier
    X : ndarray of shape (n_samples, n_features)

    Returns
    -------
    A : ndarray of shape (n_samples, n_hidden), float32
    """
    W1, b1 = clf.coefs_[0], clf.intercepts_[0]
    return np.maximum(X @ W1 + b1, 0.0).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", required=True, help="Folder for the .npy shards (created).")
    ap.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--hidden", type=int, default=256, help="Hidden ReLU units.")
    ap.add_argument("--epochs", type=int, default=10, help="Adam passes over the training set.")
    ap.add_argument("--train", type=int, default=8000, help="Training digits (the rest held out).")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from sae.mnist import mnist_images, mnist_labels

    X, y = mnist_images(args.mnist), mnist_labels(args.mnist)
    n = args.train
    clf = MLPClassifier(
        hidden_layer_sizes=(args.hidden,),
        activation="relu",
        solver="adam",
        max_iter=args.epochs,
        random_state=args.seed,
    )
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few epochs, on purpose
        clf.fit(X[:n], y[:n])
    fit_s = time.perf_counter() - t
    accuracy = clf.score(X[n:], y[n:])

    A = hidden_activations(clf, X)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(A, args.shards)):
        np.save(out / f"acts_{i}.npy", part)
    l0 = (A > 0).sum(axis=1)
    dead = int((A.max(axis=0) == 0).sum())

    print(f"digits: {X.shape[0]} (train {n}, held out {X.shape[0] - n}) from {args.mnist}")
    print(
        f"classifier: MLP 784-{args.hidden}(relu)-10, adam, {args.epochs} epochs, seed "
        f"{args.seed}, {fit_s:.1f} s"
    )
    print(
        f"held-out accuracy: {accuracy:.4f} ({round(accuracy * (X.shape[0] - n))}/{X.shape[0] - n})"
    )
    print(
        f"activations: shape {A.shape}, {A.dtype}, {A.nbytes / 2**20:.2f} MB, "
        f"in {args.shards} shards in {out}"
    )
    print(
        f"mean L0: {l0.mean():.1f} of {args.hidden} units non-zero per digit "
        f"(min {l0.min()}, max {l0.max()}; {dead} unit{'s' if dead != 1 else ''} never active)"
    )
    print(f"values: min {A.min():.4g}, mean {A.mean():.4g}, max {A.max():.4g}")


if __name__ == "__main__":
    main()
