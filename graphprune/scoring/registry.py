"""Scorer registry: ``@register_scorer("name")`` and lookup that fails loudly.

A scorer is any callable ``scorer(groups, model, **options) -> {group_id: Tensor[group.size]}``;
lower scores are removed first.

Example:
    >>> import torch
    >>> from graphprune.scoring import register_scorer, get_scorer
    >>> @register_scorer("ones")
    ... def ones(groups, model):
    ...     return {g.id: torch.ones(g.size) for g in groups}
    >>> get_scorer("ones") is ones
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import InvalidArgumentError

Scores = Mapping[int, torch.Tensor]
Scorer = Callable[..., Scores]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a scorer under ``name`` (names are unique)."""

    def wrap(scorer: Scorer) -> Scorer:
        if name in SCORERS:
            raise ValueError(f"a scorer named {name!r} is already registered")
        SCORERS[name] = scorer
        return scorer

    return wrap


def get_scorer(name: str | Scorer) -> Scorer:
    """The scorer registered as ``name`` (a callable is returned as is).

    Raises:
        InvalidArgumentError: for an unknown name, listing the known ones.
    """
    if callable(name):
        return name
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown scorer {name!r}; known scorers: {sorted(SCORERS)}") from None
