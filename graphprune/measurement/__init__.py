"""Measurement: parameters, MACs (one fused multiply-add = one MAC) and CPU latency.

Example:
    >>> import torch, timm
    >>> from graphprune.measurement import measure, compare
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> before = measure(model, torch.zeros(1, 3, 64, 64), repeats=3)
    >>> print(compare(before, before))  # doctest: +SKIP
"""

from graphprune.measurement.flops import MacCount, analyze_macs, count_macs
from graphprune.measurement.latency import LatencyStats, measure_latency
from graphprune.measurement.measure import Measurement, count_params, measure
from graphprune.measurement.report import ComparisonRow, ComparisonTable, compare

__all__ = [
    "ComparisonRow",
    "ComparisonTable",
    "LatencyStats",
    "MacCount",
    "Measurement",
    "analyze_macs",
    "compare",
    "count_macs",
    "count_params",
    "measure",
    "measure_latency",
]
