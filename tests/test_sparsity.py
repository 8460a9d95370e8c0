"""graphprune.sparsity: unstructured / N:M masks and kernel pruning.

Masks: the sparsity reached is the target (within half a point, per layer and overall), masked
weights stay exactly zero through the recipes' fine-tuning (``full``, ``full`` with EMA,
``linear``), a saved and loaded sparse model gives identical outputs. Kernels: keeping every
kernel is the identity and removing zeroed kernels changes nothing (float64, on a ResNet and an
EfficientNet), fvcore's MACs of the new layer are the closed form ``out * k * kh * kw * H' * W'``,
the model saves and loads through ``graphprune.io`` with identical outputs. Float64 comparisons use
``atol=1e-10``: the grouped conv sums in another order than the dense one.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune as gp
import graphprune.recipes as R
from graphprune import sparsity as sp
from graphprune.errors import InvalidArgumentError
from graphprune.io_record import ModelFileError
from graphprune.measurement import analyze_macs, count_macs

ATOL = 1e-10  # float64, summation order only


def _resnet18(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes).eval()


def _small(num_classes: int = 2) -> nn.Module:
    """A small timm ResNet (0.4 M parameters): for the tests that train or rank all weights."""
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes).eval()


def _data(n: int = 8, size: int = 32, classes: int = 2) -> R.TransferData:
    generator = torch.Generator().manual_seed(0)
    pairs = TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.arange(n) % classes)
    return R.TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4),
                          tuple("abcdefgh"[:classes]))


# ----------------------------------------------------------------------------- unstructured masks


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_sparsity_reached_is_the_target(scope, target):
    model = _resnet18()
    report = sp.magnitude_masks_(model, target, scope=scope)
    weights = sp.maskable_modules(model)
    assert abs(sp.overall_sparsity(weights) - target) < 0.005
    assert report.sparsity == sp.overall_sparsity(weights)
    assert "fc" not in report.module_sparsity  # the classifier stays dense by default
    if scope == "local":
        assert all(abs(s - target) < 0.005 for s in report.module_sparsity.values())
    elif target > 0:  # a global ranking spreads the zeros unevenly
        assert max(report.module_sparsity.values()) - min(report.module_sparsity.values()) > 0.05


def test_magnitude_masks_keep_the_largest_weights():
    layer = nn.Linear(10, 10)
    sp.magnitude_masks_(nn.Sequential(layer), 0.4)
    kept = layer.weight_orig.detach().abs()[layer.weight_mask.bool()]
    dropped = layer.weight_orig.detach().abs()[~layer.weight_mask.bool()]
    assert dropped.numel() == 40 and float(dropped.max()) <= float(kept.min())


def test_zero_sparsity_is_the_identity():
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    sp.magnitude_masks_(model, 0.0)
    assert torch.equal(model(x), before)


def test_random_signal_is_seeded_and_leaves_the_global_stream_alone():
    a, b, c = _small(), _small(), _small()
    torch.manual_seed(123)
    sp.magnitude_masks_(a, 0.5, signal="random", seed=1)
    after_masking = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_masking)
    sp.magnitude_masks_(b, 0.5, signal="random", seed=1)
    sp.magnitude_masks_(c, 0.5, signal="magnitude")
    assert torch.equal(a.layer1[0].conv1.weight_mask, b.layer1[0].conv1.weight_mask)
    assert not torch.equal(a.layer1[0].conv1.weight_mask, c.layer1[0].conv1.weight_mask)
    assert abs(sp.overall_sparsity(sp.maskable_modules(a)) - 0.5) < 0.005


def test_masks_only_grow():
    model = _resnet18()
    sp.magnitude_masks_(model, 0.5)
    first = model.layer1[0].conv1.weight_mask.clone()
    sp.magnitude_masks_(model, 0.7)
    second = model.layer1[0].conv1.weight_mask
    assert bool((second <= first).all()) and abs(sp.overall_sparsity(sp.maskable_modules(model)) - 0.7) < 0.005
    with pytest.raises(InvalidArgumentError, match="masks only grow"):
        sp.magnitude_masks_(model, 0.3)


@pytest.mark.parametrize("bad, match", [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), (True, "fraction"),
                                        ("0.5", "fraction")])
def test_bad_sparsity_is_refused(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        sp.magnitude_masks_(_resnet18(), bad)


def test_bad_options_are_refused():
    model = _resnet18()
    with pytest.raises(InvalidArgumentError, match="scope must be one of"):
        sp.magnitude_masks_(model, 0.5, scope="layer")
    with pytest.raises(InvalidArgumentError, match="signal must be one of"):
        sp.magnitude_masks_(model, 0.5, signal="taylor")
    with pytest.raises(InvalidArgumentError, match="'layer9' is no such module"):
        sp.magnitude_masks_(model, 0.5, modules=["layer9"])
    with pytest.raises(InvalidArgumentError, match="'layer1' is a Sequential"):
        sp.magnitude_masks_(model, 0.5, modules=["layer1"])
    assert not sp.masked_modules(model)  # refused before anything was masked


def test_effective_macs_are_the_closed_form():
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(16 * 6 * 6, 5))
    x = torch.zeros(1, 8, 6, 6)
    sp.magnitude_masks_(conv, 0.75, ignore=())
    conv_macs, linear_macs = 16 * 8 * 9 * 6 * 6, 16 * 6 * 6 * 5
    zeros_conv, zeros_linear = round(0.75 * 16 * 8 * 9), round(0.75 * 16 * 36 * 5)
    expected = conv_macs - zeros_conv * 36 + linear_macs - zeros_linear
    assert count_macs(conv, x) == conv_macs + linear_macs  # a dense kernel still does them all
    assert sp.effective_macs(conv, x) == expected


def _changed(before: dict, model: nn.Module, names) -> bool:
    return any(not torch.equal(before[n], sp.effective_weight(m)) for n, m in names.items())


@pytest.mark.parametrize("mode, ema", [("full", None), ("full", 0.5), ("linear", None)])
def test_masked_weights_stay_exactly_zero_through_finetuning(mode, ema):
    model = _small()
    sp.magnitude_masks_(model, 0.6, scope="global")
    weights = sp.maskable_modules(model)
    masks = {name: m.weight_mask.clone() for name, m in weights.items()}
    before = {name: sp.effective_weight(m).clone() for name, m in weights.items()}
    config = R.FinetuneConfig(epochs=2, mode=mode, lr=1e-2, ema_decay=ema, weight_decay=0.1)
    R.finetune_(model, _data(), config, progress=False)
    for name, module in weights.items():
        weight = sp.effective_weight(module)
        assert torch.equal(module.weight_mask, masks[name]), name
        assert not bool(weight[masks[name] == 0].any()), name
    assert _changed(before, model, weights) == (mode == "full")  # full trained the backbone; linear did not
    x = torch.randn(2, 3, 32, 32)
    out = model.eval()(x)
    sp.make_permanent_(model)
    assert not sp.masked_modules(model)
    assert torch.equal(model(x), out)
    for name, module in sp.maskable_modules(model).items():
        assert not bool(module.weight[masks[name] == 0].any()), name


def test_saved_and_loaded_sparse_model_gives_identical_outputs(tmp_path):
    model = _resnet18()
    sp.magnitude_masks_(model, 0.7, scope="global")
    with pytest.raises(ModelFileError, match="make_permanent_"):
        gp.io.save(model, tmp_path / "masked")
    sp.make_permanent_(model)
    folder = gp.io.save(model, tmp_path / "sparse")
    loaded = gp.io.load(folder)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert sp.overall_sparsity(sp.maskable_modules(loaded)) == sp.overall_sparsity(sp.maskable_modules(model))


def test_a_deepcopy_of_a_masked_model_works_and_is_independent():
    model = _resnet18()
    sp.magnitude_masks_(model, 0.5)
    twin = copy.deepcopy(model)  # the recipes and timm's EMA copy models
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(twin(x), model(x))
    sp.magnitude_masks_(twin, 0.8)
    assert abs(sp.overall_sparsity(sp.maskable_modules(model)) - 0.5) < 0.005


# ----------------------------------------------------------------------------- gradual


def test_cubic_schedule_is_the_closed_form():
    schedule = sp.GradualSchedule(final_sparsity=0.9, end_step=110, start_step=10, initial_sparsity=0.1)
    for step in (0, 10, 35, 60, 85, 110, 200):
        progress = min(max((step - 10) / 100, 0), 1)
        assert schedule.sparsity_at(step) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - progress) ** 3, abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [({"final_sparsity": 1.0, "end_step": 5}, "final_sparsity"),
                                           ({"final_sparsity": 0.5, "end_step": 0}, "end_step"),
                                           ({"final_sparsity": 0.2, "initial_sparsity": 0.5, "end_step": 5},
                                            "masks only grow"),
                                           ({"final_sparsity": 0.5, "end_step": 5, "scope": "x"}, "scope")])
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        sp.GradualSchedule(**kwargs)


def test_gradual_pruning_during_finetune_reaches_the_schedule():
    model = _small()
    data = _data(n=16)  # 4 batches per epoch, 2 epochs: 8 steps
    pruner = sp.GradualPruner(model, sp.GradualSchedule(final_sparsity=0.8, end_step=6, scope="global"))
    seen = []
    original_step = pruner.step
    pruner.step = lambda: seen.append(original_step()) or seen[-1]
    with pruner.attached():
        record = R.finetune_(model, data, R.FinetuneConfig(epochs=2, lr=1e-3), progress=False)
    assert record.steps == 8 and pruner.steps == 7  # counted after each optimizer step but the last
    assert seen == sorted(seen) and seen[-1] == pytest.approx(0.8)
    assert abs(pruner.report().sparsity - 0.8) < 0.005
    assert not model._forward_pre_hooks  # the counting hook is gone


# ----------------------------------------------------------------------------- N:M


def test_nm_masks_are_two_of_four():
    model = _resnet18()
    report = sp.nm_masks_(model, 2, 4)
    assert report.sparsity == 0.5 and list(report.skipped) == ["conv1"]  # 3 * 7 * 7 = 147 weights per row
    for name, module in sp.masked_modules(model).items():
        assert sp.is_nm(sp.effective_weight(module), 2, 4), name
        runs = (sp.effective_weight(module).reshape(module.weight.shape[0], -1, 4) != 0).sum(-1)
        assert bool((runs == 2).all()), name


def test_nm_masks_survive_finetuning():
    model = _resnet18(num_classes=2)
    sp.nm_masks_(model, 1, 4)
    R.finetune_(model, _data(), R.FinetuneConfig(epochs=1, lr=1e-2), progress=False)
    assert all(sp.is_nm(sp.effective_weight(m), 1, 4) for m in sp.masked_modules(model).values())


def test_bad_nm_is_refused():
    with pytest.raises(InvalidArgumentError, match="N=4 > M=2"):
        sp.nm_masks_(_resnet18(), 4, 2)
    with pytest.raises(InvalidArgumentError, match="integers"):
        sp.nm_masks_(_resnet18(), 0, 4)
    with pytest.raises(InvalidArgumentError, match="conv1: rows of 147 weights"):
        sp.nm_masks_(_resnet18(), 2, 4, modules=["conv1"])
    model = _resnet18()
    sp.magnitude_masks_(model, 0.5)
    with pytest.raises(InvalidArgumentError, match="already have masks"):
        sp.nm_masks_(model)


def test_semi_structured_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("covered by test_semi_structured_matches_the_masked_dense_layer on this machine")
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        sp.semi_structured_(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse tensors need a CUDA GPU")
def test_semi_structured_matches_the_masked_dense_layer():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("sparse tensor cores need compute capability 8.0 or newer")
    net = nn.Sequential(nn.Linear(128, 128)).half().cuda().eval()
    sp.nm_masks_(net, 2, 4, ignore=())
    sp.make_permanent_(net)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    dense = net(x)
    assert sp.semi_structured_(net) == ["0"]
    assert type(net[0].weight).__name__.startswith("SparseSemiStructured")
    torch.testing.assert_close(net(x), dense, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- kernel pruning


def _conv_input(cin: int, size: int = 9) -> torch.Tensor:
    return torch.randn(2, cin, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("conv_kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2),
                                         dict(kernel_size=(1, 3), padding="same", bias=False),
                                         dict(kernel_size=3, dilation=2, padding=2)])
def test_kernel_conv_keeping_every_kernel_is_the_identity(conv_kwargs):
    conv = nn.Conv2d(5, 7, **conv_kwargs).double()
    pruned = sp.KernelConv2d.from_conv(conv, torch.arange(5).flip(0).repeat(7, 1))  # any order: sorted
    assert torch.equal(pruned.input_index, torch.arange(5).repeat(7, 1))
    assert torch.equal(pruned.weight, conv.weight)  # the gather order is the dense input order
    x = _conv_input(5)
    assert torch.allclose(pruned(x), conv(x), rtol=0, atol=ATOL)
    assert torch.equal(pruned.to_dense().weight, conv.weight)


def test_kernel_conv_weight_is_the_dense_weight_at_the_kept_kernels():
    conv = nn.Conv2d(6, 4, 3).double()
    index = torch.tensor([[0, 3], [5, 1], [2, 4], [0, 5]])
    pruned = sp.KernelConv2d.from_conv(conv, index)
    dense = pruned.to_dense().weight
    for o in range(4):
        for i in range(6):
            kept = i in index[o].tolist()
            assert torch.equal(dense[o, i], conv.weight[o, i] if kept else torch.zeros_like(dense[o, i]))
    x = _conv_input(6)
    assert torch.allclose(pruned(x), pruned.to_dense()(x), rtol=0, atol=ATOL)
    assert not torch.allclose(pruned(x), conv(x), atol=1e-3)  # kernels were removed


def _zero_kernels_(model: nn.Module, keep_ratio: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Zero all but k random kernels per output of every dense conv; the kept index per conv."""
    kept = {}
    with torch.no_grad():
        for name, conv in sp.dense_convs(model).items():
            k = max(1, round(keep_ratio * conv.in_channels))
            order = torch.rand(conv.out_channels, conv.in_channels, generator=generator).argsort(dim=1)
            drop = order[:, k:]
            rows = torch.arange(conv.out_channels)[:, None]
            conv.weight[rows, drop] = 0
            kept[name] = order[:, :k].sort(dim=1).values
    return kept


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_removing_zeroed_kernels_leaves_outputs_unchanged(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).double().eval()
    kept = _zero_kernels_(model, 0.4, torch.Generator().manual_seed(3))
    x = _conv_input(3, size=64)
    before = model(x)
    plan = sp.kernel_prune_(model, 0.4)  # magnitude keeps exactly the nonzero kernels
    assert {layer.name for layer in plan.layers} == set(kept)
    for layer in plan.layers:
        module = model.get_submodule(layer.name)
        assert isinstance(module, sp.KernelConv2d) and torch.equal(module.input_index, kept[layer.name])
    assert torch.allclose(model(x), before, rtol=0, atol=ATOL)


