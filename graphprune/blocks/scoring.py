"""Block importance: one score per block, higher = keep.

* ``end_scale`` (data-free): root-mean-square of the parameters that produce the branch
  output (the last batch-norm affine, layer-scale gamma or projection). A branch whose
  output is scaled near zero adds little to the residual stream.
* ``random`` (seeded): the baseline every scorer must beat.
* ``gate`` (learned, NetTailor): gate values trained on target data with the weights frozen
  (:func:`~.gates.train_gates`); needs ``data=``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..scoring.registry import Registry
from .discovery import Blocks
from .gates import GateConfig, train_gates


def _end_scale(blocks: Blocks, model: nn.Module, **_: object) -> dict[str, float]:
    scores = {}
    for block in blocks:
        params = [p.detach().flatten() for p in model.get_submodule(block.end_module).parameters(recurse=False)]
        scores[block.name] = float(torch.cat(params).pow(2).mean().sqrt()) if params else float("inf")
    return scores


def _random(blocks: Blocks, model: nn.Module, *, seed: int = 0, **_: object) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(len(blocks), generator=generator)
    return {b.name: float(v) for b, v in zip(blocks, values)}


def _gate(blocks: Blocks, model: nn.Module, *, data: Iterable | None = None, teacher: nn.Module | None = None,
          config: GateConfig | None = None, progress: bool = False, **_: object) -> dict[str, float]:
    if data is None:
        raise InvalidArgumentError("the 'gate' block scorer trains on target data: pass data=")
    config = config or GateConfig()
    scores = train_gates(blocks, model, data, teacher=teacher, config=config, progress=progress).scores
    return {b.name: scores.get(b.name, float("inf")) for b in blocks}  # ungated blocks are never chosen


BLOCK_REGISTRY: Registry[Callable[..., dict[str, float]]] = Registry("block scorer")
BLOCK_REGISTRY.register("end_scale")(_end_scale)
BLOCK_REGISTRY.register("random", seeded=True)(_random)
BLOCK_REGISTRY.register("gate", needs_data=True)(_gate)
BLOCK_SCORERS = BLOCK_REGISTRY.table  # the plain {name: scorer} dict, kept for code that reads it


def block_scores(blocks: Blocks, model: nn.Module, method: str = "end_scale", **options: object) -> dict[str, float]:
    """Score every block of ``blocks`` (higher = more important).

    Args:
        blocks: from :func:`~.discovery.find_blocks` on ``model``.
        model: the model the blocks belong to.
        method: ``"end_scale"``, ``"random"`` (option ``seed``) or ``"gate"`` (options
            ``data``, ``teacher``, ``config``: a :class:`~.gates.GateConfig`, ``progress``).

    Example:
        >>> import timm, torch
        >>> from graphprune.blocks import find_blocks
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> blocks = find_blocks(model, torch.randn(1, 3, 32, 32))
        >>> scores = block_scores(blocks, model, "random", seed=1)
        >>> len(scores) == len(blocks), all(0 <= s <= 1 for s in scores.values())
        (True, True)
    """
    return BLOCK_REGISTRY.get(method)(blocks, model, **options)
