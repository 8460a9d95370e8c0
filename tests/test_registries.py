"""Tests swept over the registries: every timm ``test_*`` model, every scorer, every block scorer."""

from __future__ import annotations

import copy
import inspect

import pytest
import timm
import torch

import graphprune as gp
from graphprune.verify import apply_verified_
from graphprune.blocks.scoring import BLOCK_REGISTRY
from graphprune.scoring import list_scorers, scorer_spec
from graphprune.testing import pick_channels, zero_channels_
from test_zoo import make

TIMM_TEST_MODELS = timm.list_models("test_*")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


@pytest.mark.parametrize("name", TIMM_TEST_MODELS)
def test_timm_test_model_identity_exactness_and_plan_sizes(name: str) -> None:
    """Ratio 0 is the identity; removing zeroed channels leaves the float64 output unchanged;
    every pruned parameter has the size the plan says."""
    model, x = make(name)
    with torch.no_grad():
        reference = model(x)
    identity = gp.prune(model, x, ratio=0.0)
    assert all(torch.equal(a, b) for a, b in zip(identity.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(identity.eval()(x), reference)

    zeroed, x = copy.deepcopy(model).double(), x.double()
    groups = gp.find_groups(gp.trace(zeroed, x), model=zeroed)
    picked = pick_channels(groups, 0.3, seed=0)
    assert picked, f"{name}: no channel could be picked"
    zero_channels_(zeroed, groups, picked)
    with torch.no_grad():
        expected = zeroed(x)
    sizes = {k: tuple(v.shape) for k, v in _tensors(zeroed).items()}
    plan, dropped = apply_verified_(zeroed, groups, gp.make_plan(groups, removed=picked), (x,))
    assert plan.num_removed > 0.5 * sum(len(v) for v in picked.values()), f"{name}: {dropped}"
    with torch.no_grad():
        got = zeroed(x)
    assert ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item() <= 1e-9

    state = _tensors(zeroed)  # parameters and buffers, non-persistent ones (relative-position tables) too
    for edit in plan.edits:
        assert sizes[edit.name][edit.dim] == edit.size, edit.name
        assert state[edit.name].shape[edit.dim] == len(edit.keep), edit.name
    edited = {e.name for e in plan.edits}
    assert all(tuple(state[k].shape) == s for k, s in sizes.items() if k not in edited)


def _options(name: str, seed: int = 0) -> dict:
    spec, options = scorer_spec(name), {}
    if spec.needs_data:
        generator = torch.Generator().manual_seed(0)
        options.update(data=[(torch.randn(6, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1]))],
                       progress=False)
    if spec.seeded:
        options["seed"] = seed
    return options


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


@pytest.mark.parametrize("name", list_scorers())
def test_scorer_spec_matches_its_signature(name: str) -> None:
    """``needs_data`` / ``seeded`` say what the scorer takes, so callers can trust them."""
    spec, accepted = scorer_spec(name), _parameters(gp.get_scorer(name))
    assert ("data" in accepted) == spec.needs_data and ("seed" in accepted) == spec.seeded
    if spec.needs_data:
        assert {"progress", "max_batches"} <= accepted


@pytest.mark.parametrize("name", list_scorers())
def test_scorer_gives_one_finite_score_per_channel_and_leaves_the_model(name: str) -> None:
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=4).train()
    groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 32, 32)), ignore=gp.classifier_names(net), model=net)
    assert len(groups) > 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scores = gp.get_scorer(name)(groups, net, **_options(name))
    assert set(scores) == {g.id for g in groups}
    for group in groups:
        assert scores[group.id].shape == (group.size,) and bool(torch.isfinite(scores[group.id]).all())
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    again = gp.get_scorer(name)(groups, net, **_options(name))
    assert all(torch.equal(scores[g], again[g]) for g in scores)  # deterministic (seeded where random)
    if scorer_spec(name).seeded:
        other = gp.get_scorer(name)(groups, net, **_options(name, seed=1))
        assert not all(torch.equal(scores[g], other[g]) for g in scores)


def test_unknown_scorer_lists_the_registry() -> None:
    with pytest.raises(gp.InvalidArgumentError, match=r"known scorers: \['bn_scale', 'classmean', 'l1'"):
        gp.get_scorer("l3")


@pytest.mark.parametrize("name", BLOCK_REGISTRY.names())
def test_block_scorer_spec_matches_its_signature(name: str) -> None:
    spec, accepted = BLOCK_REGISTRY.spec(name), _parameters(BLOCK_REGISTRY.get(name))
    assert ("data" in accepted) == spec.needs_data and ("seed" in accepted) == spec.seeded
