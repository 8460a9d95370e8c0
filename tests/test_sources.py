"""Weights in (graphprune.sources): timm's pretrained loading from local files, checkpoints, clear errors.

No test reaches the network: timm's own loading is exercised with local files
(``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``), and the offline hub failure
runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from graphprune import sources
from graphprune.errors import InvalidArgumentError

NAME = "test_resnet"


def _reference(**kwargs) -> torch.nn.Module:
    torch.manual_seed(7)
    return timm.create_model(NAME, pretrained=False, **kwargs)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file(_reference().state_dict(), path)
    return path


def test_pretrained_the_timm_way_from_a_local_file(weights: Path):
    model = sources.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    assert _same_weights(model, _reference())
    assert not _same_weights(sources.create_model(NAME), _reference())  # the check can fail


def test_pretrained_from_a_local_dir(tmp_path: Path):
    from timm.models import save_for_hf

    save_for_hf(_reference(), tmp_path / "folder", safe_serialization=True)
    model = sources.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True)
    assert _same_weights(model, _reference())


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_checkpoint_from_torch_save(wrap: str, tmp_path: Path):
    state = _reference().state_dict()
    if wrap == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap != "plain":
        state = {wrap: state, "epoch": 3}
    torch.save(state, tmp_path / "w.pth")
    assert _same_weights(sources.create_model(NAME, checkpoint=tmp_path / "w.pth"), _reference())


def test_checkpoint_from_safetensors(weights: Path):
    assert _same_weights(sources.create_model(NAME, checkpoint=str(weights)), _reference())


def test_checkpoint_with_a_new_head_loads_the_backbone(weights: Path):
    model = sources.create_model(NAME, checkpoint=weights, num_classes=3)
    reference = _reference().state_dict()
    assert model.fc.out_features == 3
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    same = sources.create_model(NAME, checkpoint=weights, num_classes=1000)  # same size: the head loads too
    assert _same_weights(same, _reference())


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_is_not_a_plain_state_dict_is_refused_unexecuted(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"fc.weight": _Boom()}, tmp_path / "evil.pth")
    with pytest.raises(InvalidArgumentError, match="weights_only=True"):
        sources.create_model(NAME, checkpoint=tmp_path / "evil.pth")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"fc.weight": _Boom()}))
    with pytest.raises(InvalidArgumentError, match="weights_only=True"):
        sources.create_model(NAME, checkpoint=tmp_path / "raw.pkl")
    assert not (tmp_path / "pwned").exists()


def _without(state: dict, *names: str) -> dict:
    return {k: v for k, v in state.items() if k not in names}


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: _without(s, "fc.bias"), r"missing fc\.bias"),
    (lambda s: s | {"extra.weight": torch.zeros(1)}, r"unexpected extra\.weight"),
    (lambda s: s | {"fc.weight": torch.zeros(3, s["fc.weight"].shape[1])},
     r"mismatched fc\.weight \(3, \d+\) vs the model's \(1000, \d+\); the checkpoint has another head.*--num-classes"),
    (lambda s: {"fc.weight": "a string"}, r"not tensors"),
])
def test_checkpoint_keys_must_match_exactly(edit, match: str, tmp_path: Path):
    torch.save(edit(_reference().state_dict()), tmp_path / "w.pth")
    with pytest.raises(InvalidArgumentError, match=match):
        sources.create_model(NAME, checkpoint=tmp_path / "w.pth")


@pytest.mark.parametrize(("call", "match"), [
    (lambda: sources.create_model("no_such_net"), "not a timm model name"),
    (lambda: sources.create_model("resnet18.no_such_tag"), "Invalid pretrained tag"),
    (lambda: sources.create_model(NAME, pretrained=True, checkpoint="w.pth"), "not both"),
    (lambda: sources.create_model(NAME, checkpoint="missing.safetensors"), "does not exist"),
    (lambda: sources.create_model(NAME, pretrained_cfg_overlay={"file": 1}, pretrained=True, checkpoint_path="x"),
     "checkpoint="),
    (lambda: sources.create_model("timm/resnet18"), "source prefix"),
])
def test_bad_arguments_are_named(call, match: str):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


def test_checkpoint_that_is_not_a_checkpoint(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidArgumentError, match="neither a safetensors file nor a torch.save"):
        sources.create_model(NAME, checkpoint=tmp_path / "notes.txt")


def test_missing_pretrained_file_says_what_to_do(tmp_path: Path):
    with pytest.raises(sources.PretrainedWeightsError, match="--checkpoint PATH"):
        sources.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "none.pth")})
    with pytest.raises(sources.PretrainedWeightsError, match="no pretrained weights"):
        sources.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "", "url": ""})


def test_tagged_name_without_weights_warns(weights: Path):
    with pytest.warns(sources.RandomWeightsWarning, match="a1_in1k.*random"):
        sources.create_model("resnet18.a1_in1k")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sources.RandomWeightsWarning)
        sources.create_model("resnet18")
        sources.create_model("test_resnet.r160_in1k", checkpoint=weights)


def test_offline_hub_download_fails_with_a_clear_error():
    code = ("from graphprune import sources\n"
            "try:\n    sources.create_model('resnet18.a1_in1k', pretrained=True)\n"
            "except sources.PretrainedWeightsError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "cannot get pretrained weights for 'resnet18.a1_in1k'" in done.stdout
    assert "checkpoint=PATH (CLI: --checkpoint PATH)" in done.stdout


def test_pretrained_file_of_another_architecture_is_bad_input(tmp_path: Path):
    save_file(timm.create_model("test_vit").state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(InvalidArgumentError, match="do not fit the model"):
        sources.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "vit.safetensors")})
