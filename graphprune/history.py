"""A pruned model's structural history: the plans applied to it, as JSON, on the model itself.

Every removal (channels, blocks, kernels) appends its plan's JSON to ``model.graphprune_plans``;
:func:`graphprune.save` writes that list so :func:`graphprune.load` can rebuild the architecture
from the unpruned one without pickling. This module only keeps the list; reading the entries
back as plans is persistence (:func:`graphprune.io.parse_edit`).

Example:
    >>> import torch
    >>> class Note:  # any plan: it has to_json()
    ...     def to_json(self) -> str:
    ...         return '{"format": "note"}'
    >>> model = torch.nn.Linear(2, 2)
    >>> record_plan(model, Note())
    >>> plan_texts(model), HISTORY_ATTR
    (('{"format": "note"}',), 'graphprune_plans')
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Protocol

from torch import nn

from .errors import InvalidArgumentError

HISTORY_ATTR = "graphprune_plans"


class AsJson(Protocol):
    """Anything recorded: a channel, block or kernel plan."""

    def to_json(self) -> str: ...


def record_plan(model: nn.Module, plan: AsJson) -> None:
    """Append ``plan`` (as JSON) to ``model.graphprune_plans`` (a new list: copies of the model keep theirs)."""
    history = list(getattr(model, HISTORY_ATTR, []))
    history.append(plan.to_json())
    setattr(model, HISTORY_ATTR, history)


def plan_texts(model: nn.Module) -> tuple[str, ...]:
    """The recorded plans' JSON, oldest first; a malformed attribute raises :class:`InvalidArgumentError`."""
    history = getattr(model, HISTORY_ATTR, [])
    if not isinstance(history, (list, tuple)) or not all(isinstance(text, str) for text in history):
        raise InvalidArgumentError(f"model.{HISTORY_ATTR} must be a list of plan JSON strings")
    return tuple(history)


def entry_format(text: str) -> str | None:
    """The ``format`` a history entry (JSON text) declares, or None for text that is no JSON object.

    Example:
        >>> entry_format('{"format": "graphprune.plan/2"}'), entry_format("[1]"), entry_format("{")
        ('graphprune.plan/2', None, None)
    """
    try:
        value = json.loads(text).get("format")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def set_history(model: nn.Module, plans: Iterable[AsJson]) -> None:
    """Replace the history with ``plans`` (a model rebuilt from a saved record)."""
    setattr(model, HISTORY_ATTR, [plan.to_json() for plan in plans])
