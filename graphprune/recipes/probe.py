"""The linear probe: logistic regression on frozen penultimate features, the reference every transfer
recipe must beat.

:func:`linear_probe_` extracts the features ``f = forward_head(forward_features(x),
pre_logits=True)`` of the unaugmented training and validation images once, fits a multinomial
logistic regression ``softmax(W f + b)`` by L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line
search) for each L2 strength of a small grid, keeps the strength with the best validation
accuracy (never a test split), and writes ``W, b`` into the model's classifier. The rest of
the model is untouched, so the result is exactly "the pretrained features + the best linear
head", and it is the head that LP-FT (``head_init="probe"``) fine-tunes from.

The objective is ``mean CE + (l2 / 2) * ||W||^2`` on standardized-free raw features, i.e.
scikit-learn's ``LogisticRegression(C=1 / (l2 * n))``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from .data import TransferData
from .device import Placement
from .distributed import DistContext, on_main, sync_state_
from .finetune import classifier_of, features_and_logits, measure_record
from .records import StageRecord

L2_GRID = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def extract_features(model: nn.Module, loader: Iterable, placement: Placement | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``(N, D)`` (float32, CPU) and labels ``(N,)`` of every batch, in eval mode.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> f, y = extract_features(model, [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 0]))])
        >>> tuple(f.shape), y.tolist()
        ((3, 512), [0, 1, 0])
    """
    modes = [(m, m.training) for m in model.modules()]
    features, labels = [], []
    try:
        model.eval()
        with torch.no_grad():
            for images, targets in loader:
                with (placement or Placement()).autocast():
                    f, _ = features_and_logits(model, images)
                features.append(f.float().cpu())
                labels.append(targets.cpu())
    finally:
        for m, training in modes:
            m.training = training
    if not features:
        raise InvalidArgumentError("the linear probe got no batches")
    return torch.cat(features), torch.cat(labels)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, *,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (K, D), b (K,)`` minimizing ``mean CE(W f + b, y) + (l2 / 2) ||W||^2`` (L-BFGS).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); y = torch.tensor([0, 1])
        >>> w, b = fit_logistic(x, y, 2, l2=1e-3)
        >>> (x @ w.T + b).argmax(1).tolist()
        [0, 1]
    """
    dim = features.shape[1]
    weight = torch.zeros(num_classes, dim) if init is None else init[0].clone()
    bias = torch.zeros(num_classes) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _fit_on_main(model: nn.Module, data: TransferData, grid: Sequence[float], placement: Placement | None
                 ) -> dict:
    classifier = classifier_of(model)
    if not isinstance(classifier, nn.Linear):
        raise InvalidArgumentError(f"the linear probe needs an nn.Linear classifier, got {type(classifier).__name__}")
    train_x, train_y = extract_features(model, data.unaugmented_train, placement)
    val_x, val_y = extract_features(model, data.val, placement)
    best: dict | None = None
    init = None
    for l2 in sorted(grid, reverse=True):  # strongest first: each fit warm-starts the next
        weight, bias = fit_logistic(train_x, train_y, data.num_classes, l2, init=init)
        init = (weight, bias)
        accuracy = float(((val_x @ weight.T + bias).argmax(1) == val_y).float().mean())
        if best is None or accuracy > best["val_accuracy"]:
            best = {"l2": l2, "val_accuracy": accuracy, "weight": weight, "bias": bias}
    with torch.no_grad():
        classifier.weight.copy_(best["weight"].to(classifier.weight))
        if classifier.bias is not None:
            classifier.bias.copy_(best["bias"].to(classifier.bias))
    return {"l2": best["l2"], "probe_val_accuracy": best["val_accuracy"], "train_images": int(len(train_y))}


def linear_probe_(model: nn.Module, data: TransferData, *, grid: Sequence[float] = L2_GRID,
                  ctx: DistContext = DistContext(), placement: Placement | None = None,
                  name: str = "probe") -> StageRecord:
    """Fit ``model``'s classifier as a linear probe on its frozen features, in place; measure it.

    Args:
        model: a timm classifier whose ``get_classifier()`` is an ``nn.Linear`` for the target classes.
        data: the target task; ``train_eval`` (unaugmented) is read if present, else ``train``.
        grid: L2 strengths tried; the best on ``data.val`` is kept.
        ctx: the data-parallel context (rank 0 fits, every rank receives the head).
        placement: device and precision of the feature extraction.
        name: the stage name in the record.

    Returns:
        The stage's record (``kind="probe"``); ``details`` hold the chosen ``l2``.

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> loader = DataLoader(pairs, batch_size=4)
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> record = linear_probe_(model, TransferData(loader, loader, ("a", "b")))
        >>> record.kind, record.val_accuracy == 1.0  # a linear head separates 8 random 512-d points
        ('probe', True)
    """
    start = time.perf_counter()
    details = on_main(ctx, lambda: _fit_on_main(model, data, grid, placement))
    sync_state_(model, ctx)
    return measure_record(model, data, name, "probe", time.perf_counter() - start, ctx=ctx, placement=placement,
                          steps=0, details=details)
