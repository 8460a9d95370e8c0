"""Kernel pruning as a mask while the model trains, and the structural transform afterwards.

The function of a conv whose removed kernels are zero is that of its
:class:`~graphprune.sparsity.kernel_conv.KernelConv2d` (``tests/test_sparsity.py`` checks it in
float64), and so are the gradients of the kept weights. Training the dense conv under a
kernel-shaped ``torch.nn.utils.prune`` mask (every ``kh x kw`` kernel all kept or all zero, ``k``
per output channel) therefore trains the same model at dense-kernel speed; the gather + grouped
conv, which runs far slower on a CPU than the dense conv it replaces, is only needed for the
deployed model. :func:`kernel_masks_` masks, :func:`kernel_convs_from_masks_` folds the masks and
swaps the convs (recording the ``graphprune.kernels/1`` plan).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import InvalidArgumentError
from .kernel_plan import KernelPlan, kernel_counts, kernel_indices, replace_convs_
from .unstructured import refresh_
from .weights import is_masked


def kernel_masks_(model: nn.Module, keep_ratio: float | Mapping[str, int], *, signal: str = "magnitude",
                  modules: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
                  seed: int = 0) -> dict[str, int]:
    """Mask all but ``k`` kernels per output channel of dense convs (the convs stay ``nn.Conv2d``).

    Arguments as :func:`~graphprune.sparsity.kernel_plan.kernel_prune_`.

    Returns:
        ``{conv name: k}``.

    Raises:
        InvalidArgumentError: as ``kernel_prune_``, or a conv that is masked already.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(4, 2, 3))
        >>> kernel_masks_(net, 0.5)
        {'0': 2}
        >>> net[0].weight_mask.amax(dim=(2, 3)).sum(dim=1).tolist()
        [2.0, 2.0]
    """
    counts = kernel_counts(model, keep_ratio, modules=modules, ignore=ignore)
    indices = kernel_indices(model, counts, signal=signal, seed=seed)
    all_modules = dict(model.named_modules())
    masked = [name for name in indices if is_masked(all_modules[name])]
    if masked:
        raise InvalidArgumentError(f"{masked[:3]} already have masks; make_permanent_ them first")
    for name, index in indices.items():
        conv = all_modules[name]
        kernels = torch.zeros(conv.out_channels, conv.in_channels, device=conv.weight.device,
                              dtype=conv.weight.dtype).scatter_(1, index.to(conv.weight.device), 1.0)  # (out, in)
        prune.custom_from_mask(conv, "weight", kernels[:, :, None, None].expand_as(conv.weight).contiguous())
        refresh_(conv)
    return counts


def kernel_mask_index(conv: nn.Module) -> torch.Tensor | None:
    """``(out, k)`` kept inputs if ``conv``'s mask is kernel-shaped (whole kernels, ``k`` per output); else ``None``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 1))
        >>> _ = kernel_masks_(net, {"0": 1})
        >>> kernel_mask_index(net[0]).shape
        torch.Size([2, 1])
    """
    if not is_masked(conv) or conv.weight_mask.dim() != 4:
        return None
    mask = conv.weight_mask
    kept = mask.amax(dim=(2, 3))  # (out, in)
    if not torch.equal(kept, mask.amin(dim=(2, 3))) or not bool(((kept == 0) | (kept == 1)).all()):
        return None  # a kernel partly masked: not a kernel mask
    per_row = kept.sum(dim=1)
    if int(per_row.min()) < 1 or not bool((per_row == per_row[0]).all()):
        return None
    return kept.nonzero()[:, 1].reshape(kept.shape[0], -1)  # row-major: sorted within each row


def kernel_convs_from_masks_(model: nn.Module, *, record: bool = True) -> KernelPlan:
    """Replace every exact ``nn.Conv2d`` with a kernel-shaped mask by its :class:`KernelConv2d`.

    The masks are folded first (``prune.remove``), so the new module has the trained weights of
    the kept kernels. Convs with other masks are left as they are.

    Raises:
        InvalidArgumentError: no conv has a kernel-shaped mask.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(4, 2, 3)).double().eval()
        >>> _ = kernel_masks_(net, 0.5)
        >>> x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
        >>> before = net(x)
        >>> plan = kernel_convs_from_masks_(net, record=False)
        >>> type(net[0]).__name__, torch.allclose(net(x), before, rtol=0, atol=1e-12)
        ('KernelConv2d', True)
    """
    indices = {}
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and module.groups == 1:
            index = kernel_mask_index(module)
            if index is not None:
                indices[name] = index
    if not indices:
        raise InvalidArgumentError("no nn.Conv2d has a kernel-shaped mask (kernel_masks_ makes them)")
    all_modules = dict(model.named_modules())
    for name in indices:
        conv = all_modules[name]
        trains = conv.weight_orig.requires_grad
        prune.remove(conv, "weight")
        conv.weight.requires_grad_(trains)
    return replace_convs_(model, indices, record=record)
