"""What a spec means: its networks, its schedule of stages, its options, its checks.

The one place that turns a :class:`~worker.spec.TrainSpec` and the dataset it names into
networks and stages. A one-layer spec is a schedule of one stage (the sparse autoencoder
``n -> hidden -> n``); a deep spec is K pretraining stages and a fine-tuning stage of the
unrolled network (:class:`sae.deep.DeepArchitecture`). The CLI, the REST checks and the
estimator ask this module, never rebuild a network of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sae import objective as obj
from sae.activations import get_activation
from sae.deep import DeepArchitecture
from sae.dictionary import Dictionary
from sae.network import Network
from sae.objective import check_fused
from worker import layout
from worker.dataset import DatasetInfo, open_dataset
from worker.spec import DEFAULT_L1, TrainSpec
from worker.stage import Stage
from worker.stage_id import StageId

Execution = Literal["local", "distributed"]
#: ``"auto"`` picks an execution per stage (:func:`choose_execution`).
ExecutionChoice = Literal["auto", "local", "distributed"]
EXECUTIONS = ("local", "distributed")

#: A stage whose data (decoded, in the compute dtype) fit in this many bytes runs as one task
#: next to its data ("local"); larger ones in the driver, one Dask graph per evaluation.
LOCAL_BYTES = 64 * 2**20

#: Bracketing iterations of the line search in deep stages (the optimizers' default is 10);
#: why: docs/deep-autoencoders.md, "Line search in deep stages".
DEEP_LS_MAXITER = 40


# ----------------------------------------------------------------------------- networks


def build_network(spec: TrainSpec, n_features: int, rows: int | None = None) -> Network:
    """The sparse autoencoder ``n_features -> hidden -> n_features`` of a one-layer spec: the
    classic network, or a :class:`~sae.dictionary.Dictionary` for kinds relu-l1 and topk.

    ``rows`` (the training rows) is the default ``dead_after`` of a stochastic topk job.

    Raises
    ------
    ValueError
        Naming the field (e.g. ``rho`` on units that cannot carry a sparsity target).
    """
    if spec.is_dictionary:
        return _dictionary(spec, n_features, rows)
    return Network.autoencoder(
        n_features,
        spec.hidden_sizes[0],
        lam=spec.lam,
        rho=spec.rho,
        beta=spec.beta if spec.rho is not None else 0.0,
        activation=spec.activation,
        output_activation=spec.output_activation,
    )


def _dictionary(spec: TrainSpec, n_features: int, rows: int | None) -> Dictionary:
    """The relu-l1 or topk dictionary of a spec."""
    options: dict = {"lam": spec.lam}
    if spec.unit_norm_decoder is not None:
        options["unit_norm"] = spec.unit_norm_decoder
    if spec.kind == "relu-l1":
        options["l1"] = DEFAULT_L1 if spec.l1 is None else spec.l1
        options["l1_weighting"] = spec.l1_weighting or "none"
    else:
        options.update(k=spec.k, k_aux=spec.k_aux)
        if spec.aux_coeff is not None:
            options["aux_coeff"] = spec.aux_coeff
        dead = spec.dead_after
        if dead is None and spec.is_stochastic and rows is not None:
            dead = rows
        if dead is not None:
            options["dead_after"] = dead
    return Dictionary.of(spec.kind, n_features, spec.hidden_sizes[0], **options)


def initial_model(spec: TrainSpec, net: Network) -> np.ndarray:
    """The theta of ``spec.init_model`` (a model.npz), checked to be a model of ``net``'s kind
    and sizes.

    Raises
    ------
    ValueError
        Naming ``init_model`` when the file is missing, unreadable or another model.
    """
    path = Path(spec.init_model)
    try:
        model, theta, _ = layout.load_model(path)
    except FileNotFoundError:
        raise ValueError(f"init_model: no model file {str(path)!r}") from None
    except Exception as exc:  # noqa: BLE001 - a .npy, a truncated zip, another npz: all "not a model"
        raise ValueError(f"init_model: {str(path)!r} is not a model.npz ({exc})") from None
    if model.kind != net.kind or model.sizes != net.sizes:
        raise ValueError(
            f"init_model: {str(path)!r} is a {model.kind} model of sizes {list(model.sizes)}; "
            f"this job trains a {net.kind} model of sizes {list(net.sizes)}"
        )
    if model.unit_norm_decoder != net.unit_norm_decoder:  # the same theta, another model
        unit = model.unit_norm_decoder
        raise ValueError(
            f"init_model: {str(path)!r} has a {'unit-norm' if unit else 'free'} decoder; "
            f"continue it with unit_norm_decoder {str(unit).lower()} "
            f"({'--unit-norm-decoder' if unit else '--free-decoder'})"
        )
    return np.asarray(theta, dtype=np.float64)


def data_mean(info: DatasetInfo, chunk_ids=None) -> np.ndarray:
    """The mean row of a dataset's chunks (all, or ``chunk_ids``), streamed chunk by chunk in
    float64, in chunk order (the same bits on every run).

    Returns
    -------
    mean : ndarray of shape (n_features,)
    """
    from worker.dataset import read_chunk

    ids = range(info.n_chunks) if chunk_ids is None else chunk_ids
    total, count = np.zeros(info.shape[1]), 0
    for i in ids:
        X = read_chunk(info.path, i, "float64", info.scale)
        total += X.sum(axis=0)
        count += X.shape[0]
    return total / max(count, 1)


def deep_architecture(spec: TrainSpec, n_visible: int) -> DeepArchitecture:
    """The deep autoencoder of a deep spec for data of ``n_visible`` features.

    Raises
    ------
    ValueError
        Naming the field (``hidden``, ``stages``, ``rho`` ...): e.g. a code layer larger than
        the input, or more pretraining stages than encoder layers.
    """
    return DeepArchitecture(
        n_visible=n_visible,
        hidden=tuple(spec.hidden_sizes),
        activation=spec.activation,
        code_activation=spec.code_activation,
        output_activation=spec.output_activation,
        lam=spec.lam,
        rho=spec.rho,
        beta=spec.beta if spec.rho is not None else 0.0,
        pretrain=spec.pretrain,
        decoder_init=spec.decoder_init,
        stages=spec.stages,
        finetune_sparse=spec.finetune_sparse,
    )


def network(spec: TrainSpec, n_features: int) -> Network:
    """The network a job trains in the end: the sparse autoencoder, or the unrolled deep
    autoencoder that fine-tuning trains."""
    if spec.is_deep:
        return deep_architecture(spec, n_features).network()
    return build_network(spec, n_features)


def layer_sizes(spec: TrainSpec, n_features: int) -> list[int]:
    """Sizes of the whole (unrolled) autoencoder, input to reconstruction."""
    h = spec.hidden_sizes
    return [n_features, *h, *reversed(h[:-1]), n_features]


def n_params(spec: TrainSpec, n_features: int) -> int:
    """Parameters of the network a job trains (weights and biases of every layer)."""
    sizes = layer_sizes(spec, n_features)
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def optimizer_options(spec: TrainSpec) -> dict:
    """Options of the spec's optimizer (``sae.optimize.OPTIMIZERS``, or
    ``sae.optimize.stochastic.STOCHASTIC`` for adam and sgd)."""
    if spec.is_stochastic:
        from sae.optimize.stochastic import stochastic_options

        common = {
            "learning_rate": spec.learning_rate,
            "schedule": spec.lr_schedule,
            "warmup_steps": spec.warmup_steps,
            "clip_norm": spec.clip_grad_norm,
        }
        if spec.optimizer == "adam":
            own = {"beta1": spec.adam_beta1, "beta2": spec.adam_beta2, "eps": spec.adam_eps}
        else:
            own = {"momentum": spec.momentum, "nesterov": spec.nesterov}
        return stochastic_options(spec.optimizer, {**common, **own})
    return {"alpha": spec.alpha} if spec.optimizer == "gd" else {}


def _stage_options(spec: TrainSpec) -> dict:
    """Options of a deep job's stages: the spec's, with :data:`DEEP_LS_MAXITER`."""
    options = optimizer_options(spec)
    if spec.optimizer in ("lbfgs", "cg"):
        options.setdefault("ls_maxiter", DEEP_LS_MAXITER)
    return options


def _passes(spec_passes: str, net: Network) -> str:
    """The spec's passes, or "two" where the one-pass form does not apply to ``net``."""
    if spec_passes == "fused":
        try:
            check_fused(net)
        except ValueError:
            return "two"
    return spec_passes


