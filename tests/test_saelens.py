"""SAELens folders: export -> import round trips; the written tensors and config against
SAELens's conventions; folders written as SAELens writes them, imported and compared with
SAELens's forward pass written here in numpy; the CLI; errors; and, where ``sae_lens`` is
installed, SAELens's own loader on our exports (and our importer on SAELens's own saves)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sae import objective as obj
from sae.dictionary import Dictionary
from sae.network import Network
from service.cli import main
from worker.layout import load_model, save_model
from worker.saelens import (
    CFG,
    SPARSITY,
    WEIGHTS,
    export_model,
    export_saelens,
    import_saelens,
    import_to_model,
)

D_IN, D_SAE, K = 6, 9, 3

#: The keys of SAELens 6's ``StandardSAEConfig.to_dict()``, and TopK's extra ones.
STANDARD_KEYS = {
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
    "architecture",
}
TOPK_KEYS = STANDARD_KEYS | {"k", "rescale_acts_by_decoder_norm"}


def _X(m: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.2, 1.0, (m, D_IN))


def _model(kind: str, unit_norm: bool, seed: int = 1) -> tuple[Dictionary, np.ndarray]:
    """A trained-looking dictionary: decoder columns of norms other than 1 (V), b_dec != 0."""
    options = {"k": K} if kind == "topk" else {"l1": 0.1}
    net = Dictionary.of(kind, D_IN, D_SAE, unit_norm=unit_norm, **options)
    rng = np.random.default_rng(seed)
    W_enc = rng.normal(0, 0.6, (D_SAE, D_IN))
    V = rng.normal(0, 0.6, (D_IN, D_SAE)) * rng.uniform(0.5, 2.0, D_SAE)
    return net, net.pack([W_enc, V], [rng.normal(0, 0.2, D_SAE), rng.normal(0, 0.3, D_IN)])


MODELS = [(kind, unit) for kind in ("relu-l1", "topk") for unit in (True, False)]
IDS = [f"{k}-{'unit' if u else 'free'}" for k, u in MODELS]


def _forward(net, theta, X) -> tuple[np.ndarray, np.ndarray]:
    _, f, x_hat = obj.forward(net, theta, X)
    return f, x_hat


def _saelens_forward(cfg: dict, t: dict, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's ``encode`` and ``decode`` (standard_sae.py, topk_sae.py, SAE.process_sae_in),
    one example at a time, from the stored tensors cast to the config's dtype."""
    dt = np.dtype(cfg.get("dtype", "float32"))
    W_enc, W_dec, b_enc, b_dec = (
        np.asarray(t[n]).astype(dt).astype(np.float64) for n in ("W_enc", "W_dec", "b_enc", "b_dec")
    )
    a = 1.0 if cfg.get("apply_b_dec_to_input", True) else 0.0
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    norms = np.linalg.norm(W_dec, axis=1)
    F, R = [], []
    for x in X:
        hidden_pre = (x - a * b_dec) @ W_enc + b_enc
        if cfg["architecture"] == "topk":
            if rescale:
                hidden_pre = hidden_pre * norms
            f = np.zeros(len(hidden_pre))
            for j in sorted(range(len(hidden_pre)), key=lambda j: -hidden_pre[j])[: cfg["k"]]:
                f[j] = max(hidden_pre[j], 0.0)
        else:
            f = np.maximum(hidden_pre, 0.0)
        acts = f / norms if rescale else f
        F.append(f)
        R.append(acts @ W_dec + b_dec)
    return np.array(F), np.array(R)


