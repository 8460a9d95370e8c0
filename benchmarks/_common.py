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


def search_ratio(prune_at, macs_of, base_macs: int, budget: float, *, tolerance: float, max_steps: int):
    """Search a channel ratio whose pruned model removes ``budget`` of ``base_macs``.

    Bracketed bisection with linear interpolation on ``[0, 0.95]``, starting at
    ``1 - sqrt(1 - budget)``; ``prune_at(ratio)`` returns a fresh pruned copy and
    ``macs_of(model)`` measures it. Stops within ``tolerance``, when the bracket is narrower
    than 0.001, or after ``max_steps`` prunes.

    Returns:
        ``(closest model, its ratio, prunes done)``.

    Example:
        >>> model, ratio, steps = search_ratio(lambda r: r, lambda r: round(100 * (1 - r) ** 2), 100, 0.36,
        ...                                    tolerance=0.005, max_steps=12)
        >>> round(ratio, 6), steps
        (0.2, 1)
    """
    import math

    lo, hi = (0.0, 0.0), (0.95, None)  # (ratio, measured reduction)
    ratio = 1.0 - math.sqrt(1.0 - budget)
    best = None  # (|error|, ratio, model)
    steps = 0
    for steps in range(1, max_steps + 1):
        pruned = prune_at(ratio)
        reduction = 1.0 - macs_of(pruned) / base_macs
        if best is None or abs(reduction - budget) < best[0]:
            best = (abs(reduction - budget), ratio, pruned)
        del pruned
        if best[0] <= tolerance or hi[0] - lo[0] < 1e-3:  # close enough, or no width left to move
            break
        if reduction < budget:
            lo = (ratio, reduction)
        else:
            hi = (ratio, reduction)
        if hi[1] is None:
            ratio = (lo[0] + hi[0]) / 2
        else:  # interpolate, but keep 10% away from the ends so the bracket shrinks
            t = (budget - lo[1]) / max(hi[1] - lo[1], 1e-9)
            ratio = lo[0] + min(max(t, 0.1), 0.9) * (hi[0] - lo[0])
    return best[2], best[1], steps


def tp_prune_to_budget(model, x, importance, budget: float, ignored: list[str], *, tolerance: float = 0.005,
                       max_steps: int = 12):
    """A pruned copy of ``model`` whose measured MACs reduction is within ``tolerance`` of ``budget``.

    Torch-Pruning takes a channel ratio, not a FLOPs budget, so the ratio is searched: bracketed
    bisection with linear interpolation on ``[0, 0.95]``, starting at ``1 - sqrt(1 - budget)``
    (a conv's MACs scale with the product of its kept input and output channels), every trial
    on a fresh copy, MACs measured with ``graphprune.measurement.count_macs`` (:func:`search_ratio`);
    returns the closest trial. Gradients on ``model`` (for ``TaylorImportance``) are copied to
    every trial, since ``copy.deepcopy`` drops ``.grad``.

    Args:
        model: the model to prune (not modified).
        x: example input.
        importance: a ``torch_pruning.importance`` object.
        budget: fraction of MACs to remove.
        ignored: module names Torch-Pruning must not prune (``ignored_layers``).

    Returns:
        ``(pruned model, ratio)``.

    Example:
        >>> import timm, torch, torch_pruning as tp  # doctest: +SKIP
        >>> model = timm.create_model("resnet18", pretrained=False)  # doctest: +SKIP
        >>> pruned, ratio = tp_prune_to_budget(model, torch.randn(1, 3, 64, 64),  # doctest: +SKIP
        ...                                    tp.importance.MagnitudeImportance(p=1), 0.3, ["fc"])
    """
    import copy

    from graphprune.measurement import count_macs

    def trial(ratio: float):
        pruned = copy.deepcopy(model)
        for mine, theirs in zip(pruned.parameters(), model.parameters()):
            mine.grad = None if theirs.grad is None else theirs.grad.clone()
        pruner = tp_pruner(pruned, x, importance, ratio, [pruned.get_submodule(n) for n in ignored], {})
        pruner.step()
        return pruned

    pruned, ratio, _ = search_ratio(trial, lambda m: count_macs(m, x), count_macs(model, x), budget,
                                    tolerance=tolerance, max_steps=max_steps)
    return pruned, ratio


def write_report(out: Path, rows: list[dict], *, committed: Path, docs_figure: Path, plot, summary_text) -> bool:
    """Draw ``out``'s PNG (copied to ``docs_figure`` when ``out`` is the ``committed`` CSV) and write
    its ``_summary.txt``; True when ``out`` is the committed run."""
    plot(rows, out.with_suffix(".png"))
    is_committed = out.resolve() == committed.resolve()
    if is_committed:  # the committed run is the docs' figure
        docs_figure.parent.mkdir(parents=True, exist_ok=True)
        docs_figure.write_bytes(out.with_suffix(".png").read_bytes())
    summary = out.with_name(out.stem + "_summary.txt")
    summary.write_text(summary_text(rows))
    print(summary.read_text())
    print(f"wrote {out.with_suffix('.png')} and {summary}")
    return is_committed


def finish_report(out: Path, rows: list[dict], summarize, plot) -> None:
    """Print and write ``out``'s summary (``<stem>_summary.txt``) and draw its PNG: every benchmark's last step."""
    summary = summarize(rows)
    print(summary)
    out.with_name(out.stem + "_summary.txt").write_text(summary + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_name(out.stem + '_summary.txt')}")
