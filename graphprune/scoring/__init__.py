"""Importance scorers: one score per channel of each group (lower goes first)."""

from . import magnitude  # noqa: F401  (registers l1, l2)
from .registry import SCORERS, Scorer, Scores, get_scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "Scores", "get_scorer", "register_scorer"]
