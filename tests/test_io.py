"""Saving and loading pruned models: exact round trips in a fresh process, no pickle, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import graphprune as gp
from graphprune import io as gio

FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import pickle, sys, timm, torch
    from safetensors.torch import load_file, save_file
    import graphprune.io as gio

    def forbidden(*args, **kwargs):
        raise AssertionError("graphprune.load unpickled something")

    class ForbiddenUnpickler(pickle.Unpickler):
        __init__ = forbidden

    # load() must never need these
    torch.load = pickle.load = pickle.loads = forbidden
    pickle.Unpickler = ForbiddenUnpickler

    for case in sys.argv[1:]:
        model = gio.load(case + "/model")
        x = load_file(case + "/input.safetensors")["x"]
        with torch.no_grad():
            save_file({"y": model(x).contiguous()}, case + "/output.safetensors")
""")


@dataclass(frozen=True)
class RoundTrip:
    """One model to prune, save and reload elsewhere."""

    name: str
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_hw: int = 32
    ratios: tuple[float, ...] = (0.5,)


ROUND_TRIPS = (
    RoundTrip("resnet18", "resnet18", {"num_classes": 10}),
    RoundTrip("efficientnet_b0", "efficientnet_b0", {"num_classes": 10}, ratios=(0.3,)),
    RoundTrip("vit_heads", "vit_small_patch16_224", {"img_size": 64, "num_classes": 10}, input_hw=64),
    RoundTrip("resnet18_twice", "resnet18", {"num_classes": 10}, ratios=(0.3, 0.3)),
)


