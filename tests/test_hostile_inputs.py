"""Bad input to the pruning API (issue 15 items 6-10): untraced branches, low-precision scores,
a plan for another model, tied weights, bad arguments. Each is refused with a named error and
the model left exactly as it was, or handled exactly (zero the removed channels, then remove
them: identical outputs in float64).
"""

from __future__ import annotations

import copy
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import graphprune as gp
from graphprune import cli, cli_commands
from graphprune import io as gio
from graphprune.testing import zero_channels_
from graphprune.verify import apply_verified_


def _state(model: nn.Module) -> dict[str, object]:
    """Everything a failed call must leave as it was: tensors (by value), attributes, modes."""
    return {"tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            "ids": [id(t) for t in model.state_dict(keep_vars=True).values()],
            "attrs": [(n, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for n, m in model.named_modules()],
            "modes": [m.training for m in model.modules()]}


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = _state(model)
    assert after["ids"] == before["ids"] and after["attrs"] == before["attrs"] and after["modes"] == before["modes"]
    tensors = before["tensors"].items()
    assert all(v.is_meta or torch.equal(after["tensors"][k], v) for k, v in tensors)  # meta: no values


# ----------------------------------------------------------------------------- 6: untraced code

class Branchy(nn.Module):
    """``a`` runs on inputs with a positive mean, ``b`` on the others (issue 15's reproduction);
    with ``expose``, the ``b`` branch also returns the stem's features, which freezes them."""

    def __init__(self, expose: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)
        self.expose = expose

    def forward(self, x: torch.Tensor):
        positive = bool(x.mean() > 0)
        x = torch.relu(self.stem(x))
        y = self.head((self.a(x) if positive else self.b(x)).mean((2, 3)))
        return y if positive or not self.expose else (y, x.mean((2, 3)))


def _branchy(expose: bool = False) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    return Branchy(expose).double().eval(), [x.abs() + 0.1, -x.abs() - 0.1]


def test_one_input_that_misses_a_branch_is_refused_naming_it():
    model, (positive, negative) = _branchy()
    graph = gp.trace(model, positive)
    assert graph.untraced == ("b.weight", "b.bias") and "untraced parameters: ['b.weight', 'b.bias']" in graph.summary()
    before = _state(model)
    with pytest.raises(gp.UntracedCodeError, match=r"never reached 2 parameters \(b\.weight, b\.bias.*"
                                                   r"example_inputs=\[x1, x2\].*ignore=\['b'\]"):
        gp.prune_(model, positive, ratio=0.5)
    assert_unchanged(model, before)
    with pytest.raises(gp.UntracedCodeError, match="a.weight"):
        gp.prune(model, negative, ratio=0.5)


def test_both_branches_traced_prune_both_exactly():
    model, examples = _branchy()
    graph = gp.trace(model, examples)
    assert graph.untraced == () and len(graph.outputs) == 2
    groups = gp.find_groups(graph, model=model)
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, model), ratio=0.5)
    zeroed = copy.deepcopy(model)
    zero_channels_(zeroed, groups, plan.removed)
    pruned = copy.deepcopy(zeroed)
    applied, dropped = apply_verified_(pruned, groups, plan, [(x,) for x in examples])
    assert dropped == {} and applied == plan
    assert pruned.stem.out_channels == pruned.a.in_channels == pruned.b.in_channels == 8
    with torch.no_grad():
        for x in examples:  # a branch each: both are consistent and exact
            assert torch.allclose(pruned(x), zeroed(x), rtol=0, atol=1e-12)
    small = gp.prune(model, examples, ratio=0.5)
    assert small.b.in_channels == 8 and all(small(x).shape == (2, 4) for x in examples)


def test_a_branch_that_freezes_channels_freezes_them_for_the_union():
    model, (positive, negative) = _branchy(expose=True)
    alone = gp.find_groups(gp.trace(model, positive), ignore=["b"], model=model)
    union = gp.find_groups(gp.trace(model, [positive, negative]), model=model)
    stem = "stem.weight"
    assert any(m.name == stem for g in alone for m in g.members)  # prunable when b is unseen
    assert not any(m.name == stem and m.dim == 0 for g in union for m in g.members)  # b's output pins it


def test_ignore_declares_an_untraced_module_unused():
    model, (positive, _) = _branchy()
    small = gp.prune(model, positive, ratio=0.5, ignore=["b"])
    assert small.stem.out_channels == 8 and small.b.in_channels == 16  # left as it was, as asked


