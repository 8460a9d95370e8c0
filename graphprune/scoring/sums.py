"""Per-channel sums over a group's members: the one scatter every parameter scorer shares."""

from __future__ import annotations

import torch

from ..groups import ChannelGroup, Member


def add_member_(score: torch.Tensor, member: Member, values: torch.Tensor) -> torch.Tensor:
    """Add ``values`` (a tensor of the member's shape), summed over every dim but ``member.dim``, to
    the channels the member's indices carry; indices without a channel (slots) add nothing.

    Args:
        score: float64 Tensor[group.size] on the CPU, updated in place and returned.
        member: a member of the group ``score`` belongs to.
        values: float64 per-element quantity of the member's tensor (``|w|``, ``w^2``, ``|w * g|``).

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> group = gp.find_groups(gp.trace(net, torch.randn(1, 2)))[0]
        >>> member = next(m for m in group.members if m.name == "0.weight")
        >>> add_member_(torch.zeros(3, dtype=torch.float64), member, torch.ones(3, 2, dtype=torch.float64)).tolist()
        [2.0, 2.0, 2.0]
    """
    other = [d for d in range(values.dim()) if d != member.dim]
    return add_index_sums_(score, member, values.sum(other) if other else values)


def add_index_sums_(score: torch.Tensor, member: Member, per_index: torch.Tensor) -> torch.Tensor:
    """Add ``per_index`` (float64 Tensor[member's length along ``member.dim``]) to the channels its indices carry.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> group = gp.find_groups(gp.trace(net, torch.randn(1, 2)))[0]
        >>> member = next(m for m in group.members if m.name == "0.bias")
        >>> add_index_sums_(torch.zeros(3, dtype=torch.float64), member, torch.ones(3, dtype=torch.float64)).tolist()
        [1.0, 1.0, 1.0]
    """
    channel = torch.from_numpy(member.channel.copy())
    valid = channel >= 0
    return score.index_add_(0, channel[valid], per_index.cpu()[valid])


def channel_sums(group: ChannelGroup, per_element: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum an elementwise quantity per channel over the group's members found in ``per_element``.

    Args:
        group: a :class:`graphprune.ChannelGroup`.
        per_element: ``{parameter name: tensor of its shape}``; members not in it add nothing.

    Returns:
        float64 Tensor[group.size].

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> group = gp.find_groups(gp.trace(net, torch.randn(1, 2)))[0]
        >>> ones = {name: torch.ones_like(p) for name, p in net.named_parameters()}
        >>> channel_sums(group, ones).tolist()  # 2 weights + 1 bias in, 1 weight out, per channel
        [4.0, 4.0, 4.0]
    """
    score = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        values = per_element.get(member.name)
        if values is not None:
            add_member_(score, member, values.to(torch.float64))
    return score
