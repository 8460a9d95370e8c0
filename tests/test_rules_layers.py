"""Rules for the layers beyond conv/linear/norm (issue 16): transposed convs, recurrent layers,
nn.MultiheadAttention, pixel shuffles, creation ops, F.normalize, and weight statistics.

Every rule is checked the same way, in float64: channels are zeroed where they are produced,
then removed; the output must not change (relative 1e-12), and a ratio-0 prune is the identity.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.testing import pick_channels, zero_channels_


def groups_of(model: nn.Module, *inputs: torch.Tensor) -> gp.Groups:
    return gp.find_groups(gp.trace(model, inputs), model=model)


def members(group: gp.ChannelGroup) -> set[tuple[str, int]]:
    return {(m.name, m.dim) for m in group.members}


def group_with(groups: gp.Groups, name: str, dim: int) -> gp.ChannelGroup:
    found = [g for g in groups.all if (name, dim) in members(g)]
    assert found, f"no group has {name} dim {dim}"
    return found[0]


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in out if isinstance(o, torch.Tensor)]


def removal_error(model: nn.Module, inputs: tuple, removed: dict[int, tuple[int, ...]] | None = None, *,
                  ratio: float = 0.4, seed: int = 0) -> tuple[float, int, nn.Module]:
    """Zero channels in their producers, remove them; the largest relative output change,
    the number of channels removed and the pruned model (float64 throughout)."""
    model = copy.deepcopy(model).double().eval()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    groups = groups_of(model, *inputs)
    removed = pick_channels(groups, ratio, seed=seed) if removed is None else removed
    zero_channels_(model, groups, removed)
    expected = _outputs(model, inputs)
    gp.apply_plan_(model, gp.make_plan(groups, removed=removed))
    got = _outputs(model, inputs)
    assert [g.shape for g in got] == [e.shape for e in expected]
    error = max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-30)) for g, e in zip(got, expected))
    return error, sum(len(v) for v in removed.values()), model


def assert_ratio_zero_is_identity(model: nn.Module, inputs: tuple) -> None:
    model = model.eval()
    pruned = gp.prune(model, inputs, ratio=0.0)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), model.state_dict().values()))
    for a, b in zip(_outputs(pruned, inputs), _outputs(model, inputs)):
        assert torch.equal(a, b)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- weight statistics: standardized filters (timm StdConv2d / ScaledStdConv2d, NF-ResNets) ----

def test_standardized_filter_inputs_are_a_statistic_and_its_outputs_prune_exactly() -> None:
    from timm.layers import ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), ScaledStdConv2d(8, 6, 1), nn.ReLU(), StdConv2d(6, 5, 1),
                        nn.ReLU(), nn.Conv2d(5, 2, 1))
    x = torch.randn(1, 3, 9, 9)
    g = groups_of(net, x)
    feeding = [group_with(g, "2.weight", 1), group_with(g, "4.weight", 1)]
    assert all(f.prunable.all() and f.statistic.all() for f in feeding)  # prunable, but not invisibly
    last = group_with(g, "4.weight", 0)  # a standardized conv's outputs, read by a plain conv
    assert last.prunable.all() and not last.statistic.any()
    error, n, pruned = removal_error(net, (x,), {last.id: (0, 3)})
    assert error <= 1e-12 and pruned[4].out_channels == 3
    # removing a zeroed input column re-standardizes the filter: that is why it is marked
    error, _, _ = removal_error(net, (x,), {feeding[1].id: (1, 4)})
    assert error > 1e-3
    assert_ratio_zero_is_identity(net, (x,))


def test_nf_resnet26_exact_picks_skip_every_standardized_input() -> None:
    """Every channel of nf_resnet26 feeds a standardized filter, so an exact pick must be empty
    (before: 1747 channels picked, zero-then-remove changed the logits by 2.2 % in float64)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("nf_resnet26", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    g = groups_of(model, x)
    assert len(g) >= 10 and all(group.statistic[group.prunable].all() for group in g)
    assert pick_channels(g, 0.3, seed=0) == {}
    error, n, _ = removal_error(model, (x,), pick_channels(g, 0.3, seed=0, exact_only=False))
    assert n > 1000 and error > 1e-3  # the marked channels really are not removable invisibly
    assert_ratio_zero_is_identity(model, (x,))
