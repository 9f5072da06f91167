"""The training spec: one validated description of a job, shared by the CLI and the REST API.

Field names are the CLI's option names. Validation happens here, at the boundary, so the math
can assume valid input; every error names its field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ActivationName = Literal["sigmoid", "tanh", "linear"]

MAX_UNITS = 100_000
MAX_ITER = 1_000_000


class TrainSpec(BaseModel):
    """A training job.

    ``hidden`` is one size for a sparse autoencoder (``n -> hidden -> n``) or a list of sizes
    for a deep autoencoder (``n -> h1 -> ... -> hk -> ... -> h1 -> n``).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, description="Dataset path (CLI) or name (REST)")
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
    optimizer: Literal["lbfgs", "cg", "gd"] = "lbfgs"
    alpha: float = Field(
        0.1, gt=0, le=1e6, allow_inf_nan=False, description="Learning rate of optimizer 'gd'"
    )
    max_iter: int = Field(400, ge=0, le=MAX_ITER, description="Iterations (per stage)")
    passes: Literal["two", "fused"] = "two"
    dtype: Literal["float64", "float32"] = "float64"
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

    @field_validator("hidden")
    @classmethod
    def _check_hidden(cls, v: int | list[int]) -> int | list[int]:
        sizes = [v] if isinstance(v, int) else v
        if not sizes:
            raise ValueError("hidden: give at least one layer size")
        for h in sizes:
            if h < 1:
                raise ValueError(f"hidden: layer sizes must be >= 1, got {h}")
            if h > MAX_UNITS:
                raise ValueError(f"hidden: layer sizes must be <= {MAX_UNITS}, got {h}")
        return v

    @property
    def hidden_sizes(self) -> list[int]:
        """The encoder's hidden sizes as a list."""
        return [self.hidden] if isinstance(self.hidden, int) else list(self.hidden)

    def total_iterations(self) -> int:
        """Iterations the job runs when it uses all of them.

        ``max_iter`` for one hidden layer; for a deep autoencoder ``max_iter`` per pretraining
        stage (``stages``, by default one per encoder layer; none for ``pretrain="none"``)
        plus ``finetune_iter``.
        """
        if not self.is_deep:
            return self.max_iter
        return self.max_iter * self.n_pretrain_stages + self.finetune_iter

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
