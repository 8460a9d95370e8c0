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


# --- transposed convolutions -------------------------------------------------------------------

class Decoder(nn.Module):
    def __init__(self, dim: int = 2, groups: int = 1, output_padding: int = 1):
        super().__init__()
        conv, up = (nn.Conv1d, nn.ConvTranspose1d) if dim == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        if dim == 3:
            conv, up = nn.Conv3d, nn.ConvTranspose3d
        self.enc = conv(3, 8, 3, padding=1)
        self.up = up(8, 12, 3, stride=2, padding=1, output_padding=output_padding, groups=groups)
        self.mid = up(12, 12, 3, padding=1, groups=groups)
        self.out = conv(12, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.up(torch.relu(self.enc(x)))))))


@pytest.mark.parametrize("dim, groups", [(1, 1), (2, 1), (3, 1), (2, 2), (2, 4)])
def test_transposed_conv_prunes_inputs_and_outputs_exactly(dim: int, groups: int) -> None:
    torch.manual_seed(0)
    net = Decoder(dim, groups)
    x = torch.randn(1, 3, *([6] * dim))
    g = groups_of(net, x)
    inner = group_with(g, "up.weight", 0)  # enc's outputs are up's inputs (weight dim 0)
    assert ("enc.weight", 0) in members(inner) and inner.prunable.all()
    outer = group_with(g, "up.bias", 0)
    assert ("mid.weight", 0) in members(outer) and outer.prunable.all()
    error, n, pruned = removal_error(net, (x,))
    assert n >= 2 and error <= 1e-12
    up = pruned.up
    assert up.weight.shape[0] == up.in_channels == pruned.enc.out_channels < 8
    assert up.out_channels == up.weight.shape[1] * up.groups == pruned.mid.in_channels < 12
    # few wide groups keep their number (and narrow); many small ones are removed whole
    whole_groups = groups >= 8 // groups
    assert (up.groups < groups and up.weight.shape[1] == 12 // groups) if whole_groups else up.groups == groups
    assert up.output_padding == (1,) * dim
    assert_ratio_zero_is_identity(net, (x,))


def test_depthwise_transposed_conv_loses_whole_groups() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 16, 2, stride=2, groups=8), nn.ReLU(),
                        nn.Conv2d(16, 2, 1))
    x = torch.randn(1, 3, 5, 5)
    g = groups_of(net, x)
    unit = group_with(g, "2.weight", 0)
    assert unit.size == 8 and set(unit.width.tolist()) == {2}  # one channel in, two out per group
    assert not any(("2.weight", 1) in members(other) for other in g)  # the per-group dim stays
    error, _, pruned = removal_error(net, (x,), {unit.id: (1, 4, 6)})
    assert error <= 1e-12
    assert pruned[2].groups == 5 and pruned[2].weight.shape == (5, 2, 2, 2) and pruned[2].out_channels == 10


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


# --- channels that move in blocks: pixel shuffles, channel shuffle ------------------------------

def _shuffled(shuffle: nn.Module, c_in: int, c_mid: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c_in, 1), nn.ReLU(), shuffle, nn.Conv2d(c_mid, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 2, 1))


@pytest.mark.parametrize("shuffle, c_in, c_mid, width", [
    (nn.PixelShuffle(2), 16, 4, 4), (nn.PixelUnshuffle(2), 4, 16, 4), (nn.ChannelShuffle(4), 16, 16, 4)])
def test_shuffles_remove_whole_blocks_exactly(shuffle: nn.Module, c_in: int, c_mid: int, width: int) -> None:
    torch.manual_seed(0)
    net = _shuffled(shuffle, c_in, c_mid)
    x = torch.randn(1, 3, 8, 8)
    g = groups_of(net, x)
    unit = group_with(g, "0.weight", 0)
    assert unit.prunable.all() and set(unit.width.tolist()) == {width}
    assert ("3.weight", 1) in members(unit)
    error, _, pruned = removal_error(net, (x,), {unit.id: tuple(range(0, unit.size, 2))})
    assert error <= 1e-12
    assert pruned[0].out_channels == c_in // 2 and pruned[3].in_channels == c_mid // 2
    small = gp.prune(net, x, ratio=0.5)  # before: pixel_shuffle's wrong group failed verification
    assert small(x).shape == net(x).shape and small[0].out_channels == c_in // 2
    assert_ratio_zero_is_identity(net, (x,))


# --- new_zeros and friends, F.normalize ---------------------------------------------------------

