"""Verification (issue 16 items 3 and 5): outputs whose size follows the data (detection boxes)
are compared by structure, rank and the dims that cannot change; a group whose removal breaks
the model is found by bisection and left whole, the others pruned, exactly (float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.testing import zero_channels_
from graphprune.verify import apply_verified_, check_outputs


class Branches(nn.Module):
    """Two conv branches concatenated; each ``"perm"`` branch reorders its channels with an index
    kept in a buffer (``x[:, perm]``), each ``"view"`` branch reshapes with a literal 16, and a
    ``"plain"`` branch has neither. The graph cannot see that the first two pin 16 channels."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        super().__init__()
        self.kinds = kinds
        self.convs = nn.ModuleList(nn.Conv2d(3, 16, 3, padding=1) for _ in kinds)
        self.mix = nn.ModuleList(nn.Conv2d(16, 8, 1) for _ in kinds)
        for i, kind in enumerate(kinds):
            if kind == "perm":
                self.register_buffer(f"perm{i}", torch.randperm(16, generator=torch.Generator().manual_seed(i)))
        self.head = nn.Linear(8 * len(kinds), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, kind in enumerate(self.kinds):
            h = torch.relu(self.convs[i](x))
            if kind == "perm":
                h = h[:, getattr(self, f"perm{i}")]
            elif kind == "view":
                h = h.view(x.shape[0], 16, -1).unsqueeze(-1)  # (B, 16, H*W, 1): the 16 is a literal
            parts.append(self.mix[i](h).mean((2, 3)))
        return self.head(torch.cat(parts, 1))


def _model(*kinds: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Branches(kinds).double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)


def _owner(groups: gp.Groups, name: str) -> int:
    return next(g.id for g in groups if any(m.name == name and m.dim == 0 for m in g.members))


@pytest.mark.parametrize("kind", ["perm", "view"])
def test_the_group_that_breaks_the_model_is_isolated_and_the_rest_pruned_exactly(kind: str):
    model, x = _model("plain", kind, "plain")
    groups = gp.find_groups(gp.trace(model, x), model=model)
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, model), ratio=0.3)
    broken = _owner(groups, "convs.1.weight")
    assert broken in plan.removed and len(plan.removed) >= 3
    pruned = copy.deepcopy(model)
    applied, dropped = apply_verified_(pruned, groups, plan, (x,))
    assert list(dropped) == [broken] and set(applied.removed) == set(plan.removed) - {broken}
    assert pruned.convs[1].out_channels == 16 and pruned.convs[0].out_channels == pruned.convs[2].out_channels == 11
    zeroed = copy.deepcopy(model)
    zero_channels_(zeroed, groups, dict(applied.removed))
    gp.apply_plan_(exact := copy.deepcopy(zeroed), applied)
    with torch.no_grad():
        assert torch.allclose(exact(x), zeroed(x), rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match=rf"1 groups left unpruned.*group {broken} \(convs\.1\)"):
        small = gp.prune(model, x, ratio=0.3)
    assert small.convs[1].out_channels == 16 and small.convs[0].out_channels == 11


class Permuted(nn.Module):
    """Two convs whose channels are reordered by an index buffer, then pooled into the output:
    every group the graph finds breaks the model."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 16, 3) for _ in range(2))
        for i in range(2):
            self.register_buffer(f"perm{i}", torch.randperm(16, generator=torch.Generator().manual_seed(i)))
        self.heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.heads[i](conv(x)[:, getattr(self, f"perm{i}")].mean((2, 3))) for i, conv in enumerate(self.convs))


def test_when_no_group_can_go_the_full_plans_error_is_kept_and_the_model_unchanged():
    torch.manual_seed(0)
    model, x = Permuted().eval(), torch.randn(1, 3, 8, 8)
    groups = gp.find_groups(gp.trace(model, x), model=model)
    assert len(groups) == 2  # bisection has something to split
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gp.PruneError, match=r"does not run \(IndexError: index \d+ is out of bounds.*left unchanged"):
        gp.prune_(model, x, ratio=0.3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [c.out_channels for c in model.convs] == [16, 16]


class Detector(nn.Module):
    """Scores per row, then the rows above zero: the row count follows the data."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 16)
        self.box = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.box(torch.relu(self.body(x)))
        return {"boxes": out[out[:, 0] > 0][:, 1:], "features": out}


def test_a_leading_dim_that_follows_the_data_may_change_and_nothing_else():
    torch.manual_seed(0)
    net, x = Detector().double(), torch.randn(64, 4, dtype=torch.float64)
    traced = gp.trace(net, x).outputs
    # "features" too: its leading dim is channel-free in a forward that ran a boolean mask
    assert traced[0].data_sized == (True, True)
    with torch.no_grad():
        net.box.bias[0] -= 0.5  # fewer rows above zero
    assert net(x)["boxes"].shape[0] != traced[0].shapes[0][0]
    assert check_outputs(net, (x,), traced) is None
    plain = gp.trace(net.body, x).outputs  # no op that follows the data: the leading dim stays
    assert plain[0].data_sized == (False,)
    assert "channel-free dim 0: 64 -> 63" in check_outputs(net.body, (x[:63],), plain)
    narrow = Detector().double()
    narrow.box = nn.Linear(16, 4).double()
    assert "channel dim 1: 4 -> 3" in check_outputs(narrow, (x,), traced)  # a data-sized tensor's other dims
    net.forward = lambda x: (Detector.forward(net, x)["boxes"],)
    assert "output structure changed" in check_outputs(net, (x,), traced)


DETECTORS = ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2",
             "keypointrcnn_resnet50_fpn"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n not in DETECTORS[:2] else n
                                  for n in DETECTORS])
def test_torchvision_detectors_prune_and_keep_running(name: str):
    torch.manual_seed(0)
    build = getattr(torchvision.models.detection, name)
    # every anchor scores, NMS alone decides the box count (at 0.05 the random head keeps none)
    thresh = {"score_thresh": 0.0, "detections_per_img": 5000} if name.startswith("retinanet") else {}
    model = build(weights=None, weights_backbone=None, min_size=224, max_size=224, **thresh).eval()
    images = ([torch.rand(3, 224, 224)],)
    small = gp.prune(model, images, ratio=0.3)
    assert sum(p.numel() for p in small.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        reference, got = model(*images), small([torch.rand(3, 224, 224)])
    assert len(got) == 1 and got[0].keys() == reference[0].keys()
    assert all(got[0][k].shape[1:] == reference[0][k].shape[1:] for k in got[0])  # only the box count may differ
