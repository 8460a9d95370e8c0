"""The ``graphprune`` command line, and how API and CLI fail on bad input.

Every bad input must give a clear error (CLI: exit 2, one line on stderr, no traceback),
leave the input model and files unchanged, and leave no partial output behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
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
from graphprune.measurement import count_params, measure

MODEL = "test_resnet"  # timm's tiny test ResNet (0.5 M parameters)
SIZE = "3,32,32"


def _tiny() -> nn.Module:
    return timm.create_model(MODEL, pretrained=False, num_classes=5)


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def _edit_record(folder: Path, edit: Callable[[dict], None]) -> None:
    record_path = folder / gio.RECORD_FILE
    record = json.loads(record_path.read_text())
    edit(record)
    record_path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A saved pruned model and broken variants of it."""
    root = tmp_path_factory.mktemp("corpus")
    pruned = gp.prune(_tiny(), _x(), ratio=0.5)
    gio.save(pruned, root / "saved")
    shutil.copytree(root / "saved", root / "truncated")
    weights = root / "truncated" / gio.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "saved", root / "mismatched")
    _edit_record(root / "mismatched", lambda r: r["tensors"]["fc.weight"].update(shape=[5, 1]))
    shutil.copytree(root / "saved", root / "unknown_arch")
    _edit_record(root / "unknown_arch", lambda r: r["architecture"].update(timm="no_such_net"))
    torch.save(pruned.state_dict(), root / "weights.pt")  # what most people ship: a pickle in a zip
    shutil.copytree(root / "saved", root / "sneaky")  # a record asking timm to torch.load a file
    checkpoint = str(root / "weights.pt")
    _edit_record(root / "sneaky", lambda r: r["architecture"]["kwargs"].update(checkpoint_path=checkpoint))
    (root / "afile").write_text("a regular file, not a directory\n")
    return root


@pytest.fixture
def env(corpus: Path, tmp_path: Path) -> Path:
    """A private copy of the corpus for one test."""
    return Path(shutil.copytree(corpus, tmp_path / "env"))


