"""Golden outputs of seeded training runs, to prove a refactor keeps behaviour bit for bit.

Runs a fixed set of seeded jobs through the public entry points (``worker.train.train`` on
each execution path, deep jobs with every pretraining target, cancelled-and-resumed jobs, the
``sae train`` CLI and a job of the real service under uvicorn) and records, for every file of
every job folder, a digest of what is deterministic in it: each array of a ``.npz`` (bytes,
shape, dtype), each JSON document without its wall-clock fields (``seconds``, ``started``,
``dashboard``), each picture's bytes, and the names of marker files. Also the result of
``train`` and the final job record of the service.

Usage::

    python benchmarks/golden_outputs.py record before.json
    python benchmarks/golden_outputs.py record after.json
    python benchmarks/golden_outputs.py compare before.json after.json

Bits are those of one BLAS kernel (README, "Same bits"): record and compare on one machine
under one ``OPENBLAS_CORETYPE``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Keys whose values are wall-clock readings or addresses, not results.
VOLATILE = {
    "seconds",
    "started",
    "dashboard",
    "dashboard_url",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "eta_seconds",
    "out_dir",
    "model_path",
    "history_path",
    "state_path",
    "job_path",
    "filters_path",
    "cost_path",
    "path",
    "created",
}


#: Cancelled through a task's polled history: the iteration it stops at depends on timing.
TIMED_CANCEL = ("cancel-resume-local",)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def describe_file(path: Path) -> Any:
    """What is deterministic in one file of a job folder."""
    name = path.name
    if name.startswith(".") or name == "owner":
        return "exists"
    if name.endswith(".npz"):
        out = {}
        with np.load(path, allow_pickle=False) as npz:
            for key in sorted(npz.files):
                a = npz[key]
                if key == "spec" or (a.dtype.kind == "U" and a.ndim == 0):
                    try:
                        out[key] = _strip(json.loads(str(a[()])))
                        continue
                    except json.JSONDecodeError:
                        pass
                out[key] = f"{a.dtype}{list(a.shape)}:{_digest(np.ascontiguousarray(a).tobytes())}"
        return out
    if name.endswith(".json"):
        return _strip(json.loads(path.read_text()))
    return _digest(path.read_bytes())


def describe_dir(root: Path) -> dict[str, Any]:
    """Every file under ``root`` (relative path -> :func:`describe_file`)."""
    return {
        str(p.relative_to(root)): describe_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- scenarios


def _datasets(root: Path) -> dict[str, str]:
    from worker.dataset import write_dataset

    rng = np.random.default_rng(7)
    X = rng.random((600, 64)) ** 2  # in [0, 1], 8x8 pictures
    Xs = rng.standard_normal((400, 36))  # unbounded values for linear outputs
    paths = {}
    for name, data, shape in (("unit", X, (8, 8)), ("signed", Xs, (6, 6))):
        p = root / name
        write_dataset(
            p,
            data,
            data.shape[0],
            data.shape[1],
            dtype="float64",
            chunk_rows=100,
            sample_shape=shape,
            source="golden",
        )
        paths[name] = str(p)
    return paths


def _stop_after(iteration: int, stage: str | None = None):
    """should_stop / on_iteration pair that cancels once ``iteration`` of ``stage`` is seen."""
    flag = threading.Event()

    def on_iteration(entry: dict) -> None:
        if entry.get("stage") == stage and entry["iteration"] >= iteration:
            flag.set()

    return flag.is_set, on_iteration


def worker_scenarios(root: Path, client) -> dict[str, Any]:
    import inspect

    from worker.spec import TrainSpec
    from worker.train import train as _train

    def train(*args, plan=None, **kwargs):
        """``train`` with where to run named as the version at hand names it."""
        if plan is not None:
            name = "execution" if "execution" in inspect.signature(_train).parameters else "plan"
            kwargs[name] = plan
        return _train(*args, **kwargs)

    data = _datasets(root / "data")
    one = dict(dataset=data["unit"], hidden=20, max_iter=25, seed=3)
    deep = dict(dataset=data["unit"], hidden=[20, 8], max_iter=8, finetune_iter=10, seed=5)
    adam = dict(
        dataset=data["unit"],
        hidden=20,
        optimizer="adam",
        batch_size=64,
        max_steps=25,
        learning_rate=1e-2,
        log_every=2,
        seed=3,
    )
    runs: dict[str, tuple[dict, dict]] = {
        "one-distributed": (one, {"plan": "distributed"}),
        "one-local": (one, {"plan": "local"}),
        "one-fused-cg-f32": (
            {**one, "passes": "fused", "optimizer": "cg", "dtype": "float32", "max_iter": 12},
            {"plan": "distributed"},
        ),
        "one-gd-linear-local": (
            {
                "dataset": data["signed"],
                "hidden": 10,
                "rho": None,
                "activation": "tanh",
                "output_activation": "linear",
                "optimizer": "gd",
                "alpha": 0.05,
                "max_iter": 10,
            },
            {"plan": "local"},
        ),
        "one-linear-rho": (
            {
                "dataset": data["signed"],
                "hidden": 10,
                "activation": "sigmoid",
                "output_activation": "linear",
                "max_iter": 10,
            },
            {"plan": "distributed"},
        ),
        "deep-previous": (deep, {}),
        "deep-input-transpose": (
            {
                **deep,
                "pretrain": "input",
                "code_activation": "linear",
                "decoder_init": "transpose",
                "passes": "fused",
            },
            {},
        ),
        "deep-none": ({**deep, "pretrain": "none", "finetune_iter": 12}, {}),
        "deep-stages1-sparse": (
            {**deep, "hidden": [20, 12, 6], "stages": 1, "finetune_sparse": True},
            {},
        ),
        "adam-fused-f32-val": (
            {
                **adam,
                "passes": "fused",
                "dtype": "float32",
                "validation_fraction": 0.2,
                "validate_every": 4,
                "lr_schedule": "cosine",
                "warmup_steps": 3,
            },
            {},
        ),
        "sgd-nesterov-ema": (
            {
                **adam,
                "optimizer": "sgd",
                "nesterov": True,
                "momentum": 0.9,
                "learning_rate": 0.05,
                "sparsity_estimate": "ema",
                "clip_grad_norm": 0.5,
            },
            {},
        ),
        "adam-topk-auxk-early": (
            {
                **adam,
                "kind": "topk",
                "k": 4,
                "k_aux": 6,
                "activation": "relu",
                "rho": None,
                "beta": 0.0,
                "validation_fraction": 0.2,
                "validate_every": 2,
                "early_stopping": 3,
                "max_steps": 60,
            },
            {},
        ),
        "adam-deep-finetune": (
            {
                **deep,
                "optimizer": "adam",
                "batch_size": 64,
                "learning_rate": 1e-2,
                "epochs": 2,
                "finetune_epochs": 2,
            },
            {},
        ),
    }
    out: dict[str, Any] = {}
    for name, (spec, kwargs) in runs.items():
        folder = root / name
        res = train(TrainSpec(**spec), folder, client=client, **kwargs)
        out[name] = {"result": _strip(res.to_dict()), "files": describe_dir(folder)}
        print(f"  {name}: {res.status} cost {res.final_cost!r}", flush=True)

    # cancelled, then resumed: the folder after the cancel and after the resume
    cancels = {
        "cancel-resume-one": (one, {"plan": "distributed"}, 7, None),
        "cancel-resume-local": (one, {"plan": "local"}, 7, None),
        "cancel-resume-deep": (deep, {"plan": "distributed"}, 4, "pretrain 2/2"),
        "cancel-resume-deep-finetune": (deep, {"plan": "distributed"}, 3, "finetune"),
        "cancel-resume-adam": (adam, {}, 9, None),
    }
    for name, (spec, kwargs, at, stage) in cancels.items():
        folder = root / name
        stop, seen = _stop_after(at, stage)
        res = train(
            TrainSpec(**spec), folder, client=client, should_stop=stop, on_iteration=seen, **kwargs
        )
        first = {
            "result": _strip(res.to_dict()),
            "status": res.status,
            "files": describe_dir(folder),
        }
        res2 = train(TrainSpec(**spec), folder, client=client, resume=True, **kwargs)
        out[name] = {
            "cancelled": first,
            "result": _strip(res2.to_dict()),
            "files": describe_dir(folder),
        }
        print(f"  {name}: {res.status} then {res2.status} cost {res2.final_cost!r}", flush=True)
    return out


def cli_scenarios(root: Path) -> dict[str, Any]:
    """``sae train`` in a subprocess (its own embedded cluster), one-layer and deep."""
    from worker.dataset import write_dataset

    rng = np.random.default_rng(11)
    X = rng.random((300, 25))
    data = root / "cli-data"
    write_dataset(
        data, X, 300, 25, dtype="float64", chunk_rows=100, sample_shape=(5, 5), source="golden"
    )
    out: dict[str, Any] = {}
    runs = {
        "cli-one": ["--hidden", "9", "--max-iter", "12"],
        "cli-deep-local": [
            "--hidden",
            "12,4",
            "--max-iter",
            "6",
            "--finetune-iter",
            "6",
            "--plan",
            "local",
        ],
        "cli-deep-distributed": [
            "--hidden",
            "12,4",
            "--max-iter",
            "6",
            "--finetune-iter",
            "6",
            "--plan",
            "distributed",
        ],
    }
    for name, args in runs.items():
        folder = root / name
        cmd = [
            sys.executable,
            "-c",
            "from service.cli import main; main()",
            "train",
            str(data),
            "--out",
            str(folder),
            "--workers",
            "2",
            "--seed",
            "2",
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
        out[name] = {"files": describe_dir(folder)}
        print(f"  {name}: ok", flush=True)
    return out


def service_scenarios(root: Path) -> dict[str, Any]:
    """Jobs of the real service (``sae serve`` under uvicorn): one-layer and deep."""
    sys.path.insert(0, str(REPO / "tests"))
    from service_fixtures import Server, write_tiny

    data_root, state = root / "svc-data", root / "svc-state"
    data_root.mkdir()
    write_tiny(data_root, "tiny")
    out: dict[str, Any] = {}
    with Server(data_root, state) as srv, srv.client() as http:
        specs = {
            "service-one": {"dataset": "tiny", "hidden": 6, "max_iter": 15, "seed": 4},
            "service-deep": {
                "dataset": "tiny",
                "hidden": [8, 3],
                "max_iter": 5,
                "finetune_iter": 5,
                "seed": 4,
            },
        }
        for name, spec in specs.items():
            job = http.post("/jobs", json=spec).json()
            deadline = time.monotonic() + 300
            while True:
                rec = http.get(f"/jobs/{job['id']}").json()
                if rec["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: still {rec['status']}")
                time.sleep(0.3)
            history = http.get(f"/jobs/{job['id']}/history").json()
            rec.pop("id")
            rec.pop("links")
            out[name] = {
                "job": _strip(rec),
                "history": _strip(history),
                "files": describe_dir(state / "jobs" / job["id"]),
            }
            print(f"  {name}: {rec['status']}", flush=True)
    return out


def record(path: Path) -> None:
    from worker.cluster import get_client

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with get_client(workers=2, threads_per_worker=1, memory_limit="1GB") as (client, _):
            results.update(worker_scenarios(root, client))
        results.update(cli_scenarios(root))
        results.update(service_scenarios(root))
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {len(results)} scenarios to {path}")


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{where}/{k}: only after")
            elif k not in b:
                out.append(f"{where}/{k}: only before")
            else:
                _diff(a[k], b[k], f"{where}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {str(a)[:120]} != {str(b)[:120]}")


def _load(path: Path) -> Any:
    """A recording, with the temporary folder it ran in written as ``<root>``."""
    data = json.loads(re.sub(r"/tmp/tmp[A-Za-z0-9_]+", "<root>", path.read_text()))
    for name in TIMED_CANCEL:  # where it stopped depends on timing; its resume does not
        data[name]["cancelled"] = {"status": data[name]["cancelled"]["status"]}
    return data


def compare(before: Path, after: Path) -> int:
    a, b = _load(before), _load(after)
    diffs: list[str] = []
    _diff(a, b, "", diffs)
    n_files = sum(len(v.get("files", {})) for v in a.values())
    for d in diffs:
        print(d)
    print(f"{len(a)} scenarios, {n_files} files: {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
