"""Stage checkpoints: one saved model per finished stage, a metrics log, and resume.

Layout of a checkpoint directory::

    run/
        metrics.json        # RecipeResult so far: recipe, stages, base MACs, config
        metrics.csv         # the same stages, one CSV row each
        stages/<name>/      # graphprune.save of the model after stage <name>
            masks.pt        # only for a masked model: {layer name: weight_mask} (torch.nn.utils.prune)

A model with ``torch.nn.utils.prune`` masks (``PruneConfig.granularity`` kernel or
unstructured) is saved in its permanent form (masked weights zero, so ``graphprune.io.load``
of the directory alone gives the sparse model) plus its masks, which :meth:`StageStore.load`
reinstalls: the function, the masks and the gradients of the kept weights are those of the
model saved (only the dead values under the masks, which no output or update reads, are zero).

Every file is written atomically: the model directory by :func:`graphprune.io.save`
(staging directory, fsync, rename), the logs by :func:`atomic_write_text` (temp file in the
same directory, fsync, ``os.replace``). A stage counts as finished only once its model *and*
its record are on disk (the model is written first), so a crash mid-stage reruns that stage.
A rerun refuses a directory written with another configuration, rather than mixing runs.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .. import io as gp_io
from ..errors import InvalidArgumentError
from ..sparsity import make_permanent_, masked_modules
from ..sparsity.unstructured import refresh_
from .distributed import DistContext, barrier
from .records import RecipeResult, StageRecord, records_csv

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
MASKS_FILE = "masks.pt"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same directory, fsync and ``os.replace``.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "log.json"
        >>> atomic_write_text(target, "{}").read_text()
        '{}'
    """
    target = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def _save_stage(model: nn.Module, path: Path) -> None:
    """``graphprune.io.save`` of ``model``; a masked model as its permanent form plus ``masks.pt``."""
    masked = masked_modules(model)
    if not masked:
        gp_io.save(model, path)
        return
    for module in masked.values():
        refresh_(module)  # a leaf ``weight`` again, so the model deep-copies
    permanent = copy.deepcopy(model)
    make_permanent_(permanent)
    gp_io.save(permanent, path)
    masks = {name: module.weight_mask.detach().cpu() for name, module in masked.items()}
    handle, temp = tempfile.mkstemp(prefix=f".{MASKS_FILE}.", suffix=".tmp", dir=path)
    os.close(handle)
    try:
        torch.save(masks, temp)
        os.replace(temp, path / MASKS_FILE)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class StageStore:
    """The checkpoint directory of one recipe run (or nothing, when ``directory`` is ``None``).

    Example:
        >>> import tempfile, timm
        >>> store = StageStore(tempfile.mkdtemp(), "S->T", {"seed": 0})
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> store.finish(model, StageRecord("source", "finetune", 0.5, 10, 10, 1.0))
        >>> StageStore(store.directory, "S->T", {"seed": 0}).done("source")
        True
    """

    def __init__(self, directory: str | os.PathLike | None, recipe: str, config: Mapping[str, Any], *,
                 base_macs: int = 0, ctx: DistContext = DistContext()) -> None:
        self.directory = None if directory is None else Path(directory)
        self.recipe = recipe
        self.config = dict(config)
        self.base_macs = base_macs
        self.ctx = ctx
        self.records: list[StageRecord] = []
        if self.directory is not None:
            self._read_existing()

    def _read_existing(self) -> None:
        path = self.directory / METRICS_JSON
        if not path.is_file():
            return
        previous = RecipeResult.from_json(path.read_text(encoding="utf-8"))
        old_config = {k: v for k, v in previous.config.items() if k != "selected_stage"}
        if previous.recipe != self.recipe or old_config != json.loads(json.dumps(self.config)):
            raise InvalidArgumentError(f"{self.directory} holds a {previous.recipe} run with another configuration; "
                                       "use a new checkpoint_dir to start over")
        self.records = list(previous.stages)
        self.base_macs = previous.base_macs or self.base_macs

    def done(self, name: str) -> bool:
        """True when stage ``name`` finished in an earlier run (model and record on disk)."""
        return any(r.name == name for r in self.records) and self._model_dir(name) is not None

    def record(self, name: str) -> StageRecord:
        """The saved record of a finished stage."""
        return next(r for r in self.records if r.name == name)

    def _model_dir(self, name: str) -> Path | None:
        if self.directory is None:
            return None
        path = self.directory / "stages" / name
        return path if (path / gp_io.RECORD_FILE).is_file() else None

    def load(self, name: str) -> nn.Module:
        """The model saved after stage ``name``, in train mode like a model mid-recipe."""
        path = self._model_dir(name)
        if path is None:
            raise InvalidArgumentError(f"no checkpoint of stage {name!r} in {self.directory}")
        model = gp_io.load(path)
        masks_path = path / MASKS_FILE
        if masks_path.is_file():
            modules = dict(model.named_modules())
            masks = torch.load(masks_path, map_location="cpu", weights_only=True)
            missing = sorted(set(masks) - set(modules))
            if missing:
                raise InvalidArgumentError(f"{masks_path} masks layers the saved model lacks: {missing[:3]}")
            for name, mask in masks.items():
                prune.custom_from_mask(modules[name], "weight", mask.to(modules[name].weight.device))
                refresh_(modules[name])
        return model.train()

    def finish(self, model: nn.Module, record: StageRecord, *, selected: str | None = None) -> None:
        """Record a finished stage: the model first, then the metrics log (rank 0 writes)."""
        self.records = [r for r in self.records if r.name != record.name] + [record]
        if selected is not None:
            self.config["selected_stage"] = selected
        if self.directory is None:
            return
        if self.ctx.is_main:
            stages = self.directory / "stages"
            stages.mkdir(parents=True, exist_ok=True)
            _save_stage(model, stages / record.name)
            self._write_logs()
        barrier(self.ctx)

    def select(self, name: str) -> None:
        """Mark stage ``name`` as the one whose model the recipe returns, in the log."""
        self.config["selected_stage"] = name
        if self.directory is not None and self.ctx.is_main:
            self._write_logs()
        barrier(self.ctx)

    def result(self) -> RecipeResult:
        """Everything recorded so far."""
        return RecipeResult(self.recipe, tuple(self.records), self.base_macs, dict(self.config))

    def _write_logs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / METRICS_JSON, self.result().to_json())
        atomic_write_text(self.directory / METRICS_CSV, records_csv(self.recipe, self.records))
