"""A pruned timm model is still a timm model: widths, heads, features, memory format.

The zoo-wide check (every zoo model re-heads, and its ``feature_info`` matches
``forward_intermediates``) is ``tests/test_zoo.py::test_pruned_model_keeps_the_timm_contract``;
this file covers what the zoo cannot: save/load, depth pruning, ``features_only`` wrappers,
errors, non-timm models and ``channels_last``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from timm.models import FeatureListNet
from torch import nn

import graphprune as gp
import graphprune.blocks as gb
from graphprune import io as gio
from graphprune.timm_contract import find_witnesses, unresolved


def _model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _head_widths(model: nn.Module) -> set[int]:
    heads = model.get_classifier()  # a distilled DeiT has two
    return {head.in_features for head in (heads if isinstance(heads, tuple) else (heads,))}


@pytest.mark.parametrize(("name", "kwargs", "size"), [
    ("convnext_atto", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
])
def test_saved_and_reloaded_pruned_model_can_be_re_headed(name: str, kwargs: dict, size: int, tmp_path: Path):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).double()
    pruned = gp.prune(_model(name, **kwargs), x[:1].float(), ratio=0.3)
    loaded = gio.load(gio.save(pruned, tmp_path / "pruned"))
    assert loaded.num_features == pruned.num_features < _model(name, **kwargs).num_features
    assert [f["num_chs"] for f in loaded.feature_info] == [f["num_chs"] for f in pruned.feature_info]
    loaded.reset_classifier(5)
    assert _head_widths(loaded) == {loaded.num_features}
    loaded.double()
    with torch.no_grad():
        assert loaded(x).shape == (2, 5)
        # the new head sees exactly the pruned model's pre-logits features
        features = pruned.double().forward_head(pruned.forward_features(x), pre_logits=True)
        again = loaded.forward_head(loaded.forward_features(x), pre_logits=True)
    assert torch.equal(features, again)


@pytest.mark.parametrize(("name", "flatten"), [("resnet18", False), ("efficientnet_b0", True),
                                              ("convnext_atto", True), ("densenet121", True)])
def test_features_only_wrapper_of_a_pruned_model_reports_true_widths(name: str, flatten: bool):
    """``FeatureListNet`` is what ``features_only=True`` builds for these; necks read its channels()."""
    x = torch.randn(1, 3, 64, 64)
    pruned = gp.prune(_model(name), x, ratio=0.3)
    net = FeatureListNet(copy.deepcopy(pruned), out_indices=tuple(range(len(pruned.feature_info))),
                         flatten_sequential=flatten).eval()  # as timm's builder for each
    with torch.no_grad():
        widths = [t.shape[1] for t in net(x)]
    assert widths == net.feature_info.channels() == [f["num_chs"] for f in pruned.feature_info]
    assert widths != [f["num_chs"] for f in _model(name).feature_info]


def test_depth_then_width_pruning_keeps_the_contract():
    model, x = _model("resnet18"), torch.randn(1, 3, 64, 64)
    blocks = gb.find_blocks(model, x)
    gb.apply_block_plan_(model, gb.make_block_plan(blocks, ["layer1.1", "layer4.1"]))
    assert unresolved(find_witnesses(model)) == []
    pruned = gp.prune(model, x, ratio=0.5)
    with torch.no_grad():
        widths = [t.shape[1] for t in pruned.forward_intermediates(x, intermediates_only=True)]
    assert widths == [f["num_chs"] for f in pruned.feature_info] == [32, 32, 64, 128, 256]
    pruned.reset_classifier(3)
    assert pruned(x).shape == (1, 3)


def test_witnesses_tie_each_width_to_a_tensor_of_that_size():
    model = _model("convnext_atto")
    witnesses = find_witnesses(model)
    assert unresolved(witnesses) == []
    assert witnesses[("head", "in_features", None)].tensor == "head.norm.weight"
    assert witnesses[("", "head_hidden_size", None)].tensor == "head.fc.weight"
    state = model.state_dict()
    for (module, attr, index), witness in witnesses.items():
        owner = model if module in ("", "feature_info") else model.get_submodule(module)
        value = model.feature_info[index]["num_chs"] if module == "feature_info" else getattr(owner, attr)
        value = value[index] if isinstance(value, (tuple, list)) else value
        assert state[witness.tensor].shape[witness.dim] == value, (module, attr, witness)


def test_a_failed_removal_restores_the_contract():
    model, x = _model("resnet18"), torch.randn(1, 3, 32, 32)
    groups = gp.find_groups(gp.trace(model, x), model=model)
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, model), ratio=0.5)
    info = copy.deepcopy(model.feature_info)
    bad = gp.Plan(plan.removed, plan.edits, (*plan.patches, gp.AttrPatch("fc", "no_such_attr", 1, 2)))
    with pytest.raises(gp.InvalidArgumentError, match="no_such_attr"):
        gp.apply_plan_(model, bad)
    assert model.feature_info == info and model.num_features == model.head_hidden_size == 512


def test_models_without_the_timm_contract_are_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(1, 3, 8, 8))
    net.num_features = 8  # a user attribute that only looks like timm's
    assert find_witnesses(net) == {}
    gp.prune_(net, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert net.num_features == 8 and net[0].out_channels == 4


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "efficientnet_b0"])
def test_channels_last_stays_channels_last(name: str):
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    model = _model(name).to(memory_format=torch.channels_last)
    pruned = gp.prune(model, x, ratio=0.3)
    convs = [m.weight for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    # not vacuous: the pruned k x k convs are not also plain contiguous
    assert any(not w.is_contiguous() for w in convs)
    with torch.no_grad():
        assert pruned.forward_features(x).is_contiguous(memory_format=torch.channels_last)
    plain = gp.prune(_model(name), x.contiguous(), ratio=0.3)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(("name", "kwargs"), [("convnext_atto", {}), ("vit_tiny_patch16_224", {"img_size": 32})])
def test_a_recipe_re_heads_a_pruned_and_reloaded_backbone(name: str, kwargs: dict, tmp_path: Path):
    """The transfer workflow: prune, save, load elsewhere, then S->T gives it a head for the target task."""
    from torch.utils.data import DataLoader, TensorDataset

    from graphprune import recipes as R

    x = torch.randn(1, 3, 32, 32)
    loaded = gio.load(gio.save(gp.prune(_model(name, **kwargs), x, ratio=0.3), tmp_path / "pruned"))
    pairs = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    data = R.TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b", "c"))
    config = R.TransferConfig(source=R.FinetuneConfig(epochs=1.0), run=R.RunConfig(progress=False))  # one step
    model, result = R.s_to_t(loaded, data, config)
    assert [s.name for s in result.stages][-1] == "source"
    assert _head_widths(model) == {loaded.num_features}
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3)