@pytest.mark.parametrize(("inputs", "match"), [([], "empty list"), ([torch.zeros(1), 3], "example input 2 of 2 is a int")])
def test_a_bad_list_of_example_inputs_is_named(inputs, match):
    model, _ = _branchy()
    with pytest.raises(gp.InvalidArgumentError, match=match):
        gp.prune(model, inputs, ratio=0.5)


# ----------------------------------------------------------------------------- 7: float64 sums

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scorer", ["l1", "l2"])
def test_magnitude_scores_of_a_low_precision_model_equal_those_of_its_float64_copy(dtype, scorer):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    groups = gp.find_groups(gp.trace(model, torch.randn(1, 3, 64, 64)), model=model)
    low = copy.deepcopy(model).to(dtype)
    exact = copy.deepcopy(low).double()  # the same values, widened: no rounding
    score = gp.get_scorer(scorer)
    low_scores, exact_scores = score(groups, low), score(groups, exact)
    assert all(s.dtype == torch.float64 for s in low_scores.values())
    assert all(torch.equal(low_scores[g], exact_scores[g]) for g in exact_scores)
    assert gp.select_channels(groups, low_scores, ratio=0.3) == gp.select_channels(groups, exact_scores, ratio=0.3)


# ----------------------------------------------------------------------------- 8: a plan for another model

def test_a_plan_for_another_model_is_refused_and_the_model_left_as_it_was():
    torch.manual_seed(0)
    r18, r34 = timm.create_model("resnet18", pretrained=False), timm.create_model("resnet34", pretrained=False)
    groups = gp.find_groups(gp.trace(r18, torch.randn(1, 3, 64, 64)), model=r18)
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, r18), ratio=0.3)
    before = _state(r34)
    for candidate in (plan, gp.Plan.from_json(plan.to_json())):
        with pytest.raises(gp.InvalidArgumentError, match="made for a model with other parameters"):
            gp.apply_plan_(r34, candidate)
        assert_unchanged(r34, before)


def test_a_plan_still_fits_its_architecture_with_another_head():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    groups = gp.find_groups(gp.trace(model, torch.randn(1, 3, 64, 64)), model=model)
    plan = gp.Plan.from_json(gp.make_plan(groups, gp.get_scorer("l1")(groups, model), ratio=0.3).to_json())
    other = gp.apply_plan_(timm.create_model("resnet18", pretrained=False, num_classes=5), plan)
    assert other.fc.in_features == other.num_features < 512 and other(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("value", ["abc", 5, "0" * 63 + "g"])
def test_a_plan_with_a_malformed_model_fingerprint_is_not_a_plan(value):
    text = gp.Plan({}, ()).to_json().replace('"patches": []', f'"patches": [], "model": {value!r}'.replace("'", '"'))
    with pytest.raises(gp.InvalidArgumentError, match="model must be a sha256"):
        gp.Plan.from_json(text)


# ----------------------------------------------------------------------------- 9: tied weights

TIED_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Tied(nn.Module):
        def __init__(self, bias=True):
            super().__init__()
            self.stem = nn.Conv2d(3, 64, 3, padding=1)
            self.conv1 = nn.Conv2d(64, 64, 3, padding=1, bias=bias)
            self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=bias)
            self.conv2.weight = self.conv1.weight  # one Parameter, cut along both dims
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.conv2(torch.relu(self.conv1(torch.relu(self.stem(x)))))
            return self.head(x.mean((2, 3)))

    def make(bias=True):
        return Tied(bias)
