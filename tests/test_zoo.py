"""The model zoo: every family prunes, runs, shrinks, and removal is exact.

Exactness: channels chosen at random are zeroed in every producer (weights, biases, norm
affine), then removed; the output must not change. Channels a statistic is taken over
(LayerNorm dims, means, softmax) are left out, since zeroing those is visible by design.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import graphprune as gp
from graphprune.verify import apply_verified_
from graphprune.selection import removal_count
from graphprune.testing import pick_channels, zero_channels_

ZOO = [
    "resnet18", "resnet50", "resnext50_32x4d", "seresnet50", "res2net50_14w_8s", "skresnet18", "resnest14d",
    "regnety_008", "densenet121", "dla34", "dpn68", "cspdarknet53", "vgg11_bn", "repvgg_a0", "mobilenetv2_100",
    "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "efficientnetv2_rw_t", "mnasnet_100",
    "ghostnet_100", "rexnet_100", "inception_v3", "hrnet_w18_small", "convnext_atto", "convnext_tiny",
    "poolformer_s12", "mobileone_s0", "fastvit_t8", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "deit_tiny_distilled_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "levit_128", "mobilevit_xs",
    "efficientformer_l1", "pvt_v2_b0", "swin_tiny_patch4_window7_224", "maxvit_nano_rw_256", "coat_lite_tiny",
    "mixer_s16_224", "resmlp_12_224", "hiera_tiny_224",
]


def randomize_statistics_(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every constant non-trivial: random-init BatchNorm has mean 0 / var 1 and unit affine,
    layer scales start at 1e-5 and some classifiers at zero, which would hide errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.flatten()
            if flat.numel() > 1 and bool((flat == flat[0]).all()):
                if param.dim() == 1:
                    param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if weight is not None:
                    weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
                if bias is not None:
                    bias.copy_(torch.rand(bias.shape, generator=generator) * 0.4 - 0.2)


def make(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    if model.num_classes == 0:  # a headless (self-supervised) checkpoint: add the head transfer would add
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    randomize_statistics_(model)
    example = torch.randn(1, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    return model.eval(), example


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


KNOWN_DEFECTS: dict[str, str] = {}  # open defects (strict xfail: a fix turns them into failures to remove)
# eva02: EvaAttention ends with reshape(B, N, C), C read from its input's shape, so the attention width
# must equal the residual width, and RoPE (pairwise strided slices) pins head_dim: the residual stream
# and every block's heads form one group of 3 whole-head channels; ratio 0.3 removes the nearest
# count, 1 of 3 (graphprune.selection.removal_count)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[n]))
                                  if n in KNOWN_DEFECTS else n for n in ZOO])
def test_prune_runs_shrinks_and_is_exact(name: str) -> None:
    model, x = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(x)

    pruned = gp.prune(model, x, ratio=0.3)
    identity = gp.prune(model, x, ratio=0.0)
    with torch.no_grad():
        assert torch.equal(identity.eval()(x), reference), f"{name}: ratio=0 changed the output"

    # the input model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # eval and train forward work, shapes unchanged, parameters drop by >= 20%
    with torch.no_grad():
        assert pruned.eval()(x).shape == reference.shape
        pruned.train()(torch.cat([x, x]))
    assert n_params(pruned) <= 0.8 * n_params(model), f"{name}: {n_params(pruned) / n_params(model):.3f} kept"

    # exactness: zero the channels a plan removes in their producers, then remove them; in
    # float64, so that a different conv algorithm for the narrower layer cannot hide a real error
    zeroed, x = copy.deepcopy(model).double(), x.double()
    graph = gp.trace(zeroed, x)
    groups = gp.find_groups(graph, model=zeroed)
    picked = pick_channels(groups, 0.3, seed=0)
    assert picked, f"{name}: no channel could be picked"
    zero_channels_(zeroed, groups, picked)
    with torch.no_grad():
        expected = zeroed(x)
    plan, dropped = apply_verified_(zeroed, groups, gp.make_plan(groups, removed=picked), (x,))
    assert plan.num_removed > 0.5 * sum(len(v) for v in picked.values()), f"{name}: {dropped}"
    with torch.no_grad():
        got = zeroed(x)
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((got - expected).abs().max() / scale).item() <= 1e-9


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_ratio_zero_is_identity(name: str) -> None:
    model, x = make(name)
    pruned = gp.prune(model, x, ratio=0.0)
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "convnext_atto", "vit_tiny_patch16_224"])
def test_l1_removes_exactly_the_dead_channels(name: str) -> None:
    model, x = make(name)
    groups = gp.find_groups(gp.trace(model, x), model=model)
    dead = pick_channels(groups, 0.3, seed=3, exact_only=False)
    zero_channels_(model, groups, dead, roles=("out", "in"))
    scores = gp.get_scorer("l1")(groups, model)
    chosen = gp.select_channels(groups, scores, ratio=0.3)
    for gid, channels in dead.items():
        if len(channels) == removal_count(0.3, int(groups.by_id(gid).prunable.sum())):
            assert set(chosen[gid]) == set(channels), groups.by_id(gid).describe()


def _feature_width(features: torch.Tensor, width: int) -> int:
    """The dim of ``forward_features``' output that holds ``width`` channels (NCHW, NHWC or tokens)."""
    dims = [d for d in (1, -1) if features.shape[d] == width]
    assert dims, f"no dim of {tuple(features.shape)} is {width} wide"
    return dims[0]


@pytest.mark.parametrize("name", ZOO)
def test_pruned_model_keeps_the_timm_contract(name: str) -> None:
    """After pruning, every width timm reads matches the weights: re-heading, pre-logits,
    forward_features and every feature_info entry (checked against forward_intermediates)."""
    from graphprune.timm_contract import find_witnesses, unresolved

    model, x = make(name)
    assert unresolved(find_witnesses(model)) == [], name
    with torch.no_grad():
        channel_dim = _feature_width(model.forward_features(x), model.num_features)
        before = [t.shape[1] for t in model.forward_intermediates(x, intermediates_only=True)]
    assert before == [f["num_chs"] for f in model.feature_info], "the check itself must hold unpruned"

    pruned = gp.prune(model, x, ratio=0.3).eval()
    with torch.no_grad():
        features = pruned.forward_features(x)
        assert features.shape[channel_dim] == pruned.num_features <= model.num_features
        assert pruned.forward_head(features, pre_logits=True).shape[-1] == pruned.head_hidden_size
        widths = [t.shape[1] for t in pruned.forward_intermediates(x, intermediates_only=True)]
    assert widths == [f["num_chs"] for f in pruned.feature_info]
    assert widths != before  # pruning changed them, so the equality above is not trivial

    pruned.reset_classifier(5)
    with torch.no_grad():
        assert pruned(x).shape == (1, 5)
        pruned.reset_classifier(0)  # headless: the output is the pre-logits width
        assert pruned(x).shape == (1, pruned.head_hidden_size)
