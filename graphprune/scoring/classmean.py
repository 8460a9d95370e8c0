"""Class-mean regularized Taylor importance, and the class means it aligns features with.

The objective is ``CE(logits_i, y_i) + lambda * (1 - cos(f_i, c_{y_i}))``: ``f_i`` is the
penultimate feature of sample ``i`` and ``c_k`` the mean penultimate feature of class ``k``
under a reference model (by default the model itself, i.e. the fine-tuned full model) on
the training data. Channels that keep the features clustered around their class means
score high. The importance is first-order Taylor ``|w * dL/dw|`` of that objective, summed
over every member slice like :mod:`graphprune.scoring.taylor`.

Penultimate features come from timm's contract,
``model.forward_head(model.forward_features(x), pre_logits=True)``; other models pass
``feature_fn(model, inputs) -> (features (B, D), logits (B, K))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..groups import Groups
from .data import Batch, LossFn, ScoringData, left_as_found
from .registry import Scores, register_scorer
from .taylor import taylor_scores

FeatureFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]


def timm_features(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits through timm's ``forward_features`` / ``forward_head``.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
        >>> features, logits = timm_features(model, (torch.randn(2, 3, 32, 32),))
        >>> tuple(features.shape), tuple(logits.shape)
        ((2, 512), (2, 5))
    """
    trunk = model.forward_features(*inputs)
    return model.forward_head(trunk, pre_logits=True), model.forward_head(trunk)


def _feature_fn(model: nn.Module, feature_fn: FeatureFn | None, scorer: str) -> FeatureFn:
    if feature_fn is not None:
        if not callable(feature_fn):
            raise InvalidArgumentError(f"{scorer}: feature_fn must be callable(model, inputs) -> (features, logits)")
        return feature_fn
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise InvalidArgumentError(
            f"{scorer}: {type(model).__name__} has no timm forward_features/forward_head(pre_logits=True), so its "
            "penultimate features are unknown; pass feature_fn=lambda model, inputs: (features, logits)")
    return timm_features


