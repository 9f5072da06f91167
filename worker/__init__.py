"""The distributed engine: Zarr datasets, per-chunk tasks, tree aggregation, cluster."""
