"""N:M masks (2:4 the common case): in every run of M consecutive weights of an output row, keep the N largest.

Rows are the weight flattened to ``(out_features, in_features)`` (a conv: ``(out, in * kh * kw)``,
row-major), the layout NVIDIA's sparse tensor cores and ``torch.sparse.to_sparse_semi_structured``
read for a Linear weight. The mask is a ``torch.nn.utils.prune`` method (:class:`NMMagnitude`),
so it is kept through fine-tuning and made permanent like the unstructured masks.

:func:`semi_structured_` converts 2:4-masked Linear weights to ``SparseSemiStructuredTensor``
(CUDA, fp16 / bf16, the sizes cuSPARSELt / CUTLASS accept): the only form here that a kernel
runs faster; on a CPU, or for convolutions, a 2:4 mask is a 50 % unstructured mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import InvalidArgumentError
from .unstructured import SparsityReport, refresh_
from .weights import is_masked, module_sparsity, overall_sparsity, resolve_modules


def check_nm(n: int, m: int) -> tuple[int, int]:
    """``(n, m)`` if ``1 <= n <= m``; else an error naming the problem.

    Example:
        >>> check_nm(2, 4)
        (2, 4)
        >>> check_nm(4, 2)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: N:M keeps N of every M weights, so N <= M; got N=4 > M=2
    """
    for name, value in (("N", n), ("M", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"N:M needs integers N, M >= 1, got {name}={value!r}")
    if n > m:
        raise InvalidArgumentError(f"N:M keeps N of every M weights, so N <= M; got N={n} > M={m}")
    return n, m


class NMMagnitude(prune.BasePruningMethod):
    """``torch.nn.utils.prune`` method: keep the ``n`` largest ``|w|`` of every ``m`` consecutive row entries.

    Example:
        >>> layer = nn.Linear(8, 2)
        >>> _ = NMMagnitude.apply(layer, "weight", n=2, m=4)
        >>> layer.weight_mask.view(2, 2, 4).sum(-1).tolist()
        [[2.0, 2.0], [2.0, 2.0]]
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = check_nm(n, m)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        rows = t.reshape(t.shape[0], -1)  # (out, in * kh * kw)
        if rows.shape[1] % self.m:
            raise InvalidArgumentError(f"a row of {rows.shape[1]} weights does not split into runs of M={self.m}")
        runs = (rows.abs() * default_mask.reshape(rows.shape)).reshape(rows.shape[0], -1, self.m)  # (out, runs, M)
        keep = runs.topk(self.n, dim=-1).indices
        mask = torch.zeros_like(runs).scatter_(-1, keep, 1.0)
        return mask.reshape(t.shape) * default_mask


def nm_masks_(model: nn.Module, n: int = 2, m: int = 4, *, modules: Iterable[str] | None = None,
              ignore: Iterable[str] | None = None) -> SparsityReport:
    """Mask every Conv2d / Linear weight N:M by magnitude, in place.

    Args:
        model: the model.
        n: weights kept per run.
        m: run length.
        modules: layer names; every one must have rows divisible by ``m``. ``None``: every
            Conv2d / Linear but ``ignore``, layers whose rows do not split into runs of ``m``
            left dense and listed in ``skipped``.
        ignore: layers left dense when ``modules`` is ``None``; ``None``: the timm classifier.

    Raises:
        InvalidArgumentError: bad ``n`` / ``m``, a named layer that does not split, or a layer
            masked already (N:M is a pattern, not a level: make the old mask permanent first).

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> report = nm_masks_(model, 2, 4)
        >>> report.sparsity, report.skipped
        (0.5, {'conv1': 'rows of 147 weights do not split into runs of 4'})
    """
    n, m = check_nm(n, m)
    found = resolve_modules(model, modules, ignore)
    masked = [name for name, module in found.items() if is_masked(module)]
    if masked:
        raise InvalidArgumentError(f"{masked[:3]} already have masks; make_permanent_ them first")
    skipped = {}
    for name, module in list(found.items()):
        row = module.weight[0].numel()
        if row % m:
            if modules is not None:
                raise InvalidArgumentError(f"{name}: rows of {row} weights do not split into runs of M={m}")
            skipped[name] = f"rows of {row} weights do not split into runs of {m}"
            del found[name]
    if not found:
        raise InvalidArgumentError(f"no layer has rows that split into runs of M={m}")
    for module in found.values():
        NMMagnitude.apply(module, "weight", n=n, m=m)
        refresh_(module)
    return SparsityReport(1.0 - n / m, overall_sparsity(found), "n:m", "magnitude", module_sparsity(found), skipped)


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every run of ``m`` consecutive row entries of ``weight`` has at most ``n`` nonzeros.

    Example:
        >>> is_nm(torch.tensor([[1.0, 0.0, 2.0, 0.0]])), is_nm(torch.ones(1, 4))
        (True, False)
    """
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        return False
    return bool(((rows.reshape(rows.shape[0], -1, m) != 0).sum(-1) <= n).all())


def semi_structured_(model: nn.Module, modules: Iterable[str] | None = None) -> list[str]:
    """Store 2:4-sparse Linear weights as ``torch.sparse.to_sparse_semi_structured`` tensors (CUDA only).

    Masks must be permanent (:func:`~graphprune.sparsity.make_permanent_`) and the weights fp16
    or bf16 on a CUDA device with sparse tensor cores (Ampere or newer); the result is for
    inference (``requires_grad`` off).

    Args:
        model: the model.
        modules: Linear names; ``None``: every Linear whose weight is 2:4.

    Returns:
        The layers converted.

    Raises:
        InvalidArgumentError: no CUDA, a named layer that is not a 2:4 Linear on CUDA in fp16 / bf16.

    Example:
        >>> semi_structured_(nn.Linear(64, 64)) if torch.cuda.is_available() else "needs CUDA"  # doctest: +SKIP
    """
    if not torch.cuda.is_available():
        raise InvalidArgumentError("semi-structured (2:4) sparse tensors need a CUDA GPU with sparse tensor cores")
    from torch.sparse import to_sparse_semi_structured

    all_modules = dict(model.named_modules())
    names = list(modules) if modules is not None else [
        name for name, mod in all_modules.items() if isinstance(mod, nn.Linear) and not is_masked(mod)
        and mod.weight.is_cuda and mod.weight.dtype in (torch.float16, torch.bfloat16) and is_nm(mod.weight)]
    for name in names:
        module = all_modules.get(name)
        if not isinstance(module, nn.Linear) or is_masked(module):
            raise InvalidArgumentError(f"{name!r} is not a Linear with a permanent mask")
        weight = module.weight
        if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16) or not is_nm(weight):
            raise InvalidArgumentError(f"{name}: a 2:4 fp16/bf16 CUDA weight is needed, got {weight.dtype} on "
                                       f"{weight.device}, 2:4={is_nm(weight)}")
        module.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
    return names