def test_removing_zeroed_kernels_of_efficientnet_lite0_leaves_outputs_unchanged(efficientnet_lite0_package):
    from graphprune.assets import load_efficientnet_lite0

    model = load_efficientnet_lite0().double().eval()
    _zero_kernels_(model, 0.5, torch.Generator().manual_seed(4))
    x = _conv_input(3, size=64)
    before = model(x)
    plan = sp.kernel_prune_(model, 0.5)
    assert len(plan.layers) == 32  # the 1x1 convs; the stem is a Conv2dSame, depthwise convs have groups > 1
    assert torch.allclose(model(x), before, rtol=0, atol=ATOL)


@pytest.mark.parametrize("cin, cout, k, kernel, stride, size", [(8, 16, 3, 3, 1, 10), (8, 16, 8, 3, 2, 11),
                                                               (32, 24, 5, 1, 1, 7), (6, 4, 1, 5, 1, 12)])
def test_kernel_conv_macs_are_the_closed_form(cin, cout, k, kernel, stride, size):
    net = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.ReLU())
    x = torch.zeros(1, cin, size, size)
    sp.kernel_prune_(net, {"0": k})
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    count = analyze_macs(net, x)
    assert count.macs == count.macs_by_module["0"] == cout * k * kernel * kernel * out * out
    assert count.uncounted_ops == {}  # the gather is data movement, counted as zero on purpose


