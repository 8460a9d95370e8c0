"""What every data-driven scorer shares: checked batches, a budget, a loss, and a model left as found.

A data-driven scorer takes ``data``: any re-iterable of ``(inputs, targets)`` batches, such
as a ``DataLoader`` or a list of tensor pairs; ``inputs`` is a tensor (or a tuple of
positional tensors) and ``targets`` a tensor. It runs the model inside
:func:`left_as_found`, so train/eval mode, ``requires_grad``, ``.grad``, hooks, parameters
and buffers are all exactly as before when it returns or raises.

Scorers run the model in **eval mode**: BatchNorm normalizes with its running statistics
(the statistics the pruned network is deployed with), dropout and drop-path are off, no
buffer is updated, and the scores are a deterministic function of the data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: mean cross entropy of logits ``(B, K)`` against class indices ``(B,)``.

    Example:
        >>> import torch
        >>> float(cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])))  # log(4)
        1.3862943649291992
    """
    if not isinstance(outputs, torch.Tensor):
        raise InvalidArgumentError(f"the default loss (cross entropy) needs a tensor of logits, the model returned "
                                   f"{type(outputs).__name__}; pass loss_fn=")
    return F.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class Batch:
    """One checked batch: positional inputs and targets, already on the scoring device."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor


@dataclass(frozen=True)
class ScoringData:
    """Validated data options of one data-driven scorer call.

    Attributes:
        scorer: the scorer's registered name, used in messages and the progress bar.
        data: re-iterable of ``(inputs, targets)`` batches.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        max_batches: batches read per pass over ``data`` (``None``: all of them).
        progress: show a tqdm bar per pass.
        device: where the batches go (the model is moved there by :func:`left_as_found`).
    """

    scorer: str
    data: Iterable
    loss_fn: LossFn
    max_batches: int | None
    progress: bool
    device: torch.device | None

    @classmethod
    def create(cls, scorer: str, data: Iterable | None, *, loss_fn: LossFn | None = None,
               max_batches: int | None = None, progress: bool = True, device: str | torch.device | None = None,
               passes: int = 1) -> ScoringData:
        """Check every option before the model is touched.

        Args:
            scorer: the scorer's registered name.
            data: re-iterable of ``(inputs, targets)`` batches.
            loss_fn: ``None`` uses :func:`cross_entropy`.
            max_batches: positive batch budget per pass, or ``None``.
            progress: show a progress bar.
            device: ``None`` keeps the model's device.
            passes: how many times the scorer will iterate ``data`` (a one-shot iterator
                only supports one).

        Raises:
            InvalidArgumentError: missing or unusable data, a bad budget or loss.

        Example:
            >>> import torch
            >>> options = ScoringData.create("taylor", [(torch.randn(2, 3), torch.tensor([0, 1]))], max_batches=1)
            >>> options.max_batches, options.loss_fn is cross_entropy
            (1, True)
        """
        check_data(scorer, data, passes=passes)
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise InvalidArgumentError(f"scorer {scorer!r}: max_batches must be a positive int or None, "
                                       f"got {max_batches!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise InvalidArgumentError(f"scorer {scorer!r}: loss_fn must be callable(outputs, targets), "
                                       f"got {type(loss_fn).__name__}")
        return cls(scorer, data, loss_fn or cross_entropy, max_batches, bool(progress),
                   None if device is None else torch.device(device))

    def batches(self, desc: str = "scoring") -> Iterator[Batch]:
        """One pass over the data, checked, on the device, within the budget, with a progress bar.

        Raises:
            InvalidArgumentError: a batch is not ``(inputs, targets)`` tensors, or the pass
                yields no batch at all.

        Example:
            >>> import torch
            >>> options = ScoringData.create("taylor", [(torch.randn(2, 3), torch.tensor([0, 1]))] * 3,
            ...                              max_batches=2, progress=False)
            >>> sum(1 for _ in options.batches())
            2
        """
        total = self.max_batches
        try:
            total = len(self.data) if total is None else min(total, len(self.data))
        except TypeError:  # an iterable without a length
            pass
        source = self.data if self.max_batches is None else itertools.islice(self.data, self.max_batches)
        count = 0
        with tqdm(total=total, desc=f"{self.scorer} {desc}", disable=not self.progress, leave=False) as bar:
            for raw in source:  # islice: no batch beyond the budget is loaded
                yield self._check_batch(raw, count)
                count += 1
                bar.update(1)
        if count == 0:
            raise InvalidArgumentError(f"scorer {self.scorer!r}: data yielded no batches (empty loader?)")

    def _check_batch(self, raw: object, index: int) -> Batch:
        if not isinstance(raw, (tuple, list)) or len(raw) != 2:
            raise InvalidArgumentError(f"scorer {self.scorer!r}: batch {index} is a {type(raw).__name__}; each batch "
                                       "must be an (inputs, targets) pair")
        inputs, targets = raw
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise InvalidArgumentError(f"scorer {self.scorer!r}: inputs of batch {index} must be a tensor or a tuple "
                                       f"of tensors, got {type(raw[0]).__name__}")
        if not isinstance(targets, torch.Tensor):
            raise InvalidArgumentError(f"scorer {self.scorer!r}: targets of batch {index} must be a tensor, got "
                                       f"{type(targets).__name__}")
        if self.device is not None:
            inputs = tuple(t.to(self.device) for t in inputs)
            targets = targets.to(self.device)
        return Batch(tuple(inputs), targets)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, index: int) -> torch.Tensor:
        """``loss_fn(outputs, targets)``, checked to be a finite scalar tensor.

        Raises:
            InvalidArgumentError: the loss is not a scalar tensor, or is NaN / infinite.

        Example:
            >>> import torch
            >>> options = ScoringData.create("taylor", [])
            >>> float(options.loss(torch.zeros(1, 2), torch.tensor([1]), 0))  # log(2)
            0.6931471824645996
        """
        return check_loss(self.scorer, self.loss_fn(outputs, targets), index)


def check_data(scorer: str, data: object, *, passes: int = 1) -> None:
    """Raise unless ``data`` looks like a re-iterable of ``(inputs, targets)`` batches.

    Batches themselves are checked as they are read (:meth:`ScoringData.batches`).

    Raises:
        InvalidArgumentError: ``data`` is missing, of an unknown type, or a one-shot
            iterator when the scorer needs several ``passes``.

    Example:
        >>> check_data("taylor", None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: scorer 'taylor' needs data=... (an iterable of ... batches, ...)
    """
    if data is None:
        raise InvalidArgumentError(f"scorer {scorer!r} needs data=... (an iterable of (inputs, targets) batches, "
                                   "e.g. a DataLoader)")
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or (isinstance(data, Dataset)
                                                               and not isinstance(data, IterableDataset)):
        hint = "; wrap a Dataset in a DataLoader" if isinstance(data, Dataset) else ""
        raise InvalidArgumentError(f"scorer {scorer!r}: data must be an iterable of (inputs, targets) batches, got "
                                   f"{type(data).__name__}{hint}")
    try:
        iterator = iter(data)
    except TypeError:
        raise InvalidArgumentError(f"scorer {scorer!r}: data must be an iterable of (inputs, targets) batches, got "
                                   f"{type(data).__name__}") from None
    if passes > 1 and iterator is data:
        raise InvalidArgumentError(f"scorer {scorer!r} reads the data {passes} times; pass a re-iterable "
                                   "(a DataLoader or a list of batches), not a one-shot iterator or generator")


def check_loss(scorer: str, loss: object, index: int) -> torch.Tensor:
    """Return ``loss`` if it is a finite scalar tensor, else raise.

    Raises:
        InvalidArgumentError: not a scalar tensor, or NaN / infinite.

    Example:
        >>> import torch
        >>> check_loss("taylor", torch.tensor(float("nan")), 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: scorer 'taylor': the loss is nan on batch 3; check the ...
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidArgumentError(f"scorer {scorer!r}: the loss must be a scalar tensor, got "
                                   f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
    if not torch.isfinite(loss.detach()).all():
        raise InvalidArgumentError(f"scorer {scorer!r}: the loss is {loss.item()} on batch {index}; check the "
                                   "inputs, targets and loss_fn")
    return loss.reshape(())


@contextmanager
def left_as_found(model: nn.Module, device: torch.device | None = None) -> Iterator[list[RemovableHandle]]:
    """Run a scorer on ``model`` and put everything back on exit, even on error.

    Inside the block the model is in eval mode, on ``device`` (if given), every parameter has
    ``requires_grad=False`` and ``.grad=None`` (enable what the scorer differentiates), and
    gradients are enabled even under an outer ``torch.no_grad()``. Append the handles of any
    hook you register to the yielded list. On exit the hooks are removed, and mode,
    ``requires_grad``, ``.grad``, device and the values of every parameter and buffer are
    restored bit for bit (from a copy taken on entry).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).train()
        >>> with left_as_found(net) as hooks:
        ...     hooks.append(net[0].register_forward_hook(lambda m, i, o: o * 2))
        ...     _ = net[0].weight.requires_grad_(True)
        ...     net(torch.randn(3, 2)).sum().backward()
        ...     (net.training, net[0].weight.grad is None)
        (False, False)
        >>> net.training, net[0].weight.grad, len(net[0]._forward_hooks)
        (True, None, 0)
    """
    modes = [(module, module.training) for module in model.modules()]
    # (module, name, original tensor object, saved value); parameters keep their identity.
    slots = [(module, name, tensor, tensor.detach().clone())
             for module in model.modules()
             for name, tensor in [*module._parameters.items(), *module._buffers.items()] if tensor is not None]
    params = list({id(p): p for p in model.parameters()}.values())
    flags = [(p, p.requires_grad, p.grad, p.data) for p in params]
    handles: list[RemovableHandle] = []
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        model.eval()
        if device is not None:
            model.to(device)
        with torch.enable_grad():
            yield handles
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        for p, requires_grad, grad, data in flags:
            p.data = data  # undoes a device move
            p.grad = grad
            p.requires_grad_(requires_grad)
        with torch.no_grad():
            for module, name, tensor, saved in slots:
                table = module._parameters if name in module._parameters else module._buffers
                table[name] = tensor
                if not torch.equal(tensor, saved):
                    tensor.copy_(saved)
