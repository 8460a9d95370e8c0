"""Planning: local and global selection, rounding, caps, and the never-empty rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp


class Wide(nn.Module):
    """Three hidden layers of different widths, each its own group."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(4, 16), nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.fixture(scope="module")
def groups() -> gp.Groups:
    return gp.find_groups(gp.trace(Wide(), torch.randn(1, 4)))


def ramp_scores(groups: gp.Groups, scale: dict[int, float]) -> dict[int, torch.Tensor]:
    return {g.id: torch.arange(1.0, g.size + 1) * scale.get(g.size, 1.0) for g in groups}


def test_local_removes_the_same_fraction_of_every_group(groups) -> None:
    chosen = gp.select_channels(groups, ramp_scores(groups, {}), ratio=0.25)
    assert {groups.by_id(g).size: len(c) for g, c in chosen.items()} == {16: 4, 32: 8, 8: 2}
    assert all(c == tuple(range(len(c))) for c in chosen.values())  # the lowest scores go


def test_global_ranks_across_groups_after_normalization(groups) -> None:
    # the 32-wide group's scores are 100x larger: unnormalized it keeps everything
    scores = ramp_scores(groups, {32: 100.0})
    raw = gp.select_channels(groups, scores, ratio=0.25, config=gp.PlanConfig(scope="global", normalize="none"))
    wide = next(g.id for g in groups if g.size == 32)
    assert wide not in raw and sum(map(len, raw.values())) == 14  # floor(0.25 * 56)
    normalized = gp.select_channels(groups, scores, ratio=0.25, config=gp.PlanConfig(scope="global", normalize="max"))
    assert len(normalized[wide]) > 0


def test_global_cap_and_never_empty(groups) -> None:
    scores = {g.id: torch.full((g.size,), 0.0 if g.size == 8 else 1.0) for g in groups}
    capped = gp.select_channels(groups, scores, ratio=0.5,
                                config=gp.PlanConfig(scope="global", normalize="none", max_group_ratio=0.5))
    narrow = next(g.id for g in groups if g.size == 8)
    assert len(capped[narrow]) == 4
    uncapped = gp.select_channels(groups, scores, ratio=0.5, config=gp.PlanConfig(scope="global", normalize="none"))
    assert len(uncapped[narrow]) == 7  # never empty a group


def test_round_to_keeps_multiples(groups) -> None:
    chosen = gp.select_channels(groups, ramp_scores(groups, {}), ratio=0.3, round_to=8)
    for gid, channels in chosen.items():
        assert (groups.by_id(gid).size - len(channels)) % 8 == 0


def test_removal_table_reports_per_group_fractions(groups) -> None:
    chosen = gp.select_channels(groups, ramp_scores(groups, {}), ratio=0.25)
    table = gp.removal_table(groups, chosen)
    assert "25.0%" in table and len(table.splitlines()) == 1 + len(groups)


@pytest.mark.parametrize("bad", [{"scope": "everywhere"}, {"normalize": "zscore"}, {"round_to": 0},
                                 {"max_group_ratio": 1.5}])
def test_bad_config_is_rejected(bad) -> None:
    with pytest.raises(gp.InvalidArgumentError):
        gp.PlanConfig(**bad)


def test_scores_with_nan_or_wrong_length_are_rejected(groups) -> None:
    scores = ramp_scores(groups, {})
    first = next(iter(groups)).id
    with pytest.raises(gp.InvalidArgumentError, match="NaN"):
        gp.select_channels(groups, {**scores, first: torch.full_like(scores[first], float("nan"))}, ratio=0.3)
    with pytest.raises(gp.InvalidArgumentError, match="scores"):
        gp.select_channels(groups, {**scores, first: torch.ones(3)}, ratio=0.3)


def test_scorer_registry_fails_loudly() -> None:
    with pytest.raises(gp.InvalidArgumentError, match="known scorers: .*l1"):
        gp.get_scorer("magic")


class BiasTable(nn.Module):
    """A per-head bias table read by a helper method under its parent's name (timm's RelPosBias)."""

    def __init__(self, tokens: int, heads: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(tokens * tokens, heads))
        self.bias_shape = (tokens, tokens, heads)

    def get_bias(self) -> torch.Tensor:
        return self.table.view(self.bias_shape).permute(2, 0, 1)  # (heads, N, N)


class BiasedHeads(nn.Module):
    def __init__(self, tokens: int = 5, heads: int = 4, head_dim: int = 3):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv, self.proj = nn.Linear(8, 3 * heads * head_dim), nn.Linear(heads * head_dim, 8)
        self.rel_pos = BiasTable(tokens, heads)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + self.rel_pos.get_bias()).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


def test_a_shape_attribute_of_a_submodule_follows_the_removed_heads() -> None:
    torch.manual_seed(0)
    net, x = BiasedHeads().eval(), torch.randn(2, 5, 8)
    groups = gp.find_groups(gp.trace(net, x))
    heads = next(g for g in groups.all if ("rel_pos.table", 1) in {(m.name, m.dim) for m in g.members})
    assert heads.size == 4 and heads.prunable.all()
    plan = gp.make_plan(groups, removed={heads.id: (1, 2)})
    assert gp.AttrPatch("rel_pos", "bias_shape", (5, 5, 4), (5, 5, 2)) in plan.patches
    gp.apply_plan_(net, plan)
    assert net.rel_pos.bias_shape == (5, 5, 2) and net.heads == 2 and net(x).shape == (2, 5, 8)
