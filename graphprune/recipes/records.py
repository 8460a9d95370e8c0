"""Metrics records: one :class:`StageRecord` per stage, one :class:`RecipeResult` per recipe run.

Both are frozen dataclasses of JSON values; ``RecipeResult.to_json`` / ``from_json`` round-trip,
and :func:`records_csv` flattens the stages into CSV rows for the metrics log.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageRecord:
    """What one stage did and how the model measured afterwards.

    Attributes:
        name: the stage's unique name in its recipe (``"source"``, ``"prune"``, ``"step-2"``, ...).
        kind: ``"probe"``, ``"finetune"``, ``"prune"`` or ``"search-step"``.
        val_accuracy: top-1 accuracy on the validation split after the stage, in ``[0, 1]``.
        macs: MACs of one forward pass at the example input (one fused multiply-add = one MAC).
        params: parameter elements.
        seconds: wall time of the stage.
        steps: optimizer steps taken (0 for a pruning stage).
        epochs: passes over the training data the steps amount to.
        train_loss: mean training loss over the stage's steps, ``None`` without training.
        details: anything stage-specific (scorer, measured FLOPs reduction, stop reason, ...).
    """

    name: str
    kind: str
    val_accuracy: float
    macs: int
    params: int
    seconds: float
    steps: int = 0
    epochs: float = 0.0
    train_loss: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipeResult:
    """The metrics of one recipe run.

    Attributes:
        recipe: ``"S->T"``, ``"S->TP->T"``, ``"SP->T"`` or ``"TransTailor"``.
        stages: every stage in the order it ran (resumed stages included, read back from disk).
        base_macs: MACs of the model the recipe started from (at the example input).
        config: the recipe's configuration (``to_dict()`` of its config dataclass).
    """

    recipe: str
    stages: tuple[StageRecord, ...]
    base_macs: int
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> StageRecord:
        """The record of the model the recipe returns (the last stage, or the selected one)."""
        selected = self.config.get("selected_stage")
        for stage in self.stages:
            if stage.name == selected:
                return stage
        return self.stages[-1]

    def stage(self, name: str) -> StageRecord:
        """The record of stage ``name``.

        Raises:
            KeyError: no stage of that name ran.

        Example:
            >>> result = RecipeResult("S->T", (StageRecord("source", "finetune", 0.5, 10, 10, 1.0),), 10)
            >>> result.stage("source").val_accuracy
            0.5
        """
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def val_accuracy(self) -> float:
        """Validation accuracy of the returned model."""
        return self.final.val_accuracy

    @property
    def flops_reduction(self) -> float:
        """Measured fraction of MACs removed from the starting model by the returned model."""
        return 1.0 - self.final.macs / self.base_macs if self.base_macs else 0.0

    def to_json(self) -> str:
        """Serialize; :meth:`from_json` reads it back.

        Example:
            >>> result = RecipeResult("S->T", (StageRecord("source", "finetune", 0.9, 100, 10, 1.0),), 100)
            >>> RecipeResult.from_json(result.to_json()) == result
            True
        """
        return json.dumps(asdict(self), indent=1, allow_nan=False)

    @staticmethod
    def from_json(text: str) -> RecipeResult:
        """Parse what :meth:`to_json` wrote.

        Example:
            >>> RecipeResult.from_json('{"recipe": "S->T", "stages": [], "base_macs": 1}').stages
            ()
        """
        data = json.loads(text)
        stages = tuple(StageRecord(**stage) for stage in data["stages"])
        return RecipeResult(data["recipe"], stages, int(data["base_macs"]), data.get("config", {}))


def records_csv(recipe: str, stages: Sequence[StageRecord]) -> str:
    """The stages as CSV text, one row per stage; ``details`` is one JSON column.

    Example:
        >>> print(records_csv("S->T", [StageRecord("source", "finetune", 0.5, 100, 10, 1.25)]).splitlines()[1])
        S->T,source,finetune,0.5,100,10,1.25,0,0.0,,{}
    """
    buffer = io.StringIO()
    columns = ["recipe", "name", "kind", "val_accuracy", "macs", "params", "seconds", "steps", "epochs",
               "train_loss", "details"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for stage in stages:
        row = asdict(stage)
        row["details"] = json.dumps(row["details"], sort_keys=True)
        row["train_loss"] = "" if row["train_loss"] is None else row["train_loss"]
        writer.writerow({"recipe": recipe, **row})
    return buffer.getvalue()