def test_kernel_pruned_model_saves_and_loads_with_identical_outputs(tmp_path):
    model = _resnet18()
    sp.kernel_prune_(model, 0.3, signal="random", seed=5)
    folder = gp.io.save(model, tmp_path / "kernels")
    record = json.loads((folder / "graphprune.json").read_text())
    assert [p["format"] for p in record["plans"]] == [sp.KERNEL_PLAN_FORMAT]
    assert record["tensors"]["layer1.0.conv1.input_index"]["dtype"] == "int64"
    loaded = gp.io.load(folder)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.layer2[0].conv1.input_index, model.layer2[0].conv1.input_index)
    again = gp.io.load(gp.io.save(loaded, tmp_path / "again"))  # the history comes back with it
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("bad, match", [(torch.tensor([[0, 9]]), "outside"), (torch.tensor([[1, 0]]), "increasing"),
                                        (torch.tensor([[0, 1]], dtype=torch.int32), "int64")])
def test_a_bad_index_is_refused_when_loading(bad, match):
    module = sp.KernelConv2d(4, 1, 2, (3, 3))
    state = {**module.state_dict(), "input_index": bad}
    with pytest.raises(RuntimeError, match=match):  # graphprune.io.load turns it into a ModelFileError
        module.load_state_dict(state)


