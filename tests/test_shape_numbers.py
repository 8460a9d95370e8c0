"""A count read from a shape freezes its channels only when the number can have come from the shape."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphprune as gp


def divide(x: torch.Tensor, count: int) -> torch.Tensor:
    return x / math.sqrt(count)


class Heads(nn.Module):
    """4 heads of 16: ``16 ** -0.5 == 1 / 4``, the head count read from a shape in the same call."""

    def __init__(self, source: str):
        super().__init__()
        self.source, self.heads, self.head_dim = source, 4, 16
        self.scaling = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(8, 3 * 64), nn.Linear(64, 8)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        heads = q.shape[1]  # (B, heads, N, head_dim)
        logits = q @ k.transpose(-2, -1)
        if self.source == "attribute":
            logits = logits * self.scaling
        elif self.source == "literal":
            logits = logits * 0.25
        elif self.source == "local":
            logits = logits / heads
        else:  # "argument": the count reaches the op through a helper's parameter
            logits = divide(logits, heads * heads)
        out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


@pytest.mark.parametrize(("source", "frozen"), [("attribute", False), ("literal", False), ("local", True),
                                                ("argument", True)])
def test_heads_freeze_only_when_the_number_comes_from_the_shape(source: str, frozen: bool) -> None:
    torch.manual_seed(0)
    groups = gp.find_groups(gp.trace(Heads(source).eval(), torch.randn(2, 5, 8)))
    qkv = next(g for g in groups.all if any(m.name == "qkv.weight" for m in g.members))
    assert qkv.prunable.any() != frozen, groups.report()
    reasons = groups.graph.store.frozen_reasons(groups.graph.classes).values()
    assert any("read from a shape, used as the number" in why for why in reasons) == frozen
    if not frozen:
        assert qkv.size == 4  # the heads