# ----------------------------------------------------------------------------- checks


def value_range(info: DatasetInfo) -> tuple[float, float] | None:
    """``(min, max)`` of a dataset's values when known without reading it: the range the
    ingestion recorded (``preprocessing["value_range"]``), else the bound of stored ``uint8``
    pixels ``[0, 255 * scale]``, else None."""
    vr = (info.preprocessing or {}).get("value_range")
    if isinstance(vr, list | tuple) and len(vr) == 2:
        return float(vr[0]), float(vr[1])
    if info.dtype == "uint8" and info.scale >= 0:
        return 0.0, 255.0 * info.scale
    return None


def output_bounded(spec: TrainSpec) -> bool:
    """True when the spec's output units reach a bounded range (sigmoid, tanh)."""
    act = get_activation(spec.output_activation or spec.activation)
    return bool(np.isfinite(act.low) and np.isfinite(act.high))


def check_output_range(spec: TrainSpec, vr: tuple[float, float] | None) -> None:
    """Raise ValueError naming ``output_activation`` when data spanning ``vr = (min, max)``
    lie outside what the spec's output units can reach (None: the range is unknown)."""
    name = spec.output_activation or spec.activation
    act = get_activation(name)
    if vr is None or not output_bounded(spec):
        return
    tol = 1e-9
    if vr[0] < act.low - tol or vr[1] > act.high + tol:
        raise ValueError(
            f"output_activation: {name} output units reach [{act.low:g}, {act.high:g}] but "
            f"the data span [{vr[0]:.4g}, {vr[1]:.4g}]; use output_activation 'linear' "
            "(--output-activation linear) or rescale the data"
        )


