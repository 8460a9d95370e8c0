"""Verification on the meta device: it confirms only what it can decide, and never changes the model."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.utils.prune
from torch import nn

import graphprune as gp
from graphprune.verify import check_outputs
from graphprune.verify_meta import meta_outputs


def _shapes(out) -> list[tuple[int, ...]]:
    from torch.utils._pytree import tree_flatten

    return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def test_meta_shapes_equal_the_real_ones_and_nothing_is_computed() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = meta_outputs(model, (x,))
    assert out is not None and out.is_meta and _shapes(out) == _shapes(model(x))
    state = model.state_dict()
    assert all(torch.equal(before[k], state[k]) and not state[k].is_meta for k in before)


class _Cache(nn.Module):
    """Caches a tensor on itself in forward, as rotary embeddings and some attention layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = torch.tensor([2.0, 2.0, 2.0, 2.0])  # a plain CPU tensor, no buffer
        self.seen: list = []

    def forward(self, x):
        self.cached = x * 2
        self.seen.append(x)
        return self.linear(x)


def test_attributes_a_forward_assigns_are_restored() -> None:
    net = _Cache()
    assert meta_outputs(net, (torch.randn(1, 4),)) is not None
    assert not hasattr(net, "cached") and net.seen == []


class _Scaled(_Cache):
    def forward(self, x):
        return self.linear(x) * self.scale  # the CPU tensor meets a meta one: undecided on meta


class _Gather(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("perm", torch.arange(7, -1, -1))

    def forward(self, x):
        return self.conv(x)[:, self.perm]


def test_undecidable_forwards_fall_back_to_the_real_one() -> None:
    assert meta_outputs(nn.Embedding(10, 4), (torch.tensor([1, 2]),)) is None  # integer inputs
    assert meta_outputs(_Gather(), (torch.randn(1, 3, 4, 4),)) is None  # an index tensor: values decide
    assert meta_outputs(_Scaled(), (torch.randn(1, 4),)) is None  # a tensor outside the state
    net, x = _Gather(), torch.randn(1, 3, 4, 4)
    modes: list[str] = []
    assert check_outputs(net, (x,), gp.trace(net, x).outputs, modes=modes) is None and modes == ["real"]


def test_an_index_kept_in_a_buffer_is_still_caught() -> None:
    """Meta indexing does not check bounds; the integer index sends the check to a real run,
    which finds that the gather breaks once the conv has fewer channels than the index expects."""
    net, x = _Gather(), torch.randn(1, 3, 4, 4)
    expected = gp.trace(net, x).outputs
    net.conv = nn.Conv2d(3, 6, 1)
    modes: list[str] = []
    error = check_outputs(net, (x,), expected, modes=modes)
    assert error is not None and "index" in error.lower() and modes == ["real"]


def test_prune_verifies_on_meta_where_that_is_cheaper_and_says_so() -> None:
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 8))
    x = torch.randn(256, 2048)  # 2.2 GMACs in 5 ops: a real check would compute them all
    pruned = gp.prune(wide, x, ratio=0.5)
    assert pruned.graphprune_verification == "meta" and not hasattr(wide, "graphprune_verification")
    assert pruned[0].out_features == 1024 and pruned(x).shape == (256, 8)
    small = gp.prune(timm.create_model("resnet18", pretrained=False, num_classes=5), torch.randn(1, 3, 64, 64),
                     ratio=0.3)
    assert small.graphprune_verification == "real"  # 0.15 GMACs in 70 ops: the real forward is cheaper
    gathered = gp.prune(_Gather(), torch.randn(1, 3, 4, 4), ratio=0.5)
    assert gathered.graphprune_verification == "real"


def test_the_cost_model_prefers_meta_only_for_expensive_forwards() -> None:
    from graphprune.verify_meta import meta_is_cheaper

    assert not meta_is_cheaper(4.1e9, 175, threads=1)  # resnet50 at 224 px, one thread: about even, real wins
    assert meta_is_cheaper(2.2e9, 5, threads=1) and not meta_is_cheaper(2.2e9, 5, threads=1000)


def _group_view(groups) -> list[tuple]:
    return [(g.id, g.name, tuple((m.name, m.dim, m.role, m.channel.tobytes()) for m in g.members),
             g.prunable.tobytes(), g.width.tobytes(), g.statistic.tobytes()) for g in groups]


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("efficientnet_b0", 64), ("vit_tiny_patch16_224", 224),
                                        ("convnext_atto", 64), ("mobilenetv3_small_100", 64)])
def test_the_meta_trace_finds_the_groups_the_real_one_finds(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    meta, real = gp.trace(model, x, meta=True), gp.trace(model, x, meta=False)
    assert (meta.forward, real.forward) == ("meta", "real")
    assert meta.summary() == real.summary()
    assert [(o.structure, o.shapes, o.data_sized) for o in meta.outputs] == [
        (o.structure, o.shapes, o.data_sized) for o in real.outputs]
    assert np.array_equal(meta.frozen, real.frozen) and np.array_equal(meta.classes, real.classes)
    assert _group_view(gp.find_groups(meta, model=model)) == _group_view(gp.find_groups(real, model=model))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_forward_reading_values_is_traced_for_real() -> None:
    net = _Gather()
    assert gp.trace(net, torch.randn(1, 3, 4, 4), meta=True).forward == "real"
    assert gp.trace(nn.Embedding(10, 4), torch.tensor([[1, 2]]), meta=True).forward == "real"


class _Buffered(nn.Module):
    """Registers a buffer and fills an OrderedDict cache from forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("mask", None)
        from collections import OrderedDict

        self.cache: OrderedDict = OrderedDict()

    def forward(self, x):
        self.mask = torch.ones_like(x)
        self.cache["last"] = x
        return self.linear(x * self.mask)


def test_state_assigned_in_forward_does_not_outlive_a_meta_run() -> None:
    net = _Buffered()
    assert meta_outputs(net, (torch.randn(1, 4),)) is not None
    assert net.mask is None and len(net.cache) == 0
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])


class _Caught(nn.Module):
    """Takes another branch when an op fails: on meta, ``x.max().item()`` raises."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        try:
            scale = float(x.abs().max())
        except Exception:
            scale = 1.0
        return self.linear(x) * scale


def test_models_a_meta_run_cannot_stand_for_are_checked_for_real() -> None:
    x = torch.randn(2, 4)
    assert meta_outputs(_Caught(), (x,)) is None  # an op raised, even though the forward went on
    linear = nn.Linear(4, 4)
    torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.5)  # a forward pre-hook recomputes weight
    assert meta_outputs(linear, (x,)) is None
    assert meta_outputs(nn.Sequential(torch.jit.script(nn.Linear(4, 4))), (x,)) is None
    assert meta_outputs(nn.MultiheadAttention(4, 2, batch_first=True), (x[None], x[None], x[None])) is None
    lazy = nn.LazyLinear(3)
    assert meta_outputs(lazy, (x,)) is None and lazy(x).shape == (2, 3)  # still lazy, materializes for real
    assert gp.trace(_Caught(), x, meta=True).forward == "real"