def _checked(scorer: str, out: object, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise InvalidArgumentError(f"{scorer}: feature_fn must return (features, logits) tensors")
    features, logits = out
    n = batch.targets.shape[0]
    if features.dim() != 2 or features.shape[0] != n or logits.dim() != 2 or logits.shape[0] != n:
        raise InvalidArgumentError(f"{scorer}: expected features (B, D) and logits (B, K) for "
                                   f"B = {n} targets, got {tuple(features.shape)} and {tuple(logits.shape)}")
    if batch.targets.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or batch.targets.dim() != 1:
        raise InvalidArgumentError(f"{scorer}: targets must be class indices of shape (B,), got "
                                   f"{batch.targets.dtype} {tuple(batch.targets.shape)}")
    return features, logits


def class_means(model: nn.Module, data: Iterable, num_classes: int | None = None, *,
                feature_fn: FeatureFn | None = None, max_batches: int | None = None, progress: bool = True,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Mean penultimate feature of every class, computed by ``model`` (eval mode) on ``data``.

    Args:
        model: the reference model (left exactly as found).
        data: re-iterable of ``(inputs, targets)`` batches with class-index targets.
        num_classes: rows of the result; ``None`` takes the width of the model's logits.
        feature_fn: ``feature_fn(model, inputs) -> (features, logits)``; ``None`` uses timm's
            ``forward_features`` / ``forward_head(pre_logits=True)``.
        max_batches: read at most this many batches.
        progress: show a tqdm progress bar.
        device: run there; ``None`` keeps the model's device.

    Returns:
        float32 Tensor[num_classes, feat_dim] on the CPU.

    Raises:
        InvalidArgumentError: unusable data, a target outside ``[0, num_classes)``, a class
            with no sample, or a model without timm's feature contract and no ``feature_fn``.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=3)
        >>> data = [(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))]
        >>> class_means(model, data, progress=False).shape
        torch.Size([3, 512])
    """
    name = "class_means"
    options = ScoringData.create(name, data, max_batches=max_batches, progress=progress, device=device)
    features_of = _feature_fn(model, feature_fn, name)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise InvalidArgumentError(f"{name}: num_classes must be a positive int or None, got {num_classes!r}")
    sums = counts = None
    with left_as_found(model, options.device), torch.no_grad():
        for index, batch in enumerate(options.batches("class means")):
            features, logits = _checked(name, features_of(model, batch.inputs), batch)
            if sums is None:
                num_classes = num_classes or logits.shape[1]
                sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
                counts = torch.zeros(num_classes, dtype=torch.int64)
            targets = batch.targets.cpu()
            if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
                raise InvalidArgumentError(f"{name}: batch {index} has targets outside [0, {num_classes})")
            sums.index_add_(0, targets, features.detach().cpu().to(torch.float64))
            counts += torch.bincount(targets, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise InvalidArgumentError(f"{name}: no sample of class(es) {empty[:10]} in the data (a class mean needs at "
                                   "least one; check max_batches and that the loader covers every class)")
    return (sums / counts[:, None]).to(torch.float32)


def _check_means(means: object, num_classes: int, feat_dim: int) -> torch.Tensor:
    if not isinstance(means, torch.Tensor) or tuple(means.shape) != (num_classes, feat_dim):
        shape = tuple(means.shape) if isinstance(means, torch.Tensor) else type(means).__name__
        raise InvalidArgumentError(f"classmean: class_means must be a Tensor[{num_classes}, {feat_dim}] "
                                   f"(classes x penultimate features), got {shape}")
    return means


@register_scorer("classmean", needs_data=True)
def classmean(groups: Groups, model: nn.Module, *, data: Iterable | None = None, reference: nn.Module | None = None,
              class_means: torch.Tensor | None = None, alignment_weight: float = 1.0,
              loss_fn: LossFn | None = None, feature_fn: FeatureFn | None = None, max_batches: int | None = None,
              progress: bool = True, device: str | torch.device | None = None) -> Scores:
    """Taylor importance ``|w * dL/dw|`` of ``CE + alignment_weight * (1 - cos(f_i, c_{y_i}))``.

    Runs in eval mode; ``model`` (and ``reference``) are left exactly as found.

    Args:
        groups: from :func:`graphprune.find_groups`.
        model: the model to score.
        data: re-iterable of ``(inputs, targets)`` training batches (required); the class
            means are computed on it too, unless given.
        reference: model whose features define the class means; ``None`` is ``model``.
        class_means: precomputed Tensor[num_classes, feat_dim] (see :func:`class_means`);
            then ``reference`` is not used.
        alignment_weight: lambda, the weight of the cosine alignment term (0 gives ``taylor``).
        loss_fn: classification loss on the logits; ``None`` is cross entropy.
        feature_fn: ``feature_fn(model, inputs) -> (features, logits)``; ``None`` uses timm's
            ``forward_features`` / ``forward_head(pre_logits=True)``.
        max_batches: read at most this many batches per pass.
        progress: show tqdm progress bars.
        device: run there (models are moved back afterwards); ``None`` keeps their device.

    Returns:
        ``{group_id: float64 Tensor[group.size]}``, lower is removed first.

    Raises:
        InvalidArgumentError: no or unusable data, an empty loader, a NaN loss, class means
            of the wrong shape, or no way to get penultimate features.

    Example:
        >>> import timm, torch, graphprune as gp
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> groups = gp.find_groups(gp.trace(model, torch.randn(1, 3, 32, 32)), model=model)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
        >>> scores = classmean(groups, model, data=data, progress=False)
        >>> all(scores[g.id].shape == (g.size,) for g in groups)
        True
    """
    scorer = "classmean"
    if not isinstance(alignment_weight, (int, float)) or not math.isfinite(alignment_weight) or alignment_weight < 0:
        raise InvalidArgumentError(f"{scorer}: alignment_weight must be a finite number >= 0, got {alignment_weight!r}")
    options = ScoringData.create(scorer, data, loss_fn=loss_fn, max_batches=max_batches, progress=progress,
                                 device=device, passes=1 if class_means is not None else 2)
    features_of = _feature_fn(model, feature_fn, scorer)
    if reference is not None and not isinstance(reference, nn.Module):
        raise InvalidArgumentError(f"{scorer}: reference must be an nn.Module or None, got {type(reference).__name__}")
    if class_means is None:
        class_means = _class_means(model if reference is None else reference, data, feature_fn=feature_fn,
                                   max_batches=max_batches, progress=progress, device=device)
    means = {}  # on the scoring device, checked on the first batch

    def step(model: nn.Module, batch: Batch) -> torch.Tensor:
        features, logits = _checked(scorer, features_of(model, batch.inputs), batch)
        if "value" not in means:
            means["value"] = _check_means(class_means, logits.shape[1], features.shape[1]).to(features)
        centers = means["value"][batch.targets]  # (B, D): the mean of each sample's class
        alignment = (1.0 - F.cosine_similarity(features, centers, dim=1)).mean()
        return options.loss_fn(logits, batch.targets) + alignment_weight * alignment

    return taylor_scores(groups, model, options, step)


_class_means = class_means  # the scorer's ``class_means`` option shadows the function inside it