def training_rows(spec: TrainSpec, info: DatasetInfo) -> int:
    """Rows a stage trains on: the dataset's, less a validation set's chunks."""
    m = info.shape[0]
    if spec.validation_fraction is None:
        return m
    from worker.batches import chunk_sizes, held_out_chunks

    sizes = chunk_sizes(m, info.chunk_rows)
    held = held_out_chunks(len(sizes), spec.validation_fraction, spec.seed)
    return m - sum(sizes[i] for i in held)


def check_spec(spec: TrainSpec, info: DatasetInfo) -> None:
    """Check a spec against its dataset: everything that needs the data's shape or range.

    Raises
    ------
    ValueError
        Whose message starts with the field's name: ``dataset`` (no examples), ``hidden``
        (a code layer larger than the input ...), ``code_activation``,
        ``finetune_iter``, ``stages``, ``rho``, ``output_activation``.
    """
    m, n = info.shape
    if m < 1 or n < 1:
        raise ValueError(f"dataset: {info.path} holds no examples")
    if spec.code_activation is not None and not spec.is_deep:
        raise ValueError("code_activation: only for deep autoencoders (hidden list)")
    if spec.is_deep and spec.pretrain == "none":
        if spec.is_stochastic and spec.finetune_epochs == 0:
            raise ValueError("finetune_epochs: with pretrain 'none' give fine-tuning epochs")
        if not spec.is_stochastic and spec.finetune_iter == 0:
            raise ValueError("finetune_iter: with pretrain 'none' give fine-tuning iterations")
    if spec.is_deep:
        deep_architecture(spec, n)
    if spec.validation_fraction is not None and not spec.is_stochastic:
        raise ValueError("validation_fraction: only for the stochastic optimizers adam and sgd")
    if spec.validation_dataset is not None and not spec.is_stochastic:
        raise ValueError("validation_dataset: only for the stochastic optimizers adam and sgd")
    if spec.is_stochastic:
        rows = training_rows(spec, info)
        if spec.batch_size > rows:
            where = f"the dataset ({m} rows)" if rows == m else f"the training chunks ({rows} rows)"
            raise ValueError(f"batch_size: {spec.batch_size} is larger than {where}")
    if not spec.is_deep:  # units that can carry rho, ... (deep layers without a range drop it)
        net = build_network(spec, n)
        if spec.init_model is not None:
            initial_model(spec, net)
    check_output_range(spec, value_range(info))


