"""Which stage of a job something belongs to, as structured fields.

A job is a schedule of stages: one stage for a sparse autoencoder, K pretraining stages and a
fine-tuning stage for a deep one. History entries, ``job.json`` and stage folders carry a
stage's identity as text; this module is the one place that writes that text and reads it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

StageKind = Literal["single", "pretrain", "finetune"]

#: History label of the fine-tuning stage, and the name of its folder.
FINETUNE = "finetune"
_PRETRAIN = re.compile(r"^pretrain (\d+)/(\d+)$")


@dataclass(frozen=True)
class StageId:
    """One stage of a job.

    Attributes
    ----------
    kind : {"single", "pretrain", "finetune"}
        The only stage of a one-layer job, a pretraining stage or the fine-tuning of a deep job.
    index : int
        1-based position among the pretraining stages (0 for the other kinds).
    count : int
        Number of pretraining stages of the job (0 for a one-layer job).
    """

    kind: StageKind
    index: int = 0
    count: int = 0

    @classmethod
    def single(cls) -> StageId:
        """The stage of a one-layer job."""
        return cls("single")

    @classmethod
    def pretrain(cls, index: int, count: int) -> StageId:
        """Pretraining stage ``index`` of ``count``."""
        return cls("pretrain", index, count)

    @classmethod
    def finetune(cls, count: int) -> StageId:
        """The fine-tuning stage after ``count`` pretraining stages."""
        return cls("finetune", 0, count)

    @property
    def label(self) -> str | None:
        """The history entries' ``"stage"``: ``"pretrain k/K"``, ``"finetune"``, or None for
        a one-layer job (whose entries have no stage)."""
        if self.kind == "pretrain":
            return f"pretrain {self.index}/{self.count}"
        return FINETUNE if self.kind == "finetune" else None

    @property
    def folder(self) -> str | None:
        """The stage's folder inside the job folder (None: the job folder itself)."""
        if self.kind == "pretrain":
            return f"stage-{self.index}"
        return FINETUNE if self.kind == "finetune" else None

    @property
    def first(self) -> bool:
        """True for the stage whose first layer is the network's first layer (its filters are
        the job's pictures): the single stage, pretraining stage 1 and fine-tuning."""
        return self.kind != "pretrain" or self.index == 1

    @classmethod
    def from_label(cls, label: str | None, count: int = 0) -> StageId:
        """The identity a history entry's ``"stage"`` names.

        Parameters
        ----------
        label : str or None
            What :attr:`label` wrote.
        count : int
            Pretraining stages of the job, for ``"finetune"`` (whose label does not say).

        Raises
        ------
        ValueError
            For a label :attr:`label` never writes.
        """
        if label is None:
            return cls.single()
        if label == FINETUNE:
            return cls.finetune(count)
        m = _PRETRAIN.match(str(label))
        if m is None:
            raise ValueError(f"stage: unknown stage label {label!r}")
        return cls.pretrain(int(m.group(1)), int(m.group(2)))