class _Raises(nn.Module):
    """A model that cannot be traced: its forward always fails."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this forward always fails")


@dataclass(frozen=True)
class BadInput:
    """One bad input: an API call that must raise ``error``, or CLI arguments that must exit 2.

    ``api(env, model)`` gets the corpus copy and a fresh model from ``make_model``;
    ``argv(env)`` builds the command line. ``match`` is a regex the message must contain.
    """

    id: str
    match: str
    api: Callable[[Path, nn.Module], object] | None = None
    argv: Callable[[Path], list[str]] | None = None
    error: type[Exception] = gp.GraphpruneError
    make_model: Callable[[], nn.Module] = _tiny


def _prune_argv(*extra: str) -> Callable[[Path], list[str]]:
    return lambda env: ["prune", MODEL, "-o", str(env / "out"), "--num-classes", "5", "--input-size", SIZE,
                        "--no-latency", *extra]


BAD_INPUTS = (
    BadInput("api-ratio-negative", "ratio", api=lambda env, m: gp.prune(m, _x(), ratio=-0.1)),
    BadInput("api-ratio-one", "ratio", api=lambda env, m: gp.prune(m, _x(), ratio=1.0)),
    BadInput("api-ratio-nan", "ratio", api=lambda env, m: gp.prune(m, _x(), ratio=math.nan)),
    BadInput("api-unknown-scorer", "unknown scorer 'magic'.*l1",
             api=lambda env, m: gp.prune(m, _x(), ratio=0.5, scorer="magic")),
    BadInput("api-ignore-names-nothing", "no_such_layer",
             api=lambda env, m: gp.prune(m, _x(), ratio=0.5, ignore=["no_such_layer"])),
    BadInput("api-wrong-input-shape", "forward pass", error=gp.UnsupportedModelError,
             api=lambda env, m: gp.prune(m, torch.randn(1, 1, 32, 32), ratio=0.5)),
    BadInput("api-untraceable-model", "always fails", error=gp.UnsupportedModelError, make_model=_Raises,
             api=lambda env, m: gp.prune(m, torch.randn(1, 4), ratio=0.5)),
    BadInput("api-load-missing", "no such file", error=gio.ModelFileNotFoundError,
             api=lambda env, m: gio.load(env / "missing")),
    BadInput("api-load-truncated", "truncated", api=lambda env, m: gio.load(env / "truncated")),
    BadInput("api-load-json-mismatch", "does not match.*fc.weight", api=lambda env, m: gio.load(env / "mismatched")),
    BadInput("api-load-pickle", "never unpickles", api=lambda env, m: gio.load(env / "weights.pt")),
    BadInput("api-load-unknown-architecture", "unknown timm architecture 'no_such_net'",
             api=lambda env, m: gio.load(env / "unknown_arch")),
    BadInput("api-load-record-names-a-checkpoint", "may not contain.*checkpoint_path",
             api=lambda env, m: gio.load(env / "sneaky")),
    BadInput("api-save-parent-not-a-directory", "not a directory", api=lambda env, m: gio.save(m, env / "afile" / "o")),
    BadInput("api-save-over-a-regular-file", "not a graphprune save", api=lambda env, m: gio.save(m, env / "afile")),
    BadInput("api-save-not-timm", "not a timm model", make_model=lambda: nn.Sequential(nn.Linear(2, 2)),
             api=lambda env, m: gio.save(m, env / "out")),
    BadInput("api-save-bad-architecture", "architecture must look like",
             api=lambda env, m: gio.save(m, env / "out", architecture={"timm": 3})),
    BadInput("cli-ratio-too-big", r"ratio must be .*1\.5", argv=_prune_argv("--ratio", "1.5")),
    BadInput("cli-ratio-negative", "ratio must be", argv=_prune_argv("--ratio", "-1")),
    BadInput("cli-ratio-nan", "ratio must be .*nan", argv=_prune_argv("--ratio", "nan")),
    BadInput("cli-ratio-missing", "one of the arguments --ratio --flops-reduction --latency-reduction is required", argv=_prune_argv()),
    BadInput("cli-flops-out-of-range", "flops_reduction must be", argv=_prune_argv("--flops-reduction", "1.5")),
    BadInput("cli-residual-scale-out-of-range", r"residual_scale must be .*-0\.5",
             argv=_prune_argv("--ratio", "0.3", "--residual-scale", "-0.5")),
    BadInput("cli-unknown-scorer", "unknown scorer", argv=_prune_argv("--ratio", "0.5", "--scorer", "magic")),
    BadInput("cli-unknown-model", "not_a_model.*neither", argv=lambda env: ["measure", "not_a_model"]),
    BadInput("cli-ignore-names-nothing", "no_such_layer",
             argv=_prune_argv("--ratio", "0.5", "--ignore", "no_such_layer")),
    BadInput("cli-wrong-input-size", r"does not run on an input of shape \(1, 1, 32, 32\)",
             argv=lambda env: ["measure", MODEL, "--input-size", "1,32,32", "--no-latency"]),
    BadInput("cli-malformed-input-size", "--input-size", argv=lambda env: ["measure", MODEL, "--input-size", "3x"]),
    BadInput("cli-missing-file", "neither a saved model", argv=lambda env: ["measure", str(env / "missing")]),
    BadInput("cli-truncated", "truncated", argv=lambda env: ["measure", str(env / "truncated"), "--no-latency"]),
    BadInput("cli-json-mismatch", "does not match", argv=lambda env: ["inspect", str(env / "mismatched")]),
    BadInput("cli-pickle", "never unpickles", argv=lambda env: ["measure", str(env / "weights.pt")]),
    BadInput("cli-output-not-writable", "not a directory",
             argv=lambda env: ["prune", str(env / "saved"), "-o", str(env / "afile" / "out"), "--ratio", "0.3",
                               "--no-latency"]),
    BadInput("cli-output-is-a-file", "not a graphprune save",
             argv=lambda env: ["prune", str(env / "saved"), "-o", str(env / "afile"), "--ratio", "0.3"]),
    BadInput("cli-num-classes-on-saved-model", "apply to timm model names",
             argv=lambda env: ["measure", str(env / "saved"), "--num-classes", "3"]),
    BadInput("cli-bad-model-kwargs", "JSON object", argv=lambda env: ["measure", MODEL, "--model-kwargs", "{oops"]),
    BadInput("cli-unknown-command", "invalid choice", argv=lambda env: ["shrink", MODEL]),
    BadInput("cli-output-is-a-save", "already holds a saved model; pass --force",
             argv=lambda env: ["prune", str(env / "saved"), "-o", str(env / "saved"), "--ratio", "0.3"]),
    BadInput("cli-pretrained-and-checkpoint", "not allowed with",
             argv=lambda env: ["measure", MODEL, "--pretrained", "--checkpoint", str(env / "weights.pt")]),
    BadInput("cli-checkpoint-on-saved-model", "apply to timm model names",
             argv=lambda env: ["measure", str(env / "saved"), "--checkpoint", str(env / "weights.pt")]),
    BadInput("cli-pretrained-in-model-kwargs", "may not set pretrained; use --pretrained",
             argv=lambda env: ["measure", MODEL, "--model-kwargs", '{"pretrained": true}']),
    BadInput("cli-overlay-without-pretrained", "need --pretrained",
             argv=lambda env: ["measure", MODEL, "--model-kwargs", '{"pretrained_cfg_overlay": {"file": "w"}}']),
    BadInput("cli-checkpoint-does-not-fit", r"does not fit ResNet: mismatched conv1.*or a pruned model\?",
             argv=lambda env: ["measure", MODEL, "--checkpoint", str(env / "weights.pt"), "--no-latency"]),
    BadInput("cli-checkpoint-missing", "does not exist",
             argv=lambda env: ["measure", MODEL, "--checkpoint", str(env / "missing.safetensors")]),
)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.id)
def test_bad_input_fails_cleanly_and_changes_nothing(case: BadInput, env: Path, capsys):
    model = case.make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    files = _tree(env)
    if case.api is not None:
        with pytest.raises(case.error, match=case.match):
            case.api(env, model)
    else:
        status = cli.main(case.argv(env))
        captured = capsys.readouterr()
        assert status == cli.EXIT_BAD_INPUT, captured.err
        assert captured.out == ""
        assert captured.err.startswith("graphprune: error: ") and captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.err
        assert re.search(case.match, captured.err), captured.err
    assert _tree(env) == files  # inputs untouched, no partial output, no temporaries
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert not hasattr(model, "graphprune_plans")


def _run_json(argv: list[str], capsys) -> dict:
    status = cli.main([*argv, "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out)


def test_prune_twice_through_files(tmp_path: Path, capsys):
    first = _run_json(["prune", MODEL, "-o", str(tmp_path / "a"), "--num-classes", "5", "--input-size", SIZE,
                       "--ratio", "0.5", "--no-latency"], capsys)
    params = first["comparison"]["rows"][0]
    assert params["metric"] == "params"
    assert params["before"] == count_params(_tiny())
    assert params["after"] == count_params(gio.load(tmp_path / "a")) < params["before"]
    second = _run_json(["prune", str(tmp_path / "a"), "-o", str(tmp_path / "b"), "--ratio", "0.3", "--no-latency"],
                       capsys)
    assert second["input_size"] == [3, 32, 32]  # remembered from the first save
    assert second["plans"] == 2
    assert second["comparison"]["rows"][0]["before"] == params["after"]
    twice = gio.load(tmp_path / "b")
    assert len(twice.graphprune_plans) == 2
    assert count_params(twice) == second["comparison"]["rows"][0]["after"]
    assert twice(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_prune_prints_the_comparison_table(tmp_path: Path, capsys):
    status = cli.main(["prune", MODEL, "-o", str(tmp_path / "a"), "--input-size", SIZE, "--ratio", "0.5",
                       "--no-latency"])
    out = capsys.readouterr().out
    assert status == 0
    assert out.splitlines()[0].split() == ["metric", "before", "after", "change"]
    assert re.search(r"^params .* -\d+\.\d%$", out, re.MULTILINE)
    assert re.search(r"^MACs .* -\d+\.\d%$", out, re.MULTILINE)


def test_measure_matches_the_api(env: Path, capsys):
    result = _run_json(["measure", str(env / "saved"), "--input-size", "48", "--no-latency"], capsys)
    expected = measure(gio.load(env / "saved"), torch.zeros(1, 3, 48, 48), latency=False)
    assert (result["params"], result["macs"], result["flops"]) == (expected.params, expected.macs, expected.flops)
    assert result["input_size"] == [3, 48, 48]
    assert result["latency_ms_median"] is None
    text_status = cli.main(["measure", str(env / "saved"), "--input-size", "48", "--no-latency"])
    assert text_status == 0 and f"{expected.params:,}" in capsys.readouterr().out


def test_inspect_lists_the_groups_of_the_api(capsys):
    result = _run_json(["inspect", MODEL, "--input-size", SIZE, "--ignore", "fc"], capsys)
    model = timm.create_model(MODEL, pretrained=False)
    groups = gp.find_groups(gp.trace(model, torch.randn(1, 3, 32, 32)), ignore=["fc"], model=model)
    assert [(g["id"], g["channels"], g["prunable"]) for g in result["groups"]] == [
        (g.id, g.size, int(g.prunable.sum())) for g in groups.all]
    assert result["frozen"] == {"fc.weight": "ignored", "fc.bias": "ignored"}
    assert cli.main(["inspect", MODEL, "--input-size", SIZE, "--ignore", "fc"]) == 0
    assert capsys.readouterr().out.strip() == groups.report()


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["measure", "--help"], ["inspect", "--help"]])
def test_help_explains_with_examples(argv: list[str], capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "graphprune prune resnet18" in out


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["measure", "not_a_model", "--debug"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("graphprune: error: ")


def test_unexpected_failure_exits_1_with_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("internal\nbug")

    monkeypatch.setattr(cli_commands, "measure_cli", broken)
    assert cli.main(["measure", MODEL, "--input-size", SIZE]) == cli.EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert err == "graphprune: error: unexpected RuntimeError: internal bug (rerun with --debug for the traceback)\n"


def test_command_in_a_fresh_process(tmp_path: Path):
    command = [sys.executable, "-m", "graphprune.cli"]
    ok = subprocess.run([*command, "measure", MODEL, "--input-size", SIZE, "--no-latency", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["params"] == count_params(timm.create_model(MODEL, pretrained=False))
    bad = subprocess.run([*command, "prune", MODEL, "-o", str(tmp_path / "o"), "--ratio", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == cli.EXIT_BAD_INPUT
    assert bad.stderr == "graphprune: error: ratio must be a number in [0, 1), got 1.0\n"
    assert list(tmp_path.iterdir()) == []


def test_prune_from_a_checkpoint_gives_the_weights_of_the_api(tmp_path: Path, capsys):
    """The issue's must-show: a timm resnet18 saved with safetensors, pruned by the CLI and by Python."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("resnet18")
    save_file(model.state_dict(), tmp_path / "W.safetensors")
    status = cli.main(["prune", "resnet18", "--checkpoint", str(tmp_path / "W.safetensors"), "--ratio", "0.3",
                       "-o", str(tmp_path / "OUT"), "--no-latency"])
    assert status == 0, capsys.readouterr().err
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # the CLI's example input
    expected = gp.prune(model.eval(), x, ratio=0.3).state_dict()
    got = gio.load(tmp_path / "OUT").state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert got["fc.weight"].shape[1] < model.fc.in_features