def check_validation(info: DatasetInfo, validation: DatasetInfo) -> None:
    """Raise ValueError naming ``validation_dataset`` unless it can measure models of the
    dataset ``info`` (the same width, some rows)."""
    if validation.shape[1] != info.shape[1]:
        raise ValueError(
            f"validation_dataset: {validation.path} has {validation.shape[1]} features, the "
            f"dataset {info.shape[1]}"
        )
    if validation.shape[0] < 1:
        raise ValueError(f"validation_dataset: {validation.path} holds no examples")


def open_validation(spec: TrainSpec, path: str | None = None) -> DatasetInfo | None:
    """The separate validation dataset of a spec (at ``path``, or ``spec.validation_dataset``
    taken as a path), or None.

    Raises
    ------
    ValueError
        Naming ``validation_dataset`` when it is missing or not a dataset.
    """
    if spec.validation_dataset is None:
        return None
    from worker.dataset import DatasetError

    try:
        return open_dataset(str(path or spec.validation_dataset))
    except DatasetError as exc:
        raise ValueError(f"validation_dataset: {exc}") from None


def check_job(
    spec: TrainSpec,
    dataset_path: str | None = None,
    execution: ExecutionChoice = "auto",
    validation_path: str | None = None,
) -> DatasetInfo:
    """Everything that can be checked before a cluster starts: the dataset opens, the spec
    fits it (one-layer and deep), and its stages can run where ``execution`` says.

    Raises
    ------
    worker.dataset.DatasetError
        If the dataset is missing or not a dataset (a ValueError).
    ValueError
        Naming the field, when the spec does not fit the dataset.
    """
    info = open_dataset(str(dataset_path or spec.dataset))
    check_spec(spec, info)
    validation = open_validation(spec, validation_path)
    if validation is not None:
        check_validation(info, validation)
    Schedule(spec, info, Path("."), execution, validation).executions()
    return info


def choose_execution(nbytes: int, requested: ExecutionChoice = "auto") -> Execution:
    """Where a stage whose data take ``nbytes`` runs: ``"local"`` up to :data:`LOCAL_BYTES`
    for ``"auto"``, else ``"distributed"``; a requested execution as given."""
    if requested != "auto":
        if requested not in EXECUTIONS:
            raise ValueError(
                f"execution: choose 'auto', 'local' or 'distributed', got {requested!r}"
            )
        return requested
    return "local" if nbytes <= LOCAL_BYTES else "distributed"


# ----------------------------------------------------------------------------- the schedule


