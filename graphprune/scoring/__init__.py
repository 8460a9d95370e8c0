"""Importance scorers: one score per channel of each group (lower goes first)."""

from . import magnitude, simple  # noqa: F401  (registers l1, l2, random, bn_scale)
from . import classmean, target_taylor, taylor  # noqa: F401  (registers taylor, target_taylor, classmean)
from .registry import (SCORER_REGISTRY, Registry, Scorer, ScorerSpec, Scores, get_scorer, list_scorers, register_scorer,
                       scorer_spec)

__all__ = ["SCORER_REGISTRY", "Registry", "Scorer", "ScorerSpec", "Scores", "get_scorer", "list_scorers", "register_scorer",
           "scorer_spec"]
