"""Fine-tuning and evaluation: the training loop every recipe stage uses.

One loop serves all stages: ``full`` or ``linear`` (classifier only, backbone frozen and in
eval mode), an optionally frozen classifier (classifier reuse), an optional class-mean
alignment term ``lambda * (1 - cos(f_i, c_{y_i}))`` on the penultimate features ``f_i`` (timm's
``forward_head(forward_features(x), pre_logits=True)``) and optional distillation from a
teacher's logits (the loss: :class:`~graphprune.recipes.objective.Objective`). Under DDP the loss module is wrapped
in ``DistributedDataParallel``, so gradients are averaged however the loss is built.
``requires_grad`` and train/eval mode are restored on exit, even on error.

The parts are timm's and torch's own: parameter groups from ``timm.optim``
(``param_groups_weight_decay`` / ``param_groups_layer_decay``: no decay on biases and norms,
optional layer-wise decay) with the classifier's groups at ``head_lr_scale`` times the rate,
the optimizer from ``timm.optim.create_optimizer_v2``, warmup + cosine from
``timm.scheduler.CosineLRScheduler`` (stepped per update; it applies each group's
``lr_scale``), ``F.cross_entropy(label_smoothing=...)``, the weight average from
``timm.utils.ModelEmaV3``, and bf16 autocast / ``channels_last`` from :mod:`.device`.
Every stage reseeds torch, Python's ``random`` (timm's random-resized-crop draws from it),
NumPy and the loader's shuffle generator from its seed, so a stage is a function of its inputs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import timm.optim
import timm.scheduler
import timm.utils
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..measurement import count_macs, count_params
from .config import FinetuneConfig
from .data import TransferData
from .device import Placement
from .distributed import DistContext, all_reduce_sum, eval_shard, sync_state_, train_shard
from .objective import Objective, classifier_of, features_and_logits, teaching  # noqa: F401  (re-exported)
from .records import StageRecord


@contextmanager
def _trainable(model: nn.Module, mode: str, freeze_classifier: bool, norm_stats: str = "train"
               ) -> Iterator[list[nn.Parameter]]:
    """Set which weights train and the train/eval mode for a stage; restore both on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    classifier = classifier_of(model)
    head = {id(p) for p in classifier.parameters()}
    try:
        for p in model.parameters():
            trains = (id(p) in head) if mode == "linear" else True
            if freeze_classifier and id(p) in head:
                trains = False
            p.requires_grad_(trains)
        if mode == "linear":
            model.eval()  # backbone statistics stay the source's
            classifier.train()
        else:
            model.train()
            if norm_stats == "frozen":  # normalize with the running statistics; affine weights still train
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise InvalidArgumentError("nothing to train: mode='linear' with a frozen (reused) classifier; "
                                       "use mode='full' or classifier_reuse=False")
        yield trainable
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def seed_everything(seed: int, loader=None) -> None:
    """Seed torch, Python's ``random``, NumPy and (if it has one) ``loader``'s shuffle generator.

    Example:
        >>> seed_everything(3); a = torch.rand(1); seed_everything(3); bool(torch.rand(1) == a)
        True
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """timm's optimizer over ``model``'s trainable weights, the classifier at ``head_lr_scale``.

    In ``mode="linear"`` only the classifier trains and ``lr`` is its rate (no scale).

    Groups come from ``timm.optim.param_groups_weight_decay`` (or ``param_groups_layer_decay``
    with ``config.layer_decay``); each is split into classifier / backbone parts, and the
    classifier's part gets ``lr_scale`` multiplied by ``config.head_lr_scale``. timm's
    schedulers (and :func:`build_schedule`) apply ``lr_scale``.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=3)
        >>> optimizer = build_optimizer(model, FinetuneConfig(lr=1e-3, head_lr_scale=10))
        >>> sorted({g["lr_scale"] for g in optimizer.param_groups})
        [1.0, 10.0]
    """
    head = {id(p) for p in classifier_of(model).parameters()}
    head_scale = config.head_lr_scale if config.mode == "full" else 1.0  # linear: lr is the head's own rate
    if config.layer_decay is not None:
        groups = timm.optim.param_groups_layer_decay(model, weight_decay=config.weight_decay,
                                                     layer_decay=config.layer_decay)
    else:
        groups = timm.optim.param_groups_weight_decay(model, weight_decay=config.weight_decay)
    split: list[dict] = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        base = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        scale = base.pop("lr_scale", 1.0)
        for is_head in (False, True):
            mine = [p for p in params if (id(p) in head) == is_head]
            if mine:
                split.append({**base, "params": mine, "lr_scale": scale * (head_scale if is_head else 1.0)})
    if not split:
        raise InvalidArgumentError("nothing to train: every parameter has requires_grad=False")
    kwargs = {"momentum": 0.9} if config.optimizer.lower() in ("sgd", "momentum", "nesterov") else {}
    optimizer = timm.optim.create_optimizer_v2(split, opt=config.optimizer.lower(), lr=config.lr,
                                               weight_decay=config.weight_decay, **kwargs)
    return optimizer  # group "lr" is the unscaled rate: the scheduler sets lr = value * lr_scale


def build_schedule(optimizer: torch.optim.Optimizer, config: FinetuneConfig, steps: int
                   ) -> timm.scheduler.CosineLRScheduler:
    """Linear warmup over ``warmup_fraction`` of ``steps`` (from 1 % of the rate), then cosine to 0.

    Call ``schedule.step_update(num_updates=k)`` after the k-th optimizer step.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        >>> schedule = build_schedule(optimizer, FinetuneConfig(lr=1.0, warmup_fraction=0.5), steps=4)
        >>> [round(optimizer.param_groups[0]["lr"], 3)] + [
        ...     (schedule.step_update(k), round(optimizer.param_groups[0]["lr"], 3))[1] for k in (1, 2, 3)]
        [0.01, 0.505, 1.0, 0.5]
    """
    warmup = int(round(config.warmup_fraction * steps))
    return timm.scheduler.CosineLRScheduler(optimizer, t_initial=max(steps - warmup, 1), lr_min=0.0, warmup_t=warmup,
                                            warmup_lr_init=config.lr * 0.01, warmup_prefix=True,
                                            t_in_epochs=False)


def stage_steps(config: FinetuneConfig, batches_per_epoch: int, scale: float = 1.0) -> int:
    """Optimizer steps of a stage: ``round(epochs * scale * batches per epoch)``.

    Example:
        >>> stage_steps(FinetuneConfig(epochs=1.0), batches_per_epoch=10, scale=1 / (1 - 0.3))
        14
    """
    per_epoch = batches_per_epoch
    if config.max_batches_per_epoch is not None:
        per_epoch = min(per_epoch, config.max_batches_per_epoch)
    return int(round(config.epochs * scale * per_epoch))


def evaluate(model: nn.Module, loader, ctx: DistContext = DistContext(), placement: Placement | None = None
             ) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no grad) over ``loader``; summed over DDP ranks.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> evaluate(net, [(torch.eye(2), torch.tensor([0, 1]))]) in (0.0, 0.5, 1.0)
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    correct = total = 0
    try:
        model.eval()
        with torch.no_grad():
            for images, targets in (eval_shard(loader, ctx) if hasattr(loader, "dataset") else loader):
                with (placement or Placement()).autocast():
                    logits = model(images)
                correct += int((logits.argmax(dim=1) == targets).sum())
                total += int(targets.numel())
    finally:
        for m, training in modes:
            m.training = training
    correct, total = all_reduce_sum([correct, total], ctx)
    if total == 0:
        raise InvalidArgumentError("the evaluation data yielded no samples")
    return correct / total


def measure_record(model: nn.Module, data: TransferData, name: str, kind: str, seconds: float, *,
                   ctx: DistContext = DistContext(), placement: Placement | None = None, **fields) -> StageRecord:
    """Evaluate and measure ``model`` into a :class:`StageRecord`.

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])), batch_size=4)
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> measure_record(model, TransferData(loader, loader, ("a", "b")), "s", "finetune", 0.0).macs > 0
        True
    """
    accuracy = evaluate(model, data.val, ctx, placement)
    example = data.example_inputs()
    return StageRecord(name=name, kind=kind, val_accuracy=accuracy, macs=int(count_macs(model, example)),
                       params=int(count_params(model)), seconds=seconds, **fields)


def _train_steps(model: nn.Module, objective: nn.Module, loader, steps: int, optimizer: torch.optim.Optimizer,
                 schedule, ema, placement: Placement, config: FinetuneConfig, name: str, bar) -> list[float]:
    """``steps`` optimizer steps over ``loader``'s epochs (at most ``config.max_batches_per_epoch`` batches
    each); the losses, one per step. A loss that is not finite stops the stage with an error."""
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for index, (images, targets) in enumerate(loader):
            if len(losses) >= steps or (config.max_batches_per_epoch is not None
                                        and index >= config.max_batches_per_epoch):
                break
            with placement.autocast():
                loss = objective(images, targets)
            if not torch.isfinite(loss):
                raise InvalidArgumentError(f"stage {name!r}: the training loss is {loss.item()} at "
                                           f"step {len(losses)}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            schedule.step_update(num_updates=len(losses))
            if ema is not None:
                ema.update(model, step=len(losses))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        epoch += 1
    return losses


def finetune_(model: nn.Module, data: TransferData, config: FinetuneConfig, *, name: str = "finetune",
              freeze_classifier: bool = False, class_means: torch.Tensor | None = None,
              alignment_weight: float = 0.0, epoch_scale: float = 1.0, ctx: DistContext = DistContext(),
              seed: int = 0, progress: bool = True, placement: Placement | None = None,
              teacher: nn.Module | None = None) -> StageRecord:
    """Fine-tune ``model`` in place on ``data.train``; evaluate on ``data.val``.

    Args:
        model: a timm classifier.
        data: the target task (batches already on ``placement``'s device, e.g. through
            :class:`~graphprune.recipes.device.DeviceLoader`).
        config: epochs, mode (``full`` / ``linear``), optimizer, rates, schedule, smoothing, EMA.
        name: the stage name in the returned record (and the progress bar).
        freeze_classifier: keep the classifier's weights fixed (classifier reuse).
        class_means: Tensor[num_classes, feat_dim] for the alignment loss.
        alignment_weight: lambda of ``1 - cos(f_i, c_{y_i})``; 0 is plain cross entropy.
        epoch_scale: multiplies ``config.epochs`` (e.g. ``1 / (1 - flops_reduction)``).
        ctx: the data-parallel context (see :mod:`graphprune.recipes.distributed`).
        seed: seeds torch, ``random``, NumPy and the data order of this stage.
        progress: show a tqdm bar (rank 0).
        placement: device, bf16 autocast and memory layout; ``None``: the model's device, fp32.
        teacher: the model distilled from when ``config.distill > 0`` (same classes; it is
            only run forward, in eval mode).

    Returns:
        The stage's record: validation accuracy, MACs, parameters, steps, mean training loss.

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> finetune_(model, data, FinetuneConfig(epochs=1, mode="linear"), progress=False).steps
        2
    """
    if alignment_weight > 0 and class_means is None:
        raise InvalidArgumentError("alignment_weight > 0 needs class_means")
    if config.distill > 0 and teacher is None:
        raise InvalidArgumentError("FinetuneConfig.distill > 0 needs a teacher model")
    placement = placement or Placement(device=next(model.parameters()).device)
    start = time.perf_counter()
    loader = train_shard(data.train, ctx, seed)
    steps = stage_steps(config, len(loader), epoch_scale)
    losses: list[float] = []
    if steps > 0:
        seed_everything(seed, loader)
        placement.model_(model)
        with _trainable(model, config.mode, freeze_classifier, config.norm_stats), teaching(teacher, placement):
            objective: nn.Module = Objective(model, class_means, alignment_weight, config.label_smoothing,
                                              teacher, config.distill, config.distill_temperature)
            if ctx.enabled:
                ids = [placement.device.index] if placement.device.type == "cuda" else None
                objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
            optimizer = build_optimizer(model, config)
            schedule = build_schedule(optimizer, config, steps)
            ema = timm.utils.ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay is not None else None
            with tqdm(total=steps, desc=name, disable=not (progress and ctx.is_main), leave=False) as bar:
                losses = _train_steps(model, objective, loader, steps, optimizer, schedule, ema, placement, config,
                                      name, bar)
            if ema is not None:  # the stage ends with the averaged weights (and their BN statistics)
                with torch.no_grad():
                    for mine, averaged in zip(model.state_dict().values(), ema.module.state_dict().values()):
                        mine.copy_(averaged)
        for p in model.parameters():
            p.grad = None
        sync_state_(model, ctx)
    mean_loss = None
    if losses:
        total, count = all_reduce_sum([sum(losses), len(losses)], ctx)
        mean_loss = total / count
    per_epoch = stage_steps(FinetuneConfig(epochs=1.0, max_batches_per_epoch=config.max_batches_per_epoch),
                            len(loader))
    return measure_record(model, data, name, "finetune", time.perf_counter() - start, ctx=ctx, placement=placement,
                          steps=steps, epochs=steps / per_epoch if per_epoch else 0.0, train_loss=mean_loss,
                          details={"mode": config.mode, "norm_stats": config.norm_stats,
                                   "freeze_classifier": freeze_classifier,
                                   "alignment_weight": alignment_weight, "epoch_scale": epoch_scale,
                                   "distill": config.distill if teacher is not None else 0.0,
                                   **placement.to_dict()})
