"""Sparse autoencoders after Andrew Ng's CS294A notes: pure numpy/scipy math.

Nothing here imports dask, zarr or fastapi; every function works on one numpy array, and the
distributed engine calls the same functions on each chunk.
"""

from sae.activations import ACTIVATIONS, get_activation
from sae.network import Network
from sae.objective import (
    add_sums,
    cost,
    finalize,
    forward,
    fused,
    merge_sums,
    pass1,
    pass2,
    rho_hat,
    sparse_autoencoder_cost,
)

__all__ = [
    "ACTIVATIONS",
    "Network",
    "add_sums",
    "cost",
    "finalize",
    "forward",
    "fused",
    "get_activation",
    "merge_sums",
    "pass1",
    "pass2",
    "rho_hat",
    "sparse_autoencoder_cost",
]
