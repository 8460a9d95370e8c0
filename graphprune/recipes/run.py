"""One recipe run: the model copy, seed, device, checkpoints and stage skipping every recipe shares.

The recipes (:mod:`.pipelines`, :mod:`.transtailor`, :mod:`.blocksearch`) are sequences of
stages on a :class:`RecipeRun`; :func:`check_data` refuses data none of them can use and
:func:`on_device` moves the loaders' batches to the run's device.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..measurement import count_macs
from .checkpoint import StageStore
from .config import FinetuneConfig, PruneConfig, TransferConfig
from .data import TransferData
from .device import DeviceLoader, Placement
from .distributed import DistContext, context, rank_device, sync_state_, train_shard
from .finetune import classifier_of, finetune_, seed_everything, stage_steps
from .probe import linear_probe_
from .records import RecipeResult, StageRecord
from .sparse import gradual_pruner, sparse_finish_
from .stages import full_model_class_means, prune_stage_

Stage = Callable[[nn.Module], StageRecord]


def _dataset_classes(loader) -> tuple[str, ...] | None:
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # through torch Subset wrappers
    classes = getattr(dataset, "classes", None)
    return tuple(classes) if classes is not None else None


def check_data(data: TransferData) -> None:
    """Refuse data a recipe cannot use, before any training: fewer than 2 classes, train and
    val datasets whose ``classes`` differ, or an empty validation loader.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])), batch_size=2)
        >>> check_data(TransferData(loader, loader, ("a", "b")))
    """
    if not isinstance(data, TransferData):
        raise InvalidArgumentError(f"recipes take a TransferData (train, val, class_names), got {type(data).__name__}")
    if data.num_classes < 2:
        raise InvalidArgumentError(f"a classification task needs at least 2 classes, got {data.class_names}")
    train, val = _dataset_classes(data.train), _dataset_classes(data.val)
    if train is not None and val is not None and train != val:
        raise InvalidArgumentError(f"train and val classes differ: {sorted(set(train) ^ set(val))} are in only one")
    for classes in (train, val):
        if classes is not None and tuple(classes) != tuple(data.class_names):
            raise InvalidArgumentError(f"data.class_names {data.class_names} differ from the dataset's {classes}")
    try:
        if len(data.val) == 0:
            raise InvalidArgumentError("the validation loader is empty")
    except TypeError:
        pass


def on_device(data: TransferData, placement: Placement) -> TransferData:
    """``data`` whose loaders deliver batches on ``placement``'s device (and memory layout).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])), batch_size=2)
        >>> moved = on_device(TransferData(loader, loader, ("a", "b")), Placement())
        >>> type(moved.train).__name__, moved.example_inputs().device.type
        ('DeviceLoader', 'cpu')
    """
    wrap = (lambda loader: None if loader is None else DeviceLoader(loader, placement))
    return TransferData(wrap(data.train), wrap(data.val), data.class_names, wrap(data.train_eval))


class RecipeRun:
    """What every recipe does around its stages: copy the model, seed, place it on the device, open
    the stage store (checkpoints, resume) and the process context, and run or reload each stage.

    A recipe is a few lines on top: ``run = RecipeRun(...)``, ``run.probe()``,
    ``run.stage("source", run.finetune("source", config.source))``, ..., ``return run.finish()``
    (see :func:`~graphprune.recipes.pipelines.s_to_t`).
    """

    def __init__(self, recipe: str, model: nn.Module, data: TransferData, config: TransferConfig) -> None:
        check_data(data)
        run = config.run
        self.config = config
        seed_everything(run.seed)
        self.model = copy.deepcopy(model)
        classifier_of(self.model)
        self.model.reset_classifier(data.num_classes)
        placement = Placement.resolve(self.model, run.device, run.precision, run.channels_last)
        self.ctx: DistContext = context(placement.device)
        self.placement = Placement(rank_device(placement.device), placement.bf16, placement.channels_last)
        self.data = on_device(data, self.placement)
        self.placement.model_(self.model)
        sync_state_(self.model, self.ctx)
        base_macs = int(count_macs(self.model, self.data.example_inputs()))
        self.store = StageStore(run.checkpoint_dir, recipe, config.to_dict(), base_macs=base_macs,
                                ctx=self.ctx)
        self.head_init = getattr(config, "head_init", "random")

    @property
    def progress(self) -> bool:
        return self.config.run.progress and self.ctx.is_main

    def stage(self, name: str, run: Stage) -> None:
        """Run stage ``name`` on ``self.model`` unless an earlier run finished it (then load it)."""
        if self.store.done(name):
            self.model = self.load(name)
            return
        record = run(self.model)
        self.store.finish(self.model, record)

    def load(self, name: str) -> nn.Module:
        """The checkpoint of stage ``name``, on the run's device and memory layout."""
        return self.placement.model_(self.store.load(name))

    def probe(self) -> None:
        """With ``head_init="probe"``: fit the new classifier as a linear probe (stage ``probe``)."""
        if self.head_init == "probe":
            self.stage("probe", lambda model: linear_probe_(model, self.data, ctx=self.ctx, placement=self.placement))

    def finetune(self, name: str, config, **options) -> Stage:
        return lambda model: finetune_(model, self.data, config, name=name, ctx=self.ctx,
                                       seed=self.config.run.seed, progress=self.progress, placement=self.placement,
                                       **options)

    def prune(self, name: str, config: PruneConfig | None = None) -> Stage:
        config = config or self.config.prune
        return lambda model: prune_stage_(model, self.data, config, name=name, ctx=self.ctx,
                                          seed=self.config.run.seed, progress=self.progress,
                                          placement=self.placement)

    def prune_and_recover(self, target: FinetuneConfig, class_means: torch.Tensor | None,
                          teacher: nn.Module | None = None) -> None:
        """Stages ``prune`` and ``target``; with ``prune.steps = n > 1``, ``prune.1``, ``target.1``, ...,
        ``prune.{n-1}``, ``target.{n-1}``, ``prune``, ``target``: each step removes its share of the
        budget (:meth:`~graphprune.recipes.PruneConfig.step_reductions`) and is fine-tuned for
        ``target.epochs / n`` epochs, with the same reuse, alignment and distillation."""
        prune = self.config.prune
        if prune.steps == 1:
            self.stage("prune", self.prune("prune"))
            self.stage("target", self.target(target, **self.target_options(class_means, teacher)))
            return
        recover = replace(target, epochs=target.epochs / prune.steps)
        for step, reduction in enumerate(prune.step_reductions(), start=1):
            suffix = "" if step == prune.steps else f".{step}"
            self.stage("prune" + suffix, self.prune("prune" + suffix, replace(prune, flops_reduction=reduction)))
            options = self.target_options(class_means, teacher, prune_stage="prune" + suffix)
            self.stage("target" + suffix, self.finetune("target" + suffix, recover, **options))

    def class_means(self) -> torch.Tensor | None:
        """Class means of ``self.model`` for the alignment loss, if the target stage still needs them."""
        if self.config.prune.alignment_weight == 0 or self.store.done("target"):
            return None
        return full_model_class_means(self.model, self.data, ctx=self.ctx, progress=self.progress)

    def teacher(self) -> nn.Module | None:
        """A frozen copy of ``self.model`` (the fine-tuned full model) to distill from after
        pruning, if the target stage still needs one (``target.distill > 0``)."""
        if self.config.target.distill == 0 or self.store.done("target"):
            return None
        return copy.deepcopy(self.model).eval()

    def target_options(self, class_means: torch.Tensor | None, teacher: nn.Module | None = None, *,
                       prune_stage: str = "prune") -> dict:
        """Keyword arguments of the fine-tuning after pruning: reuse, alignment, distillation, epoch scale."""
        prune = self.config.prune
        options: dict = {"freeze_classifier": prune.classifier_reuse, "teacher": teacher}
        if class_means is not None:
            options.update(alignment_weight=prune.alignment_weight, class_means=class_means)
        if prune.scale_epochs:
            reduction = self.store.record(prune_stage).details["flops_reduction"]
            options["epoch_scale"] = 1.0 / max(1.0 - reduction, 1e-6)
        return options

    def target(self, config: FinetuneConfig, **options) -> Stage:
        """The fine-tuning after pruning (stage ``target``).

        For ``prune.granularity`` ``"kernel"`` / ``"unstructured"`` the masks hold through it
        (``torch.nn.utils.prune`` reparametrizations: the masked weights get no update, in
        ``full`` and ``linear`` mode alike), ``gradual`` masks grow during it, and it ends with
        the deployed form (:func:`~graphprune.recipes.sparse.sparse_finish_`), so that its
        checkpoint is the returned model.
        """
        finetune = self.finetune("target", config, **options)
        prune = self.config.prune
        if prune.granularity == "channel":
            return finetune

        def run(model: nn.Module) -> StageRecord:
            seed = self.config.run.seed
            steps = stage_steps(config, len(train_shard(self.data.train, self.ctx, seed)),
                                options.get("epoch_scale", 1.0))
            pruner = gradual_pruner(model, self.store.record("prune").details, prune, steps, seed=seed)
            with pruner.attached() if pruner is not None else contextlib.nullcontext():
                record = finetune(model)
            return sparse_finish_(model, record, prune, self.data.example_inputs(), self.store.base_macs,
                                  self.placement)

        return run

    def finish(self) -> tuple[nn.Module, RecipeResult]:
        """The model (on the run's device, default memory layout) and the record."""
        return self.model.to(memory_format=torch.contiguous_format), self.store.result()
