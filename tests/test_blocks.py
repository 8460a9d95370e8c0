"""Depth pruning (graphprune.blocks): discovery, exact removal, proxies, plans, gates, save/load."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import graphprune as gp
import graphprune.blocks as gb
from graphprune.measurement import count_macs
from graphprune.testing import zero_branch_

# (model, input, blocks the graph must find as identity-removable)
MODELS = {
    "resnet18": (dict(), (1, 3, 32, 32), 5),
    "tf_efficientnet_lite0": (dict(), (1, 3, 64, 64), 9),
    "vit_tiny_patch16_224": (dict(img_size=32, depth=4), (1, 3, 32, 32), 8),
}


def _randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine and running statistics: random init leaves them at 1/0, hiding mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
    return model.eval()


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = _randomize_norms_(timm.create_model(name, pretrained=False, **kwargs))
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module", params=list(MODELS))
def found(request):
    model, x = _model(request.param)
    return request.param, model, x, gb.find_blocks(model, x)


def test_discovery_finds_every_residual_branch(found):
    name, model, x, blocks = found
    assert len(blocks.candidates("identity")) == MODELS[name][2], blocks.report()
    for block in blocks:
        assert 0 < block.macs < blocks.macs and 0 < block.params < blocks.params
        for child in block.children:
            model.get_submodule(f"{block.module}.{child}")  # real children of the block module


@pytest.mark.parametrize("which", ["each", "all"])
def test_removing_zeroed_branches_leaves_outputs_unchanged(found, which):
    name, model, x, blocks = found
    chosen = blocks.candidates("identity")
    sets = [[b] for b in chosen] if which == "each" else [list(chosen)]
    for subset in sets:
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            before_zeroing = zeroed(x)
            for block in subset:
                zero_branch_(zeroed, block)
            y0 = zeroed(x)
            assert _rel(before_zeroing, y0) > 1e-4  # zeroing the branch is visible: the test can fail
            gb.apply_block_plan_(zeroed, gb.make_block_plan(blocks, [b.name for b in subset]))
            y1 = zeroed(x)
        assert _rel(y0, y1) <= 1e-5, (name, [b.name for b in subset])


def test_removal_drops_exactly_the_block_costs(found):
    name, model, x, blocks = found
    subset = blocks.candidates("identity")[:2]
    small = gb.apply_block_plan_(copy.deepcopy(model), gb.make_block_plan(blocks, [b.name for b in subset]))
    params = sum(p.numel() for p in small.parameters())
    assert params == blocks.params - sum(b.params for b in subset)
    assert count_macs(small, x) == blocks.macs - sum(b.macs for b in subset)


def test_projection_blocks_need_a_proxy_and_a_fresh_proxy_is_exact():
    model, x = _model("resnet18")
    blocks = gb.find_blocks(model, x)
    block = blocks.by_name("layer2.0")
    assert block.kind == "projection" and not block.removable and block.proxy
    with pytest.raises(gp.InvalidArgumentError, match="cannot be replaced by the identity"):
        gb.make_block_plan(blocks, ["layer2.0"])
    zeroed = copy.deepcopy(model)
    zero_branch_(zeroed, block)
    with torch.no_grad():
        y0 = zeroed(x)
        gb.apply_block_plan_(zeroed, gb.make_block_plan(blocks, ["layer2.0"], replacement="proxy"))
        y1 = zeroed(x)
    assert isinstance(zeroed.layer2[0].conv1, gb.Proxy) and zeroed.layer2[0].conv1.spec()["stride"] == 2
    assert _rel(y0, y1) <= 1e-5


def test_bad_plans_are_refused_and_leave_the_model_unchanged():
    model, x = _model("resnet18")
    blocks = gb.find_blocks(model, x)
    with pytest.raises(gp.InvalidArgumentError, match="no block 'layer9.0'"):
        gb.make_block_plan(blocks, ["layer9.0"])
    with pytest.raises(gp.InvalidArgumentError, match="k must be"):
        gb.select_blocks(blocks, {b.name: 0.0 for b in blocks}, k=99)
    with pytest.raises(gp.InvalidArgumentError, match="replacement"):
        gb.make_block_plan(blocks, ["layer1.0"], replacement="delete")
    good = gb.make_block_plan(blocks, ["layer1.0"])
    broken = gb.BlockPlan(good.edits + (gb.BlockEdit("x", "layer3.1", ("conv1", "nope"), "identity"),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gp.InvalidArgumentError, match="no children"):
        gb.apply_block_plan_(model, broken)
    assert type(model.layer1[0].conv1) is nn.Conv2d  # the first edit was rolled back
    assert not hasattr(model, "graphprune_plans")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    gb.apply_block_plan_(model, good)
    with pytest.raises(gp.InvalidArgumentError, match="already removed"):
        gb.apply_block_plan_(model, good)


def test_select_blocks_takes_the_lowest_scores_or_a_threshold():
    model, x = _model("resnet18")
    blocks = gb.find_blocks(model, x)
    scores = {b.name: float(i) for i, b in enumerate(reversed(blocks.blocks))}  # later blocks score lower
    assert [b.name for b in gb.select_blocks(blocks, scores, k=2)] == ["layer3.1", "layer4.1"]
    assert [b.name for b in gb.select_blocks(blocks, scores, threshold=1.5)] == ["layer4.1"]  # layer4.0: no identity
    assert len(gb.select_blocks(blocks, scores, threshold=2.5, replacement="proxy")) == 3


def test_unprovable_residual_adds_are_reported_not_guessed():
    class Leaky(nn.Module):  # the branch's hidden activation is also returned: removing it would change that
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            hidden = self.conv1(x)
            return x + self.conv2(hidden), hidden.mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = nn.Conv2d(3, 4, 1), Leaky()

        def forward(self, x):
            y, side = self.block(self.stem(x))
            return y.mean((2, 3)) + side

    blocks = gb.find_blocks(Net().eval(), torch.randn(1, 3, 8, 8))
    assert len(blocks) == 0
    assert any("also read outside the branch" in why for _, why in blocks.skipped), blocks.skipped
    assert "residual adds skipped" in blocks.report()


def test_removed_blocks_save_load_and_channel_prune_after(tmp_path):
    model, x = _model("resnet18")
    blocks = gb.find_blocks(model, x)
    gb.apply_block_plan_(model, gb.make_block_plan(blocks, ["layer1.1", "layer3.1"]))
    gb.apply_block_plan_(model, gb.make_block_plan(blocks, ["layer2.0"], replacement="proxy"))
    with torch.no_grad():
        model.layer2[0].conv1.norm.weight.fill_(0.5)  # a "trained" proxy: its weights must survive the round trip
    pruned = gp.prune(model, x, ratio=0.3)  # depth then width: the residual stream still prunes
    assert pruned.layer1[0].conv2.out_channels < 64
    folder = gp.save(pruned, tmp_path / "depth-width")
    loaded = gp.load(folder)
    assert [type(loaded.layer1[1].conv1), type(loaded.layer2[0].conv1)] == [gb.ZeroBranch, gb.Proxy]
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned.eval()(x), atol=1e-5, rtol=1e-5)
    assert len(loaded.graphprune_plans) == 3


def test_gates_close_under_a_complexity_penalty():
    model, x = _model("resnet18")
    model.reset_classifier(2)
    blocks = gb.find_blocks(model, x)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 2) for _ in range(3)]
    free = gb.block_scores(blocks, model, "gate", data=batches,
                           config=gb.GateConfig(epochs=8, complexity_weight=0.0, teacher_weight=0.0))
    costly = gb.block_scores(blocks, model, "gate", data=batches,
                             config=gb.GateConfig(epochs=8, complexity_weight=20.0, teacher_weight=0.0))
    names = [b.name for b in blocks.candidates("identity")]
    assert sum(costly[n] for n in names) < sum(free[n] for n in names) - 1.0
    result = gb.train_gates(blocks, model, batches, config=gb.GateConfig(epochs=1, proxies=True))
    assert set(result.proxies) == {b.name for b in blocks.candidates("proxy")} and result.steps == 3
    with pytest.raises(gp.InvalidArgumentError, match="data="):
        gb.block_scores(blocks, model, "gate")
    with pytest.raises(gp.InvalidArgumentError, match="unknown block scorer"):
        gb.block_scores(blocks, model, "magic")


def _tiny_task(classes: int = 2):
    from torch.utils.data import DataLoader, TensorDataset

    import graphprune.recipes as R

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % classes
    images = torch.randn(16, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1).float()  # learnable
    pairs = TensorDataset(images, labels)
    return R.TransferData(DataLoader(pairs, batch_size=8), DataLoader(pairs, batch_size=8),
                          tuple("ab"[:classes]))


def test_block_search_stops_by_the_rule_and_resumes(tmp_path):
    import graphprune.recipes as R

    data = _tiny_task()
    source = timm.create_model("resnet18", pretrained=False)
    config = R.BlockSearchConfig(source=R.FinetuneConfig(epochs=1), gates=gb.GateConfig(epochs=1), tolerance=0.0,
                                 patience=1, max_blocks=3, finetune=R.FinetuneConfig(epochs=0.5),
                                 run=R.RunConfig(checkpoint_dir=str(tmp_path / "run"), progress=False))
    model, result = R.block_search(source, data, config)
    teacher = result.stage("source").val_accuracy
    steps = [s for s in result.stages if s.kind == "search-step"]
    assert steps and [s.details["blocks_removed"] for s in steps] == list(range(1, len(steps) + 1))
    # patience 1: every step before the last passed; the last failed unless the search ran out of blocks
    assert all(s.val_accuracy >= teacher for s in steps[:-1])
    assert steps[-1].val_accuracy < teacher or len(steps) == 3
    selected = result.final
    passed = [s for s in steps if s.val_accuracy >= teacher]
    assert selected.name == (passed[-1].name if passed else "source")
    removed = selected.details.get("blocks_removed", 0)
    assert sum(isinstance(m, gb.ZeroBranch) for m in model.modules()) == removed
    assert selected.name == ("source" if removed == 0 else f"depth-{removed}")
    again_model, again = R.block_search(source, data, config)  # resumes: every stage read back from disk
    assert again.stages == result.stages
    x = data.example_inputs()
    with torch.no_grad():
        assert torch.allclose(again_model.eval()(x), model.eval()(x), atol=1e-5)


def test_block_search_depth_then_width_with_proxies():
    import graphprune.recipes as R

    data = _tiny_task()
    config = R.BlockSearchConfig(source=R.FinetuneConfig(epochs=0.5), gates=gb.GateConfig(epochs=1, proxies=True),
                                 replacement="proxy", tolerance=1.0, max_blocks=2,
                                 finetune=R.FinetuneConfig(epochs=0.5),
                                 width=R.PruneConfig(scorer="l1", flops_reduction=0.2),
                                 width_finetune=R.FinetuneConfig(epochs=0.5), run=R.RunConfig(progress=False))
    model, result = R.block_search(timm.create_model("resnet18", pretrained=False), data, config)
    assert [s.name for s in result.stages] == ["probe", "source", "depth-1", "depth-2", "width", "width-finetune"]
    assert sum(isinstance(m, gb.Proxy) for m in model.modules()) == 2
    depth, width = result.stage("depth-2"), result.stage("width-finetune")
    assert width.macs < depth.macs < result.base_macs
    assert result.final == width  # the record describes the returned model


@pytest.mark.parametrize("bad, message", [
    (dict(tolerance=-0.1), "tolerance"),
    (dict(scorer="magic"), "scorer"),
    (dict(replacement="proxy"), "needs trained proxies"),
    (dict(step=0), "step"),
    (dict(patience=0), "patience"),
])
def test_block_search_config_errors(bad, message):
    import graphprune.recipes as R

    with pytest.raises(gp.InvalidArgumentError, match=message):
        R.BlockSearchConfig(**bad)
