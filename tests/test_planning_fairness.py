"""Plans that take the requested ratio from what can be pruned, and do not starve producers.

Issue 16 item 6: counts are taken on a group's prunable channels (an option-A shortcut's
zero-padded channels are frozen, so the 16-channel stem of a CIFAR ResNet is only 16 of its
group's 400), and concatenation groups compare their producers on normalized scores
(a 3x3 producer's raw L1 holds 9x the weights of a 1x1's; a DenseNet layer's output feeds
every later layer of its block).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.assets import CifarResNet
from graphprune.selection import producer_segments, removal_count
from graphprune.testing import zeroed_then_removed


def l1_selection(model: nn.Module, x: torch.Tensor, ratio: float, config: gp.PlanConfig | None = None):
    groups = gp.find_groups(gp.trace(model, x))
    return groups, gp.select_channels(groups, gp.get_scorer("l1")(groups, model), ratio=ratio, config=config)


def kept_out_channels(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def assert_zero_then_remove_exact(model: nn.Module, x: torch.Tensor, groups: gp.Groups, removed: dict) -> nn.Module:
    """Zero the removed channels' producers, remove them, and compare in float64."""
    expected, got, model = zeroed_then_removed(copy.deepcopy(model).double(), x.double(), groups, removed)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * expected.abs().max().item())
    return model


@pytest.fixture(scope="module")
def cifar() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return CifarResNet(3).eval(), torch.randn(2, 3, 32, 32)


def test_option_a_stem_loses_the_ratio_of_its_prunable_channels(cifar) -> None:
    model, x = cifar
    groups, removed = l1_selection(model, x, 0.3)
    stem = next(g for g in groups if any(m.name == "conv1.weight" for m in g.members))
    assert int(stem.prunable.sum()) == 16 < stem.size  # the padded channels are frozen
    assert len(removed[stem.id]) == removal_count(0.3, 16) == 5  # was 15 of 16: 16 -> 1 channel
    for group in groups:
        assert len(removed.get(group.id, ())) == removal_count(0.3, int(group.prunable.sum())), group.describe()
    pruned = assert_zero_then_remove_exact(model, x, groups, removed)
    widths = kept_out_channels(pruned)
    assert widths["conv1"] == widths["layer1.0.conv2"] == 11
    assert widths["layer1.0.conv1"] == 11 and widths["layer3.0.conv1"] == 64 - 19


def test_global_target_and_cap_count_prunable_channels(cifar) -> None:
    model, x = cifar
    config = gp.PlanConfig(scope="global", max_group_ratio=0.5)
    groups, removed = l1_selection(model, x, 0.3, config)
    prunable = sum(int(g.prunable.sum()) for g in groups)
    assert sum(len(v) for v in removed.values()) == int(0.3 * prunable)
    for group in groups:
        assert len(removed.get(group.id, ())) <= 0.5 * int(group.prunable.sum()), group.describe()


def test_squeezenet_expand3x3_loses_channels() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.squeezenet1_1().eval(), torch.randn(1, 3, 64, 64)
    groups, removed = l1_selection(model, x, 0.3)
    concatenations = [g for g in groups if producer_segments(g).any()]
    assert len(concatenations) == 8  # the fire modules' expand1x1 | expand3x3 outputs
    pruned = assert_zero_then_remove_exact(model, x, groups, removed)
    widths = kept_out_channels(pruned)
    for name, before in kept_out_channels(model).items():
        if name.endswith("expand3x3"):  # none of them lost a channel before
            assert widths[name] <= before - 0.15 * before, (name, before, widths[name])


def test_densenet_every_layer_loses_channels() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.densenet121().eval(), torch.randn(1, 3, 64, 64)
    groups, removed = l1_selection(model, x, 0.3)
    pruned = assert_zero_then_remove_exact(model, x, groups, removed)
    before, after = kept_out_channels(model), kept_out_channels(pruned)
    untouched = [name for name in before if after[name] == before[name]]
    assert untouched == [], untouched  # 34 of 120 convs before: conv0, transitions, every 'conv2' of early layers
    lost = sorted(before[n] - after[n] for n in before if n.endswith("conv2"))  # 32 each, the growth rate
    assert 4 <= lost[0] and lost[-1] <= 16, lost  # 7 to 14 here


def test_single_producer_groups_are_ranked_on_raw_scores() -> None:
    """Normalizing per segment changes nothing where every channel has the same producers."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
    scores = {groups[0].id: torch.tensor([5.0, 1, 7, 2, 8, 3, 6, 4])}
    assert not producer_segments(groups[0]).any()
    assert gp.select_channels(groups, scores, ratio=0.25) == {groups[0].id: (1, 3)}