def test_a_kernel_plan_that_does_not_fit_is_refused_on_load():
    from graphprune.io_replay import replay_on_meta

    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)
    plan = json.loads(sp.KernelPlan((sp.KernelLayer("layer1.0.conv1", 32, 64, 2),)).to_json())
    with pytest.raises(ModelFileError, match="expects layer1.0.conv1 with 32 -> 64 channels"):
        replay_on_meta(model, [plan], "m")
    plan = json.loads(sp.KernelPlan((sp.KernelLayer("layer1.0.bn1", 64, 64, 2),)).to_json())
    with pytest.raises(ModelFileError, match="takes an nn.Conv2d"):
        replay_on_meta(model, [plan], "m")
    with pytest.raises(InvalidArgumentError, match="more than the conv's 4 input"):
        sp.KernelPlan.from_json(json.dumps({"format": sp.KERNEL_PLAN_FORMAT, "layers": [
            {"name": "a", "in_channels": 4, "out_channels": 2, "kernels_per_output": 5}]}))


def test_bad_kernel_requests_are_refused_and_leave_the_model_unchanged():
    model = _resnet18()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    with pytest.raises(InvalidArgumentError, match="k=65 is more than the conv's 64 input channels"):
        sp.kernel_prune_(model, {"layer1.0.conv1": 32, "layer1.0.conv2": 65})
    with pytest.raises(InvalidArgumentError, match=r"keep_ratio must be a fraction of the kernels in \(0, 1\]"):
        sp.kernel_prune_(model, 0.0)
    with pytest.raises(InvalidArgumentError, match="no such module"):
        sp.kernel_prune_(model, {"layer9": 1})
    with pytest.raises(InvalidArgumentError, match="signal must be one of"):
        sp.kernel_prune_(model, 0.5, signal="taylor")
    assert type(model.layer1[0].conv1) is nn.Conv2d and torch.equal(model(x), before)
    assert not getattr(model, "graphprune_plans", [])
    with pytest.raises(InvalidArgumentError, match="groups=4"):
        sp.kernel_prune_(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), {"0": 1})
    same = timm.layers.create_conv2d(4, 4, 3, stride=2, padding="same")  # timm's Conv2dSame: another forward
    with pytest.raises(InvalidArgumentError, match="exact type"):
        sp.kernel_prune_(nn.Sequential(same), {"0": 1})