class MaskedPad(nn.Module):
    """Swin-style: a mask from ``x.new_zeros`` (spatial), and a channel pad sized from ``x.shape``."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.proj(x)
        b, c, h, w = x.shape
        mask = x.new_zeros((h, w))
        mask[: h // 2] = 1.0
        x = torch.cat([x * mask, x.new_zeros(b, c, 1, w)], dim=2) + torch.zeros_like(x[:, :, :1])
        return self.out(F.normalize(x, dim=1))


class OnesPad(MaskedPad):
    def forward(self, x):
        x = self.proj(x)
        b, c, h, w = x.shape
        return self.out(torch.cat([x + torch.full_like(x, 2.0), x.new_ones(b, c, 1, w)], dim=2))


def test_new_zeros_and_normalize_keep_channels_prunable_and_exact() -> None:
    torch.manual_seed(0)
    net = MaskedPad()
    x = torch.randn(1, 3, 6, 6)
    g = groups_of(net, x)
    assert not g.graph.unsupported
    unit = group_with(g, "proj.weight", 0)
    assert unit.prunable.all() and not unit.statistic.any() and ("out.weight", 1) in members(unit)
    error, n, pruned = removal_error(net, (x,), ratio=0.5)
    assert n == 4 and error <= 1e-12 and pruned.proj.out_channels == 4
    assert_ratio_zero_is_identity(net, (x,))


def test_normalize_with_negative_p_is_a_statistic() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    net[1].forward = lambda x: F.normalize(x, p=-1.0, dim=-1)
    g = groups_of(net, torch.randn(2, 4))
    assert group_with(g, "0.weight", 0).statistic.all()


def test_nonzero_constants_keep_channels_prunable_but_not_invisible() -> None:
    g = groups_of(OnesPad(), torch.randn(1, 3, 6, 6))
    unit = group_with(g, "proj.weight", 0)
    assert not g.graph.unsupported and unit.prunable.all() and unit.statistic.all()


# --- nn.MultiheadAttention (F.multi_head_attention_forward) -------------------------------------

class AttentionBlock(nn.Module):
    def __init__(self, residual: bool = True, kdim: int | None = None, vdim: int | None = None,
                 bias_kv: bool = False):
        super().__init__()
        self.residual = residual
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=vdim, add_bias_kv=bias_kv)
        self.q_in, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        if residual or not self.attn._qkv_same_embed_dim:  # else self-attention: query is key is value
            self.k_in, self.v_in = nn.Linear(6, kdim or 16), nn.Linear(6, vdim or 16)

    def forward(self, x, memory):
        q = self.q_in(x)
        if not hasattr(self, "k_in"):
            y = self.attn(q, q, q, need_weights=False)[0]
        else:
            y = self.attn(q, self.k_in(memory), self.v_in(memory), need_weights=False)[0]
        return self.head(torch.relu(y + q if self.residual else y))


@pytest.mark.parametrize("kwargs", [{}, {"residual": False}, {"kdim": 10, "vdim": 12}, {"bias_kv": True}])
def test_multihead_attention_removes_whole_heads_exactly(kwargs: dict) -> None:
    torch.manual_seed(0)
    net = AttentionBlock(**kwargs)
    x, memory = torch.randn(2, 5, 6), torch.randn(2, 7, 6)
    g = groups_of(net, x, memory)
    assert not g.graph.unsupported
    heads = group_with(g, "attn.out_proj.weight", 1)
    assert heads.size == 4 and heads.prunable.all()
    assert set(heads.width.tolist()) == {12}  # head_dim rows in each of q, k and v (in_proj_bias)
    assert ("q_in.weight", 0) in members(heads)  # the query's embedding channels come with the heads
    error, n, pruned = removal_error(net, (x, memory), {heads.id: (1, 2)})
    assert error <= 1e-12
    attn = pruned.attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.out_proj.in_features) == (2, 4, 8, 8)
    assert (attn.kdim, attn.vdim) == (kwargs.get("kdim", 8), kwargs.get("vdim", 8))
    error, n, _ = removal_error(net, (x, memory), ratio=0.5)  # every group at once
    assert n >= 2 and error <= 1e-12
    assert_ratio_zero_is_identity(net, (x, memory))


def test_multihead_attention_heads_fixed_by_a_per_head_mask_or_averaged_weights() -> None:
    net = AttentionBlock(residual=False)
    x = torch.randn(2, 5, 6)
    per_head = torch.zeros(2 * 4, 5, 5)
    net.forward = lambda x: net.attn(*(net.q_in(x),) * 3, attn_mask=per_head, need_weights=False)[0]
    assert not group_with(groups_of(net, x), "attn.out_proj.weight", 1).prunable.any()
    net.forward = lambda x: net.attn(*(net.q_in(x),) * 3)  # returns weights averaged over heads
    heads = group_with(groups_of(net, x), "attn.out_proj.weight", 1)
    assert heads.prunable.all() and heads.statistic.all()


def test_torchvision_vit_prunes_heads_and_stays_exact() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48, mlp_dim=64,
                            num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    g = groups_of(vit, x)
    assert not g.graph.unsupported
    stream = group_with(g, "conv_proj.weight", 0)  # residual stream = whole heads of every layer
    assert stream.size == 4 and ("encoder.layers.encoder_layer_1.self_attention.in_proj_weight", 0) in members(stream)
    error, n, _ = removal_error(vit, (x,))  # the MLPs (the stream is under LayerNorm: a statistic)
    assert n >= 2 * 25 and error <= 1e-12
    small = gp.prune(vit, x, ratio=0.5)
    attn = small.encoder.layers[0].self_attention
    assert small(x).shape == (1, 10) and (attn.num_heads, attn.embed_dim, small.hidden_dim) == (2, 24, 24)
    assert n_params(small) < 0.35 * n_params(vit)
    assert_ratio_zero_is_identity(vit, (x,))


def test_attention_macs_match_fvcore_and_the_closed_form() -> None:
    """The fast path fvcore's jit trace takes (``_native_multi_head_attention``) counts like the rule."""
    from graphprune.measurement import count_macs
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48, mlp_dim=64,
                            num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    tokens, e, mlp = 17, 48, 64
    layer = tokens * e * 3 * e + 2 * tokens * tokens * e + tokens * e * e + 2 * tokens * e * mlp
    closed = 16 * e * 3 * 8 * 8 + 2 * layer + e * 10
    assert count_macs(vit, x) == gp.trace(vit, x).estimate_macs() == closed
    for kwargs in ({}, {"residual": False}, {"kdim": 10, "vdim": 12}, {"bias_kv": True}):
        net, inputs = AttentionBlock(**kwargs).eval(), (torch.randn(2, 5, 6), torch.randn(2, 7, 6))
        assert count_macs(net, inputs) == gp.trace(net, inputs).estimate_macs(), kwargs


