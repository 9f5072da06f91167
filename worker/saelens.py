"""Models in SAELens's folder layout: export a one-hidden-layer model, import such a folder.

What SAELens writes and reads (read from the source of ``sae-lens`` 6.54.12, the release on
PyPI of 2026-10, files ``sae_lens/constants.py``, ``sae_lens/saes/sae.py`` (``SAEConfig``,
``SAEMetadata``, ``SAE.save_model``, ``SAE.load_from_disk``, ``SAE.process_sae_in``),
``sae_lens/saes/standard_sae.py``, ``sae_lens/saes/topk_sae.py``, ``sae_lens/__init__.py``
(the architecture registry) and ``sae_lens/loading/pretrained_sae_loaders.py``
(``sae_lens_disk_loader``, ``handle_config_defaulting``, ``handle_pre_6_0_config``,
``read_sae_components_from_disk``); the same names are in decoderesearch/SAELens at commit
0d5cfa69bcb1a38fc44a0510de0af483bc4036e6, version 6.49.2)::

    FOLDER/cfg.json                  the config (JSON)
    FOLDER/sae_weights.safetensors   W_enc (d_in, d_sae), W_dec (d_sae, d_in),
                                     b_enc (d_sae,), b_dec (d_in,)
    FOLDER/sparsity.safetensors      optional: "sparsity", log10 firing frequencies (d_sae,)

``cfg.json`` is ``SAEConfig.to_dict()``: ``d_in``, ``d_sae``, ``dtype`` ("float32", ...),
``device``, ``apply_b_dec_to_input``, ``normalize_activations`` ("none", ...),
``reshape_activations`` ("none" or "hook_z"), ``metadata`` (a free dict: ``model_name``,
``hook_name``, ..., and ``sae_lens_version``), ``architecture``; ``"topk"`` adds ``k`` and
``rescale_acts_by_decoder_norm``. The loader reads a config as the 6.x layout when
``metadata.sae_lens_version`` (or a top-level ``sae_lens_version``) is >= 6.0; otherwise as an
older one (``activation_fn_str``/``activation_fn`` and ``activation_fn_kwargs: {"k": ...}``
for TopK; a missing ``architecture`` means ``"standard"``). It builds the class registered
for ``architecture`` and loads the tensors strictly (no missing or extra names), cast to
``dtype``. SAELens's forward pass, with ``a = 1`` if ``apply_b_dec_to_input`` else 0::

    z     = (x - a b_dec) @ W_enc + b_enc
    f     = ReLU(z)                                    ("standard")
          = ReLU of the k largest z, 0 elsewhere       ("topk"; torch.topk: exactly k)
    x_hat = f @ W_dec + b_dec

and ``"topk"`` with ``rescale_acts_by_decoder_norm`` ranks ``z * ||W_dec[j]||`` and decodes
``f / ||W_dec[j]||``.

Export (:func:`export_saelens`) writes the 6.x layout with ``metadata.sae_lens_version`` set
to :data:`FORMAT_VERSION` (the release whose format this follows; its loader reads the file
as such), ``sae_lens_training_version`` null (SAELens did not train it), and this service's
record of the model under ``metadata.sae_service``. It writes no ``sparsity.safetensors``
(that needs the data). The decoder written is the one the model computes with: a unit-norm
dictionary's ``V / ||V||``.

- ``"relu-l1"`` -> ``"standard"``, ``apply_b_dec_to_input: true`` (the same equations).
- ``"topk"`` -> ``"topk"`` with ``k``, ``rescale_acts_by_decoder_norm: false``.
- ``"sigmoid-kl"``: SAELens 6 has no sigmoid (or tanh) encoder and no non-linear output: its
  "standard" SAE is always ReLU (``activation_fn`` is a key of pre-6 configs that 6.x drops),
  and no config key asks for another activation. So a classic network exports only when it
  computes what a standard SAE computes: sizes ``(n, h, n)`` with activations
  ``("relu", "linear")``, written with ``apply_b_dec_to_input: false`` (x_hat = W2 ReLU(W1 x
  + b1) + b2, exactly). Any other is refused (``ValueError("kind: ...")``) rather than
  written as weights SAELens would run with the wrong units.

Import (:func:`import_saelens`) builds a :class:`~sae.dictionary.Dictionary` that computes
what SAELens computes on the folder (the tensors cast to the config's ``dtype`` first, as
SAELens does, then to float64):

- ``W_enc = W_enc_saelens^T``, ``W_dec = W_dec_saelens^T``, ``b_dec = b_dec``.
- ``apply_b_dec_to_input: false``: a Dictionary always subtracts ``b_dec`` before the
  encoder, so the encoder bias takes it back: ``(x - b_dec) W_enc + b_enc' = x W_enc + b_enc``
  for ``b_enc' = b_enc + b_dec @ W_enc_saelens``; the latents and x_hat are the same (up to
  rounding of the added term).
- ``"topk"``: ``k`` (SAELens's default 100 when absent); ``rescale_acts_by_decoder_norm`` is
  folded as SAELens's own ``_fold_norm_topk`` does: ``W_enc`` and ``b_enc`` times the decoder
  norms, ``W_dec`` rows divided by them (the same latents and x_hat).
- The decoder is used as stored (``unit_norm=False``): SAELens does not renormalise it.
- ``reshape_activations: "hook_z"`` only flattens inputs of shape (..., n_heads, d_head) into
  d_in features; rows of a dataset are flat already, so it changes nothing here.
- Refused, with an error naming the field: architectures a Dictionary does not compute
  (``"jumprelu"``, ``"gated"``, ``"abstopk"``, transcoders, ...; see :data:`NOT_IMPORTED`),
  ``normalize_activations`` other than ``"none"`` (``"constant_norm_rescale"`` and
  ``"layer_norm"`` rescale each example, which a Dictionary does not;
  ``"expected_average_only_in"`` and ``"covariance_whitening"`` expect inputs scaled by
  statistics the folder does not hold: SAELens folds them into the weights at the end of
  training), a ``scaling_factor`` other than ones, missing, extra or misshapen tensors.

TopK ties: SAELens keeps exactly k latents; a Dictionary keeps every latent tied with the
k-th largest. They differ only where two pre-activations are exactly equal at the k-th place.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import numpy as np

from sae.atomic import atomic_write
from sae.dictionary import Dictionary
from sae.network import Network

__all__ = [
    "ARCHITECTURES",
    "CFG",
    "DTYPES",
    "FORMAT_VERSION",
    "SPARSITY",
    "WEIGHTS",
    "export_model",
    "export_saelens",
    "import_saelens",
    "import_to_model",
    "read_saelens",
    "saelens_state",
]

#: File names of a SAELens folder (``sae_lens/constants.py``).
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"

#: The SAELens release whose format is written (``metadata.sae_lens_version``).
FORMAT_VERSION = "6.54.12"

#: Architectures exported and imported: SAELens's names.
ARCHITECTURES = ("standard", "topk")

#: Parameter dtypes of a SAELens config (``DTYPE_MAP``; ``"torch.float32"`` etc. read too).
DTYPES = ("float32", "float64", "float16", "bfloat16")

#: SAELens architectures that are not imported, and why.
NOT_IMPORTED = {
    "jumprelu": "its latents fire only above a learned per-latent threshold",
    "gated": "its gate and magnitude paths (b_gate, r_mag, b_mag) differ",
    "abstopk": "it keeps the k largest latents by magnitude, negative ones too",
    "batchtopk": "it is a training architecture (saved for inference as 'jumprelu')",
    "matryoshka_batchtopk": "it is a training architecture (saved for inference as 'jumprelu')",
    "transcoder": "it maps to another layer's output, not back to its input",
    "skip_transcoder": "it maps to another layer's output, not back to its input",
    "jumprelu_transcoder": "it maps to another layer's output, not back to its input",
    "jumprelu_skip_transcoder": "it maps to another layer's output, not back to its input",
    "temporal": "it attends over earlier tokens",
    "matching_pursuit": "it encodes by iterative matching pursuit",
}

#: Why each ``normalize_activations`` other than "none" is refused.
_NORMALIZE_REFUSED = {
    "constant_norm_rescale": "rescales each example to norm sqrt(d_in), which a Dictionary "
    "does not compute",
    "layer_norm": "layer-normalises each example, which a Dictionary does not compute",
    "expected_average_only_in": "expects inputs scaled by a factor the folder does not hold "
    "(SAELens folds it into the weights with fold_activation_norm_scaling_factor)",
    "covariance_whitening": "expects whitened inputs, by statistics the folder does not hold "
    "(SAELens folds them into the weights with fold_activation_whitening)",
}

_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# ----------------------------------------------------------------------------- export


def saelens_state(net: Network, theta: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The SAELens config entries and tensors (float64) of a one-hidden-layer model.

    Parameters
    ----------
    net : Network
        A :class:`~sae.dictionary.Dictionary` ("relu-l1" or "topk"), or a classic network of
        sizes ``(n, h, n)`` with activations ``("relu", "linear")``.
    theta : ndarray of shape (net.n_params,)

    Returns
    -------
    cfg : dict
        ``architecture``, ``d_in``, ``d_sae``, ``apply_b_dec_to_input`` and, for "topk",
        ``k`` and ``rescale_acts_by_decoder_norm``.
    tensors : dict
        ``W_enc`` of shape (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc`` (d_sae,),
        ``b_dec`` (d_in,).

    Raises
    ------
    ValueError
        ``kind: ...`` or ``sizes: ...`` for a model SAELens cannot represent; ``theta: ...``.
    """
    if len(net.sizes) != 3:
        raise ValueError(
            f"sizes: a SAELens SAE has one hidden layer; this network has sizes {net.sizes}"
        )
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (net.n_params,):
        raise ValueError(f"theta: expected shape ({net.n_params},), got {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta: holds non-finite values (NaN or inf)")
    d_in, d_sae, d_out = net.sizes
    if net.kind == "sigmoid-kl":
        if net.activations != ("relu", "linear") or d_out != d_in:
            raise ValueError(
                "kind: SAELens's architectures encode with ReLU ('standard'), TopK, JumpReLU or "
                "gated units and decode linearly back to the input; this 'sigmoid-kl' network "
                f"has sizes {net.sizes} and activations {net.activations}, which none of them "
                "computes (a classic network exports only with sizes (n, h, n) and activations "
                "('relu', 'linear')); train a 'relu-l1' or 'topk' dictionary to export"
            )
        apply_b_dec = False
    else:
        apply_b_dec = True  # a Dictionary subtracts b_dec before its encoder
    (W1, W2), (b1, b2) = net.unpack(net.effective(theta))
    cfg: dict[str, Any] = {
        "architecture": "topk" if net.kind == "topk" else "standard",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "apply_b_dec_to_input": apply_b_dec,
    }
    if net.kind == "topk":
        cfg["k"] = int(net.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    tensors = {
        "W_enc": np.ascontiguousarray(W1.T),
        "W_dec": np.ascontiguousarray(W2.T),
        "b_enc": np.ascontiguousarray(b1),
        "b_dec": np.ascontiguousarray(b2),
    }
    for name, t in tensors.items():
        if not np.all(np.isfinite(t)):
            raise ValueError(f"{name}: holds non-finite values (a decoder column of norm 0?)")
    return cfg, tensors


def export_saelens(
    net: Network,
    theta: np.ndarray,
    folder: str | os.PathLike,
    *,
    meta: dict | None = None,
    dtype: str = "float32",
    model_name: str | None = None,
    hook_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``net`` as a SAELens folder: ``cfg.json`` and ``sae_weights.safetensors``.

    Parameters
    ----------
    net : Network
        "relu-l1" or "topk" dictionary, or a classic ``("relu", "linear")`` network
        (see the module docstring; others raise ``ValueError("kind: ...")``).
    theta : ndarray of shape (net.n_params,)
    folder : path
        Created if missing; must be empty unless ``overwrite``.
    meta : dict, optional
        The model's metadata (``model.npz``'s spec), recorded under ``metadata.sae_service``.
    dtype : {"float32", "float64", "float16", "bfloat16"}
        The tensors' dtype, and the config's.
    model_name, hook_name : str, optional
        SAELens metadata: the model and hook the activations came from (what
        ``HookedSAETransformer`` attaches the SAE to).
    overwrite : bool
        Replace the files of an existing folder (and remove its stale ``sparsity.safetensors``).

    Returns
    -------
    folder : Path
    """
    dtype = _dtype_name(dtype, "dtype")
    cfg_part, tensors = saelens_state(net, theta)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"folder: {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"folder: {folder} is not empty (overwrite to replace its files)")
    cast = {name: _cast(name, t, dtype) for name, t in tensors.items()}
    cfg = _cfg(cfg_part, dtype, meta, net, model_name=model_name, hook_name=hook_name)

    from safetensors.numpy import save

    data = save(cast)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPARSITY).unlink(missing_ok=True)  # the firing rates of another model
    atomic_write(folder / WEIGHTS, lambda fh: fh.write(data))
    text = json.dumps(cfg, indent=2) + "\n"
    atomic_write(folder / CFG, lambda fh: fh.write(text.encode()), sync_dir=True)
    return folder


def _cfg(
    part: dict[str, Any],
    dtype: str,
    meta: dict | None,
    net: Network,
    *,
    model_name: str | None,
    hook_name: str | None,
) -> dict[str, Any]:
    """``cfg.json`` in the order SAELens's ``SAEConfig.to_dict`` writes it."""
    service: dict[str, Any] = {"version": _version(), "network": net.to_dict()}
    service.update({k: v for k, v in (meta or {}).items() if k != "network"})
    md: dict[str, Any] = {
        "sae_lens_version": FORMAT_VERSION,
        "sae_lens_training_version": None,
    }
    if model_name is not None:
        md["model_name"] = model_name
    if hook_name is not None:
        md["hook_name"] = hook_name
    md["sae_service"] = service
    cfg: dict[str, Any] = {
        "d_in": part["d_in"],
        "d_sae": part["d_sae"],
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": part["apply_b_dec_to_input"],
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": md,
    }
    if part["architecture"] == "topk":
        cfg["k"] = part["k"]
        cfg["rescale_acts_by_decoder_norm"] = part["rescale_acts_by_decoder_norm"]
    cfg["architecture"] = part["architecture"]
    return cfg


def _version() -> str | None:
    try:
        return _metadata.version("sae-service")
    except _metadata.PackageNotFoundError:
        return None


def _dtype_name(dtype: str, field: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{field}: choose one of {list(DTYPES)}, got {dtype!r}")
    return name


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        from worker.dataset import bfloat16

        return bfloat16()
    return np.dtype(name)


def _cast(name: str, t: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16" and t.size and float(np.max(np.abs(t))) > _FLOAT16_MAX:
        raise ValueError(f"dtype: {name} has values beyond float16's range; use float32")
    return np.ascontiguousarray(t.astype(_numpy_dtype(dtype)))


# ----------------------------------------------------------------------------- import


def read_saelens(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config (as in ``cfg.json``) and the tensors (as stored) of a SAELens folder.

    Raises
    ------
    ValueError
        ``folder: ...`` for a missing folder or file, ``cfg.json: ...`` or
        ``sae_weights.safetensors: ...`` for an unreadable one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a folder")
    cfg_path = folder / CFG
    if not cfg_path.is_file():
        raise ValueError(f"folder: {folder} has no {CFG} (not a SAELens folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{CFG}: {cfg_path} is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{CFG}: expected a JSON object, got {type(cfg).__name__}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"folder: {folder} has no {WEIGHTS}")
    from safetensors import safe_open

    from worker.dataset import bfloat16

    bfloat16()  # numpy learns the name "bfloat16" that safetensors asks it for
    try:
        with safe_open(str(weights), framework="numpy") as f:
            tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        why = f"{weights} is not a readable safetensors file ({type(exc).__name__}: {exc})"
        raise ValueError(f"{WEIGHTS}: {why}") from None
    return cfg, tensors


def _defaulted(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as SAELens's ``handle_config_defaulting`` reads it (6.x keys)."""
    md = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or md.get("sae_lens_version")
    if version and _major(version) >= 6:
        return dict(cfg)
    new = {
        {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v
        for k, v in cfg.items()
    }
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    act = new.get("activation_fn") or "relu"
    kwargs = new.get("activation_fn_kwargs") or {}
    if act == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    elif act not in ("relu", "topk"):
        raise ValueError(
            f"activation_fn: {act!r} cannot be imported: SAELens 6 (and a Dictionary) computes "
            "'relu' and 'topk'"
        )
    norm = new.get("normalize_activations")
    if isinstance(norm, bool):
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        new["normalize_activations"] = "none"
    return new


def _major(version: Any) -> int:
    m = re.match(r"\s*(\d+)", str(version))
    return int(m.group(1)) if m else 0


def _size(cfg: dict[str, Any], name: str) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: must be a positive integer in {CFG}, got {v!r}")
    return v


def import_saelens(folder: str | os.PathLike) -> tuple[Dictionary, np.ndarray, dict]:
    """A Dictionary that computes what SAELens computes on the folder (module docstring).

    Parameters
    ----------
    folder : path
        Holding ``cfg.json`` and ``sae_weights.safetensors``.

    Returns
    -------
    net : Dictionary
        "relu-l1" for "standard", "topk" for "topk"; ``unit_norm=False``.
    theta : ndarray of shape (net.n_params,)
    meta : dict
        ``"imported"``: ``{"format": "saelens", "folder", "architecture", "cfg"}``; and the
        spec, dataset, ... this service recorded when it exported the folder.

    Raises
    ------
    ValueError
        Naming the field: ``folder``, ``cfg.json``, ``architecture``, ``normalize_activations``,
        ``d_in``/``d_sae``, ``dtype``, ``k``, ``sae_weights.safetensors``, a tensor's name.
    """
    raw, stored = read_saelens(folder)
    cfg = _defaulted(raw)
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        why = "it is not an architecture of SAELens a Dictionary computes"
        why = NOT_IMPORTED.get(arch, why) if isinstance(arch, str) else why
        raise ValueError(
            f"architecture: {arch!r} cannot be imported ({why}); a Dictionary computes "
            f"{' and '.join(repr(a) for a in ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        why = "is not a normalisation SAELens knows"
        why = _NORMALIZE_REFUSED.get(norm, why) if isinstance(norm, str) else why
        raise ValueError(f"normalize_activations: {norm!r} cannot be imported: it {why}")
    d_in, d_sae = _size(cfg, "d_in"), _size(cfg, "d_sae")
    dtype = _dtype_name(cfg.get("dtype", "float32"), "dtype")
    t = _tensors(stored, d_in, d_sae, dtype)
    W_enc, W_dec, b_enc, b_dec = (t[n] for n in _TENSORS)  # SAELens's shapes
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"apply_b_dec_to_input: must be true or false, got {apply_b_dec!r}")
    if not apply_b_dec:  # (x - b_dec) W_enc + b_enc' == x W_enc + b_enc
        b_enc = b_enc + b_dec @ W_enc
    enc, dec = W_enc.T.copy(), W_dec.T.copy()  # ours: (d_sae, d_in), (d_in, d_sae)
    options: dict[str, Any] = {"unit_norm": False}
    if arch == "topk":
        k = cfg.get("k", 100)  # TopKSAEConfig's default
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        options["k"] = k
        rescale = cfg.get("rescale_acts_by_decoder_norm", False)
        if not isinstance(rescale, bool):
            raise ValueError(
                f"rescale_acts_by_decoder_norm: must be true or false, got {rescale!r}"
            )
        if rescale:  # SAELens's _fold_norm_topk: the same latents and x_hat
            norms = np.sqrt(np.einsum("ij,ij->i", W_dec, W_dec))
            if not np.all(norms > 0):
                raise ValueError(
                    "W_dec: a row has norm 0, and rescale_acts_by_decoder_norm divides by it"
                )
            enc *= norms[:, None]
            b_enc = b_enc * norms
            dec /= norms[None, :]
    kind = "topk" if arch == "topk" else "relu-l1"
    net = Dictionary.of(kind, d_in, d_sae, **options)
    theta = net.pack([enc, dec], [b_enc, b_dec])
    if not np.all(np.isfinite(theta)):
        raise ValueError(f"{WEIGHTS}: the folded parameters are not finite")
    meta = _recorded(raw)
    meta["imported"] = {
        "format": "saelens",
        "folder": str(Path(folder)),
        "architecture": arch,
        "cfg": raw,
    }
    return net, theta, meta


def _tensors(
    stored: dict[str, np.ndarray], d_in: int, d_sae: int, dtype: str
) -> dict[str, np.ndarray]:
    """The four tensors, checked, cast to the config's dtype (as SAELens) and then float64."""
    stored = dict(stored)
    scale = stored.pop("scaling_factor", None)  # SAELens drops an all-ones one
    if scale is not None and not np.all(np.asarray(scale, dtype=np.float64) == 1):
        raise ValueError(
            "scaling_factor: a fine-tuning scaling factor other than ones cannot be imported "
            "(SAELens 6 has no such parameter either)"
        )
    missing = [n for n in _TENSORS if n not in stored]
    if missing:
        raise ValueError(f"{WEIGHTS}: missing tensor(s) {missing} (expected {list(_TENSORS)})")
    extra = sorted(set(stored) - set(_TENSORS))
    if extra:
        raise ValueError(
            f"{WEIGHTS}: unexpected tensor(s) {extra} (a 'standard' or 'topk' SAE holds "
            f"{list(_TENSORS)})"
        )
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    words = {"W_enc": "(d_in, d_sae)", "W_dec": "(d_sae, d_in)", "b_enc": "(d_sae,)"}
    out = {}
    for name in _TENSORS:
        a = stored[name]
        if a.shape != shapes[name]:
            raise ValueError(
                f"{name}: expected shape {words.get(name, '(d_in,)')} = {shapes[name]} for "
                f"d_in={d_in}, d_sae={d_sae}, got {a.shape}"
            )
        if not np.issubdtype(a.dtype, np.floating) and a.dtype != _numpy_dtype("bfloat16"):
            raise ValueError(f"{name}: expected floats, got {a.dtype}")
        a = a.astype(_numpy_dtype(dtype)).astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: holds non-finite values (NaN or inf)")
        out[name] = a
    return out


def _recorded(cfg: dict[str, Any]) -> dict[str, Any]:
    """What this service recorded in ``metadata.sae_service`` when it exported (or ``{}``)."""
    md = cfg.get("metadata")
    service = md.get("sae_service") if isinstance(md, dict) else None
    if not isinstance(service, dict):
        return {}
    return {k: v for k, v in service.items() if k not in ("network", "version")}


# ----------------------------------------------------------------------------- model.npz


def export_model(model_path: str | os.PathLike, folder: str | os.PathLike, **options) -> Path:
    """Export a ``model.npz`` (as written by ``sae train``) to a SAELens folder.

    ``options``: those of :func:`export_saelens` (``dtype``, ``model_name``, ``hook_name``,
    ``overwrite``).
    """
    from worker.layout import load_model

    net, theta, meta = load_model(Path(model_path))
    return export_saelens(net, theta, folder, meta=meta, **options)


def import_to_model(folder: str | os.PathLike, model_path: str | os.PathLike) -> Path:
    """Import a SAELens folder and write it as a ``model.npz`` that ``sae encode`` and
    ``sae reconstruct`` read."""
    from worker.layout import save_model

    net, theta, meta = import_saelens(folder)
    path = Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(path, net, theta, meta)