def test_pretrained_the_timm_way_matches_the_checkpoint(tmp_path: Path, capsys):
    from safetensors.torch import save_file

    save_file(timm.create_model(MODEL).state_dict(), tmp_path / "w.safetensors")  # timm's 1000 classes
    overlay = json.dumps({"pretrained_cfg_overlay": {"file": str(tmp_path / "w.safetensors")}})
    common = ["--input-size", SIZE, "--ratio", "0.5", "--no-latency"]
    assert cli.main(["prune", MODEL, "--pretrained", "--model-kwargs", overlay, "-o", str(tmp_path / "a"),
                     *common]) == 0
    assert cli.main(["prune", MODEL, "--checkpoint", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "b"),
                     *common]) == 0
    a, b = gio.load(tmp_path / "a").state_dict(), gio.load(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / gio.RECORD_FILE).read_text())
    assert record["architecture"]["kwargs"] == {"num_classes": 1000}  # where the weights came from is not recorded


def test_tagged_name_without_weights_warns_on_stderr(capsys):
    argv = ["measure", "test_resnet.r160_in1k", "--input-size", SIZE, "--no-latency"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("graphprune: warning: 'test_resnet.r160_in1k' names pretrained weights")
    assert "random" in err and err.count("\n") == 1
    assert cli.main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_offline_pretrained_fails_with_what_to_do(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "graphprune.cli", "prune", "resnet18.a1_in1k", "--pretrained",
                           "-o", str(tmp_path / "o"), "--ratio", "0.3"], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == cli.EXIT_BAD_INPUT
    assert done.stderr.startswith("graphprune: error: cannot get pretrained weights for 'resnet18.a1_in1k'")
    assert "--checkpoint PATH" in done.stderr and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_earlier_save(env: Path, capsys):
    before = count_params(gio.load(env / "saved"))
    argv = ["prune", str(env / "saved"), "-o", str(env / "saved"), "--ratio", "0.3", "--no-latency"]
    assert cli.main([*argv, "--force"]) == 0, capsys.readouterr().err
    assert count_params(gio.load(env / "saved")) < before
    (env / "empty").mkdir()
    assert cli.main(["prune", MODEL, "-o", str(env / "empty"), "--input-size", SIZE, "--ratio", "0.3",
                     "--no-latency"]) == 0
    assert gio.load(env / "empty").graphprune_plans


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"graphprune {gp.__version__} (torch {torch.__version__}, timm {timm.__version__})")


def test_progress_reports_each_stage_on_stderr(tmp_path: Path, capsys):
    argv = ["prune", MODEL, "-o", str(tmp_path / "a"), "--input-size", SIZE, "--ratio", "0.5", "--no-latency",
            "--json", "--progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays one JSON document
    stages = [re.sub(r"[ :].*", "", line.removeprefix("graphprune: ")) for line in captured.err.splitlines()]
    assert stages == ["loading", "measuring", "tracing", "scoring", "planning", "removing", "measuring", "saving"]
    assert all(re.search(r" \.\.\. \[\d+\.\d s\]$", line) for line in captured.err.splitlines())
    assert cli.main([*argv[:-2], "--quiet", "--progress", "-o", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""


def test_a_closed_pipe_ends_quietly():
    """``graphprune inspect X | head``: the reader leaves before the output is written."""
    done = subprocess.Popen([sys.executable, "-m", "graphprune.cli", "inspect", MODEL, "--input-size", SIZE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()
    _, err = done.communicate(timeout=120)
    assert err.decode() == ""
    assert done.returncode == cli.EXIT_CLOSED_PIPE