# --- recurrent layers: nn.LSTM, nn.GRU, nn.RNN ---------------------------------------------------

class Tagger(nn.Module):
    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.embed, self.rnn = nn.Linear(3, rnn.input_size), rnn
        width = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        return self.out(torch.relu(self.rnn(self.embed(x))[0]))


RNNS = {
    "lstm": lambda: nn.LSTM(8, 6),
    "lstm-bi-2layers": lambda: nn.LSTM(8, 6, num_layers=2, bidirectional=True),
    "lstm-proj-batch-first": lambda: nn.LSTM(8, 6, num_layers=2, proj_size=4, batch_first=True),
    "gru-bi-2layers": lambda: nn.GRU(8, 6, num_layers=2, bidirectional=True),
    "gru-no-bias": lambda: nn.GRU(8, 6, bias=False),
    "rnn-relu": lambda: nn.RNN(8, 6, nonlinearity="relu", num_layers=2),
}


@pytest.mark.parametrize("kind", list(RNNS))
def test_recurrent_input_features_and_hidden_units_prune_exactly(kind: str) -> None:
    torch.manual_seed(0)
    net = Tagger(RNNS[kind]())
    x = torch.randn(7, 2, 3)  # (T, N, F); batch_first only swaps the meaning of the first two
    g = groups_of(net, x)
    assert not g.graph.unsupported
    features = group_with(g, "rnn.weight_ih_l0", 1)
    assert ("embed.weight", 0) in members(features) and features.size == 8 and features.prunable.all()
    hidden = group_with(g, "rnn.weight_hh_l0", 0)
    assert hidden.size == 6 and hidden.prunable.all()
    error, n, pruned = removal_error(net, (x,), ratio=0.5)
    assert n >= 4 + 3 and error <= 1e-12
    rnn = pruned.rnn
    assert (rnn.input_size, rnn.hidden_size) == (4, 3) and rnn.weight_ih_l0.shape[1] == 4
    if rnn.proj_size:
        assert rnn.proj_size == 2 and pruned.out.in_features == 2
    assert_ratio_zero_is_identity(net, (x,))


