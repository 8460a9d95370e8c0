"""Each coupling rule on a small module: what couples, what is frozen, and that removal is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.testing import zeroed_then_removed


def groups_of(model: nn.Module, x: torch.Tensor) -> gp.Groups:
    return gp.find_groups(gp.trace(model, x), model=model)


def member_set(group: gp.ChannelGroup) -> set[tuple[str, int]]:
    return {(m.name, m.dim) for m in group.members}


def group_with(groups: gp.Groups, name: str, dim: int) -> gp.ChannelGroup:
    return next(g for g in groups.all if (name, dim) in member_set(g))


def assert_exact_removal(model: nn.Module, x: torch.Tensor, removed: dict[int, tuple[int, ...]],
                         groups: gp.Groups) -> nn.Module:
    """Zero ``removed`` in producers, remove it, and check the output is unchanged."""
    expected, got, model = zeroed_then_removed(model, x, groups, removed)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    return model


def randomize_bn_(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def test_dense_conv_couples_output_rows_with_bn_and_next_input_columns() -> None:
    net = randomize_bn_(nn.Sequential(ConvBlock(3, 8), ConvBlock(8, 4)))
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    group = group_with(groups, "0.0.weight", 0)
    assert member_set(group) == {("0.0.weight", 0), ("0.1.weight", 0), ("0.1.bias", 0), ("0.1.running_mean", 0),
                                 ("0.1.running_var", 0), ("1.0.weight", 1)}
    assert group.size == 8 and group.prunable.all()
    # the stem's input channels and the model output are never prunable
    assert not any(("0.0.weight", 1) in member_set(g) for g in groups)
    assert not any(("1.0.weight", 0) in member_set(g) for g in groups)
    pruned = assert_exact_removal(net, torch.randn(2, 3, 8, 8), {group.id: (1, 5)}, groups)
    assert pruned[0][0].out_channels == 6 and pruned[0][1].num_features == 6 and pruned[1][0].in_channels == 6


def test_depthwise_conv_couples_input_and_output_channels_and_updates_groups() -> None:
    net = randomize_bn_(nn.Sequential(ConvBlock(3, 8), ConvBlock(8, 8, groups=8), ConvBlock(8, 4)))
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    group = group_with(groups, "1.0.weight", 0)
    assert ("0.0.weight", 0) in member_set(group) and ("2.0.weight", 1) in member_set(group)
    pruned = assert_exact_removal(net, torch.randn(1, 3, 8, 8), {group.id: (0, 3, 7)}, groups)
    assert pruned[1][0].groups == 5 and pruned[1][0].in_channels == 5 and pruned[1][0].out_channels == 5


def test_many_small_conv_groups_are_removed_whole() -> None:
    net = randomize_bn_(nn.Sequential(ConvBlock(3, 16), ConvBlock(16, 16, groups=8), ConvBlock(16, 4)))
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    group = group_with(groups, "1.0.weight", 0)
    assert group.size == 8 and set(group.width.tolist()) == {2}  # one channel = one conv group of 2
    pruned = assert_exact_removal(net, torch.randn(1, 3, 8, 8), {group.id: (2, 6)}, groups)
    assert pruned[1][0].groups == 6 and pruned[1][0].weight.shape == (12, 2, 3, 3)


def test_few_wide_conv_groups_lose_the_same_slice_in_every_group() -> None:
    net = randomize_bn_(nn.Sequential(ConvBlock(3, 16), ConvBlock(16, 16, groups=2), ConvBlock(16, 4)))
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    inner = group_with(groups, "0.0.weight", 0)  # feeds the grouped conv: local index j of both groups
    assert inner.size == 8 and set(inner.width.tolist()) == {2}
    pruned = assert_exact_removal(net, torch.randn(1, 3, 8, 8), {inner.id: (1,)}, groups)
    assert pruned[1][0].groups == 2 and pruned[1][0].in_channels == 14 and pruned[1][0].weight.shape[1] == 7


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBlock(3, 8)
        self.a = nn.Sequential(ConvBlock(8, 6), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(ConvBlock(8, 6), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = F.relu(x + self.b(x))
        return self.head(x.mean((2, 3)))


def test_residual_adds_couple_the_whole_stream() -> None:
    net = randomize_bn_(Residual())
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    stream = group_with(groups, "stem.0.weight", 0)
    names = member_set(stream)
    assert {("a.1.weight", 0), ("b.1.weight", 0), ("a.0.0.weight", 1), ("head.weight", 1)} <= names
    assert assert_exact_removal(net, torch.randn(1, 3, 8, 8), {stream.id: (0, 7)}, groups).head.in_features == 6


class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = ConvBlock(3, c)
        self.reduce, self.expand = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.out(x * gate)


def test_squeeze_excite_gate_couples_with_the_gated_channels() -> None:
    net = randomize_bn_(SqueezeExcite())
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    group = group_with(groups, "conv.0.weight", 0)
    assert {("expand.weight", 0), ("expand.bias", 0), ("reduce.weight", 1), ("out.weight", 1)} <= member_set(group)
    assert_exact_removal(net, torch.randn(1, 3, 8, 8), {group.id: (2, 3)}, groups)


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBlock(3, 4), ConvBlock(3, 6)
        self.mix = ConvBlock(10, 8)
        self.left, self.right = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        left, right = y.chunk(2, dim=1)
        return self.left(left) + self.right(right)


def test_concat_keeps_offsets_and_chunk_parts_stay_equal() -> None:
    net = randomize_bn_(ConcatSplit())
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    cat = group_with(groups, "a.0.weight", 0)
    assert ("b.0.weight", 0) in member_set(cat)
    mix_cols = next(m for m in cat.members if m.name == "mix.0.weight")
    a_rows = next(m for m in cat.members if m.name == "a.0.weight")
    assert mix_cols.channel[:4].tolist() == a_rows.channel.tolist()
    chunk = group_with(groups, "mix.0.weight", 0)
    assert chunk.size == 4 and set(chunk.width.tolist()) == {2}  # channel j of both halves together
    assert_exact_removal(net, torch.randn(1, 3, 8, 8), {cat.id: (0, 5), chunk.id: (1,)}, groups)


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvBlock(3, 4)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 2), 1))


def test_flatten_maps_each_channel_to_its_block_of_features() -> None:
    net = randomize_bn_(FlattenHead())
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    group = group_with(groups, "conv.0.weight", 0)
    fc = next(m for m in group.members if m.name == "fc.weight")
    assert fc.channel.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert assert_exact_removal(net, torch.randn(1, 3, 8, 8), {group.id: (1,)}, groups).fc.in_features == 12


def test_layernorm_updates_normalized_shape_and_is_marked_statistic() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    groups = groups_of(net, torch.randn(2, 5, 4))
    group = group_with(groups, "0.weight", 0)
    assert group.statistic.all()
    gp.apply_plan_(net, gp.make_plan(groups, removed={group.id: (0, 1)}))
    assert net[1].normalized_shape == (6,) and net(torch.randn(2, 5, 4)).shape == (2, 5, 3)


def test_timm_attention_prunes_whole_heads_and_updates_its_attributes() -> None:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attention(32, num_heads=4, qkv_bias=True), Mlp(32, 64)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.mlp(x)

    torch.manual_seed(0)
    net = Block().eval()
    x = torch.randn(2, 7, 32)
    groups = groups_of(net, x)
    heads = group_with(groups, "attn.qkv.weight", 0)
    assert heads.size == 4 and set(heads.width.tolist()) == {3 * 8}  # q, k and v rows of one head
    assert ("attn.proj.weight", 1) in member_set(heads)
    pruned = assert_exact_removal(net, x, {heads.id: (1, 2)}, groups)
    assert (pruned.attn.num_heads, pruned.attn.head_dim, pruned.attn.attn_dim) == (2, 8, 16)
    assert pruned.attn.qkv.out_features == 48 and pruned.attn.proj.in_features == 16


class OneHeadAttention(nn.Module):
    """One head: only ``head_dim`` can be pruned; ``scale`` None means 1 / sqrt(q.shape[-1])."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.qkv, self.proj, self.scale = nn.Linear(8, 3 * 8), nn.Linear(8, 8), scale

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 1, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, 1, N, 8)
        return self.proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("scale", [None, 8 ** -0.5])