def test_kernel_magnitude_keeps_the_largest_kernels_and_random_differs():
    conv = nn.Conv2d(16, 8, 3)
    scores = sp.kernel_scores(conv)
    assert torch.equal(scores, conv.weight.detach().abs().sum(dim=(2, 3)))
    net = nn.Sequential(copy.deepcopy(conv))
    sp.kernel_prune_(net, {"0": 4})
    assert torch.equal(net[0].input_index, scores.topk(4, dim=1).indices.sort(dim=1).values)
    a, b = nn.Sequential(copy.deepcopy(conv)), nn.Sequential(copy.deepcopy(conv))
    sp.kernel_prune_(a, {"0": 4}, signal="random", seed=1)
    sp.kernel_prune_(b, {"0": 4}, signal="random", seed=1)
    assert torch.equal(a[0].input_index, b[0].input_index)  # seeded
    assert not torch.equal(a[0].input_index, net[0].input_index)  # 1820 choices per row, 8 rows


def test_a_kernel_pruned_model_trains():
    model = _small()
    sp.kernel_prune_(model, 0.5)
    before = model.layer1[0].conv1.weight.detach().clone()
    R.finetune_(model, _data(), R.FinetuneConfig(epochs=1, lr=1e-2), progress=False)
    assert not torch.equal(model.layer1[0].conv1.weight, before)


