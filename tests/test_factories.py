"""Weights out beyond timm: torchvision models and named factories save, load and refuse what is not allowed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

import graphprune as gp
from graphprune import cli
from graphprune import io as gio

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

FRESH = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    import graphprune.io as gio
    folder, inputs, out = sys.argv[1:]
    from safetensors.torch import load_file
    model = gio.load(folder)
    with torch.no_grad():
        save_file({"y": model(load_file(inputs)["x"])}, out)
""")


@pytest.mark.parametrize(("name", "kwargs"), [("resnet18", {"num_classes": 7}), ("mobilenet_v3_small", {})])
def test_torchvision_model_saves_and_loads_in_a_fresh_process(name: str, kwargs: dict, tmp_path: Path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    pruned = gp.prune(model, X[:1], ratio=0.3).eval()
    folder = gio.save(pruned, tmp_path / "m", architecture={"factory": f"torchvision.models:{name}", "kwargs": kwargs})
    save_file({"x": X}, tmp_path / "x.safetensors")
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "y.safetensors")], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = pruned(X)
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], expected)
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())


def test_factory_shortcut_and_saving_again(tmp_path: Path):
    pruned = gp.prune(torchvision.models.resnet18(), X[:1], ratio=0.5)
    folder = gio.save(pruned, tmp_path / "a", factory="torchvision.models:resnet18")
    record = json.loads((folder / gio.RECORD_FILE).read_text())
    assert record["architecture"] == {"factory": "torchvision.models:resnet18", "kwargs": {}}
    again = gp.prune(gio.load(folder), X[:1], ratio=0.3)  # the loaded model remembers its factory
    twice = gio.load(gio.save(again, tmp_path / "b"))
    assert len(twice.graphprune_plans) == 2 and twice.fc.in_features == again.fc.in_features < 256
    assert cli.main(["measure", str(tmp_path / "b"), "--input-size", "3,64,64", "--no-latency", "--quiet"]) == 0


FACTORY_MODULE = textwrap.dedent("""
    import pathlib
    pathlib.Path(__file__).with_name("imported").touch()  # proof that the module was imported

    import torch

    def make(width=4):
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))
""")


def test_a_user_factory_loads_only_where_allowed_by_name(tmp_path: Path, monkeypatch):
    (tmp_path / "gp_user_factory.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import gp_user_factory

    pruned = gp.prune(gp_user_factory.make(width=8), torch.randn(1, 3, 8, 8), ratio=0.5)
    folder = gio.save(pruned, tmp_path / "m", architecture={"factory": "gp_user_factory:make", "kwargs": {"width": 8}})
    (tmp_path / "imported").unlink()
    monkeypatch.delitem(sys.modules, "gp_user_factory")
    with pytest.raises(gio.ModelFileError, match=r"not allowed.*allow_factories=\['gp_user_factory:make'\]"):
        gio.load(folder)
    assert not (tmp_path / "imported").exists() and "gp_user_factory" not in sys.modules
    with pytest.raises(gio.ModelFileError, match="not allowed"):
        gio.load(folder, allow_factories=["gp_user_factory:other"])  # exact names only
    loaded = gio.load(folder, allow_factories=["gp_user_factory:make"])
    assert (tmp_path / "imported").exists() and loaded[0].out_channels == 4
    with torch.no_grad():
        assert torch.equal(loaded(torch.ones(1, 3, 8, 8)), pruned.eval()(torch.ones(1, 3, 8, 8)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tv") / "m"
    return gio.save(gp.prune(torchvision.models.resnet18(), X[:1], ratio=0.5), folder,
                    factory="torchvision.models:resnet18")


@pytest.mark.parametrize(("architecture", "match"), [
    ({"factory": "os:system", "kwargs": {}}, "'os:system', which is not allowed"),
    ({"factory": "torchvision.models:no_such_net", "kwargs": {}}, "not a torchvision model"),
    ({"factory": "os.system", "kwargs": {}}, "package.module:function"),
    ({"factory": "torchvision.models:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}},
     r"may not contain \['weights'\]"),
    ({"factory": "torchvision.models:resnet18", "timm": "resnet18"}, "must look like"),
])
def test_a_tampered_record_is_refused(architecture: dict, match: str, saved: Path, tmp_path: Path):
    import shutil

    folder = Path(shutil.copytree(saved, tmp_path / "m"))
    record = json.loads((folder / gio.RECORD_FILE).read_text())
    record["architecture"] = architecture
    (folder / gio.RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(gio.ModelFileError, match=match):
        gio.load(folder)


def test_saving_a_non_timm_model_says_to_name_its_factory(tmp_path: Path):
    net = torchvision.models.resnet18()
    with pytest.raises(gp.InvalidArgumentError, match='factory="torchvision.models:resnet18"'):
        gio.save(net, tmp_path / "m")
    with pytest.raises(gp.InvalidArgumentError, match="not both"):
        gio.save(net, tmp_path / "m", factory="torchvision.models:resnet18", architecture={"timm": "resnet18"})
    with pytest.raises(gio.ModelFileError, match="fc.weight"):  # the recipe is checked as for timm models
        gio.save(net, tmp_path / "m", architecture={"factory": "torchvision.models:resnet18",
                                                    "kwargs": {"num_classes": 3}})
    assert list(tmp_path.iterdir()) == []
