"""Softmax: only the dim it normalizes over is a statistic; the other dims are independent rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.testing import pick_channels, zero_channels_


class EagerAttention(nn.Module):
    """Multi-head self-attention with an explicit softmax over the keys (B, heads, N, N)."""

    def __init__(self, width: int = 12, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)  # (B, heads, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


def heads_group(groups: gp.Groups) -> gp.ChannelGroup:
    return next(g for g in groups if int(g.width.max()) > 1)


def test_heads_under_softmax_are_not_a_statistic_and_remove_exactly() -> None:
    torch.manual_seed(0)
    net, x = EagerAttention().double().eval(), torch.randn(2, 5, 12, dtype=torch.float64)
    groups = gp.find_groups(gp.trace(net, x))
    heads = heads_group(groups)
    assert heads.size == 4 and not heads.statistic.any()  # all 4 were marked before
    picked = pick_channels(groups, 0.5, seed=0)  # exact_only: heads are candidates now
    assert len(picked[heads.id]) == 2
    model = copy.deepcopy(net)
    zero_channels_(model, groups, picked)
    with torch.no_grad():
        expected = model(x)
    gp.apply_plan_(model, gp.make_plan(groups, removed=picked))
    assert model.heads == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("softmax", [lambda h: h.softmax(-1), lambda h: torch.log_softmax(h, dim=1),
                                     lambda h: nn.Softmax(dim=-1)(h)])
def test_the_softmax_dim_stays_a_statistic(softmax) -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(softmax(self.a(x)))

    groups = gp.find_groups(gp.trace(Net(), torch.randn(4, 3)))
    assert np.all(groups[0].statistic)