def test_packed_sequences_and_a_given_initial_state() -> None:
    torch.manual_seed(0)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.init = nn.Linear(3, 8), nn.Linear(3, 6)
            self.rnn, self.out = nn.GRU(8, 6, batch_first=True), nn.Linear(6, 2)

        def forward(self, x):
            h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0)  # (layers, N, H): carries the hidden units
            seq = nn.utils.rnn.pack_padded_sequence(self.embed(x), [5, 3], batch_first=True)
            return self.out(self.rnn(seq, h0)[1][0])

    net, x = Packed(), torch.randn(2, 5, 3)
    g = groups_of(net, x)
    hidden = group_with(g, "rnn.weight_hh_l0", 0)
    assert ("init.weight", 0) in members(hidden) and hidden.prunable.all()
    error, n, pruned = removal_error(net, (x,), ratio=0.5)
    assert n == 4 + 3 and error <= 1e-12 and pruned.rnn.hidden_size == 3 and pruned.init.out_features == 3


def test_a_failed_removal_leaves_the_recurrent_weights_in_use() -> None:
    """``_flat_weights`` holds the tensors themselves: undoing a removal must point it back."""
    from graphprune.removal import restore_on_error

    net = Tagger(nn.LSTM(8, 6))
    x = torch.randn(4, 1, 3)
    g = groups_of(net, x)
    plan = gp.make_plan(g, removed={group_with(g, "rnn.weight_hh_l0", 0).id: (0, 1)})
    expected = _outputs(net, (x,))[0]
    with pytest.raises(RuntimeError), restore_on_error(net):
        gp.removal.apply_unguarded_(net, plan)
        raise RuntimeError("later failure")
    assert net.rnn.hidden_size == 6 and all(a is b for a, b in zip(net.rnn._flat_weights, net.rnn.parameters()))
    torch.testing.assert_close(_outputs(net, (x,))[0], expected, rtol=0, atol=0)


def test_sequencer2d_s_prunes_its_lstms_exactly() -> None:
    """timm's Sequencer: bidirectional LSTMs over rows and columns (before: 85.6 % of the
    parameters kept at ratio 0.3, every LSTM frozen)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("sequencer2d_s", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    g = groups_of(model, x)
    assert not g.graph.unsupported
    error, n, _ = removal_error(model, (x,), ratio=0.3)
    assert n > 5000 and error <= 1e-12
    small = gp.prune(model, x, ratio=0.3)
    assert small(x).shape == (1, 1000) and n_params(small) < 0.6 * n_params(model)
    rnn = small.stages[0].blocks[0].rnn_tokens.rnn_v
    assert rnn.hidden_size < 48 and rnn.input_size < 192


# --- a channel count read from a shape, used as a number (RAFT's correlation scale) -------------

class Correlation(nn.Module):
    """RAFT's ``CorrBlock``: the correlation of two feature maps, divided by ``sqrt(C)``."""

    def __init__(self, as_tensor: bool = True):
        super().__init__()
        self.as_tensor = as_tensor
        self.fnet, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 2, 1)
        self.other = nn.Conv2d(8, 4, 1)

    def forward(self, a, b):
        f1, f2 = self.fnet(a), self.fnet(b)
        n, c, h, w = f1.shape
        corr = torch.matmul(f1.view(n, c, h * w).transpose(1, 2), f2.view(n, c, h * w))  # (N, HW, HW)
        corr = corr / (torch.sqrt(torch.tensor(c).float()) if self.as_tensor else c ** 0.5)
        return self.head(corr.view(n, h * w, h, w)) + self.other(f1).sum()


@pytest.mark.parametrize("as_tensor", [True, False])
def test_a_count_read_from_a_shape_and_used_as_a_value_freezes_its_channels(as_tensor: bool, monkeypatch) -> None:
    torch.manual_seed(0)
    net, a, b = Correlation(as_tensor), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    g = groups_of(net, a, b)
    features = group_with(g, "fnet.weight", 0)
    assert not features.prunable.any() and "read from a shape, used as the number" in g.report()
    assert group_with(g, "other.weight", 0).prunable.all()  # channels of other counts are untouched
    # why: without the check, removing zeroed channels rescales the correlation
    from graphprune.rules.context import Context

    monkeypatch.setattr(Context, "numbers_used", lambda self, call: None)
    unchecked = groups_of(net, a, b)
    error, n, _ = removal_error(net, (a, b), {group_with(unchecked, "fnet.weight", 0).id: (0, 1, 2, 3)})
    assert error > 1e-2
