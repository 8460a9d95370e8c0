"""Latency of the user's device: a per-op timing table, a per-layer model, latency-targeted plans.

The pipeline, as for FLOPs budgets (:mod:`graphprune.budget`), but on measured time::

    table = LatencyTable()                                   # on-disk cache of op timings
    lm    = LatencyModel(model, graph, example, table)       # per-layer lookup, summed
    chosen, ms = select_for_latency(groups, scores, lm, target_ms)
    plan, record = plan_for_latency(model, groups, scores, [example], 0.3)   # measured, refined

``gp.prune(model, x, latency_reduction=0.3)`` calls :func:`plan_for_latency`.
"""

from .predict import Layer, LatencyModel, width_grid
from .config import LatencyConfig, LatencyRecord, check_latency_reduction
from .select import plan_for_latency, select_for_latency
from .table import CACHE_ENV_VAR, LatencyTable, OpSpec, default_cache_path, device_name, time_op

__all__ = [
    "CACHE_ENV_VAR", "Layer", "LatencyConfig", "LatencyModel", "LatencyRecord", "LatencyTable", "OpSpec",
    "check_latency_reduction", "default_cache_path", "device_name", "plan_for_latency", "select_for_latency",
    "time_op", "width_grid",
]
