"""Scorer registry: ``@register_scorer("name", needs_data=..., seeded=...)`` and lookup that fails loudly.

A scorer is any callable ``scorer(groups, model, **options) -> {group_id: Tensor[group.size]}``;
lower scores are removed first. What a scorer needs from its caller is registered with it, so
callers ask the registry (``scorer_spec(name).needs_data``) instead of keeping lists of names.

Example:
    >>> import torch
    >>> from graphprune.scoring import get_scorer, list_scorers, register_scorer
    >>> @register_scorer("ones")
    ... def ones(groups, model):
    ...     return {g.id: torch.ones(g.size) for g in groups}
    >>> get_scorer("ones") is ones, "ones" in list_scorers(needs_data=False)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from ..errors import InvalidArgumentError

Scores = Mapping[int, torch.Tensor]
Scorer = Callable[..., Scores]
F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class ScorerSpec:
    """What a registered scorer needs from its caller.

    Attributes:
        name: the registered name.
        needs_data: it reads target data, ``data=`` (re-iterable ``(inputs, targets)`` batches).
        seeded: it draws random numbers from its ``seed=`` option.
    """

    name: str
    needs_data: bool = False
    seeded: bool = False


class Registry(Generic[F]):
    """Named callables and their :class:`ScorerSpec`; unknown names raise with the known ones.

    ``table`` is the plain ``{name: callable}`` dict behind it.

    Example:
        >>> blocks = Registry("block scorer")
        >>> _ = blocks.register("zero", seeded=False)(lambda blocks, model: {})
        >>> blocks.names(), "zero" in blocks
        (['zero'], True)
        >>> blocks.get("one")
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: unknown block scorer 'one'; known block scorers: ['zero']
    """

    def __init__(self, what: str):
        self.what = what
        self.table: dict[str, F] = {}
        self._specs: dict[str, ScorerSpec] = {}

    def register(self, name: str, *, needs_data: bool = False, seeded: bool = False) -> Callable[[F], F]:
        """Decorator: register a callable under ``name`` (names are unique)."""

        def wrap(fn: F) -> F:
            if name in self.table:
                raise ValueError(f"a {self.what} named {name!r} is already registered")
            self.table[name] = fn
            self._specs[name] = ScorerSpec(name, needs_data=needs_data, seeded=seeded)
            return fn

        return wrap

    def get(self, name: str) -> F:
        """The callable registered as ``name``.

        Raises:
            InvalidArgumentError: for an unknown name, listing the known ones.
        """
        try:
            return self.table[name]
        except (KeyError, TypeError):
            raise InvalidArgumentError(f"unknown {self.what} {name!r}; known {self.what}s: {self.names()}") from None

    def spec(self, name: str) -> ScorerSpec:
        """What the callable registered as ``name`` needs (see :meth:`get` for unknown names)."""
        self.get(name)
        return self._specs.get(name) or ScorerSpec(name)  # one put in ``table`` by hand needs nothing

    def names(self, *, needs_data: bool | None = None, seeded: bool | None = None) -> list[str]:
        """Registered names, sorted; ``needs_data`` / ``seeded`` keep only those whose spec says so."""
        specs = [self.spec(name) for name in sorted(self.table)]
        return [s.name for s in specs if needs_data in (None, s.needs_data) and seeded in (None, s.seeded)]

    def unregister(self, name: str) -> F:
        """Remove ``name`` (a plugin's or a test's registration) and return its callable.

        Example:
            >>> blocks = Registry("block scorer")
            >>> _ = blocks.register("zero")(lambda model, names: {n: 0.0 for n in names})
            >>> _ = blocks.unregister("zero")
            >>> blocks.names()
            []
        """
        fn = self.get(name)
        del self.table[name]
        self._specs.pop(name, None)
        return fn

    def __contains__(self, name: object) -> bool:
        return name in self.table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


SCORER_REGISTRY: Registry[Scorer] = Registry("scorer")


def register_scorer(name: str, *, needs_data: bool = False, seeded: bool = False) -> Callable[[Scorer], Scorer]:
    """Register a scorer under ``name`` (names are unique).

    Args:
        name: the name ``get_scorer`` and ``prune(scorer=...)`` take.
        needs_data: the scorer takes ``data=``, ``progress=`` and ``max_batches=`` (recipes pass them).
        seeded: the scorer takes ``seed=`` (recipes pass the run's seed).

    Example:
        >>> scorer_spec("taylor").needs_data, scorer_spec("random").seeded, scorer_spec("l1").needs_data
        (True, True, False)
    """
    return SCORER_REGISTRY.register(name, needs_data=needs_data, seeded=seeded)


def get_scorer(name: str | Scorer) -> Scorer:
    """The scorer registered as ``name`` (a callable is returned as is).

    Raises:
        InvalidArgumentError: for an unknown name, listing the known ones.

    Example:
        >>> get_scorer("l1").__name__
        'l1'
    """
    return name if callable(name) else SCORER_REGISTRY.get(name)


def scorer_spec(name: str) -> ScorerSpec:
    """What the scorer registered as ``name`` needs from its caller.

    Raises:
        InvalidArgumentError: for an unknown name, listing the known ones.

    Example:
        >>> scorer_spec("classmean")
        ScorerSpec(name='classmean', needs_data=True, seeded=False)
    """
    return SCORER_REGISTRY.spec(name)


def list_scorers(*, needs_data: bool | None = None, seeded: bool | None = None) -> list[str]:
    """Registered scorer names, sorted; ``needs_data`` / ``seeded`` filter on their spec.

    Example:
        >>> list_scorers(needs_data=True)
        ['classmean', 'target_taylor', 'taylor']
        >>> list_scorers(seeded=True)
        ['random']
    """
    return SCORER_REGISTRY.names(needs_data=needs_data, seeded=seeded)
