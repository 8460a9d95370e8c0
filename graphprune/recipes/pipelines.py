"""The transfer recipes: S->T, S->TP->T and SP->T.

* **S->T**: fine-tune the source (pretrained) model on the target task, with a new classifier.
* **S->TP->T**: S->T, then prune the fine-tuned model (any scorer, a ratio or a FLOPs budget),
  then fine-tune again; optionally reuse the fine-tuned classifier (frozen), align the
  pruned model's features with the fine-tuned model's class means, and scale the second
  stage's epochs by ``1 / (1 - FLOPs reduction)``.
* **SP->T**: prune the source model first (after giving it the target's classifier, so
  data-driven scorers see target labels), then fine-tune; ``target.epochs = 0`` measures
  zero-shot pruning at the budget.

The pruning stage of S->TP->T and SP->T removes whole channels by default;
``PruneConfig(granularity="kernel" | "unstructured")`` prunes K x K kernels or single weights
to the FLOPs budget instead (:mod:`.sparse`), as masks that every later stage keeps, returned in
their deployed form (``KernelConv2d`` layers or plain zeros).

Each recipe copies the input model (it is never modified), returns the resulting model and a
:class:`RecipeResult`, checkpoints after every stage when ``config.run.checkpoint_dir`` is
set, resumes finished stages from there, and runs unchanged under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..measurement import count_macs
from .checkpoint import StageStore
from .config import FinetuneConfig, PruneConfig, RunConfig, TransferConfig  # noqa: F401  (docstring examples)
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


def _check_prune(prune: PruneConfig, recipe: str) -> None:
    if recipe == "SP->T" and prune.classifier_reuse:
        raise InvalidArgumentError("SP->T has no fine-tuned classifier to reuse; set classifier_reuse=False")


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


class _Run:
    """Shared plumbing: the copy, the seed, the device, the store, the context, stage skipping on resume."""

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

    def prune(self, name: str) -> Stage:
        return lambda model: prune_stage_(model, self.data, self.config.prune, name=name, ctx=self.ctx,
                                          seed=self.config.run.seed, progress=self.progress,
                                          placement=self.placement)

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

    def target_options(self, class_means: torch.Tensor | None, teacher: nn.Module | None = None) -> dict:
        """Keyword arguments of the fine-tuning after pruning: reuse, alignment, distillation, epoch scale."""
        prune = self.config.prune
        options: dict = {"freeze_classifier": prune.classifier_reuse, "teacher": teacher}
        if class_means is not None:
            options.update(alignment_weight=prune.alignment_weight, class_means=class_means)
        if prune.scale_epochs:
            reduction = self.store.record("prune").details["flops_reduction"]
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


def s_to_t(model: nn.Module, data: TransferData, config: TransferConfig | None = None
           ) -> tuple[nn.Module, RecipeResult]:
    """S->T: give ``model`` a classifier for the target classes and fine-tune it (``config.source``).

    With ``config.head_init="probe"`` (the default) the classifier is first fitted as a linear
    probe on the frozen features (stage ``probe``: the linear-probe reference), then the whole
    model is fine-tuned from there.

    Args:
        model: the source (pretrained) timm model; not modified.
        data: the target task.
        config: ``source`` (the fine-tuning) and ``run`` are used; ``None``: the defaults.

    Returns:
        The fine-tuned model and the metrics record (stage ``"source"``).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> source = timm.create_model("resnet18", pretrained=False)
        >>> model, result = s_to_t(source, data, TransferConfig(run=RunConfig(progress=False)))
        >>> classifier_of(model).out_features, [s.name for s in result.stages]
        (2, ['probe', 'source'])
    """
    config = config or TransferConfig()
    run = _Run("S->T", model, data, config)
    run.probe()
    run.stage("source", run.finetune("source", config.source))
    return run.finish()


def s_tp_t(model: nn.Module, data: TransferData, config: TransferConfig | None = None
           ) -> tuple[nn.Module, RecipeResult]:
    """S->TP->T: fine-tune (``source``), prune (``prune``), fine-tune again (``target``).

    With ``prune.classifier_reuse`` the classifier of the fine-tuned full model stays frozen
    during ``target``; with ``prune.alignment_weight`` > 0 the loss adds
    ``lambda * (1 - cos(f_i, c_{y_i}))`` with class means of the fine-tuned full model; with
    ``target.distill`` > 0 the pruned model also learns the fine-tuned full model's logits
    (knowledge distillation).

    Args:
        model: the source (pretrained) timm model; not modified.
        data: the target task.
        config: every stage's settings and the run options; ``None``: the defaults.

    Returns:
        The pruned, fine-tuned model and the metrics record (stages ``source``, ``prune``, ``target``).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> config = TransferConfig(prune=PruneConfig(flops_reduction=None, ratio=0.3), run=RunConfig(progress=False))
        >>> model, result = s_tp_t(timm.create_model("resnet18", pretrained=False), data, config)
        >>> result.final.macs < result.base_macs
        True
    """
    config = config or TransferConfig()
    _check_prune(config.prune, "S->TP->T")
    run = _Run("S->TP->T", model, data, config)
    run.probe()
    run.stage("source", run.finetune("source", config.source))
    means = run.class_means()  # run.model is the fine-tuned full model here, trained now or resumed
    teacher = run.teacher()
    run.stage("prune", run.prune("prune"))
    run.stage("target", run.target(config.target, **run.target_options(means, teacher)))
    return run.finish()


def sp_t(model: nn.Module, data: TransferData, config: TransferConfig | None = None
         ) -> tuple[nn.Module, RecipeResult]:
    """SP->T: prune the source model (with a fresh target classifier), then fine-tune (``target``).

    ``config.source`` is not used. ``target.epochs = 0`` evaluates the pruned model without
    any training (zero-shot pruning at the budget). Alignment uses class means of the
    unpruned source features.

    Args:
        model: the source (pretrained) timm model; not modified.
        data: the target task.
        config: ``prune``, ``target`` and ``run`` are used; ``None``: the defaults.

    Returns:
        The pruned, fine-tuned model and the metrics record (stages ``prune``, ``target``).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> config = TransferConfig(prune=PruneConfig(flops_reduction=None, ratio=0.3),
        ...                         target=FinetuneConfig(epochs=0), run=RunConfig(progress=False))
        >>> model, result = sp_t(timm.create_model("resnet18", pretrained=False), data, config)
        >>> [s.name for s in result.stages], result.final.steps
        (['probe', 'prune', 'target'], 0)
    """
    config = config or TransferConfig()
    _check_prune(config.prune, "SP->T")
    if config.target.distill > 0:
        raise InvalidArgumentError("SP->T has no fine-tuned model to distill from; set target.distill=0 "
                                   "(S->TP->T distills from its fine-tuned full model)")
    run = _Run("SP->T", model, data, config)
    run.probe()  # data-driven scorers then see a head that fits the target classes
    means = run.class_means()  # of the unpruned source, with the target's fresh classifier
    run.stage("prune", run.prune("prune"))
    run.stage("target", run.target(config.target, **run.target_options(means)))
    return run.finish()

