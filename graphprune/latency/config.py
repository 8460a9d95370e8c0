"""What a latency target asks for (:class:`LatencyConfig`) and what it got (:class:`LatencyRecord`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from .table import OpSpec

__all__ = ["LatencyConfig", "LatencyRecord", "check_latency_reduction"]


def check_latency_reduction(value: float) -> float:
    """Validate a latency reduction target in ``(0, 1)``.

    Example:
        >>> check_latency_reduction(0.3)
        0.3
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value < 1:
        raise InvalidArgumentError(f"latency_reduction must be a number in (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how latency is modelled and measured for ``prune(..., latency_reduction=...)``.

    Attributes:
        batch_size: the batch the model will run at (copies of the example input); latency
            per width differs between batch 1 and 16, so the table is built at this batch.
        threads: intra-op threads for the table and the measurement (``None``: the current
            ``torch.get_num_threads()``).
        cache: the table's JSON cache file (``None``: ``~/.cache/graphprune/latency.json`` or
            ``$GRAPHPRUNE_CACHE``; ``False``: no file).
        tolerance: accepted distance between the measured and the target reduction (0.02: two points).
        max_steps: most end-to-end measurements of a candidate plan.
        width_step: groups keep multiples of this many channels (one head at a time for heads).
        grid_points: about this many widths timed per layer dim.
        warmup: untimed passes before an end-to-end measurement.
        repeats: timed passes per end-to-end measurement (the median counts).
        timer: ``(spec, threads) -> ms`` for the table (tests pass a closed-form fake).
    """

    batch_size: int = 1
    threads: int | None = None
    cache: str | Path | bool | None = None
    tolerance: float = 0.02
    max_steps: int = 6
    width_step: int = 8
    grid_points: int = 6
    warmup: int = 5
    repeats: int = 20
    timer: Callable[[OpSpec, int], float] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "width_step", "grid_points", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"LatencyConfig.{name} must be a positive integer, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidArgumentError(f"LatencyConfig.threads must be a positive integer or None, got {self.threads!r}")
        if not 0 < self.tolerance < 1:
            raise InvalidArgumentError(f"LatencyConfig.tolerance must be in (0, 1), got {self.tolerance!r}")


@dataclass(frozen=True)
class LatencyRecord:
    """Predicted against measured, for the plan that ``plan_for_latency`` returned.

    Attributes:
        target: the requested reduction.
        predicted: the reduction the latency model predicted for the returned plan
            (modelled milliseconds saved over the measured base time of the same try).
        measured: the reduction measured end to end.
        base_ms: measured median of the unpruned model (in the rounds alternating with the
            returned plan's model).
        pruned_ms: measured median of the returned plan's model.
        modelled_ms: the model's milliseconds for the unpruned model (the rest of ``base_ms``
            is width-independent: activations, pooling, framework overhead).
        reached: whether ``measured`` is within ``tolerance`` of ``target``.
        steps: every measured try, as ``(budget, predicted, measured)`` reductions.
        batch_size, threads: what was measured.
        timings: op timings the table ran (0 when every one was cached).
    """

    target: float
    predicted: float
    measured: float
    base_ms: float
    pruned_ms: float
    modelled_ms: float
    reached: bool
    steps: tuple[tuple[float, float, float], ...]
    batch_size: int
    threads: int
    timings: int

    def to_dict(self) -> dict:
        """The record as plain data (JSON-serializable)."""
        return asdict(self)