@dataclass
class Schedule:
    """The stages a spec trains on a dataset, in order.

    Parameters
    ----------
    spec : TrainSpec
    info : DatasetInfo
        The dataset (``shape``, ``sample_shape``).
    root : Path
        The job folder.
    execution : {"auto", "local", "distributed"}
        Where the stages run (``"auto"``: chosen per stage by the size of its data).

    Attributes
    ----------
    ids : list of StageId
        ``[single]`` for a one-layer spec; ``[pretrain 1/K, ..., pretrain K/K, finetune]``.
    metadata : dict
        What every model.npz of the job records: the spec, the dataset, the sample shape and,
        for deep jobs, the architecture (``"deep"``).
    """

    spec: TrainSpec
    info: DatasetInfo
    root: Path
    execution: ExecutionChoice = "auto"
    validation_info: DatasetInfo | None = None

    def __post_init__(self) -> None:
        choose_execution(0, self.execution)  # an unknown execution fails before any work
        n = self.info.shape[1]
        self.arch = deep_architecture(self.spec, n) if self.spec.is_deep else None
        self.metadata = {
            "spec": self.spec.model_dump(mode="json"),
            "dataset": self.info.to_dict(),
            "sample_shape": list(self.info.sample_shape) if self.info.sample_shape else None,
        }
        if self.spec.validation_dataset is not None and self.validation_info is None:
            self.validation_info = open_validation(self.spec)
        if self.validation_info is not None:
            self.metadata["validation_dataset"] = self.validation_info.to_dict()
        if self.arch is None:
            self.ids = [StageId.single()]
        else:
            self.metadata["deep"] = self.arch.to_dict()
            K = self.arch.n_stages
            self.ids = [StageId.pretrain(k, K) for k in range(1, K + 1)]
            self.ids.append(StageId.finetune(K))

    @property
    def multi_stage(self) -> bool:
        """True when the stages have folders of their own (a deep job)."""
        return self.arch is not None

    @property
    def labels(self) -> list[str | None]:
        """The stages' labels (``job.json``'s ``"stages"``)."""
        return [sid.label for sid in self.ids]

    def network(self) -> Network:
        """The network the job trains in the end."""
        return self.arch.network() if self.arch is not None else self.stage_network(self.ids[0])

    def stage_network(self, sid: StageId) -> Network:
        """The network stage ``sid`` trains."""
        if sid.kind == "single":
            rows = training_rows(self.spec, self.info)
            return build_network(self.spec, self.info.shape[1], rows)
        if sid.kind == "pretrain":
            return self.arch.stage_network(sid.index)
        return self.arch.network()

    def data_bytes(self, sid: StageId) -> int:
        """Bytes of stage ``sid``'s data in the compute dtype: its inputs (codes of the
        frozen encoders for a stage above the first) and a separate target, if any."""
        m = self.info.shape[0]
        net = self.stage_network(sid)
        width = net.sizes[0]
        if sid.kind == "pretrain" and self.arch.stage_target(sid.index) == "input":
            width += self.info.shape[1]
        return m * width * np.dtype(obj.array_dtype(self.spec.dtype)).itemsize

    def stage_execution(self, sid: StageId) -> Execution:
        """Where stage ``sid`` runs.

        Raises
        ------
        ValueError
            Naming ``plan`` when a stochastic stage is asked to run next to its data (its
            steps are driven from here, one graph per batch).
        """
        if self.spec.is_stochastic:
            if self.execution == "local":
                raise ValueError(
                    "plan: adam and sgd take their steps from the driver (one graph per "
                    "batch); use plan 'auto' or 'distributed'"
                )
            return "distributed"
        return choose_execution(self.data_bytes(sid), self.execution)

    def executions(self) -> list[Execution]:
        """Where each stage runs, in the order of :attr:`ids`."""
        return [self.stage_execution(sid) for sid in self.ids]

    def _batches(self, sid: StageId):
        """The minibatches of stage ``sid`` (None for a full-batch optimizer)."""
        if not self.spec.is_stochastic:
            return None
        from worker.batches import Batches

        m, chunk = self.info.shape[0], self.info.chunk_rows
        seed = self.spec.seed + 7919 * self.ids.index(sid)  # each stage its own shuffle
        spec = self.spec
        return Batches.of(m, chunk, spec.batch_size, seed, spec.shuffle_window, self.held_out())

    def held_out(self) -> tuple[int, ...]:
        """The chunks of the validation set (none without ``validation_fraction``)."""
        if self.spec.validation_fraction is None:
            return ()
        from worker.batches import held_out_chunks

        return held_out_chunks(self.info.n_chunks, self.spec.validation_fraction, self.spec.seed)

    def _validation(self):
        """The validation set as batch parts (None without one): the held-out chunks, or all
        the chunks of the separate validation dataset."""
        v = self.validation_info
        if v is not None:
            from worker.batches import whole_chunks

            return whole_chunks(range(v.n_chunks), v.shape[0], v.chunk_rows)
        ids = self.held_out()
        if not ids:
            return None
        from worker.batches import whole_chunks

        return whole_chunks(ids, self.info.shape[0], self.info.chunk_rows)

    def _theta0(self, net: Network) -> np.ndarray:
        """The starting point of a one-layer stage: a dictionary's starts at the training
        data's mean (``b_dec_init`` "mean", streamed), with a tied encoder unless not asked."""
        spec = self.spec
        if spec.init_model is not None:
            return initial_model(spec, net)
        if not spec.is_dictionary:
            return net.init_theta(spec.seed)
        mean = None
        if spec.b_dec_init in (None, "mean"):
            held = set(self.held_out())
            mean = data_mean(self.info, [i for i in range(self.info.n_chunks) if i not in held])
        tied = spec.tied_init is None or spec.tied_init
        return net.init_theta(spec.seed, mean=mean, tied=tied)

    def _budget(self, sid: StageId) -> int:
        """Iterations (steps) of stage ``sid``."""
        rows = training_rows(self.spec, self.info)
        return self.spec.stage_iterations(rows, finetune=sid.kind == "finetune")

    def stage(self, sid: StageId, trained: list[np.ndarray]) -> Stage:
        """Stage ``sid``, given the parameters of the pretraining stages before it.

        Parameters
        ----------
        sid : StageId
        trained : list of ndarray
            Trained theta of each pretraining stage before ``sid`` (all of them for the
            fine-tuning stage).
        """
        spec = self.spec
        net = self.stage_network(sid)
        execution = self.stage_execution(sid)
        stochastic = (
            dict(
                batches=self._batches(sid),
                log_every=spec.log_every,
                checkpoint_every=spec.checkpoint_every,
                # carried from step to step: the running rho_hat, or AuxK's counters
                rho_decay=spec.ema_decay
                if spec.sparsity_estimate == "ema" or net.sparse_layers and spec.is_dictionary
                else None,
                validation=self._validation(),
                validation_path=None if self.validation_info is None else self.validation_info.path,
                validate_every=spec.validate_every,
                early_stopping=spec.early_stopping,
            )
            if spec.is_stochastic
            else {}
        )
        common = dict(
            id=sid,
            network=net,
            optimizer=spec.optimizer,
            passes=_passes(spec.passes, net) if self.multi_stage else spec.passes,
            dtype=spec.dtype,
            folder=layout.stage_dir(self.root, sid),
            execution=execution,
            sample_shape=self.info.sample_shape if sid.first else None,
            pictures=sid.first,
            max_iter=self._budget(sid),
            **stochastic,
        )
        if sid.kind == "single":
            return Stage(
                theta0=self._theta0(net),
                options=optimizer_options(spec),
                metadata=self.metadata,
                **common,
            )
        meta = {**self.metadata, "stage": sid.label}
        if sid.kind == "pretrain":
            k = sid.index
            return Stage(
                theta0=net.init_theta(spec.seed + k),
                options=_stage_options(spec),
                metadata=meta,
                encoder=self.arch.stage_encoder(trained, k),
                target=self.arch.stage_target(k),
                **common,
            )
        return Stage(
            theta0=self.arch.assemble(trained, seed=spec.seed),
            options=_stage_options(spec),
            metadata=meta,
            **common,
        )
