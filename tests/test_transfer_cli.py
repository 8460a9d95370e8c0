"""``graphprune transfer``: a recipe from the shell, its outputs, resume, and bad input refused up front."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import graphprune as gp
from graphprune import cli


def _tree(root: Path, splits=("train", "val", "test"), classes=("a", "b")) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in splits:
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (36, 40, 3), generator=generator, dtype=torch.uint8)
                pixels[:, :, k] = 255
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["transfer", "test_efficientnet", "--data", str(data), "-o", str(out), "--ratio", "0.3", "--epochs", "1",
            "--target-epochs", "1", "--image-size", "32", "--batch-size", "4", "--quiet", "--device", "cpu",
            "--json", *extra]


def test_transfer_writes_model_and_metrics_and_resumes(tmp_path, capsys):
    data, out = _tree(tmp_path / "data"), tmp_path / "out"
    assert cli.main(_argv(data, out)) == 0
    document = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["probe", "source", "prune", "target"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and document["metrics"] == metrics
    assert len((out / "metrics.csv").read_text().splitlines()) == 5
    model = gp.io.load(out / "model")
    assert model.get_classifier().out_features == 2
    assert metrics["stages"][-1]["macs"] < metrics["base_macs"]
    # the same command again resumes: every stage is read back, the result is the same
    assert cli.main(_argv(data, out)) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]
    assert [s["seconds"] for s in again["stages"]] == [s["seconds"] for s in metrics["stages"]]


@pytest.mark.parametrize("case, message", [
    ("no-val", "split 'val' is missing"),
    ("classes-differ", "class folders differ"),
    ("foreign-output", "holds other files"),
    ("bad-device", "unknown device"),
    ("bad-scorer", "nope"),
])
def test_transfer_refuses_bad_input_before_training(tmp_path, capsys, case, message):
    data = _tree(tmp_path / "data", splits=("train",) if case == "no-val" else ("train", "val"))
    if case == "classes-differ":
        (data / "val" / "c").mkdir()
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "foreign-output":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "bad-device":
        extra = ["--device", "tpu"]
    if case == "bad-scorer":
        extra = ["--scorer", "nope"]
    assert cli.main(_argv(data, out, *extra)) == 2
    assert message in capsys.readouterr().err
    if case == "foreign-output":
        assert (out / "notes.txt").read_text() == "mine"  # nothing replaced
    else:
        assert not (out / "model").exists()


def test_transfer_force_replaces_a_foreign_output(tmp_path, capsys):
    data, out = _tree(tmp_path / "data", splits=("train", "val")), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = _argv(data, out, "--force", "--recipe", "s_to_t")
    assert cli.main(argv) == 0
    assert not (out / "notes.txt").exists() and (out / "model").is_dir()
    assert "test_accuracy" not in json.loads((out / "metrics.json").read_text())  # no test split: not reported


def test_transfer_prunes_to_a_measured_latency_reduction(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "cache"))
    data, out = _tree(tmp_path / "data"), tmp_path / "out"
    argv = [a for a in _argv(data, out) if a not in ("--ratio", "0.3")] + ["--latency-reduction", "0.3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a loaded machine may miss the 2 points
        assert cli.main(argv) == 0
    stages = {s["name"]: s for s in json.loads((out / "metrics.json").read_text())["stages"]}
    latency = stages["prune"]["details"]["latency"]
    assert latency["target"] == 0.3 and latency["steps"] and stages["prune"]["macs"] < stages["source"]["macs"]
    both = _argv(data, tmp_path / "both") + ["--latency-reduction", "0.3"]
    capsys.readouterr()
    assert cli.main(both) == 2  # one budget flag at most
    assert "not allowed with argument --ratio" in capsys.readouterr().err
    tailor = [a for a in _argv(data, tmp_path / "tt") if a not in ("--ratio", "0.3")]
    assert cli.main(tailor + ["--recipe", "transtailor", "--latency-reduction", "0.3"]) == 2
    assert "--latency-reduction" in capsys.readouterr().err
