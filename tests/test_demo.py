"""`sae demo` end to end on an embedded LocalCluster (few patches, few iterations)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from service.cli import main
from worker.layout import load_model


def test_demo_writes_filters_model_and_history(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-patches", "500", "--max-iter", "15", "--workers", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    run = out / "run"
    for name in ("filters.png", "model.npz", "history.json"):
        assert str(run / name) in result.output
    history = json.loads((run / "history.json").read_text())
    assert [e["iteration"] for e in history] == list(range(16))
    assert history[-1]["cost"] < history[0]["cost"]
    net, theta, spec = load_model(run / "model.npz")
    assert net.sizes == (64, 25, 64)
    assert (net.lam, net.rho[0], net.beta[0]) == (1e-4, 0.01, 3.0)
    assert np.isfinite(theta).all()
    with Image.open(run / "filters.png") as im:
        # 5 x 5 tiles of 8 x 8 with 1-pixel borders, scaled up 4x
        assert im.size == (46 * 4, 46 * 4)
