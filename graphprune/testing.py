"""Helpers to prove pruning exact: zero channels first, then remove them.

Used by the test-suite and the coverage benchmark; public because users adding a
coupling rule should check it the same way.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .errors import InvalidArgumentError
from .groups import Groups
from .plan import make_plan
from .selection import removal_count
from .removal import apply_plan_


def pick_channels(groups: Groups, ratio: float, *, seed: int = 0, exact_only: bool = True) -> dict[int, tuple[int, ...]]:
    """Choose ``ratio`` of each group's prunable channels at random (seeded).

    With ``exact_only``, channels a statistic is taken over (layer norm, mean, softmax)
    are skipped: zeroing those changes the statistic, so removal cannot be exact there.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> picked = pick_channels(gp.find_groups(gp.trace(net, torch.randn(1, 4))), 0.5)
        >>> len(picked[0])
        4
    """
    rng = np.random.default_rng(seed)
    picked = {}
    for group in groups:
        allowed = group.prunable & ~group.statistic if exact_only else group.prunable.copy()
        candidates = np.flatnonzero(allowed)
        n = min(removal_count(ratio, int(group.prunable.sum())), candidates.size, group.size - 1)
        if n <= 0:
            continue
        chosen = set(int(c) for c in rng.choice(candidates, size=n, replace=False))
        for member in group.members:  # never empty a member
            owned = np.unique(member.channel[member.channel >= 0])
            if owned.size and all(int(c) in chosen for c in owned):
                chosen.discard(int(owned[0]))
        if chosen:
            picked[group.id] = tuple(sorted(chosen))
    return picked


@torch.no_grad()
def zero_channels_(model: nn.Module, groups: Groups, channels: dict[int, tuple[int, ...]], *,
                   roles: tuple[str, ...] = ("out",)) -> None:
    """Zero the given channels in every member with one of ``roles`` (in place).

    ``roles=("out",)`` zeroes the producers (weights, biases, norm affine); ``("out", "in")``
    makes the channels fully dead, consumers included.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for gid, chosen in channels.items():
        chosen_arr = np.asarray(chosen)
        for member in groups.by_id(gid).members:
            if member.role not in roles:
                continue
            tensor = tensors[member.name]
            if member.name.endswith("running_var"):
                continue
            index = np.flatnonzero(np.isin(member.channel, chosen_arr))
            if index.size:
                tensor.index_fill_(member.dim, torch.from_numpy(index), 0.0)


@torch.no_grad()
def zeroed_then_removed(model: nn.Module, x: torch.Tensor, groups: Groups, removed: dict[int, tuple[int, ...]]
                        ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """On an eval-mode copy of ``model``: zero ``removed`` in its producers, run ``x``, remove the
    channels, run ``x`` again. Returns ``(expected, got, pruned)``; the caller compares the two
    outputs with its tolerance (they agree when the removal is exact).

    Example:
        >>> import graphprune as gp
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> groups = gp.find_groups(gp.trace(net, x))
        >>> expected, got, pruned = zeroed_then_removed(net, x, groups, {groups[0].id: (1, 5)})
        >>> pruned[0].out_features, torch.allclose(got, expected, rtol=0, atol=1e-12)
        (6, True)
    """
    model = copy.deepcopy(model).eval()
    zero_channels_(model, groups, removed)
    expected = model(x)
    apply_plan_(model, make_plan(groups, removed=removed))
    return expected, model(x), model


@torch.no_grad()
def zero_branch_(model: nn.Module, block) -> None:
    """Zero the parameters that produce ``block``'s branch output (in place), so the branch adds zero.

    ``block`` is a :class:`graphprune.blocks.Block`; its ``end_module``'s own parameters
    (the last norm's affine, a layer-scale gamma or the output projection) are zeroed.
    Removing the block afterwards must leave the model's outputs unchanged.

    Raises:
        InvalidArgumentError: the block's ``end_module`` has no parameters of its own.

    Example:
        >>> import timm, torch
        >>> from graphprune.blocks import find_blocks
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> block = find_blocks(model, torch.randn(1, 3, 32, 32)).by_name("layer1.1")
        >>> zero_branch_(model, block)
        >>> float(model.layer1[1].bn2.weight.abs().sum())
        0.0
    """
    params = list(model.get_submodule(block.end_module).parameters(recurse=False))
    if not params:
        raise InvalidArgumentError(f"{block.end_module} has no parameters of its own to zero")
    for p in params:
        p.zero_()
