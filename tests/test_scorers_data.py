"""Data-driven scorers (taylor, target_taylor, classmean): invariants, real-model behaviour, bad input.

The real-model checks use ImageNet EfficientNet-Lite0 with a new 17-class head fitted as a
linear probe on a flowers17 train subset (2 images per class, 96 px). The probe makes the
model a plausible "fine-tuned" reference for classmean: with a random head the class
logits, and so the cross-entropy gradients, would carry no information about the task.
"""

from __future__ import annotations

import copy
import functools
import math
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune as gp
import graphprune.scoring.classmean  # noqa: F401  (registers classmean)
import graphprune.scoring.target_taylor  # noqa: F401  (registers target_taylor)
import graphprune.scoring.taylor  # noqa: F401  (registers taylor)
from graphprune.scoring import list_scorers
from graphprune.scoring.classmean import class_means
from graphprune.testing import pick_channels, zero_channels_

DATA_SCORERS = tuple(list_scorers(needs_data=True))
NORMS = (nn.BatchNorm2d, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# small models and data


class SmallNet(nn.Module):
    """Dense conv, depthwise conv, a residual pair, and an MLP head: every member kind in a few layers."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.bn2 = nn.BatchNorm2d(24)
        self.res = nn.Conv2d(24, 24, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24, 20)
        self.fc2 = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        x = F.relu(x + self.bn3(self.res(x)))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


@torch.no_grad()
def randomize_affine_(net: nn.Module) -> nn.Module:
    """Random BatchNorm gamma / beta: timm zero-inits each block's last gamma, which would cut every gradient."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(0.1, 0.3)
    return net


@torch.no_grad()
def calibrate_norms_(net: nn.Module, image_size: int, batch_size: int) -> nn.Module:
    """BatchNorm running statistics measured on the test data, as after training (then eval mode).

    With arbitrary statistics some ReLUs are off on every input; such a channel is really dead
    and rightly scores 0 under a data-driven scorer, which the dead-channel test must not meet.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    net.train()
    for x, _ in random_batches(image_size, batch_size=batch_size):
        net(x)
    for m in norms:
        m.momentum = 0.1
    return net.eval()


@functools.cache
def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        net.fc1.bias.uniform_(0.5, 1.0)  # no hidden unit dead on every sample
    return calibrate_norms_(randomize_affine_(net), *MODELS["small_net"][1:])


@functools.cache
def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=5)
    return calibrate_norms_(randomize_affine_(net), *MODELS["resnet18"][1:])


def small_net() -> nn.Module:
    return copy.deepcopy(_small_net())


def resnet18() -> nn.Module:
    return copy.deepcopy(_resnet18())


MODELS = {"small_net": (small_net, 16, 16), "resnet18": (resnet18, 48, 8)}  # builder, image px, batch size


def random_batches(image_size: int, *, n_batches: int = 2, batch_size: int = 16, num_classes: int = 5,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, image_size, image_size, generator=generator),
             torch.arange(batch_size) % num_classes) for _ in range(n_batches)]


def groups_of(model: nn.Module, image_size: int) -> gp.Groups:
    return gp.find_groups(gp.trace(model, torch.randn(1, 3, image_size, image_size)), model=model)


def score(name: str, groups: gp.Groups, model: nn.Module, data, **options) -> dict[int, torch.Tensor]:
    if name in DATA_SCORERS:
        options = {"data": data, "progress": False, **options}
    return gp.get_scorer(name)(groups, model, **options)


def snapshot(model: nn.Module) -> dict:
    """Everything a scorer must leave untouched."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for k, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    for key, grad in before["grad"].items():
        got = after["grad"][key]
        assert (got is None) == (grad is None) and (grad is None or torch.equal(got, grad)), f"{key}.grad changed"


def has_norm(group: gp.ChannelGroup, model: nn.Module) -> bool:
    modules = dict(model.named_modules())
    return any(m.name.endswith(".weight") and isinstance(modules.get(m.module), NORMS) for m in group.members)


# ---------------------------------------------------------------------------------------------
# 1. dead channels score exactly zero, and only they


@pytest.mark.parametrize("scorer", ["taylor", "target_taylor", "l1", "l2", "bn_scale"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_dead_channels_rank_lowest_with_score_zero(model_name: str, scorer: str) -> None:
    build, image_size, batch_size = MODELS[model_name]
    model = build()
    groups = groups_of(model, image_size)
    dead = pick_channels(groups, 0.25, seed=1)
    zero_channels_(model, groups, dead, roles=("out", "in"))
    if scorer in DATA_SCORERS:  # statistics of the inputs the zeroing left, so no live ReLU is off everywhere
        calibrate_norms_(model, image_size, batch_size)
    scores = score(scorer, groups, model, random_batches(image_size, batch_size=batch_size))
    checked = 0
    for group in groups:
        if group.id not in dead or (scorer == "bn_scale" and not has_norm(group, model)):
            continue  # bn_scale gives 0 to every channel of a group without a norm layer
        s = scores[group.id]
        is_dead = torch.zeros(group.size, dtype=torch.bool)
        is_dead[list(dead[group.id])] = True
        assert torch.all(s[is_dead] == 0), f"{group.describe()}: dead channels scored {s[is_dead]}"
        assert torch.all(s[~is_dead] > 0), f"{group.describe()}: a live channel scored 0"
        checked += 1
    assert checked >= (2 if model_name == "small_net" else 8)


# ---------------------------------------------------------------------------------------------
# 2. every member counts (depthwise conv and norm affine included)


def hand_taylor(model: nn.Module, group: gp.ChannelGroup, batches, members: set[str]) -> torch.Tensor:
    """Mean over batches of sum over ``members`` of |w * dL/dw| per channel, computed naively."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    total = torch.zeros(group.size, dtype=torch.float64)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for member in group.members:
            if member.name not in members:
                continue
            p = params[member.name]
            contrib = (p * p.grad).abs().double().movedim(member.dim, 0).reshape(p.shape[member.dim], -1).sum(1)
            for index, channel in enumerate(member.channel):
                if channel >= 0:
                    total[channel] += contrib[index]
    return total / len(batches)


def test_taylor_equals_hand_computation_over_every_member() -> None:
    model = small_net()
    batches = random_batches(16)
    groups = groups_of(model, 16)
    group = next(g for g in groups if any(m.name == "dw.weight" for m in g.members))
    names = {m.name for m in group.members} & set(dict(model.named_parameters()))
    assert {"stem.weight", "bn0.weight", "dw.weight", "bn1.weight", "pw.weight"} <= names
    got = score("taylor", groups, model, batches)[group.id]
    torch.testing.assert_close(got, hand_taylor(model, group, batches, names), rtol=1e-5, atol=0)
    without = hand_taylor(model, group, batches, names - {"dw.weight", "bn0.weight", "bn1.weight"})
    assert torch.all(got > without * 1.01), "depthwise conv and BatchNorm affine must add to the score"


@pytest.mark.parametrize("scorer", ["taylor", "l1"])
@pytest.mark.parametrize("member", ["dw.weight", "bn1.weight"])
def test_scaling_one_member_moves_the_group_score(member: str, scorer: str) -> None:
    model = small_net()
    batches = random_batches(16)
    groups = groups_of(model, 16)
    group = next(g for g in groups if any(m.name == member for m in g.members))
    before = score(scorer, groups, model, batches)[group.id]
    with torch.no_grad():
        dict(model.named_parameters())[member].mul_(3.0)
    after = score(scorer, groups, model, batches)[group.id]
    assert torch.all((after - before).abs() > 1e-3 * before), f"{scorer} ignores {member}"


def test_l1_closed_form_for_a_scaled_depthwise_member() -> None:
    model = small_net()
    groups = groups_of(model, 16)
    group = next(g for g in groups if any(m.name == "dw.weight" for m in g.members))
    before = gp.get_scorer("l1")(groups, model)[group.id]
    dw_l1 = model.dw.weight.detach().abs().double().sum((1, 2, 3))
    with torch.no_grad():
        model.dw.weight.mul_(3.0)
    after = gp.get_scorer("l1")(groups, model)[group.id]
    torch.testing.assert_close(after - before, 2 * dw_l1, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# invariants of the three data scorers on small models


@pytest.mark.parametrize("scorer", DATA_SCORERS)
def test_data_scorers_are_deterministic_and_leave_the_model_as_found(scorer: str) -> None:
    model = resnet18().train()  # a user's model in train mode, part frozen, with a stale gradient
    model.conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    groups = groups_of(model, 32)
    before = snapshot(model)
    batches = random_batches(32, batch_size=10)
    first = score(scorer, groups, model, batches, max_batches=1)
    assert_unchanged(model, before)
    with torch.no_grad():  # an outer no_grad must not break a gradient-based scorer
        second = score(scorer, groups, model, batches, max_batches=1)
    assert first.keys() == {g.id for g in groups}
    for gid, s in first.items():
        assert s.dtype == torch.float64 and s.shape == (groups.by_id(gid).size,)
        assert torch.isfinite(s).all() and (s >= 0).all()
        assert torch.equal(s, second[gid])
    third = score(scorer, groups, model, batches)  # max_batches=None reads both batches
    assert any(not torch.equal(first[gid], third[gid]) for gid in first)


def test_classmean_without_alignment_is_taylor() -> None:
    model = resnet18()
    groups = groups_of(model, 32)
    batches = random_batches(32, batch_size=10)
    plain = score("taylor", groups, model, batches)
    unaligned = score("classmean", groups, model, batches, alignment_weight=0.0)
    aligned = score("classmean", groups, model, batches, alignment_weight=1.0)
    for gid in plain:
        torch.testing.assert_close(unaligned[gid], plain[gid], rtol=1e-5, atol=1e-12)
    assert any(not torch.allclose(aligned[gid], plain[gid], rtol=1e-3) for gid in plain)


def test_class_means_closed_form_and_feature_fn() -> None:
    model = small_net()
    batches = random_batches(16, batch_size=10)

    def features_and_logits(net: nn.Module, inputs: tuple[torch.Tensor, ...]):
        features = F.relu(net.fc1(inputs[0].mean((2, 3)).repeat(1, 8)))  # any (B, D) feature will do
        return features, net.fc2(features)

    means = class_means(model, batches, 5, feature_fn=features_and_logits, progress=False)
    with torch.no_grad():
        feats = torch.cat([features_and_logits(model, (x,))[0] for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    expected = torch.stack([feats[labels == k].mean(0) for k in range(5)])
    torch.testing.assert_close(means, expected)
    groups = groups_of(model, 16)
    scores = score("classmean", groups, model, batches, feature_fn=features_and_logits, class_means=means)
    assert all(torch.isfinite(s).all() for s in scores.values())


# ---------------------------------------------------------------------------------------------
# 3-4. the real EfficientNet-Lite0 on flowers17


@pytest.fixture(scope="module")
def lite0_flowers(shared_data, efficientnet_lite0_package):
    """Lite0 with a 17-class head fitted as a linear probe, its groups, and flowers17 batches."""
    from graphprune.assets import LITE0_MEAN, LITE0_STD, image_folder, load_efficientnet_lite0, subset_loader

    torch.manual_seed(0)
    model = load_efficientnet_lite0(num_classes=17)
    dataset = image_folder("flowers17", "train", image_size=96, mean=LITE0_MEAN, std=LITE0_STD)
    batches = list(subset_loader(dataset, per_class=2, batch_size=17, shuffle=False, seed=0))
    with torch.no_grad():
        features = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    head = model.get_classifier()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(10):  # a quick probe (train CE ~0.3), not a collapsed fit (CE ~0 flattens the gradients)
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.zero_grad(set_to_none=True)
    with torch.no_grad():
        probe_ce = float(F.cross_entropy(head(features), labels))
    groups = groups_of(model, 96)
    before = snapshot(model)
    scores = {name: score(name, groups, model, batches) for name in ("l1", "taylor", "target_taylor")}
    # lambda = 10: with this probe the cosine term is ~0.1 against CE ~0.2, so at lambda = 1 the
    # ranking is within 1% of plain taylor (mean within-group Spearman 0.99; 0.81 at lambda = 10)
    scores["classmean"] = score("classmean", groups, model, batches, alignment_weight=10.0)
    assert_unchanged(model, before)
    print(f"\nLite0 probe train CE {probe_ce:.3f}; {len(groups)} groups, "
          f"{sum(int(g.prunable.sum()) for g in groups)} prunable channels")
    return model, groups, scores


def pooled(groups: gp.Groups, scores: dict[int, torch.Tensor]) -> np.ndarray:
    return np.concatenate([scores[g.id].numpy()[g.prunable] for g in groups])


def mean_within_group_spearman(groups: gp.Groups, a: dict, b: dict) -> float:
    return float(np.mean([spearmanr(a[g.id].numpy(), b[g.id].numpy())[0] for g in groups]))


# Measured (flowers17, 2 images per class, 96 px; printed with -s): Spearman vs l1 pooled over all
# prunable channels 0.32 (target_taylor) and 0.51 (classmean, lambda = 10); mean within-group 0.21 and 0.30.
@pytest.mark.parametrize("scorer, pooled_bound, within_bound", [("target_taylor", 0.6, 0.45),
                                                                 ("classmean", 0.75, 0.6)])
def test_target_aware_scores_differ_from_l1_on_lite0(lite0_flowers, scorer: str, pooled_bound: float,
                                                     within_bound: float) -> None:
    _, groups, scores = lite0_flowers
    for s in (scores[scorer][g.id] for g in groups):
        assert torch.isfinite(s).all() and (s >= 0).all() and (s > 0).any()
    pooled_rho = spearmanr(pooled(groups, scores[scorer]), pooled(groups, scores["l1"]))[0]
    within_rho = mean_within_group_spearman(groups, scores[scorer], scores["l1"])
    print(f"\n{scorer} vs l1 on Lite0/flowers17: pooled Spearman {pooled_rho:.3f}, "
          f"mean within-group Spearman {within_rho:.3f}")
    assert pooled_rho < pooled_bound and within_rho < within_bound


def test_classmean_alignment_changes_the_ranking_on_lite0(lite0_flowers) -> None:
    _, groups, scores = lite0_flowers
    within_rho = mean_within_group_spearman(groups, scores["classmean"], scores["taylor"])
    print(f"\nclassmean vs taylor on Lite0/flowers17: mean within-group Spearman {within_rho:.3f}")
    assert within_rho < 0.9


def test_target_taylor_global_ranking_gives_non_uniform_layer_ratios(lite0_flowers) -> None:
    _, groups, scores = lite0_flowers
    target = scores["target_taylor"]
    ratio = 0.3
    threshold = np.quantile(pooled(groups, target), ratio)
    per_group = np.array([float((target[g.id].numpy()[g.prunable] <= threshold).mean()) for g in groups])
    print(f"\ntarget_taylor, lowest {ratio:.0%} over all groups, per-group prune ratios: "
          + " ".join(f"{g.name}={r:.2f}" for g, r in zip(groups, per_group)))
    sizes = np.array([int(g.prunable.sum()) for g in groups])
    assert math.isclose(float((per_group * sizes).sum() / sizes.sum()), ratio, abs_tol=0.01)
    assert per_group.std() > 0.1 and per_group.max() - per_group.min() > 0.4
    assert (per_group < 0.05).sum() >= 3 and (per_group > 0.3).sum() >= 3


# ---------------------------------------------------------------------------------------------
# 5. bad input: a clear InvalidArgumentError, and the model exactly as found


def _nan_batches() -> list:
    return [(torch.full((5, 3, 32, 32), float("nan")), torch.arange(5))]


def _one_shot():
    return iter(random_batches(32, batch_size=4, n_batches=1))


BAD_INPUTS = {
    "no data": ({}, "needs data="),
    "a tensor": ({"data": torch.randn(4, 3, 32, 32)}, "iterable of (inputs, targets) batches, got Tensor"),
    "a dataset": ({"data": TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))}, "DataLoader"),
    "an int": ({"data": 3}, "got int"),
    "empty list": ({"data": []}, "no batches"),
    "empty loader": ({"data": DataLoader(TensorDataset(torch.randn(0, 3, 32, 32), torch.zeros(0).long()))},
                     "no batches"),
    "bare inputs": ({"data": [torch.randn(4, 3, 32, 32)]}, "(inputs, targets) pair"),
    "zero budget": ({"data": random_batches(32, batch_size=4), "max_batches": 0}, "max_batches"),
    "nan loss": ({"data": _nan_batches()}, "the loss is nan"),
    "nan loss_fn": ({"data": random_batches(32, batch_size=5, n_batches=1),
                     "loss_fn": lambda out, y: out.sum() * float("nan")}, "the loss is nan"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("scorer", DATA_SCORERS)
def test_bad_input_raises_and_leaves_the_model_unchanged(scorer: str, case: str) -> None:
    options, message = BAD_INPUTS[case]
    model = resnet18().train()
    model.layer1[0].conv1.weight.requires_grad_(False)
    groups = groups_of(model, 32)
    before = snapshot(model)
    with pytest.raises(gp.InvalidArgumentError, match=re.escape(message)) as error:
        gp.get_scorer(scorer)(groups, model, progress=False, **options)
    if case == "no data":
        assert str(error.value).startswith(f"scorer '{scorer}' needs data=...")
    assert_unchanged(model, before)


def test_multi_pass_scorers_reject_a_one_shot_iterator() -> None:
    model = resnet18()
    groups = groups_of(model, 32)
    for scorer in ("target_taylor", "classmean"):
        with pytest.raises(gp.InvalidArgumentError, match="re-iterable"):
            gp.get_scorer(scorer)(groups, model, data=_one_shot(), progress=False)
    assert score("taylor", groups, model, _one_shot())  # one pass is fine


def test_classmean_needs_penultimate_features() -> None:
    model = small_net()
    groups = groups_of(model, 16)
    before = snapshot(model)
    with pytest.raises(gp.InvalidArgumentError, match="feature_fn"):
        score("classmean", groups, model, random_batches(16))
    with pytest.raises(gp.InvalidArgumentError, match="class_means must be a Tensor"):
        score("classmean", groups, resnet18(), random_batches(32, batch_size=4), class_means=torch.zeros(3, 7))
    assert_unchanged(model, before)


def test_class_means_rejects_a_missing_class() -> None:
    model = resnet18()
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(gp.InvalidArgumentError, match=r"no sample of class\(es\) \[3, 4\]"):
        class_means(model, batches, progress=False)


@pytest.mark.parametrize("options, message", [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"),
                                              ({"lr": float("nan")}, "lr")])
def test_target_taylor_rejects_a_bad_schedule(options: dict, message: str) -> None:
    model = small_net()
    with pytest.raises(gp.InvalidArgumentError, match=message):
        score("target_taylor", groups_of(model, 16), model, random_batches(16), **options)