def test_kernel_masks_train_as_the_kernel_conv_and_fold_into_it():
    model = _resnet18(num_classes=2)
    counts = sp.kernel_masks_(model, 0.5)
    indices = {name: sp.kernel_mask_index(model.get_submodule(name)) for name in counts}
    R.finetune_(model, _data(), R.FinetuneConfig(epochs=1, lr=1e-2), progress=False)
    for name, index in indices.items():  # still whole kernels, the same ones
        assert torch.equal(sp.kernel_mask_index(model.get_submodule(name)), index), name
    model = model.double().eval()
    x = _conv_input(3, size=32)
    before = model(x)
    plan = sp.kernel_convs_from_masks_(model)
    assert {layer.name: layer.kernels_per_output for layer in plan.layers} == counts
    assert all(torch.equal(model.get_submodule(n).input_index, i) for n, i in indices.items())
    assert torch.allclose(model(x), before, rtol=0, atol=ATOL)
    assert json.loads(model.graphprune_plans[-1])["format"] == sp.KERNEL_PLAN_FORMAT


def test_only_kernel_shaped_masks_fold_into_kernel_convs():
    net = nn.Sequential(nn.Conv2d(4, 4, 3))
    sp.magnitude_masks_(net, 0.5, ignore=())
    assert sp.kernel_mask_index(net[0]) is None  # single weights, not whole kernels
    with pytest.raises(InvalidArgumentError, match="no nn.Conv2d has a kernel-shaped mask"):
        sp.kernel_convs_from_masks_(net)
    with pytest.raises(InvalidArgumentError, match="already have masks"):
        sp.kernel_masks_(net, 0.5, ignore=())


# ----------------------------------------------------------------------------- FLOPs budgets


@pytest.mark.parametrize("reduction", [0.3, 0.5, 0.7])
def test_kernel_budget_is_met(reduction):
    model = _resnet18()
    x = torch.zeros(1, 3, 64, 64)
    base = count_macs(model, x)
    _, result = sp.kernel_prune_to_flops_(model, x, reduction)
    assert result.macs_after == count_macs(model, x) and result.macs_before == base
    assert abs(result.flops_reduction - reduction) < 0.005


@pytest.mark.parametrize("reduction", [0.3, 0.7])
def test_kernel_mask_budget_is_the_kernel_conv_budget(reduction):
    masked, pruned = _resnet18(), _resnet18()
    x = torch.zeros(1, 3, 64, 64)
    counts, result = sp.kernel_masks_to_flops_(masked, x, reduction)
    plan, structural = sp.kernel_prune_to_flops_(pruned, x, reduction)
    assert counts == {layer.name: layer.kernels_per_output for layer in plan.layers}
    assert result.macs_after == structural.macs_after  # effective MACs of the masks = fvcore's of KernelConv2d
    sp.kernel_convs_from_masks_(masked)
    assert count_macs(masked, x) == result.macs_after


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("reduction", [0.3, 0.5, 0.7])
def test_unstructured_budget_is_met(scope, reduction):
    model = _small()
    x = torch.zeros(1, 3, 64, 64)
    _, result = sp.unstructured_to_flops_(model, x, reduction, scope=scope)
    assert result.macs_after == sp.effective_macs(model, x, sp.maskable_modules(model))
    assert abs(result.flops_reduction - reduction) < 0.005


