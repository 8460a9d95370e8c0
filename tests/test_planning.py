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
