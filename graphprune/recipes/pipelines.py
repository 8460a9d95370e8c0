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

from torch import nn

from ..errors import InvalidArgumentError
from .config import FinetuneConfig, PruneConfig, RunConfig, TransferConfig  # noqa: F401  (docstring examples)
from .data import TransferData
from .finetune import classifier_of  # noqa: F401  (docstring examples)
from .records import RecipeResult
from .run import RecipeRun


def _check_prune(prune: PruneConfig, recipe: str) -> None:
    if recipe == "SP->T" and prune.classifier_reuse:
        raise InvalidArgumentError("SP->T has no fine-tuned classifier to reuse; set classifier_reuse=False")


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
    run = RecipeRun("S->T", model, data, config)
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
    run = RecipeRun("S->TP->T", model, data, config)
    run.probe()
    run.stage("source", run.finetune("source", config.source))
    means = run.class_means()  # run.model is the fine-tuned full model here, trained now or resumed
    teacher = run.teacher()
    run.prune_and_recover(config.target, means, teacher)
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
    run = RecipeRun("SP->T", model, data, config)
    run.probe()  # data-driven scorers then see a head that fits the target classes
    means = run.class_means()  # of the unpruned source, with the target's fresh classifier
    run.prune_and_recover(config.target, means)
    return run.finish()