def test_budgets_out_of_reach_are_refused():
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(InvalidArgumentError, match=r"in \(0, 1\)"):
        sp.kernel_prune_to_flops_(_resnet18(), x, 1.0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    with pytest.raises(InvalidArgumentError, match="can give at most"):
        sp.kernel_prune_to_flops_(net, x, 0.95, ignore=())


# ----------------------------------------------------------------------------- recipes: PruneConfig.granularity


def _run(**kwargs) -> R.RunConfig:
    return R.RunConfig(progress=False, **kwargs)


def _transfer(granularity: str, reduction: float = 0.5, *, target: R.FinetuneConfig | None = None,
              **prune) -> R.TransferConfig:
    run = prune.pop("run", _run())
    return R.TransferConfig(source=R.FinetuneConfig(epochs=1, lr=1e-3),
                            prune=R.PruneConfig(granularity=granularity, flops_reduction=reduction, **prune),
                            target=target or R.FinetuneConfig(epochs=0), run=run)


def _recipe(name: str):
    return {"sp_t": R.sp_t, "s_tp_t": R.s_tp_t}[name]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("recipe", ["sp_t", "s_tp_t"])
@pytest.mark.parametrize("granularity", ["channel", "kernel", "unstructured"])
def test_recipes_meet_the_budget_at_every_granularity(recipe, granularity, tmp_path):
    model, result = _recipe(recipe)(_small(), _data(), _transfer(granularity, target=R.FinetuneConfig(epochs=1)))
    prune, final = result.stage("prune"), result.final
    assert prune.details.get("granularity", "channel") == granularity
    assert abs(prune.details["flops_reduction"] - 0.5) < (0.02 if granularity == "channel" else 0.005)
    assert not sp.masked_modules(model)  # the deployed form: saveable
    x = torch.zeros(1, 3, 32, 32)
    assert final.macs == count_macs(model, x)
    if granularity == "kernel":
        assert any(isinstance(m, sp.KernelConv2d) for m in model.modules())
        assert abs(1 - final.macs / result.base_macs - 0.5) < 0.005  # fvcore, on the deployed form
    if granularity == "unstructured":
        assert final.macs == result.base_macs  # a dense kernel still runs every MAC
        assert abs(final.details["flops_reduction"] - 0.5) < 0.005  # effective MACs of the trained zeros
        assert final.details["sparsity"] == prune.details["sparsity"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gp.io.load(gp.io.save(model, tmp_path / granularity))(x), model.eval()(x))


@pytest.mark.parametrize("recipe", ["sp_t", "s_tp_t"])
@pytest.mark.parametrize("granularity, mode", [("unstructured", "full"), ("unstructured", "linear"),
                                               ("kernel", "full"), ("kernel", "linear")])
def test_recipe_finetuning_keeps_the_masks(recipe, granularity, mode):
    target = R.FinetuneConfig(epochs=1, mode=mode, lr=1e-2)
    scope = "global" if granularity == "unstructured" else "local"
    model, result = _recipe(recipe)(_small(), _data(), _transfer(granularity, 0.6, target=target, keep_masks=True,
                                                                 scope=scope))
    assert result.final.steps == 2
    assert result.final.details["sparsity"] == result.stage("prune").details["sparsity"] > 0.5
    assert abs(result.final.details["flops_reduction"] - 0.6) < 0.005
    masked = sp.masked_modules(model)
    assert masked
    for name, module in masked.items():
        assert not bool(sp.effective_weight(module)[module.weight_mask == 0].any()), name
    if granularity == "kernel":
        assert all(sp.kernel_mask_index(m) is not None for m in masked.values())


def test_deployed_kernel_model_keeps_the_trained_kept_kernels():
    """The masked model after ``target`` and its KernelConv2d form compute the same function."""
    config = _transfer("kernel", target=R.FinetuneConfig(epochs=1, lr=1e-2), keep_masks=True)
    masked, _ = R.sp_t(_small(), _data(), config)
    deployed, result = R.sp_t(_small(), _data(), _transfer("kernel", target=R.FinetuneConfig(epochs=1, lr=1e-2)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(deployed.eval()(x), masked.eval()(x), atol=1e-5)
    assert abs(1 - result.final.macs / result.base_macs - 0.5) < 0.005


def test_gradual_masks_reach_the_budget_by_the_end_of_target():
    config = _transfer("unstructured", target=R.FinetuneConfig(epochs=2, lr=1e-3), gradual=True)
    model, result = R.sp_t(_small(), _data(n=16), config)
    assert result.stage("prune").details["sparsity"] == 0.0
    assert abs(result.final.details["flops_reduction"] - 0.5) < 0.01
    assert abs(result.final.details["sparsity"] - result.stage("prune").details["gradual_final_sparsity"]) < 0.005


@pytest.mark.parametrize("recipe, granularity, gradual", [("sp_t", "kernel", False), ("sp_t", "unstructured", False),
                                                          ("sp_t", "unstructured", True),
                                                          ("s_tp_t", "kernel", False),
                                                          ("s_tp_t", "unstructured", False)])
def test_resume_from_stage_checkpoints_is_the_uninterrupted_run(recipe, granularity, gradual, tmp_path,
                                                                monkeypatch):
    from graphprune.recipes import run as pipelines  # the stages run through RecipeRun

    target = R.FinetuneConfig(epochs=1, lr=1e-2)
    config = _transfer(granularity, target=target, gradual=gradual, run=_run(checkpoint_dir=str(tmp_path)))
    uninterrupted, expected = _recipe(recipe)(_small(), _data(), _transfer(granularity, target=target,
                                                                           gradual=gradual))
    real = pipelines.finetune_

    def crash_in_target(model, data, stage_config, **options):
        if options["name"] == "target":
            raise RuntimeError("simulated crash")
        return real(model, data, stage_config, **options)

    monkeypatch.setattr(pipelines, "finetune_", crash_in_target)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _recipe(recipe)(_small(), _data(), config)
    assert (tmp_path / "stages" / "prune" / "masks.pt").is_file()
    masked = gp.io.load(tmp_path / "stages" / "prune")  # the directory alone: the permanent form
    assert not sp.masked_modules(masked)
    monkeypatch.setattr(pipelines, "finetune_", real)
    monkeypatch.setattr(pipelines, "prune_stage_", lambda *a, **k: pytest.fail("prune should be resumed"))
    resumed, result = _recipe(recipe)(_small(), _data(), config)
    assert _same_state(resumed, uninterrupted)
    assert [(s.name, s.val_accuracy, s.macs, s.train_loss) for s in result.stages] == \
        [(s.name, s.val_accuracy, s.macs, s.train_loss) for s in expected.stages]
    assert result.final.details["flops_reduction"] == expected.final.details["flops_reduction"]
    again, _ = _recipe(recipe)(_small(), _data(), config)  # everything finished: the target checkpoint
    assert _same_state(again, uninterrupted)


@pytest.mark.parametrize("build, match", [
    (lambda: R.PruneConfig(granularity="kernel", ratio=0.3, flops_reduction=None), "not ratio="),
    (lambda: R.PruneConfig(granularity="kernel", ratio=0.3), "not ratio="),
    (lambda: R.PruneConfig(granularity="unstructured", scorer="classmean"), "scorer must be one of"),
    (lambda: R.PruneConfig(granularity="kernel", scorer="taylor"), "scorer must be one of"),
    (lambda: R.PruneConfig(granularity="block"), "granularity must be one of"),
    (lambda: R.PruneConfig(granularity="kernel", scope="global"), "scope='global'"),
    (lambda: R.PruneConfig(granularity="unstructured", scope="global", scorer="random"), "scope='global'"),
    (lambda: R.PruneConfig(granularity="kernel", gradual=True), "gradual=True grows unstructured"),
    (lambda: R.PruneConfig(gradual=True), "channel pruning removes channels"),
    (lambda: R.PruneConfig(keep_masks=True), "channel pruning removes channels"),
    (lambda: R.PruneConfig(granularity="unstructured", max_group_ratio=0.5), "max_group_ratio"),
    (lambda: R.PruneConfig(granularity="unstructured", scorer="random", scorer_options={"seed": 1}),
     "no scorer_options"),
    (lambda: R.TransferConfig(prune=R.PruneConfig(granularity="unstructured", gradual=True),
                              target=R.FinetuneConfig(mode="linear")), "target.mode='full'"),
    (lambda: R.TransferConfig(prune=R.PruneConfig(granularity="unstructured", gradual=True),
                              target=R.FinetuneConfig(epochs=0)), "target.epochs > 0"),
], ids=["kernel-ratio", "kernel-ratio-default-budget", "classmean-unstructured", "taylor-kernel", "granularity",
        "global-kernel", "global-random", "gradual-kernel", "gradual-channel", "keep-masks-channel",
        "max-group-ratio", "scorer-options", "gradual-linear", "gradual-zero-shot"])
def test_granularity_combinations_that_do_not_apply_are_refused(build, match):
    with pytest.raises(InvalidArgumentError, match=match):
        build()


def test_sparse_sp_t_is_sp_t_with_the_granularity():
    from graphprune.recipes.sparse import SparseTransferConfig, sparse_sp_t

    config = SparseTransferConfig(granularity="unstructured", signal="random", flops_reduction=0.5,
                                  target=R.FinetuneConfig(epochs=0), run=_run())
    assert config.transfer_config().prune == R.PruneConfig(granularity="unstructured", scorer="random",
                                                           flops_reduction=0.5)
    model, result = sparse_sp_t(_small(), _data(), config)
    expected, _ = R.sp_t(_small(), _data(), config.transfer_config())
    assert _same_state(model, expected)
    assert abs(result.final.details["flops_reduction"] - 0.5) < 0.005
    with pytest.raises(InvalidArgumentError, match="signal must be one of"):
        SparseTransferConfig(signal="taylor")
