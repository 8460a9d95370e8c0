"""Deploying a pruned model: ONNX (+ onnxruntime), TorchScript tracing and torch.compile match eager.

A pruned model is an ordinary module with smaller layers, so the exporters need nothing
from graphprune; these tests keep it that way. ONNX needs the ``onnx`` extra
(``pip install -e '.[onnx]'``); without it those tests skip (and fail under ``CI=true``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import timm
import torch

import graphprune as gp

MODELS = ["resnet18", "efficientnet_b0", "deit_tiny_patch16_224"]
ATOL = 1e-5  # float32 logits of eager vs exported; measured differences are below 1e-6


def _onnx_or_skip() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed: pip install -e '.[onnx]'"
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(f"{reason} (CI=true)")
        pytest.skip(reason)


@pytest.fixture(scope="module", params=MODELS)
def pruned(request) -> tuple[str, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False).eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    small = gp.prune(model, x[:1], ratio=0.3).eval()
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    return request.param, small, x


def test_onnx_export_matches_eager(pruned, tmp_path: Path):
    _onnx_or_skip()
    import onnxruntime

    name, model, x = pruned
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert got.shape == tuple(expected.shape) == (2, 1000)
    assert torch.allclose(torch.from_numpy(got), expected, rtol=0, atol=ATOL), name


def test_jit_trace_matches_eager(pruned):
    name, model, x = pruned
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1])
        assert torch.allclose(traced(x), model(x), rtol=0, atol=ATOL), name


def test_torch_compile_matches_eager(pruned):
    """``aot_eager`` runs dynamo's capture and AOT autograd without code generation (seconds, not minutes)."""
    name, model, x = pruned
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=0, atol=ATOL), name


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    """The default backend, with generated kernels (about 35 s on 2 CPU cores for resnet18 at 64 px)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    small = gp.prune(model, x[:1], ratio=0.3).eval()
    with torch.no_grad():
        assert torch.allclose(torch.compile(small)(x), small(x), rtol=1e-4, atol=ATOL)