def _pruned(case: RoundTrip) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(case.timm_name, pretrained=False, **case.kwargs)
    x = torch.randn(2, 3, case.input_hw, case.input_hw)
    for ratio in case.ratios:
        model = gp.prune(model, x[:1], ratio=ratio)
    return model.eval(), x


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Prune and save every case here, reload all of them in one fresh interpreter."""
    root = tmp_path_factory.mktemp("round_trips")
    results = {}
    for case in ROUND_TRIPS:
        model, x = _pruned(case)
        folder = root / case.name
        folder.mkdir()
        gio.save(model, folder / "model")
        save_file({"x": x}, folder / "input.safetensors")
        with torch.no_grad():
            expected = model(x)
        results[case.name] = {"folder": folder, "model": model, "expected": expected}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, *(str(r["folder"]) for r in results.values())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return results


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=lambda c: c.name)
def test_round_trip_in_fresh_process_is_exact(round_trips, case: RoundTrip):
    result = round_trips[case.name]
    reloaded = load_file(result["folder"] / "output.safetensors")["y"]
    assert reloaded.shape == result["expected"].shape
    assert torch.equal(reloaded, result["expected"])


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=lambda c: c.name)
def test_loaded_model_has_pruned_structure_and_history(round_trips, case: RoundTrip):
    result = round_trips[case.name]
    model = result["model"]
    loaded = gio.load(result["folder"] / "model")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert loaded.graphprune_plans == model.graphprune_plans
    assert len(loaded.graphprune_plans) == len(case.ratios)
    assert not loaded.training
    if case.timm_name.startswith("vit"):
        assert {block.attn.num_heads for block in loaded.blocks} == {3}  # 6 heads at ratio 0.5


def test_record_lists_architecture_plans_and_tensors(round_trips):
    folder = round_trips["vit_heads"]["folder"] / "model"
    record = json.loads((folder / gio.RECORD_FILE).read_text())
    model = round_trips["vit_heads"]["model"]
    assert record["format"] == gio.MODEL_FORMAT
    assert record["architecture"] == {"timm": "vit_small_patch16_224", "kwargs": {"num_classes": 10, "img_size": 64},
                                      "input_size": [3, 64, 64]}
    assert [gp.Plan.from_json(json.dumps(p)) for p in record["plans"]] == [
        gp.Plan.from_json(p) for p in model.graphprune_plans]
    assert list(record["tensors"]) == list(model.state_dict())
    assert record["tensors"]["blocks.0.attn.qkv.weight"]["shape"] == list(model.blocks[0].attn.qkv.weight.shape)


def test_loaded_model_prunes_and_saves_again(round_trips, tmp_path):
    loaded = gio.load(round_trips["resnet18"]["folder"] / "model")
    again = gp.prune(loaded, torch.randn(1, 3, 32, 32), ratio=0.3)
    gio.save(again, tmp_path / "again")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gio.load(tmp_path / "again")(x), again.eval()(x))
    assert len(gio.load(tmp_path / "again").graphprune_plans) == 2


TINY = "test_resnet"  # timm's 0.5 M-parameter test ResNet, for tests that need any timm model


def test_tied_tensors_are_stored_once_and_stay_equal(tmp_path):
    model = timm.create_model(TINY, pretrained=False, num_classes=4)
    block = model.layer1[0]
    block.bn2.weight = block.bn1.weight  # same Parameter under two names
    gio.save(model, tmp_path / "tied")
    stored = load_file(tmp_path / "tied" / gio.WEIGHTS_FILE)
    record = json.loads((tmp_path / "tied" / gio.RECORD_FILE).read_text())
    assert record["tied"] == {"layer1.0.bn2.weight": "layer1.0.bn1.weight"}
    assert "layer1.0.bn2.weight" not in stored
    loaded = gio.load(tmp_path / "tied")
    assert torch.equal(loaded.layer1[0].bn2.weight, block.bn1.weight)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_half_precision_comes_back_in_half_precision(tmp_path):
    model = timm.create_model(TINY, pretrained=False, num_classes=4).half()
    gio.save(model, tmp_path / "half")
    loaded = gio.load(tmp_path / "half")
    assert {t.dtype for t in loaded.parameters()} == {torch.float16}
    expected = model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())


def test_infer_architecture_reads_a_replaced_head():
    model = gp.prune(timm.create_model(TINY, pretrained=False), torch.randn(1, 3, 32, 32), ratio=0.5)
    model.fc = torch.nn.Linear(model.fc.in_features, 7)  # a new task's head, made by hand
    assert gio.infer_architecture(model).kwargs == {"num_classes": 7}


def test_save_refuses_a_recipe_that_does_not_rebuild_the_model(tmp_path):
    model = timm.create_model(TINY, pretrained=False, num_classes=10)
    with pytest.raises(gio.ModelFileError, match="fc.weight"):
        gio.save(model, tmp_path / "wrong", architecture={"timm": TINY, "kwargs": {"num_classes": 3}})
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_save_replaces_it_and_leaves_nothing_else(tmp_path):
    model = timm.create_model(TINY, pretrained=False, num_classes=2)
    gio.save(model, tmp_path / "m")
    pruned = gp.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
    gio.save(pruned, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert gio.load(tmp_path / "m").fc.in_features == pruned.fc.in_features < model.fc.in_features


def test_failed_write_leaves_old_save_and_no_temporary_files(tmp_path, monkeypatch):
    model = timm.create_model(TINY, pretrained=False, num_classes=2)
    gio.save(model, tmp_path / "m")
    before = {p: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gio, "fsync_file", disk_full)
    with pytest.raises(gio.ModelFileError, match="No space left"):
        gio.save(gp.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5), tmp_path / "m")
    with pytest.raises(gio.ModelFileError):
        gio.save(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


class _CreatesMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_never_executed(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_CreatesMarker(proof)))  # the payload is live: unpickling runs it
    assert proof.exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesMarker(marker))
    evil_file = tmp_path / "model.pt"
    evil_file.write_bytes(payload)
    with pytest.raises(gio.ModelFileError, match="pickle"):
        gio.load(evil_file)
    gio.save(timm.create_model(TINY, pretrained=False, num_classes=2), tmp_path / "saved")
    (tmp_path / "saved" / gio.WEIGHTS_FILE).write_bytes(payload)  # a pickle disguised as the weights
    with pytest.raises(gio.ModelFileError, match="pickle"):
        gio.load(tmp_path / "saved")
    torch.save({"w": torch.zeros(1)}, tmp_path / "zipped.pt")  # torch.save's zip format
    with pytest.raises(gio.ModelFileError, match="torch.save"):
        gio.load(tmp_path / "zipped.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("content", "kind"), [
    (pickle.dumps([1]), "pickle"),
    (b"PK\x03\x04rest", "zip"),
    (b'{"a": 1}', "json"),
    (b"\x00\x01", "unknown"),
])
def test_sniff_recognizes_files_by_their_first_bytes(tmp_path, content: bytes, kind: str):
    (tmp_path / "f").write_bytes(content)
    assert gio.sniff(tmp_path / "f") == kind


def test_sniff_recognizes_safetensors(tmp_path):
    save_file({"a": torch.zeros(3)}, tmp_path / "f")
    assert gio.sniff(tmp_path / "f") == "safetensors"


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                              (0o002, 0o664, 0o775)])
def test_saved_files_get_the_modes_the_umask_gives(tmp_path, umask: int, file_mode: int, dir_mode: int):
    old = os.umask(umask)
    try:
        folder = gio.save(timm.create_model(TINY, pretrained=False, num_classes=2), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {gio.WEIGHTS_FILE: file_mode, gio.RECORD_FILE: file_mode}
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode


def test_an_empty_directory_is_a_valid_target_and_a_full_one_is_not(tmp_path):
    model = timm.create_model(TINY, pretrained=False, num_classes=2)
    (tmp_path / "empty").mkdir()
    assert gio.load(gio.save(model, tmp_path / "empty")).fc.out_features == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(gio.ModelFileError, match="not a graphprune save"):
        gio.save(model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_requires_grad_comes_back_as_saved(tmp_path):
    """A frozen backbone stays frozen (issue 15 item 11); records without the field load trainable."""
    model = gp.prune(timm.create_model(TINY, pretrained=False, num_classes=3), torch.randn(1, 3, 32, 32), ratio=0.5)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("fc."))
    folder = gio.save(model, tmp_path / "frozen")
    loaded = gio.load(folder)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()}
    assert sum(p.requires_grad for p in loaded.parameters()) == 2  # fc.weight and fc.bias
    record = json.loads((folder / gio.RECORD_FILE).read_text())
    for entry in record["tensors"].values():
        entry.pop("requires_grad", None)
    record.pop("record_sha256")  # an older record: neither field
    (folder / gio.RECORD_FILE).write_text(json.dumps(record))
    assert all(p.requires_grad for p in gio.load(folder).parameters())


def test_save_refuses_a_history_that_load_would_refuse(tmp_path):
    """A plan in the model's history whose patch load() would reject is refused when saving, not later."""
    model = gp.prune(timm.create_model(TINY, pretrained=False, num_classes=3), torch.randn(1, 3, 32, 32), ratio=0.5)
    plan = json.loads(model.graphprune_plans[0])
    plan["patches"].append({"module": "conv1", "attr": "stride", "old": [2, 2], "new": [1, 1]})
    model.graphprune_plans = [json.dumps(plan)]
    with pytest.raises(gio.ModelFileError, match="conv1.stride, which is not an attribute channel removal changes"):
        gio.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_dtype_the_format_does_not_record(tmp_path):
    model = timm.create_model(TINY, pretrained=False, num_classes=2)
    model.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(gio.ModelFileError, match=r"dtype \['complex64'\]"):
        gio.save(model, tmp_path / "m", architecture={"timm": TINY, "kwargs": {"num_classes": 2}})
    assert list(tmp_path.iterdir()) == []