""")


@pytest.fixture
def tied_factory(tmp_path: Path, monkeypatch):
    (tmp_path / "gp_tied_factory.py").write_text(TIED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import gp_tied_factory

    yield gp_tied_factory
    monkeypatch.delitem(sys.modules, "gp_tied_factory")


@pytest.mark.parametrize("bias", [True, False])
def test_tied_weights_stay_tied_consistent_exact_and_saveable(bias, tied_factory, tmp_path):
    torch.manual_seed(0)
    model, x = tied_factory.make(bias).double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = gp.find_groups(gp.trace(model, x), model=model)
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, model), ratio=0.3)
    zeroed = copy.deepcopy(model)
    zero_channels_(zeroed, groups, plan.removed)
    pruned = gp.apply_plan_(copy.deepcopy(zeroed), plan)
    assert pruned.conv1.weight is pruned.conv2.weight and pruned.conv1.weight.shape[:2] == (45, 45)
    for conv in (pruned.conv1, pruned.conv2):
        assert (conv.out_channels, conv.in_channels) == tuple(conv.weight.shape[:2])
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(x), rtol=0, atol=1e-12)
    small = gp.prune(model, x, ratio=0.3)
    folder = gio.save(small, tmp_path / "tied", architecture={"factory": "gp_tied_factory:make",
                                                              "kwargs": {"bias": bias}})
    loaded = gio.load(folder, allow_factories=["gp_tied_factory:make"])
    assert loaded.conv1.weight is loaded.conv2.weight and loaded.conv2.in_channels == 45
    with torch.no_grad():
        assert torch.equal(loaded.double()(x), small(x))


# ----------------------------------------------------------------------------- 10: argument checks

def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _meta() -> nn.Module:
    with torch.device("meta"):
        return _tiny()


X = torch.randn(1, 3, 8, 8)


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[nn.Module], object]
    match: str
    error: type[Exception] = gp.InvalidArgumentError
    make: Callable[[], nn.Module] = _tiny


BAD_ARGUMENTS = (
    Bad("model-none", lambda m: gp.prune(None, X, ratio=0.5), "must be a torch.nn.Module, got NoneType"),
    Bad("model-function", lambda m: gp.prune(_tiny, X, ratio=0.5), "must be a torch.nn.Module, got function"),
    Bad("in-place-model-none", lambda m: gp.prune_(None, X, ratio=0.5), "must be a torch.nn.Module"),
    Bad("config-string", lambda m: gp.prune(m, X, ratio=0.5, config="global"),
        r"config must be a graphprune.PlanConfig, e.g. PlanConfig\(scope='global'\), got str"),
    Bad("scorer-option-unknown", lambda m: gp.prune(m, X, ratio=0.5, scorer_options={"foo": 1}),
        "scorer 'l1' has no option 'foo'; its options: none"),
    Bad("scorer-option-unknown-for-random", lambda m: gp.prune(m, X, ratio=0.5, scorer="random",
                                                               scorer_options={"sead": 1}),
        r"scorer 'random' has no option 'sead'; its options: \['seed'\]"),
    Bad("scorer-options-not-a-dict", lambda m: gp.prune(m, X, ratio=0.5, scorer_options=[1]),
        "scorer_options must be a dict"),
    Bad("ignore-empty-name", lambda m: gp.prune(m, X, ratio=0.5, ignore=[""]), "ignore holds '': each entry names"),
    Bad("ignore-in-place-empty-name", lambda m: gp.prune_(m, X, ratio=0.5, ignore=[""]), "ignore holds ''"),
    Bad("ignore-none-entry", lambda m: gp.prune(m, X, ratio=0.5, ignore=[None]), "ignore holds None"),
    Bad("ignore-a-string", lambda m: gp.prune(m, X, ratio=0.5, ignore="3"), r"write ignore=\['3'\]"),
    Bad("ignore-not-iterable", lambda m: gp.prune(m, X, ratio=0.5, ignore=3), "ignore must be a list"),
    Bad("ignore-names-nothing", lambda m: gp.prune_(m, X, ratio=0.5, ignore=["fc"]), r"no module or parameter.*'fc'"),
    Bad("meta-model", lambda m: gp.prune(m, X, ratio=0.5), "meta device.*0.weight.*apply the plan to the real model",
        make=_meta),
    Bad("meta-model-in-place", lambda m: gp.prune_(m, X, ratio=0.5), "meta device", make=_meta),
    Bad("example-inputs-a-dict", lambda m: gp.prune(m, {"x": X}, ratio=0.5), "must be a Tensor, a tuple"),
)


@pytest.mark.parametrize("bad", BAD_ARGUMENTS, ids=lambda b: b.id)
def test_a_bad_argument_is_named_and_the_model_left_as_it_was(bad: Bad):
    model = bad.make()
    before = _state(model)
    with pytest.raises(bad.error, match=bad.match):
        bad.call(model)
    assert_unchanged(model, before)


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores mode bits: use /proc there)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o500)
        return folder
    if not Path("/proc").is_dir():
        pytest.skip("running as root without /proc: no folder refuses writes")
    return Path("/proc")


def test_cli_refuses_an_unwritable_output_folder_before_pruning(tmp_path, monkeypatch, capsys):
    folder = _unwritable(tmp_path)
    monkeypatch.setattr(cli_commands, "prune_in_stages", lambda *a, **k: pytest.fail("pruned before checking OUTPUT"))
    status = cli.main(["prune", "test_resnet", "-o", str(folder / "out"), "--ratio", "0.5", "--no-latency", "-q"])
    assert status == 2
    assert f"cannot write to {folder}" in capsys.readouterr().err
    assert not (folder / "out").exists()
