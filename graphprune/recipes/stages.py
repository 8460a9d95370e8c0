"""The pruning stage of a recipe, and the class means the alignment loss needs.

Channel pruning decisions are made once, on rank 0, and shipped as the plan JSON the engine
already records on the model (``model.graphprune_plans``); the other ranks apply that plan to
their identical copies. Kernel and unstructured masks (``PruneConfig.granularity``,
:mod:`.sparse`) depend only on the weights and the seed, so every rank computes its own. The
classifier (``classifier_names``) is always ignored: it keeps every input column, so the
penultimate features keep their width, the full model's classifier can be reused as is, and its
class means live in the same space as the pruned model's features.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from ..api import prune_
from ..history import plan_texts, record_plan
from ..latency.config import LatencyConfig
from ..groups import classifier_names
from ..plan import Plan
from ..removal import apply_plan_
from ..scoring import scorer_spec
from ..scoring.classmean import class_means
from .config import PruneConfig
from .data import TransferData
from .device import DeviceLoader, Placement, unwrap
from .norms import kept_channels, recalibrate_norms_, shift_norms_
from .distributed import DistContext, on_main
from .finetune import measure_record
from .records import StageRecord
from .sparse import sparse_prune_



def scorer_options(config: PruneConfig, data: Iterable, *, seed: int, progress: bool) -> dict:
    """The keyword arguments the recipe gives ``config.scorer``: the config's own plus data / seed.

    Example:
        >>> scorer_options(PruneConfig(scorer="random"), [], seed=3, progress=False)
        {'seed': 3}
    """
    options = dict(config.scorer_options)
    if scorer_spec(config.scorer).needs_data:  # the recipe passes them the training loader
        options.update(data=data, progress=progress)
        if config.scoring_batches is not None:
            options.setdefault("max_batches", config.scoring_batches)
    if scorer_spec(config.scorer).seeded:  # the run's seed unless the config sets one
        options.setdefault("seed", seed)
    return options


def _prune_on_main(model: nn.Module, data: TransferData, config: PruneConfig, seed: int, progress: bool) -> str:
    example = data.example_inputs()
    latency = LatencyConfig(batch_size=config.latency_batch_size) if config.latency_reduction is not None else None
    prune_(model, example, **config.budget(), scorer=config.scorer,
           scorer_options=scorer_options(config, data.train, seed=seed, progress=progress),
           ignore=classifier_names(model), config=config.plan_config(), latency_config=latency)
    return plan_texts(model)[-1]


def prune_stage_(model: nn.Module, data: TransferData, config: PruneConfig, *, name: str = "prune",
                 ctx: DistContext = DistContext(), seed: int = 0, progress: bool = True,
                 placement: Placement | None = None) -> StageRecord:
    """Prune ``model`` in place (identically on every rank) and measure it.

    Args:
        model: the model to prune.
        data: the target task; data-driven scorers read ``data.train``.
        config: scorer, budget, scope, granularity.
        name: the stage name in the record.
        ctx: the data-parallel context.
        seed: seed of seeded scorers.
        progress: show the scorers' progress bars (rank 0).
        placement: the run's device and layout; the pruned model is put back on it.

    Returns:
        The stage's record; ``details`` holds the scorer and the measured FLOPs reduction.

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])), batch_size=4)
        >>> data = TransferData(loader, loader, ("a", "b"))
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> record = prune_stage_(model, data, PruneConfig(flops_reduction=None, ratio=0.5), progress=False)
        >>> round(record.details["flops_reduction"], 2)  # half of every block-internal width (residual_scale=0)
        0.46
    """
    from ..measurement import count_macs

    start = time.perf_counter()
    example = data.example_inputs()
    before = count_macs(model, example)
    reference = removal_reference(model, config.recalibration, config.recalibrate_batches)
    sparse_details, plan = None, None
    if config.granularity != "channel":
        # masks chosen from the weights and the seed alone: identical on every rank, nothing to ship
        sparse_details = sparse_prune_(model, example, config, seed=seed)
    else:
        plan = Plan.from_json(on_main(ctx, lambda: _prune_on_main(model, data, config, seed, progress and ctx.is_main)))
        if not ctx.is_main:
            apply_plan_(model, plan)
            record_plan(model, plan)
    if placement is not None:
        placement.model_(model)  # new (sliced) weights take the run's memory layout again
    recalibrated = recalibrate_after_removal_(model, data, config.recalibrate_batches, placement,
                                              reference=reference, plan=plan)
    del reference
    seconds = time.perf_counter() - start
    record = measure_record(model, data, name, "prune", seconds, ctx=ctx, placement=placement)
    details = {"scorer": config.scorer, "scope": config.scope, "ratio": config.ratio,
               "target_flops_reduction": config.flops_reduction,
               "flops_reduction": 1.0 - record.macs / before if before else 0.0,
               "recalibrated_norms": recalibrated, "recalibration": config.recalibration}
    if config.latency_reduction is not None:  # predicted vs measured (rank 0 measured; the others applied its plan)
        details.update(target_latency_reduction=config.latency_reduction,
                       latency=getattr(model, "graphprune_latency", None))
    if sparse_details is not None:  # flops_reduction: of the effective (nonzero-weight) MACs
        details = {**details, **sparse_details}
    return StageRecord(**{**record.__dict__, "details": details})


def removal_reference(model: nn.Module, recalibration: str, batches: int | None) -> nn.Module | None:
    """A copy of ``model`` before a removal, when the statistics will be shifted against it
    (``recalibration="shift"`` and ``batches != 0``), else ``None``.

    Example:
        >>> removal_reference(nn.Linear(2, 2), "reset", 16) is None
        True
    """
    return copy.deepcopy(model) if recalibration == "shift" and batches != 0 else None


def recalibrate_after_removal_(model: nn.Module, data: TransferData, batches: int | None,
                               placement: Placement | None = None, *, reference: nn.Module | None = None,
                               plan: Plan | None = None) -> int:
    """Correct BatchNorm statistics after a removal, on ``batches`` unaugmented training batches.

    With ``reference`` (the model before the removal) the statistics are shifted by what the
    removal changed (:func:`~graphprune.recipes.norms.shift_norms_`; ``plan`` names the kept
    channels of narrowed layers); without it they are reset and re-estimated
    (:func:`~graphprune.recipes.norms.recalibrate_norms_`). Every rank reads the same
    (unsharded) batches, so ranks stay identical. Returns the number of BatchNorm layers
    changed (0 when ``batches == 0``).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])), batch_size=4)
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> recalibrate_after_removal_(model, TransferData(loader, loader, ("a", "b")), 1)
        20
        >>> recalibrate_after_removal_(model, TransferData(loader, loader, ("a", "b")), 1, reference=model)
        0
    """
    if batches == 0:
        return 0
    loader = mixed_batches(data.unaugmented_train) if batches is not None else data.unaugmented_train
    if reference is not None:
        return shift_norms_(model, reference, loader, max_batches=batches, placement=placement,
                            kept=kept_channels(plan) if plan is not None else None)
    return recalibrate_norms_(model, loader, max_batches=batches, placement=placement)


def mixed_batches(loader, seed: int = 0):
    """``loader``'s images in a seeded random order when it reads them in order, else ``loader``.

    An evaluation loader reads an ImageFolder class by class, so its first batches hold a few
    classes only (16 batches of 32: 20 of CUB-100's classes); statistics corrected on a
    capped number of batches should see the whole task. Same seed, same order on every rank.
    (Lite0 -> Flowers-17, seed 0, val right after a -30 % prune and the shift: ``target_taylor``
    0.806 on 16 mixed batches vs 0.788 on the first 16 and 0.776 on all, in order;
    ``classmean`` 0.800 vs 0.753 / 0.765.)

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ordered = DataLoader(TensorDataset(torch.arange(8.0), torch.arange(8) // 4), batch_size=4)
        >>> [labels.tolist() for _, labels in ordered]
        [[0, 0, 0, 0], [1, 1, 1, 1]]
        >>> [labels.tolist() for _, labels in mixed_batches(ordered)]
        [[1, 0, 1, 0], [0, 1, 0, 1]]
    """
    inner = unwrap(loader)
    ordered = isinstance(inner, DataLoader) and isinstance(inner.sampler, SequentialSampler)
    if not ordered or inner.batch_size is None:
        return loader
    mixed = DataLoader(inner.dataset, batch_size=inner.batch_size, collate_fn=inner.collate_fn,
                       num_workers=inner.num_workers, drop_last=inner.drop_last,
                       sampler=RandomSampler(inner.dataset, generator=torch.Generator().manual_seed(seed)))
    return DeviceLoader(mixed, loader.placement) if isinstance(loader, DeviceLoader) else mixed


def full_model_class_means(model: nn.Module, data: TransferData, *, ctx: DistContext = DistContext(),
                           progress: bool = True) -> torch.Tensor:
    """Class means ``c_k`` of the penultimate features of ``model`` on the training data (same on every rank).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])), batch_size=4)
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> full_model_class_means(model, TransferData(loader, loader, ("a", "b")), progress=False).shape
        torch.Size([2, 512])
    """
    return on_main(ctx, lambda: class_means(model, data.unaugmented_train, data.num_classes,
                                            progress=progress and ctx.is_main))
