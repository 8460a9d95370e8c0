"""Small process-level helpers shared across modules: the hot paths' GC pause and unique sort, JSON record parsing."""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (re-entrant).

    Tracing keeps every intermediate tensor and many small arrays alive; with the
    collector on, its full passes over those objects cost several times the work itself.
    Nothing created here forms reference cycles that need collecting mid-way.

    Example:
        >>> with paused_gc():
        ...     gc.isenabled()
        False
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of an integer array by sorting: numpy >= 2.3's hash-based unique is
    several times slower on the id arrays the graph handles.

    Example:
        >>> sorted_unique(np.array([3, 1, 3, 2])).tolist()
        [1, 2, 3]
    """
    values = np.sort(values, axis=None)
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def json_record(text: str, expected_format: str, what: str) -> dict:
    """Parse ``text`` as a JSON object whose ``"format"`` is ``expected_format``; ``ValueError`` naming ``what`` otherwise.

    Example:
        >>> json_record('{"format": "x/1", "a": 1}', "x/1", "record")["a"]
        1
        >>> json_record('[1]', "x/1", "record")
        Traceback (most recent call last):
        ...
        ValueError: a record is a JSON object, got list
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a {what} is a JSON object, got {type(data).__name__}")
    if data.get("format") != expected_format:
        raise ValueError(f"format is {data.get('format')!r}, expected {expected_format!r}")
    return data
