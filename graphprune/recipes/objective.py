"""The training objective of a fine-tuning stage and the timm classifier contract it reads.

``CE`` with label smoothing, optionally mixed with knowledge distillation from a teacher's
logits (Hinton et al., 2015) and a class-mean alignment term on the penultimate features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from .device import Placement


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


class Objective(nn.Module):
    """``(1 - a) CE(logits, y) + a T^2 KL(teacher || student) [+ weight * mean(1 - cos(f, c_y))]``.

    A module so DDP can wrap it; the teacher is held outside the module tree (a tuple), so DDP
    neither registers nor synchronizes its weights.

    Example:
        >>> import timm, torch
        >>> student = timm.create_model("resnet18", pretrained=False, num_classes=3)
        >>> x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
        >>> ce = Objective(student, None, 0.0)(x, y)
        >>> bool(torch.isclose(ce, torch.nn.functional.cross_entropy(student(x), y)))
        True
        >>> # distilling from itself adds a zero KL term: (1 - a) * CE
        >>> bool(torch.isclose(Objective(student, None, 0.0, teacher=student, distill=0.5)(x, y), 0.5 * ce))
        True
    """

    def __init__(self, model: nn.Module, class_means: torch.Tensor | None, weight: float,
                 label_smoothing: float = 0.0, teacher: nn.Module | None = None, distill: float = 0.0,
                 temperature: float = 2.0) -> None:
        super().__init__()
        self.model = model
        self.weight = weight
        self.class_means = class_means
        self.label_smoothing = label_smoothing
        self.teacher = (teacher,) if teacher is not None and distill > 0 else ()
        self.distill = distill
        self.temperature = temperature

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        aligned = self.class_means is not None and self.weight > 0
        if aligned:
            features, logits = features_and_logits(self.model, images)
        else:
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        if self.teacher:
            with torch.no_grad():
                teacher_logits = self.teacher[0](images).float()
            t = self.temperature
            kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                          reduction="batchmean", log_target=True)
            loss = (1.0 - self.distill) * loss + self.distill * t * t * kl
        if aligned:
            features = features.float()
            centers = self.class_means.to(features)[targets]  # (B, D): each sample's class mean
            loss = loss + self.weight * (1.0 - F.cosine_similarity(features, centers, dim=1)).mean()
        return loss


@contextmanager
def teaching(teacher: nn.Module | None, placement: Placement) -> Iterator[None]:
    """The teacher on the run's device in eval mode with no trainable weights; restored on exit.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> with teaching(net, Placement()):
        ...     net.training, net.weight.requires_grad
        (False, False)
        >>> net.training, net.weight.requires_grad
        (True, True)
    """
    if teacher is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    modes = [(m, m.training) for m in teacher.modules()]
    try:
        placement.model_(teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
