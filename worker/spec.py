"""The training spec: one validated description of a job, shared by the CLI and the REST API.

Field names are the CLI's option names. Validation happens here, at the boundary, so the math
can assume valid input; every error names its field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ActivationName = Literal["sigmoid", "tanh", "linear", "relu"]
KindName = Literal["sigmoid-kl", "relu-l1", "topk"]
#: The kinds of :mod:`sae.dictionary` (ReLU encoder, linear decoder, pre-encoder bias).
DICTIONARY_KINDS = ("relu-l1", "topk")
#: Fields only the dictionary kinds have, with the kind(s) each belongs to.
_DICTIONARY_FIELDS = {
    "l1": ("relu-l1",),
    "l1_weighting": ("relu-l1",),
    "k": ("topk",),
    "k_aux": ("topk",),
    "aux_coeff": ("topk",),
    "dead_after": ("topk",),
    "unit_norm_decoder": DICTIONARY_KINDS,
    "tied_init": DICTIONARY_KINDS,
    "b_dec_init": DICTIONARY_KINDS,
}
#: The L1 weight of relu-l1 when none is given.
DEFAULT_L1 = 1e-3

MAX_UNITS = 100_000
#: Most encoder layers of a deep autoencoder (each is a pretraining stage with its own files).
MAX_LAYERS = 16
MAX_ITER = 1_000_000


class TrainSpec(BaseModel):
    """A training job.

    ``hidden`` is one size for a sparse autoencoder (``n -> hidden -> n``) or a list of sizes
    for a deep autoencoder (``n -> h1 -> ... -> hk -> ... -> h1 -> n``).
    """

    # strict: "5", true or "yes" are not numbers or booleans (no silent coercion of a spec)
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(min_length=1, description="Dataset path (CLI) or name (REST)")
    kind: KindName = Field(
        "sigmoid-kl",
        description="Model kind: the classic sigmoid autoencoder with a KL sparsity penalty, "
        "a ReLU dictionary with an L1 penalty (relu-l1), or one keeping the k largest "
        "latents per example (topk)",
    )
    hidden: int | list[int] = Field(25, description="Hidden size, or sizes of a deep encoder")
    activation: ActivationName = "sigmoid"
    output_activation: ActivationName | None = Field(
        None, description="Activation of the reconstruction units (default: activation)"
    )
    code_activation: ActivationName | None = Field(
        None, description="Activation of the innermost code layer of a deep autoencoder"
    )
    lam: float = Field(1e-4, ge=0, le=1e6, allow_inf_nan=False, description="Weight decay")
    rho: float | None = Field(
        0.01, gt=0, lt=1, description="Sparsity target of the hidden units (null: none)"
    )
    beta: float = Field(3.0, ge=0, le=1e6, allow_inf_nan=False, description="Sparsity weight")
    optimizer: Literal["lbfgs", "cg", "gd", "adam", "sgd"] = Field(
        "lbfgs",
        description="Full-batch (lbfgs, cg, gd: every iteration reads all the data) or "
        "stochastic (adam, sgd: every step reads one minibatch)",
    )
    alpha: float = Field(
        0.1, gt=0, le=1e6, allow_inf_nan=False, description="Learning rate of optimizer 'gd'"
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1e3,
        allow_inf_nan=False,
        description="Learning rate of adam (default 1e-3) and sgd (default 1e-2)",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam's second-moment decay")
    adam_eps: float = Field(1e-8, gt=0, le=1, description="Adam's epsilon")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of sgd")
    nesterov: bool = Field(False, description="Nesterov momentum for sgd")
    batch_size: int = Field(256, ge=1, le=100_000_000, description="Rows per minibatch")
    epochs: int = Field(
        10, ge=1, le=MAX_ITER, description="Passes over the data (per stage) of adam and sgd"
    )
    finetune_epochs: int = Field(
        0, ge=0, le=MAX_ITER, description="Fine-tuning epochs of a deep autoencoder (adam, sgd)"
    )
    max_steps: int | None = Field(
        None, ge=1, le=10**9, description="At most this many steps per stage (adam, sgd)"
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="After warmup: constant, or decay to 0 along a cosine or a line"
    )
    warmup_steps: int = Field(0, ge=0, le=10**9, description="Steps of linear warmup")
    clip_grad_norm: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Scale longer gradients to this norm"
    )
    sparsity_estimate: Literal["batch", "ema"] = Field(
        "batch",
        description="rho_hat of the KL penalty with minibatches: the batch's (the exact "
        "gradient of the batch objective) or a running average (decay ema_decay)",
    )
    ema_decay: float = Field(0.99, gt=0, lt=1, description="Decay of the running rho_hat")
    log_every: int = Field(10, ge=1, le=10**9, description="Steps between history entries")
    checkpoint_every: int = Field(
        100, ge=1, le=10**9, description="Steps between checkpoints (and every epoch's end)"
    )
    shuffle_window: int = Field(
        4, ge=1, le=100_000, description="Chunks whose rows are shuffled together"
    )
    validation_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Hold out this share of the chunks (never trained on) to measure the "
        "held-out cost (adam, sgd)",
    )
    validate_every: int = Field(
        100, ge=1, le=10**9, description="Steps between held-out costs (and every epoch's end)"
    )
    validation_dataset: str | None = Field(
        None,
        min_length=1,
        description="A separate dataset of the same width to measure the held-out cost on "
        "(adam, sgd): a path (CLI) or a dataset name (REST)",
    )
    early_stopping: int | None = Field(
        None,
        ge=1,
        le=10**6,
        description="Stop a stage after this many held-out costs without a new best",
    )
    max_iter: int = Field(400, ge=0, le=MAX_ITER, description="Iterations (per stage)")
    passes: Literal["two", "fused"] = "two"
    dtype: Literal["float64", "float32", "bfloat16"] = Field(
        "float64",
        description="Compute dtype; sums are float64 whatever it is. bfloat16: matrix "
        "products in bfloat16 with float32 accumulation (PyTorch's CPU build, an optional "
        "install), the rest in float32",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1)
    pretrain: Literal["previous", "input", "none"] = "previous"
    decoder_init: Literal["pretrained", "transpose"] = "pretrained"
    finetune_iter: int = Field(
        0, ge=0, le=MAX_ITER, description="Fine-tuning iterations of a deep autoencoder"
    )
    stages: int | None = Field(
        None,
        ge=0,
        le=MAX_UNITS,
        description="Pretraining stages of a deep autoencoder (default: one per encoder layer)",
    )
    finetune_sparse: bool = Field(
        False, description="Keep the hidden layers' sparsity penalty during fine-tuning"
    )
    l1: float | None = Field(
        None,
        ge=0,
        le=1e6,
        allow_inf_nan=False,
        description=f"relu-l1: weight of the L1 penalty on the latents (default {DEFAULT_L1})",
    )
    l1_weighting: Literal["none", "decoder-norm"] | None = Field(
        None, description="relu-l1: weight each latent's L1 term by its decoder column's norm"
    )
    k: int | None = Field(
        None, ge=1, le=MAX_UNITS, description="topk: active latents per example (required)"
    )
    k_aux: int | None = Field(
        None,
        ge=1,
        le=MAX_UNITS,
        description="topk: dead latents that reconstruct the residual (AuxK; default none)",
    )
    aux_coeff: float | None = Field(
        None, ge=0, le=1e6, allow_inf_nan=False, description="topk: weight of AuxK (1/32)"
    )
    dead_after: int | None = Field(
        None,
        ge=1,
        le=10**15,
        description="topk with adam/sgd: a latent inactive for this many examples is dead "
        "(default: one epoch's rows); full-batch: dead = inactive on all the data",
    )
    unit_norm_decoder: bool | None = Field(
        None, description="relu-l1, topk: decoder columns of unit norm (default true)"
    )
    tied_init: bool | None = Field(
        None, description="relu-l1, topk: start with W_enc = W_dec^T (default true)"
    )
    b_dec_init: Literal["mean", "zeros"] | None = Field(
        None, description="relu-l1, topk: start b_dec at the data's mean (default) or zeros"
    )

    init_model: str | None = Field(
        None,
        min_length=1,
        description="One-layer jobs, CLI and library: start from this model.npz (e.g. one "
        "imported from SAELens with `sae import`) instead of a random initialisation",
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_fields(cls, data):
        """Fields of one kind refused on another (naming them); a dictionary kind has no KL
        penalty, ReLU latents and a linear decoder, and no weight decay unless given."""
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "sigmoid-kl")
        if kind not in ("sigmoid-kl", *DICTIONARY_KINDS):
            return data  # the Literal's own error
        for name, kinds in _DICTIONARY_FIELDS.items():
            if data.get(name) is not None and kind not in kinds:
                owners = " and ".join(repr(k) for k in kinds)
                raise ValueError(f"{name}: only for kind {owners}, not {kind!r}")
        if kind == "sigmoid-kl":
            return data
        data = dict(data)
        why = "its sparsity is k" if kind == "topk" else "its sparsity penalty is l1"
        if data.get("rho") is not None:
            raise ValueError(f"rho: kind {kind!r} has no KL sparsity target ({why})")
        if data.get("beta") not in (None, 0, 0.0):
            raise ValueError(f"beta: kind {kind!r} has no KL sparsity penalty ({why})")
        if data.get("activation") not in (None, "relu"):
            raise ValueError(f"activation: kind {kind!r} has ReLU latents")
        if data.get("output_activation") not in (None, "linear"):
            raise ValueError(f"output_activation: kind {kind!r} has a linear decoder")
        data.update(rho=None, beta=0.0, activation="relu", output_activation="linear")
        data.setdefault("lam", 0.0)
        return data

    @field_validator("hidden")
    @classmethod
    def _check_hidden(cls, v: int | list[int]) -> int | list[int]:
        sizes = [v] if isinstance(v, int) else v
        if not sizes:
            raise ValueError("hidden: give at least one layer size")
        if len(sizes) > MAX_LAYERS:
            raise ValueError(f"hidden: at most {MAX_LAYERS} encoder layers, got {len(sizes)}")
        for h in sizes:
            if h < 1:
                raise ValueError(f"hidden: layer sizes must be >= 1, got {h}")
            if h > MAX_UNITS:
                raise ValueError(f"hidden: layer sizes must be <= {MAX_UNITS}, got {h}")
        return v

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, v: str) -> str:
        if v == "bfloat16":
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise ValueError(
                    "dtype: bfloat16 products need PyTorch's CPU build where the jobs run "
                    "(pip install torch==2.13.0 --index-url "
                    "https://download.pytorch.org/whl/cpu); float32 needs nothing more"
                )
        return v

    @model_validator(mode="after")
    def _check_kind(self) -> TrainSpec:
        if self.init_model is not None and self.is_deep:
            raise ValueError("init_model: only for one-layer jobs (one hidden size)")
        if self.kind == "sigmoid-kl":
            return self
        if self.is_deep:
            raise ValueError(
                f"hidden: kind {self.kind!r} trains one hidden layer; give one size "
                "(deep autoencoders are sigmoid-kl)"
            )
        h = self.hidden_sizes[0]
        if self.kind == "topk":
            if self.k is None:
                raise ValueError("k: kind 'topk' needs k, the active latents per example")
            for name in ("k", "k_aux"):
                v = getattr(self, name)
                if v is not None and v > h:
                    raise ValueError(f"{name}: must be at most the hidden size {h}, got {v}")
            if self.k_aux is not None and self.passes == "fused":
                raise ValueError(
                    "passes: AuxK (k_aux) needs two passes (pass 1 counts the dead latents)"
                )
        if self.sparsity_estimate == "ema":
            raise ValueError("sparsity_estimate: only for kind 'sigmoid-kl' (its KL penalty)")
        return self

    @model_validator(mode="after")
    def _check_stochastic(self) -> TrainSpec:
        if self.sparsity_estimate == "ema" and self.passes == "fused":
            raise ValueError("sparsity_estimate: a running average needs passes 'two'")
        if self.validation_fraction is not None and self.validation_dataset is not None:
            raise ValueError(
                "validation_dataset: give a validation_fraction or a validation_dataset, not both"
            )
        if self.early_stopping is not None and not self.has_validation:
            raise ValueError(
                "early_stopping: give a validation_fraction or a validation_dataset to stop on"
            )
        return self

    @property
    def has_validation(self) -> bool:
        """True when held-out costs are measured (held-out chunks or another dataset)."""
        return self.validation_fraction is not None or self.validation_dataset is not None

    @property
    def is_dictionary(self) -> bool:
        """True for the kinds relu-l1 and topk (:class:`sae.dictionary.Dictionary`)."""
        return self.kind in DICTIONARY_KINDS

    @property
    def is_stochastic(self) -> bool:
        """True for the minibatch optimizers (adam, sgd)."""
        return self.optimizer in ("adam", "sgd")

    def stage_steps(self, rows: int, finetune: bool = False) -> int:
        """Steps of one stochastic stage on ``rows`` rows: its epochs of ``ceil(rows /
        batch_size)`` batches, at most ``max_steps``."""
        epochs = self.finetune_epochs if finetune else self.epochs
        steps = epochs * -(-rows // self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    @property
    def hidden_sizes(self) -> list[int]:
        """The encoder's hidden sizes as a list."""
        return [self.hidden] if isinstance(self.hidden, int) else list(self.hidden)

    def stage_iterations(self, rows: int | None = None, finetune: bool = False) -> int:
        """Iterations (steps, for adam and sgd on ``rows`` rows) of one stage: a pretraining
        stage or the one stage of a one-layer job, or the fine-tuning."""
        if self.is_stochastic:
            if rows is None:
                raise ValueError("rows: a stochastic job's steps depend on the dataset's rows")
            return self.stage_steps(rows, finetune)
        return self.finetune_iter if finetune else self.max_iter

    def total_iterations(self, rows: int | None = None) -> int:
        """Iterations the job runs when it uses all of them.

        ``max_iter`` for one hidden layer; for a deep autoencoder ``max_iter`` per pretraining
        stage (``stages``, by default one per encoder layer; none for ``pretrain="none"``)
        plus ``finetune_iter``. For adam and sgd, steps (which need the dataset's ``rows``).
        """
        if not self.is_deep:
            return self.stage_iterations(rows)
        per_stage = self.stage_iterations(rows)
        return per_stage * self.n_pretrain_stages + self.stage_iterations(rows, finetune=True)

    @property
    def n_pretrain_stages(self) -> int:
        """Pretraining stages of a deep autoencoder (0 for ``pretrain="none"``)."""
        if self.pretrain == "none":
            return 0
        return len(self.hidden_sizes) if self.stages is None else self.stages

    @property
    def is_deep(self) -> bool:
        """True for more than one hidden layer in the encoder."""
        return len(self.hidden_sizes) > 1