def _read(folder: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    return json.loads((folder / CFG).read_text()), load_file(str(folder / WEIGHTS))


def _write(folder: Path, cfg: dict, tensors: dict) -> Path:
    """A folder as SAELens's ``SAE.save_model`` writes one."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CFG).write_text(json.dumps(cfg))
    return folder


def _saelens_cfg(arch: str = "standard", **changes) -> dict:
    """``cfg.json`` as SAELens 6.54 writes it (``SAEConfig.to_dict()``)."""
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.0.hook_resid_pre",
        },
    }
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = arch
    cfg.update(changes)
    return cfg


def _saelens_tensors(seed: int = 5, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(0, 0.5, (D_IN, D_SAE)).astype(dtype),
        "W_dec": (rng.normal(0, 0.5, (D_SAE, D_IN)) * rng.uniform(0.3, 3, (D_SAE, 1))).astype(
            dtype
        ),
        "b_enc": rng.normal(0, 0.2, D_SAE).astype(dtype),
        "b_dec": rng.normal(0, 0.4, D_IN).astype(dtype),
    }


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(("kind", "unit_norm"), MODELS, ids=IDS)
def test_round_trip_float64_is_exact(tmp_path, kind, unit_norm):
    net, theta = _model(kind, unit_norm)
    X = _X()
    export_saelens(net, theta, tmp_path / "sae", dtype="float64")
    net2, theta2, _ = import_saelens(tmp_path / "sae")
    assert (net2.kind, net2.sizes, net2.k, net2.unit_norm) == (kind, net.sizes, net.k, False)
    f, x_hat = _forward(net, theta, X)
    f2, x_hat2 = _forward(net2, theta2, X)
    assert (f > 0).any() and (f == 0).any()
    np.testing.assert_array_equal(f2, f)
    np.testing.assert_array_equal(x_hat2, x_hat)


@pytest.mark.parametrize(("kind", "unit_norm"), MODELS, ids=IDS)
def test_round_trip_float32_within_rounding(tmp_path, kind, unit_norm):
    net, theta = _model(kind, unit_norm)
    X = _X()
    export_saelens(net, theta, tmp_path / "sae")  # float32 by default
    _, tensors = _read(tmp_path / "sae")
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    net2, theta2, _ = import_saelens(tmp_path / "sae")
    f, x_hat = _forward(net, theta, X)
    f2, x_hat2 = _forward(net2, theta2, X)
    np.testing.assert_array_equal(f2 > 0, f > 0)  # the same latents fire
    np.testing.assert_allclose(f2, f, rtol=0, atol=1e-5 * np.abs(f).max())
    np.testing.assert_allclose(x_hat2, x_hat, rtol=0, atol=1e-5 * np.abs(x_hat).max())


# ------------------------------------------------------------------ SAELens's conventions


@pytest.mark.parametrize(("kind", "unit_norm"), MODELS, ids=IDS)
def test_export_follows_saelens_conventions(tmp_path, kind, unit_norm):
    net, theta = _model(kind, unit_norm)
    folder = export_saelens(net, theta, tmp_path / "sae", dtype="float64", meta={"note": "x"})
    assert sorted(p.name for p in folder.iterdir()) == [CFG, WEIGHTS]
    assert (CFG, WEIGHTS) == ("cfg.json", "sae_weights.safetensors")
    cfg, t = _read(folder)
    arch = "topk" if kind == "topk" else "standard"
    assert set(cfg) == (TOPK_KEYS if arch == "topk" else STANDARD_KEYS)
    assert cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (
        D_IN,
        D_SAE,
        "float64",
        "cpu",
    )
    assert cfg["apply_b_dec_to_input"] is True
    assert (cfg["normalize_activations"], cfg["reshape_activations"]) == ("none", "none")
    if arch == "topk":
        assert (cfg["k"], cfg["rescale_acts_by_decoder_norm"]) == (K, False)
    md = cfg["metadata"]
    assert int(md["sae_lens_version"].split(".")[0]) >= 6  # read as the 6.x layout
    assert md["sae_service"]["network"] == net.to_dict() and md["sae_service"]["note"] == "x"
    assert sorted(t) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert t["W_enc"].shape == (D_IN, D_SAE) and t["W_dec"].shape == (D_SAE, D_IN)
    assert t["b_enc"].shape == (D_SAE,) and t["b_dec"].shape == (D_IN,)
    (W1, V), (b1, b2) = net.unpack(theta)
    np.testing.assert_array_equal(t["W_enc"], W1.T)
    np.testing.assert_array_equal(t["b_enc"], b1)
    np.testing.assert_array_equal(t["b_dec"], b2)
    W_dec = V / np.linalg.norm(V, axis=0) if unit_norm else V
    np.testing.assert_allclose(t["W_dec"], W_dec.T, rtol=1e-15, atol=0)
    if unit_norm:  # the effective decoder: rows of unit norm in SAELens's layout
        np.testing.assert_allclose(np.linalg.norm(t["W_dec"], axis=1), 1.0, rtol=1e-14)
    X = _X()
    f, x_hat = _forward(net, theta, X)
    f_sl, x_sl = _saelens_forward(cfg, t, X)
    np.testing.assert_allclose(f_sl, f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_sl, x_hat, rtol=1e-12, atol=1e-12)


def test_classic_relu_linear_network_exports_without_pre_encoder_bias(tmp_path):
    net = Network(sizes=(D_IN, D_SAE, D_IN), activations=("relu", "linear"))
    theta = net.init_theta(3) + np.random.default_rng(3).normal(0, 0.2, net.n_params)
    export_saelens(net, theta, tmp_path / "sae", dtype="float64")
    cfg, t = _read(tmp_path / "sae")
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is False
    X = _X()
    A = obj.forward(net, theta, X)
    f_sl, x_sl = _saelens_forward(cfg, t, X)
    np.testing.assert_allclose(f_sl, A[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_sl, A[2], rtol=1e-12, atol=1e-12)
    net2, theta2, _ = import_saelens(tmp_path / "sae")  # b_dec folded into b_enc
    f2, x2 = _forward(net2, theta2, X)
    np.testing.assert_allclose(f2, A[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x2, A[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "net",
    [
        Network(sizes=(D_IN, 4, D_IN), activations=("sigmoid", "sigmoid")),
        Network(sizes=(D_IN, 4, D_IN), activations=("relu", "sigmoid")),
        Network(sizes=(D_IN, 4, 5), activations=("relu", "linear")),
    ],
    ids=["sigmoid", "sigmoid-output", "other-output-size"],
)
def test_export_refuses_what_saelens_cannot_compute(tmp_path, net):
    with pytest.raises(ValueError, match=r"^kind: SAELens's architectures encode with ReLU"):
        export_saelens(net, net.init_theta(0), tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_export_refuses_deep_networks_and_bad_theta(tmp_path):
    deep = Network(sizes=(D_IN, 4, 3, 4, D_IN), activations=("sigmoid",) * 4)
    with pytest.raises(ValueError, match=r"^sizes: a SAELens SAE has one hidden layer"):
        export_saelens(deep, deep.init_theta(0), tmp_path / "a")
    net, theta = _model("topk", True)
    with pytest.raises(ValueError, match=r"^theta: expected shape"):
        export_saelens(net, theta[:-1], tmp_path / "b")
    with pytest.raises(ValueError, match=r"^dtype: choose one of"):
        export_saelens(net, theta, tmp_path / "c", dtype="int8")
    bad = theta.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match=r"^theta: holds non-finite"):
        export_saelens(net, bad, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    net, theta = _model("relu-l1", True)
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / SPARSITY).write_bytes(b"stale")
    with pytest.raises(ValueError, match=r"^folder: .* is not empty"):
        export_saelens(net, theta, folder)
    export_saelens(net, theta, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [CFG, WEIGHTS]  # stale sparsity gone


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports_read_back(tmp_path, dtype):
    net, theta = _model("topk", True)
    export_saelens(net, theta, tmp_path / "sae", dtype=dtype)
    assert json.loads((tmp_path / "sae" / CFG).read_text())["dtype"] == dtype
    net2, theta2, _ = import_saelens(tmp_path / "sae")
    X = _X()
    _, x_hat = _forward(net, theta, X)
    _, x_hat2 = _forward(net2, theta2, X)
    assert np.abs(x_hat2 - x_hat).max() < 0.05 * np.abs(x_hat).max()


# ------------------------------------------------------------------ folders SAELens wrote


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize(
    ("arch", "rescale"), [("standard", False), ("topk", False), ("topk", True)]
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_import_computes_saelens_forward(tmp_path, apply_b_dec, arch, rescale, dtype):
    changes = {"apply_b_dec_to_input": apply_b_dec, "dtype": dtype}
    if arch == "topk":
        changes["rescale_acts_by_decoder_norm"] = rescale
    cfg = _saelens_cfg(arch, **changes)
    t = _saelens_tensors(dtype=np.float32)  # stored float32, computed in cfg's dtype
    folder = _write(tmp_path / "sae", cfg, t)
    net, theta, meta = import_saelens(folder)
    assert net.kind == ("topk" if arch == "topk" else "relu-l1") and net.sizes == (
        D_IN,
        D_SAE,
        D_IN,
    )
    assert meta["imported"]["architecture"] == arch and meta["imported"]["cfg"] == cfg
    X = _X(64, seed=4)
    f, x_hat = _forward(net, theta, X)
    f_sl, x_sl = _saelens_forward(cfg, t, X)
    assert (f_sl > 0).any() and (f_sl == 0).any()
    np.testing.assert_array_equal(f > 0, f_sl > 0)
    np.testing.assert_allclose(f, f_sl, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_hat, x_sl, rtol=1e-12, atol=1e-12)


def test_import_reads_pre_6_configs(tmp_path):
    """SAELens < 6: ``activation_fn_str: "topk"`` with ``activation_fn_kwargs: {"k": ...}``,
    ``normalize_activations: false``, no ``architecture``, hook_point (handle_pre_6_0_config)."""
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cpu",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": False,
        "normalize_activations": False,
        "hook_point": "blocks.0.hook_resid_pre",
        "sae_lens_training_version": "3.5.0",
    }
    t = _saelens_tensors(seed=8)
    net, theta, _ = import_saelens(_write(tmp_path / "sae", cfg, t))
    assert (net.kind, net.k) == ("topk", K)
    X = _X(30, seed=9)
    f_sl, x_sl = _saelens_forward({**cfg, "dtype": "float32", "architecture": "topk", "k": K}, t, X)
    f, x_hat = _forward(net, theta, X)
    np.testing.assert_allclose(f, f_sl, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_hat, x_sl, rtol=1e-12, atol=1e-12)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("activation_fn")}  # standard
    net, _, _ = import_saelens(_write(tmp_path / "std", cfg, t))
    assert net.kind == "relu-l1"


def test_import_ignores_an_all_ones_scaling_factor(tmp_path):
    t = {**_saelens_tensors(), "scaling_factor": np.ones(D_SAE, dtype=np.float32)}
    net, _, _ = import_saelens(_write(tmp_path / "sae", _saelens_cfg(), t))
    assert net.kind == "relu-l1"


def _case(tmp_path: Path, name: str) -> Path:
    """A broken SAELens folder."""
    cfg, t = _saelens_cfg("standard"), _saelens_tensors()
    folder = tmp_path / name
    if name == "jumprelu":
        return _write(folder, {**cfg, "architecture": "jumprelu"}, {**t, "threshold": t["b_enc"]})
    if name == "gated":
        return _write(folder, {**cfg, "architecture": "gated"}, t)
    if name == "unknown":
        return _write(folder, {**cfg, "architecture": "mystery"}, t)
    if name == "layer_norm":
        return _write(folder, {**cfg, "normalize_activations": "layer_norm"}, t)
    if name == "scaling":
        return _write(folder, {**cfg, "normalize_activations": "expected_average_only_in"}, t)
    if name == "shape":
        return _write(folder, cfg, {**t, "W_enc": t["W_enc"].T})
    if name == "missing":
        return _write(folder, cfg, {k: v for k, v in t.items() if k != "b_enc"})
    if name == "extra":
        return _write(folder, cfg, {**t, "threshold": t["b_enc"]})
    if name == "no-cfg":
        _write(folder, cfg, t)
        (folder / CFG).unlink()
        return folder
    if name == "no-weights":
        _write(folder, cfg, t)
        (folder / WEIGHTS).unlink()
        return folder
    if name == "bad-json":
        _write(folder, cfg, t)
        (folder / CFG).write_text("{not json")
        return folder
    if name == "bad-weights":
        _write(folder, cfg, t)
        (folder / WEIGHTS).write_bytes(b"junk")
        return folder
    if name == "k":
        return _write(folder, _saelens_cfg("topk", k=D_SAE + 1), t)
    if name == "d_in":
        return _write(folder, {**cfg, "d_in": "six"}, t)
    if name == "dtype":
        return _write(folder, {**cfg, "dtype": "int8"}, t)
    if name == "activation_fn":
        old = {k: v for k, v in cfg.items() if k not in ("metadata", "architecture")}
        return _write(folder, {**old, "activation_fn_str": "tanh-relu"}, t)
    if name == "scaling_factor":
        return _write(folder, cfg, {**t, "scaling_factor": np.full(D_SAE, 2.0, np.float32)})
    if name == "nan":
        return _write(folder, cfg, {**t, "b_dec": np.full(D_IN, np.nan, np.float32)})
    raise AssertionError(name)


ERRORS = {
    "jumprelu": "architecture: 'jumprelu' cannot be imported (its latents fire only above",
    "gated": "architecture: 'gated' cannot be imported",
    "unknown": "architecture: 'mystery' cannot be imported",
    "layer_norm": "normalize_activations: 'layer_norm' cannot be imported",
    "scaling": "normalize_activations: 'expected_average_only_in' cannot be imported",
    "shape": "W_enc: expected shape (d_in, d_sae) = (6, 9) for d_in=6, d_sae=9, got (9, 6)",
    "missing": "sae_weights.safetensors: missing tensor(s) ['b_enc']",
    "extra": "sae_weights.safetensors: unexpected tensor(s) ['threshold']",
    "no-cfg": "folder: ",
    "no-weights": "folder: ",
    "bad-json": "cfg.json: ",
    "bad-weights": "sae_weights.safetensors: ",
    "k": "k: must be an integer from 1 to the hidden size 9",
    "d_in": "d_in: must be a positive integer",
    "dtype": "dtype: choose one of",
    "activation_fn": "activation_fn: 'tanh-relu' cannot be imported",
    "scaling_factor": "scaling_factor: ",
    "nan": "b_dec: holds non-finite values",
}


@pytest.mark.parametrize("name", ERRORS)
def test_import_errors_name_the_field(tmp_path, name):
    folder = _case(tmp_path, name)
    with pytest.raises(ValueError) as info:
        import_saelens(folder)
    assert str(info.value).startswith(ERRORS[name]), str(info.value)
    if name == "no-cfg":
        assert "has no cfg.json" in str(info.value)


def test_import_of_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=r"^folder: .* is not a folder"):
        import_saelens(tmp_path / "nowhere")


# ------------------------------------------------------------------ model.npz


def test_model_npz_round_trip_keeps_the_record(tmp_path):
    net, theta = _model("topk", True)
    save_model(tmp_path / "model.npz", net, theta, {"spec": {"hidden": D_SAE}, "note": "n"})
    export_model(tmp_path / "model.npz", tmp_path / "sae", dtype="float64")
    out = import_to_model(tmp_path / "sae", tmp_path / "back" / "model.npz")
    net2, theta2, meta = load_model(out)
    assert meta["spec"] == {"hidden": D_SAE} and meta["note"] == "n"
    assert meta["imported"]["format"] == "saelens" and meta["network"] == net2.to_dict()
    X = _X()
    np.testing.assert_array_equal(_forward(net2, theta2, X)[1], _forward(net, theta, X)[1])


# ------------------------------------------------------------------ CLI


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_import_then_encode_and_reconstruct(tmp_path):
    net, theta = _model("relu-l1", True)
    job = tmp_path / "job"
    job.mkdir()
    save_model(job / "model.npz", net, theta, {"note": "cli"})
    X = _X(25)
    np.save(tmp_path / "X.npy", X)
    r = _run(
        "export",
        job,
        tmp_path / "sae",
        "--format",
        "saelens",
        "--dtype",
        "float64",
        "--hook-name",
        "blocks.3.hook_resid_post",
        "--model-name",
        "gpt2",
    )
    assert r.exit_code == 0, r.output
    assert "SAELens 'standard' SAE, d_in=6, d_sae=9 (float64)" in r.output
    cfg, _ = _read(tmp_path / "sae")
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "gpt2"
    r = _run("import", tmp_path / "sae", tmp_path / "back.npz")
    assert r.exit_code == 0, r.output
    assert "a 'relu-l1' dictionary from SAELens 'standard'" in r.output
    r = _run(
        "encode",
        tmp_path / "back.npz",
        tmp_path / "X.npy",
        tmp_path / "c.npy",
        "-q",
        "--dtype",
        "float64",
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), _forward(net, theta, X)[0])
    r = _run(
        "reconstruct",
        tmp_path / "back.npz",
        tmp_path / "X.npy",
        tmp_path / "r.npy",
        "-q",
        "--dtype",
        "float64",
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), _forward(net, theta, X)[1], rtol=1e-12)


def test_cli_export_refuses_a_non_empty_folder_then_overwrites(tmp_path):
    net, theta = _model("topk", False)
    save_model(tmp_path / "model.npz", net, theta)
    assert _run("export", tmp_path / "model.npz", tmp_path / "sae").exit_code == 0
    r = _run("export", tmp_path / "model.npz", tmp_path / "sae")
    assert r.exit_code == 1 and r.output.startswith("Error: folder: ")
    r = _run("export", tmp_path / "model.npz", tmp_path / "sae", "--overwrite")
    assert r.exit_code == 0 and "SAELens 'topk' SAE" in r.output


def _cli_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    sig = Network(sizes=(D_IN, 4, D_IN), activations=("sigmoid", "sigmoid"))
    save_model(tmp_path / "sigmoid.npz", sig, sig.init_theta(0))
    return {
        "missing model": (["export", tmp_path / "none.npz", tmp_path / "o1"], "Error: MODEL: "),
        "sigmoid model": (["export", tmp_path / "sigmoid.npz", tmp_path / "o2"], "Error: kind: "),
        "missing cfg.json": (
            ["import", _case(tmp_path, "no-cfg"), tmp_path / "m1.npz"],
            "Error: folder: ",
        ),
        "missing folder": (
            ["import", tmp_path / "nowhere", tmp_path / "m2.npz"],
            "Error: folder: ",
        ),
        "architecture": (
            ["import", _case(tmp_path, "jumprelu"), tmp_path / "m3.npz"],
            "Error: architecture: 'jumprelu'",
        ),
        "shape": (
            ["import", _case(tmp_path, "shape"), tmp_path / "m4.npz"],
            "Error: W_enc: expected shape (d_in, d_sae)",
        ),
        "not npz": (
            ["import", _case(tmp_path, "gated"), tmp_path / "m5.bin"],
            "Error: MODEL_NPZ: give a file name ending in .npz",
        ),
    }


def test_cli_errors_are_one_line_exit_1(tmp_path):
    for name, (args, start) in _cli_cases(tmp_path).items():
        r = _run(*args)
        out = r.output.strip()
        assert r.exit_code == 1, (name, r.output)
        assert out.startswith(start) and "\n" not in out, (name, out)
        assert "Traceback" not in r.output
    assert not any(tmp_path.glob("o*")) and not any(tmp_path.glob("m*.npz"))


# ------------------------------------------------------------------ SAELens itself


def _sae_lens():
    """SAELens itself: skipped where it is not installed, except where ``.ci/run`` installed it
    for these tests (``SAE_REQUIRE_SAELENS=1``: then its absence is a failure)."""
    if os.environ.get("SAE_REQUIRE_SAELENS") == "1":
        import sae_lens

        return sae_lens
    return pytest.importorskip(
        "sae_lens", reason="sae_lens is not installed (pip install sae-lens, after torch)"
    )


@pytest.mark.parametrize(("kind", "unit_norm"), MODELS, ids=IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saelens_loads_our_export(tmp_path, kind, unit_norm, dtype):
    sae_lens = _sae_lens()
    import torch

    net, theta = _model(kind, unit_norm)
    export_saelens(net, theta, tmp_path / "sae", dtype=dtype)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    arch = "topk" if kind == "topk" else "standard"
    assert sae.cfg.architecture() == arch and (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    X = _X(64, seed=11)
    with torch.no_grad():
        f_sl = sae.encode(torch.from_numpy(X).to(getattr(torch, dtype)))
        x_sl = sae.decode(f_sl)
    f, x_hat = _forward(net, theta, X)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(f_sl.double().numpy(), f, rtol=0, atol=tol * np.abs(f).max())
    np.testing.assert_allclose(x_sl.double().numpy(), x_hat, rtol=0, atol=tol * np.abs(x_hat).max())


@pytest.mark.parametrize(
    ("arch", "apply_b_dec", "rescale"),
    [("standard", True, False), ("standard", False, False), ("topk", False, True)],
)
def test_we_import_what_saelens_saves(tmp_path, arch, apply_b_dec, rescale):
    sae_lens = _sae_lens()
    import torch

    options = {"rescale_acts_by_decoder_norm": rescale, "k": K} if arch == "topk" else {}
    Config = sae_lens.TopKSAEConfig if arch == "topk" else sae_lens.StandardSAEConfig
    Cls = sae_lens.TopKSAE if arch == "topk" else sae_lens.StandardSAE
    cfg = Config(
        d_in=D_IN, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=apply_b_dec, **options
    )
    sae = Cls(cfg)
    t = _saelens_tensors(seed=13, dtype=np.float64)
    with torch.no_grad():
        for name, value in t.items():
            getattr(sae, name).copy_(torch.from_numpy(value))
    sae.save_model(str(tmp_path / "sae"))
    net, theta, _ = import_saelens(tmp_path / "sae")
    X = _X(64, seed=12)
    with torch.no_grad():
        f_sl = sae.encode(torch.from_numpy(X))
        x_sl = sae.decode(f_sl)
    f, x_hat = _forward(net, theta, X)
    np.testing.assert_allclose(f, f_sl.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_hat, x_sl.numpy(), rtol=1e-12, atol=1e-12)
