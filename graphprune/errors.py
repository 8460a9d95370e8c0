"""Exception types users can catch.

Every error graphprune raises on bad input or an unprunable model derives from
:class:`GraphpruneError`, so ``except graphprune.GraphpruneError`` catches them all.

Example:
    >>> import graphprune as gp
    >>> issubclass(gp.InvalidArgumentError, gp.GraphpruneError)
    True
"""

from __future__ import annotations


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class InvalidArgumentError(GraphpruneError, ValueError):
    """An argument is out of range or names something that does not exist."""


class UnsupportedModelError(GraphpruneError):
    """The model cannot be traced (its forward pass fails on the example inputs)."""


class PruneError(GraphpruneError):
    """Pruning produced a model that does not run; the input model was left unchanged."""


class UntracedCodeError(GraphpruneError):
    """The example inputs never reached some parameters (a branch of the forward that did not
    run), so nothing is known about how they couple; pruning refuses rather than break that code."""
