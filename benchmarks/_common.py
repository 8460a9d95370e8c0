"""What the benchmarks share: the environment columns and the Torch-Pruning setup.

Every CSV row carries ``environment_columns()`` (versions, Python, CPU model, UTC date), so a
number can be traced to where it was measured. Torch-Pruning is driven the way its own timm
examples drive it (``examples/transformers/prune_timm_vit.py``,
``examples/timm_models/prune_timm_models.py``): attention modules with an integer
``num_heads`` and a ``qkv`` Linear go into ``num_heads={qkv: heads}``, and after pruning
``num_heads``, ``head_dim`` and (timm >= 1.0.20) ``attn_dim`` are recomputed from
``qkv.out_features``.
"""

from __future__ import annotations

import importlib.metadata
import platform
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment_columns() -> dict[str, str]:
    """Versions of everything measured with, the Python, the CPU model and the UTC date."""
    return {
        "torch": _version("torch"), "timm": _version("timm"), "torch_pruning": _version("torch-pruning"),
        "graphprune": _version("graphprune"), "python": platform.python_version(), "cpu": cpu_model(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


def attention_qkv(model) -> dict:
    """``{attention module: its qkv Linear}`` for every module Torch-Pruning must treat as heads."""
    from torch import nn

    return {m: m.qkv for m in model.modules()
            if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "qkv", None), nn.Linear)}


def tp_pruner(model, x, importance, ratio: float, ignored: list, heads: dict, round_to: int | None = None):
    """A ``tp.pruner.MetaPruner`` removing ``ratio`` of every group's channels (local, uniform)."""
    import torch_pruning as tp

    # fresh dicts: MetaPruner's defaults for these are shared mutable dicts it updates
    return tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
        num_heads={qkv: m.num_heads for m, qkv in heads.items()},
        in_channel_groups={}, out_channel_groups={}, channel_groups={},
    )


def tp_update_heads(heads: dict, pruner) -> None:
    """Make each attention module's head attributes match its pruned ``qkv``."""
    for module, qkv in heads.items():
        module.num_heads = pruner.num_heads[qkv]
        if isinstance(getattr(module, "head_dim", None), int):
            module.head_dim = qkv.out_features // (3 * module.num_heads)
        if isinstance(getattr(module, "attn_dim", None), int):
            module.attn_dim = qkv.out_features // 3
