"""Fine-tuning and evaluation: the training loop every recipe stage uses.

One loop serves all stages: ``full`` or ``linear`` (classifier only, backbone frozen and in
eval mode), an optionally frozen classifier (classifier reuse), and an optional class-mean
alignment term ``lambda * (1 - cos(f_i, c_{y_i}))`` on the penultimate features ``f_i`` (timm's
``forward_head(forward_features(x), pre_logits=True)``). Under DDP the loss module is wrapped
in ``DistributedDataParallel``, so gradients are averaged however the loss is built.
``requires_grad`` and train/eval mode are restored on exit, even on error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..measurement import count_macs, count_params
from .config import FinetuneConfig
from .data import TransferData
from .distributed import DistContext, all_reduce_sum, eval_shard, sync_state_, train_shard
from .records import StageRecord


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier module (timm's ``get_classifier()``).

    Example:
        >>> import timm
        >>> classifier_of(timm.create_model("resnet18", pretrained=False, num_classes=3)).out_features
        3
    """
    getter = getattr(model, "get_classifier", None)
    if not callable(getter) or not isinstance(getter(), nn.Module):
        raise InvalidArgumentError(f"{type(model).__name__} has no timm get_classifier(); recipes need timm models")
    return getter()


def features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``(B, D)`` and logits ``(B, K)`` by the timm contract, in one pass.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> f, logits = features_and_logits(model, x)
        >>> tuple(f.shape), torch.allclose(logits, model(x), atol=1e-5)
        ((2, 512), True)
    """
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    return features, classifier_of(model)(features)


class _Objective(nn.Module):
    """``CE(logits, y) [+ weight * mean(1 - cos(f, c_y))]``; a module so DDP can wrap it."""

    def __init__(self, model: nn.Module, class_means: torch.Tensor | None, weight: float) -> None:
        super().__init__()
        self.model = model
        self.weight = weight
        self.class_means = class_means

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.class_means is None or self.weight == 0:
            return F.cross_entropy(self.model(images), targets)
        features, logits = features_and_logits(self.model, images)
        centers = self.class_means.to(features)[targets]  # (B, D): each sample's class mean
        alignment = (1.0 - F.cosine_similarity(features, centers, dim=1)).mean()
        return F.cross_entropy(logits, targets) + self.weight * alignment


@contextmanager
def _trainable(model: nn.Module, mode: str, freeze_classifier: bool) -> Iterator[list[nn.Parameter]]:
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


def _optimizer(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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


def evaluate(model: nn.Module, loader, ctx: DistContext = DistContext()) -> float:
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
                correct += int((model(images).argmax(dim=1) == targets).sum())
                total += int(targets.numel())
    finally:
        for m, training in modes:
            m.training = training
    correct, total = all_reduce_sum([correct, total], ctx)
    if total == 0:
        raise InvalidArgumentError("the evaluation data yielded no samples")
    return correct / total


def measure_record(model: nn.Module, data: TransferData, name: str, kind: str, seconds: float, *,
                   ctx: DistContext = DistContext(), **fields) -> StageRecord:
    """Evaluate and measure ``model`` into a :class:`StageRecord`.

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])), batch_size=4)
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> measure_record(model, TransferData(loader, loader, ("a", "b")), "s", "finetune", 0.0).macs > 0
        True
    """
    accuracy = evaluate(model, data.val, ctx)
    example = data.example_inputs()
    return StageRecord(name=name, kind=kind, val_accuracy=accuracy, macs=int(count_macs(model, example)),
                       params=int(count_params(model)), seconds=seconds, **fields)


def finetune_(model: nn.Module, data: TransferData, config: FinetuneConfig, *, name: str = "finetune",
              freeze_classifier: bool = False, class_means: torch.Tensor | None = None,
              alignment_weight: float = 0.0, epoch_scale: float = 1.0, ctx: DistContext = DistContext(),
              seed: int = 0, progress: bool = True) -> StageRecord:
    """Fine-tune ``model`` in place on ``data.train``; evaluate on ``data.val``.

    Args:
        model: a timm classifier.
        data: the target task.
        config: epochs, mode (``full`` / ``linear``), optimizer and learning rate.
        name: the stage name in the returned record (and the progress bar).
        freeze_classifier: keep the classifier's weights fixed (classifier reuse).
        class_means: Tensor[num_classes, feat_dim] for the alignment loss.
        alignment_weight: lambda of ``1 - cos(f_i, c_{y_i})``; 0 is plain cross entropy.
        epoch_scale: multiplies ``config.epochs`` (e.g. ``1 / (1 - flops_reduction)``).
        ctx: the data-parallel context (see :mod:`graphprune.recipes.distributed`).
        seed: seeds the data order of this stage.
        progress: show a tqdm bar (rank 0).

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
    start = time.perf_counter()
    loader = train_shard(data.train, ctx, seed)
    steps = stage_steps(config, len(loader), epoch_scale)
    losses: list[float] = []
    if steps > 0:
        torch.manual_seed(seed)
        with _trainable(model, config.mode, freeze_classifier) as params:
            objective: nn.Module = _Objective(model, class_means, alignment_weight)
            if ctx.enabled:
                objective = nn.parallel.DistributedDataParallel(objective)
            optimizer = _optimizer(params, config)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            with tqdm(total=steps, desc=name, disable=not (progress and ctx.is_main), leave=False) as bar:
                epoch = 0
                while len(losses) < steps:
                    if hasattr(loader.sampler, "set_epoch"):
                        loader.sampler.set_epoch(epoch)
                    for index, (images, targets) in enumerate(loader):
                        if len(losses) >= steps or (config.max_batches_per_epoch is not None
                                                    and index >= config.max_batches_per_epoch):
                            break
                        loss = objective(images, targets)
                        if not torch.isfinite(loss):
                            raise InvalidArgumentError(f"stage {name!r}: the training loss is {loss.item()} at "
                                                       f"step {len(losses)}; lower the learning rate")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        schedule.step()
                        losses.append(float(loss.detach()))
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    epoch += 1
        for p in model.parameters():
            p.grad = None
        sync_state_(model, ctx)
    mean_loss = None
    if losses:
        total, count = all_reduce_sum([sum(losses), len(losses)], ctx)
        mean_loss = total / count
    per_epoch = stage_steps(FinetuneConfig(epochs=1.0, max_batches_per_epoch=config.max_batches_per_epoch),
                            len(loader))
    return measure_record(model, data, name, "finetune", time.perf_counter() - start, ctx=ctx, steps=steps,
                          epochs=steps / per_epoch if per_epoch else 0.0, train_loss=mean_loss,
                          details={"mode": config.mode, "freeze_classifier": freeze_classifier,
                                   "alignment_weight": alignment_weight, "epoch_scale": epoch_scale})
