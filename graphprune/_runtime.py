"""Process-level helpers for the hot paths."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


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
