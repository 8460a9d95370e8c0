"""Importance scorers: one score per channel of each group (lower goes first)."""

from . import magnitude, simple  # noqa: F401  (registers l1, l2, random, bn_scale)
from . import classmean, target_taylor, taylor  # noqa: F401  (registers taylor, target_taylor, classmean)
from .registry import SCORERS, Scorer, Scores, get_scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "Scores", "get_scorer", "register_scorer"]
