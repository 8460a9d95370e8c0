"""BatchNorm statistics after a removal: the shift correction is exact where it can be
(nothing changed, a scale a BatchNorm absorbs, zeroed channels removed), float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune as gp
import graphprune.recipes as R
from graphprune.recipes.norms import kept_channels, recalibrate_norms_, shift_norms_


def _net() -> nn.Module:
    """conv-BN-ReLU twice, a residual add and a head: BatchNorms fed by changed and unchanged inputs."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                      nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8))
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = torch.relu(x + self.body(x))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():  # running statistics unlike the data's: a model trained with frozen statistics
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 + 0.5, torch.zeros(6))
            for _ in range(n)]


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_unchanged_model_keeps_every_statistic_bit_for_bit() -> None:
    net = _net()
    changed = copy.deepcopy(net)
    assert shift_norms_(changed, net, _batches()) == 0
    after = _stats(changed)
    for key, value in _stats(net).items():
        assert torch.equal(after[key], value), key
    reset = copy.deepcopy(net)
    recalibrate_norms_(reset, _batches())
    assert not torch.equal(_stats(reset)["stem.1.running_mean"], _stats(net)["stem.1.running_mean"])  # reset moves them


def test_a_scale_the_norm_absorbs_is_undone_exactly() -> None:
    net = _net()
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled.stem[0].weight.mul_(2.5)
        scaled.stem[0].bias.mul_(2.5)
    x = _batches()[0][0]
    assert not torch.allclose(scaled(x), net(x))
    shift_norms_(scaled, net, _batches())
    torch.testing.assert_close(scaled(x), net(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(scaled.body[1].running_mean, net.body[1].running_mean, rtol=1e-9, atol=1e-9)


def test_zeroed_channels_removed_need_no_correction() -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = gp.find_groups(gp.trace(net, x))
    inner = next(g for g in groups if any(m.name == "body.1.weight" for m in g.members))
    removed = {inner.id: (2, 5, 7)}
    zeroed = copy.deepcopy(net)
    with torch.no_grad():  # the channels' output is exactly zero: removing them changes nothing downstream
        for name in ("body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"):
            zeroed.get_parameter(name)[list(removed[inner.id])] = 0.0
    pruned = copy.deepcopy(zeroed)
    plan = gp.make_plan(groups, removed=removed)
    gp.apply_plan_(pruned, plan)
    assert kept_channels(plan) == {"body.1": tuple(i for i in range(12) if i not in removed[inner.id])}
    before = _stats(pruned)
    shift_norms_(pruned, zeroed, _batches(), kept=kept_channels(plan))
    for key, value in _stats(pruned).items():
        torch.testing.assert_close(value, before[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-12, atol=1e-12)


def test_a_removal_moves_the_outputs_toward_the_reference() -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = gp.find_groups(gp.trace(net, x))
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, net), ratio=0.3)
    pruned = copy.deepcopy(net)
    gp.apply_plan_(pruned, plan)
    probe = torch.cat([b for b, _ in _batches()])
    error_before = (pruned(probe) - net(probe)).pow(2).mean()
    assert shift_norms_(pruned, net, _batches(), kept=kept_channels(plan)) > 0
    assert (pruned(probe) - net(probe)).pow(2).mean() < error_before


def test_widths_that_do_not_match_without_kept_are_refused_and_nothing_changes() -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = gp.find_groups(gp.trace(net, x))
    pruned = copy.deepcopy(net)
    gp.apply_plan_(pruned, gp.make_plan(groups, gp.get_scorer("l1")(groups, net), ratio=0.3))
    before = _stats(pruned)
    with pytest.raises(gp.InvalidArgumentError, match="kept="):
        shift_norms_(pruned, net, _batches())
    assert all(torch.equal(v, before[k]) for k, v in _stats(pruned).items())


def test_a_failing_batch_leaves_the_statistics_as_they_were() -> None:
    net = _net()
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled.stem[0].weight.mul_(2.0)
    before = _stats(scaled)

    def batches():
        yield _batches()[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        shift_norms_(scaled, net, batches())
    assert all(torch.equal(v, before[k]) for k, v in _stats(scaled).items())
    assert not scaled.training and not net.training


def test_prune_stage_at_ratio_zero_is_the_identity() -> None:
    net = _net().float()
    images = torch.randn(12, 3, 8, 8) * 2 + 0.5
    loader = DataLoader(TensorDataset(images, torch.arange(12) % 3), batch_size=4)
    data = R.TransferData(loader, loader, ("a", "b", "c"))
    expected = net(images)
    pruned = copy.deepcopy(net)
    record = R.prune_stage_(pruned, data, R.PruneConfig(ratio=0.0, flops_reduction=None), progress=False)
    assert record.details["recalibration"] == "shift" and record.details["recalibrated_norms"] == 0
    assert torch.equal(pruned.eval()(images), expected)
    reset = copy.deepcopy(net)
    R.prune_stage_(reset, data, R.PruneConfig(ratio=0.0, flops_reduction=None, recalibration="reset"), progress=False)
    assert not torch.equal(reset.eval()(images), expected)  # what the default avoids


def test_unknown_recalibration_is_refused() -> None:
    with pytest.raises(gp.InvalidArgumentError, match="recalibration"):
        R.PruneConfig(recalibration="adaptive")
