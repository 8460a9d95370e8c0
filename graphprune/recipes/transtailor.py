"""TransTailor search (Liu et al., AAAI 2021): prune step by step, where the target data says.

From the fine-tuned full model, repeat:

1. score every channel with ``target_taylor`` (channel scales ``alpha`` trained on the target
   data with the weights frozen; importance ``|dL/dalpha * alpha|``);
2. remove ``step_flops_reduction`` of the current model's MACs (global ranking by default:
   the scores are in units of loss, so they compare across layers);
3. importance-aware fine-tuning: each kept channel's output is multiplied by ``beta``, frozen,
   while the weights train; then ``beta`` is folded into the weights (:mod:`.importance`),
   leaving an ordinary model.

``beta`` is the trained ``alpha`` itself, on the layers where it was trained: the scale the
target loss chose for the channel. The paper's wording ("normalized importance") also reads
as ``score / mean score``; on real EfficientNet-Lite0 that spans 0.02-50 within a layer and
sent the first 10 % step to chance accuracy (0.05 on Flowers-17) before any training, so
this package multiplies by the scale and uses the scores only to rank. With
``alpha_epochs=0`` the alphas stay 1 and the fine-tuning is plain.

The search stops when validation accuracy falls more than ``tau`` below the best seen (the
full model included) or after ``max_steps``, and returns the pruned step with the best
validation accuracy. Only the validation split is read for these decisions.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..api import prune_
from ..history import plan_texts, record_plan
from ..groups import Groups, classifier_names
from ..plan import Plan
from ..selection import PlanConfig
from ..removal import apply_plan_
from ..scoring.target_taylor import fit_channel_scales
from .config import FinetuneConfig, RunConfig, TransTailorConfig  # noqa: F401  (docstring examples)
from .data import TransferData
from .distributed import on_main
from .finetune import evaluate, finetune_
from .importance import applied_factors, fold_factors_, importance_factors, slice_factors
from .run import RecipeRun
from .stages import recalibrate_after_removal_, removal_reference
from .records import RecipeResult, StageRecord


def _prune_step_on_main(model: nn.Module, data: TransferData, config: TransTailorConfig,
                        progress: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """Score, prune (in place) and return the plan JSON and the pruned model's factors (trained alphas)."""
    example = data.example_inputs()
    seen: dict = {}

    def scorer(groups: Groups, scored: nn.Module) -> dict[int, torch.Tensor]:
        fitted = fit_channel_scales(groups, scored, data=data.train, epochs=config.alpha_epochs,
                                    lr=config.alpha_lr, max_batches=config.scoring_batches, progress=progress)
        seen["factors"] = importance_factors(groups, scored, fitted.alphas)
        return fitted.scores

    prune_(model, example, flops_reduction=config.step_flops_reduction, scorer=scorer,
           ignore=classifier_names(model),
           config=PlanConfig(scope=config.scope, normalize="none", max_group_ratio=config.max_group_ratio))
    plan_json = plan_texts(model)[-1]
    return plan_json, slice_factors(seen["factors"], Plan.from_json(plan_json))


def transtailor(model: nn.Module, data: TransferData, config: TransTailorConfig | None = None
                ) -> tuple[nn.Module, RecipeResult]:
    """Run the TransTailor search and return the best pruned sub-model (``beta`` folded in).

    Args:
        model: the source (pretrained) timm model; not modified.
        data: the target task; ``val`` drives the stopping rule and the selection.
        config: the search settings (see :class:`TransTailorConfig`); ``None``: the defaults.

    Returns:
        The selected sub-model and the metrics record: stage ``source``, then ``step-1``,
        ``step-2``, ...; ``config["selected_stage"]`` names the step returned, and each step's
        ``details`` hold its measured FLOPs reduction relative to the full model and
        ``val_accuracy_before_finetune`` (pruned, ``beta`` applied, not yet trained).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> config = TransTailorConfig(max_steps=1, source=FinetuneConfig(epochs=0),
        ...                            finetune=FinetuneConfig(epochs=0.5), run=RunConfig(progress=False))
        >>> small, result = transtailor(timm.create_model("resnet18", pretrained=False), data, config)
        >>> result.final.name, result.flops_reduction > 0.05
        ('step-1', True)
    """
    config = config or TransTailorConfig()
    run = RecipeRun("TransTailor", model, data, config)  # type: ignore[arg-type]
    run.probe()
    run.stage("source", run.finetune("source", config.source))
    best_accuracy = run.store.record("source").val_accuracy
    # with finetune.distill > 0 every step learns the fine-tuned full model's logits
    teacher = copy.deepcopy(run.model).eval() if config.finetune.distill > 0 else None
    best: tuple[str, float, nn.Module | None] | None = None
    base_macs = run.store.base_macs
    for step in range(1, config.max_steps + 1):
        name = f"step-{step}"
        if run.store.done(name):
            run.model = run.load(name)
            record = run.store.record(name)
        else:
            record = _search_step(run, name, step, config, base_macs, teacher)
        accuracy = record.val_accuracy
        if best is None or accuracy > best[1]:
            best = (name, accuracy, None if run.store.directory else copy.deepcopy(run.model))
        best_accuracy = max(best_accuracy, accuracy)
        if accuracy < best_accuracy - config.tau:
            break
    run.store.select(best[0])
    chosen = best[2] if best[2] is not None else run.load(best[0])
    return chosen, run.store.result()


def _search_step(run: RecipeRun, name: str, step: int, config: TransTailorConfig, base_macs: int,
                 teacher: nn.Module | None) -> StageRecord:
    start = time.perf_counter()
    ctx = run.ctx
    reference = removal_reference(run.model, config.recalibration, config.recalibrate_batches)
    plan_json, factors = on_main(ctx, lambda: _prune_step_on_main(run.model, run.data, config, run.progress))
    plan = Plan.from_json(plan_json)
    if not ctx.is_main:
        apply_plan_(run.model, plan)
        record_plan(run.model, plan)
    run.placement.model_(run.model)
    recalibrate_after_removal_(run.model, run.data, config.recalibrate_batches, run.placement,
                               reference=reference, plan=plan)
    del reference
    with applied_factors(run.model, factors):  # frozen beta: plain tensors, never in the optimizer
        pruned_accuracy = evaluate(run.model, run.data.val, ctx, run.placement)
        record = finetune_(run.model, run.data, config.finetune, name=name, ctx=ctx, seed=run.config.run.seed + step,
                           progress=run.progress, placement=run.placement, teacher=teacher)
    fold_factors_(run.model, factors)
    details = {**record.details, "val_accuracy_before_finetune": pruned_accuracy,
               "flops_reduction": 1.0 - record.macs / base_macs if base_macs else 0.0,
               "step_flops_reduction": config.step_flops_reduction}
    record = StageRecord(**{**record.__dict__, "kind": "search-step", "seconds": time.perf_counter() - start,
                            "details": details})
    run.store.finish(run.model, record)
    return record