def test_sdpa_default_scale_marks_a_pruned_head_dim_as_a_statistic(scale) -> None:
    torch.manual_seed(0)
    net, x = OneHeadAttention(scale).eval(), torch.randn(2, 5, 8) * 3
    groups = groups_of(net, x)
    head_dim = group_with(groups, "qkv.weight", 0)
    assert head_dim.size == 8 and set(head_dim.width.tolist()) == {3}  # q, k and v row j of the head
    assert bool(head_dim.statistic.all()) == (scale is None)
    if scale is not None:  # a fixed scale: zeroed head dims are invisible once removed
        assert_exact_removal(net, x, {head_dim.id: (2, 5)}, groups)
    else:  # the scale follows the narrower head: zero-then-prune is visible, as under a layer norm
        with pytest.raises(AssertionError):
            assert_exact_removal(net, x, {head_dim.id: (2, 5)}, groups)


class PaddedShortcut(nn.Module):
    """CIFAR option-A: the shortcut pads channels with zeros."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBlock(3, 4)
        self.body = nn.Sequential(ConvBlock(4, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(F.relu(self.body(x) + F.pad(x, (0, 0, 0, 0, 2, 2))))


def test_zero_padded_channels_are_constant_slots_that_stay() -> None:
    net = randomize_bn_(PaddedShortcut())
    groups = groups_of(net, torch.randn(1, 3, 8, 8))
    stream = group_with(groups, "stem.0.weight", 0)
    body_rows = next(m for m in stream.members if m.name == "body.1.weight")
    # rows that meet a zero-padded shortcut channel are frozen; the rest follow the stem
    assert not stream.prunable[body_rows.channel[[0, 1, 6, 7]]].any()
    assert stream.prunable[body_rows.channel[2:6]].all()
    pruned = assert_exact_removal(net, torch.randn(1, 3, 8, 8), {stream.id: (1,)}, groups)
    assert pruned.body[1].out_channels == 7 and pruned.stem[0].out_channels == 3


class Glu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.glu(self.a(x), dim=-1) + self.b(x)


def test_an_op_without_a_rule_freezes_its_channels_and_is_reported() -> None:
    net = Glu()
    graph = gp.trace(net, torch.randn(1, 4))
    assert graph.unsupported["torch.nn.functional.glu"] == 1
    groups = gp.find_groups(graph, model=net)
    assert not any(("a.weight", 0) in member_set(g) for g in groups)
    assert "torch.nn.functional.glu" in groups.report()


def test_trace_leaves_the_model_as_found_even_when_it_fails() -> None:
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.fc.weight.requires_grad_(False)

        def forward(self, x):
            if self.training:
                raise AssertionError("never reached: tracing runs in eval mode")
            return self.fc(x).view(3, -1)  # wrong on purpose

    net = Fails().train()
    hooks_before = len(net.fc._forward_hooks)
    with pytest.raises(gp.UnsupportedModelError, match="invalid for input"):
        gp.trace(net, torch.randn(1, 4))
    assert net.training and net.fc.training and len(net.fc._forward_hooks) == hooks_before
    assert not net.fc.weight.requires_grad and net.fc.bias.requires_grad


def test_plan_json_reapplies_to_a_fresh_model() -> None:
    torch.manual_seed(0)
    net = randomize_bn_(Residual())
    x = torch.randn(2, 3, 8, 8)
    pruned = gp.prune(net, x, ratio=0.5)
    plan = gp.Plan.from_json(pruned.graphprune_plans[0])
    fresh = copy.deepcopy(net)
    gp.apply_plan_(fresh, plan)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned.eval()(x))
    with pytest.raises(gp.InvalidArgumentError, match="already applied"):
        gp.apply_plan_(fresh, plan)


def test_pruned_model_trains_and_keeps_requires_grad() -> None:
    net = randomize_bn_(Residual())
    net.stem[0].weight.requires_grad_(False)
    pruned = gp.prune(net, torch.randn(1, 3, 8, 8), ratio=0.3).train()
    assert not pruned.stem[0].weight.requires_grad and pruned.a[1].weight.requires_grad
    optimizer = torch.optim.SGD([p for p in pruned.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    first = F.cross_entropy(pruned(x), y)
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(pruned(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < first.item()


@pytest.mark.parametrize("kwargs, error, words", [
    ({"ratio": -0.1}, gp.InvalidArgumentError, "ratio"),
    ({"ratio": 1.0}, gp.InvalidArgumentError, "ratio"),
    ({"ratio": float("nan")}, gp.InvalidArgumentError, "ratio"),
    ({"ratio": "0.3"}, gp.InvalidArgumentError, "ratio"),
    ({"ratio": 0.3, "scorer": "nope"}, gp.InvalidArgumentError, "known scorers"),
    ({"ratio": 0.3, "ignore": ["no_such_layer"]}, gp.InvalidArgumentError, "no_such_layer"),
])
def test_bad_arguments_raise_clearly_and_leave_the_model_unchanged(kwargs, error, words) -> None:
    net = randomize_bn_(Residual())
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(error, match=words):
        gp.prune_(net, torch.randn(1, 3, 8, 8), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_untraceable_model_raises_and_is_unchanged() -> None:
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            raise RuntimeError("this model cannot run")

    net = Broken()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(gp.UnsupportedModelError, match="cannot run"):
        gp.prune_(net, torch.randn(1, 4), ratio=0.3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_wrong_input_shape_is_reported_as_untraceable() -> None:
    with pytest.raises(gp.UnsupportedModelError, match="forward"):
        gp.prune(Residual(), torch.randn(1, 5, 8, 8), ratio=0.3)
