"""Residual streams: which groups a skip connection carries, and PlanConfig.residual_scale."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import graphprune as gp
from graphprune.testing import zeroed_then_removed
from graphprune.residual import residual_groups


class Stage(nn.Module):
    """A stem, two residual blocks with hidden widths 12 and 20 (one adds a bias made from a parameter alone), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.up1, self.down1 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.up2, self.down2 = nn.Linear(8, 20), nn.Linear(20, 8)
        self.shift = nn.Parameter(torch.randn(20))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.down1(torch.relu(self.up1(x)))
        hidden = self.up2(x) + self.shift.view(1, -1)  # one operand from a parameter: not a residual add
        x = x + self.down2(torch.relu(hidden))
        return self.head(x)


@pytest.fixture(scope="module")
def stage() -> tuple[nn.Module, gp.Groups]:
    torch.manual_seed(0)
    model = Stage().double().eval()
    return model, gp.find_groups(gp.trace(model, torch.randn(2, 4, dtype=torch.float64)))


def _by_name(groups: gp.Groups) -> dict[str, int]:
    return {g.name: g.id for g in groups}


def test_only_the_stream_an_add_of_two_computed_operands_carries_is_residual(stage) -> None:
    _, groups = stage
    names = _by_name(groups)
    assert set(names) == {"stem", "up1", "up2"}, groups.report()
    assert residual_groups(groups) == {names["stem"]}


def test_residual_scale_zero_keeps_the_stream_and_halves_in_between(stage) -> None:
    _, groups = stage
    names = _by_name(groups)
    scores = {g.id: torch.arange(1.0, g.size + 1) for g in groups}
    counts = {scale: {gid: len(c) for gid, c in gp.select_channels(
        groups, scores, ratio=0.5, config=gp.PlanConfig(residual_scale=scale)).items()} for scale in (1.0, 0.5, 0.0)}
    assert counts[1.0] == {names["stem"]: 4, names["up1"]: 6, names["up2"]: 10}
    assert counts[0.5] == {names["stem"]: 2, names["up1"]: 6, names["up2"]: 10}
    assert counts[0.0] == {names["up1"]: 6, names["up2"]: 10}
    chosen = gp.select_channels(groups, scores, ratio=0.5, config=gp.PlanConfig(scope="global", residual_scale=0.0))
    assert names["stem"] not in chosen and chosen


def test_a_flops_target_is_met_inside_the_blocks_and_the_prune_stays_exact(stage) -> None:
    model, groups = stage
    x = torch.randn(5, 4, dtype=torch.float64)
    pruned = gp.prune(model, x, flops_reduction=0.3, config=gp.PlanConfig(residual_scale=0.0))
    assert pruned.stem.out_features == 8 and pruned.up1.out_features < 12 and pruned.up2.out_features < 20
    reached = 1 - gp.measurement.count_macs(pruned, x) / gp.measurement.count_macs(model, x)
    assert reached >= 0.3 - 1e-9
    # zero-then-remove in float64: the residual-protected selection removes exactly what it zeroes
    scores = gp.get_scorer("l1")(groups, model)
    chosen = gp.select_channels(groups, scores, ratio=0.4, config=gp.PlanConfig(residual_scale=0.0))
    expected, got, _ = zeroed_then_removed(model, x, groups, chosen)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_timm_residual_streams_are_found_and_kept() -> None:
    model = timm.create_model("mobilenetv3_small_100", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = gp.find_groups(gp.trace(model, x), ignore=gp.classifier_names(model))
    residual = {groups.by_id(g).name for g in residual_groups(groups)}
    # the stages with an in-stage skip: their project convs produce the stream
    assert residual and all(name.endswith("conv_pwl") for name in residual), residual
    pruned = gp.prune(model, x, ratio=0.3, config=gp.PlanConfig(residual_scale=0.0))
    widths = {n: m.out_channels for n, m in pruned.named_modules() if n.endswith("conv_pwl")}
    before = {n: m.out_channels for n, m in model.named_modules() if n.endswith("conv_pwl")}
    assert all(widths[n] == before[n] for n in residual), (residual, widths)


def test_out_of_reach_names_the_kept_streams(stage) -> None:
    model, _ = stage
    with pytest.raises(gp.InvalidArgumentError, match="residual streams kept by residual_scale=0"):
        gp.prune(model, torch.randn(2, 4, dtype=torch.float64), flops_reduction=0.95,
                 config=gp.PlanConfig(residual_scale=0.0))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0"])
def test_a_bad_residual_scale_is_refused(bad) -> None:
    with pytest.raises(gp.InvalidArgumentError, match="residual_scale"):
        gp.PlanConfig(residual_scale=bad)


def test_the_recipe_config_passes_it_on() -> None:
    from graphprune.recipes import PruneConfig

    assert PruneConfig(residual_scale=0.0).plan_config().residual_scale == 0.0
    with pytest.raises(gp.InvalidArgumentError, match="residual_scale"):
        PruneConfig(residual_scale=2.0)


def test_the_latency_selection_keeps_the_stream_too(stage) -> None:
    from graphprune.latency.predict import LatencyModel
    from graphprune.latency.select import select_for_latency
    from graphprune.latency.table import LatencyTable

    model, groups = stage
    x = torch.randn(2, 4, dtype=torch.float64)
    table = LatencyTable(path=False, timer=lambda spec, threads: 1e-3 * spec.in_width * spec.out_width)
    latency = LatencyModel(model, groups.graph, x, table, width_step=1)
    scores = {g.id: torch.arange(1.0, g.size + 1) for g in groups}
    names = _by_name(groups)
    every, _ = select_for_latency(groups, scores, latency, 0.5 * latency.predict_ms())
    kept, _ = select_for_latency(groups, scores, latency, 0.5 * latency.predict_ms(),
                                 config=gp.PlanConfig(residual_scale=0.0))
    assert names["stem"] in every and names["stem"] not in kept and kept
