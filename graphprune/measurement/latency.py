"""CPU latency: warm up, then time repeated forward passes with a fixed thread count.

Timing protocol (one place, so every number in the docs means the same thing):
``torch.inference_mode()``, eval mode, ``torch.set_num_threads(threads)``, the Python
garbage collector paused, ``warmup`` untimed passes, then ``repeats`` passes each
timed with ``torch.utils.benchmark``'s clock (``timeit.default_timer`` after synchronizing
the accelerator, the clock ``torch.utils.benchmark.Timer`` uses; the op table of
:mod:`graphprune.latency` times its ops with that ``Timer``). One reading per pass, not
``Timer.timeit``: that runs untimed passes of its own before each reading, and the protocol
fixes the count of passes (``warmup + repeats``). We report the median and the 10th/90th percentiles
in milliseconds; the median is the headline, p10..p90 says how much to trust it.
The thread count, mode and GC state are restored afterwards, even on error.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ExampleInputs",
    "LatencyStats",
    "as_input_tuple",
    "eval_mode",
    "measure_latency",
    "repeat_batch",
]

# One tensor or a sequence of positional tensors, batch first.
ExampleInputs = Tensor | Sequence[Tensor]


def torch_benchmark():
    """``torch.utils.benchmark``, imported quietly: importing it loads ``torch.utils.cpp_extension``,
    whose logger warns about ``CUDA_HOME`` on machines without CUDA, on every fresh process.

    Example:
        >>> torch_benchmark().Timer.__name__
        'Timer'
    """
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode and restores every submodule's own flag on exit.

    Restoring per submodule (not ``model.train(previous)``) keeps mixed states intact,
    e.g. a frozen batch-norm left in eval inside a model that trains.

    Args:
        model: Module to switch.

    Yields:
        The same module, in eval mode.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def as_input_tuple(example_inputs: ExampleInputs) -> tuple[Tensor, ...]:
    """Normalizes one tensor or a sequence of tensors to a tuple of positional inputs.

    Args:
        example_inputs: A tensor, or a list/tuple of tensors.

    Returns:
        A tuple of the same tensors.

    Example:
        >>> len(as_input_tuple(torch.zeros(1, 3)))
        1
    """
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def repeat_batch(example_inputs: ExampleInputs, batch_size: int) -> tuple[Tensor, ...]:
    """Repeats every input ``batch_size`` times along dim 0.

    An example with batch 1 becomes a batch of ``batch_size``; with batch ``b``, of
    ``b * batch_size``.

    Args:
        example_inputs: A tensor or a sequence of tensors, batch first.
        batch_size: Number of copies, at least 1.

    Returns:
        The repeated inputs as a tuple.

    Example:
        >>> repeat_batch(torch.zeros(1, 3, 4), 8)[0].shape
        torch.Size([8, 3, 4])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs = as_input_tuple(example_inputs)
    if batch_size == 1:
        return inputs
    return tuple(x.repeat(batch_size, *([1] * (x.dim() - 1))) for x in inputs)


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of one forward pass on CPU.

    Attributes:
        median_ms: Median over the timed runs.
        p10_ms: 10th percentile (linear interpolation).
        p90_ms: 90th percentile.
        samples_ms: Every timed run, in order.
        batch_size: Copies of the example input per pass.
        threads: ``torch`` intra-op threads used.
        warmup: Untimed passes before timing.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: tuple[float, ...]
    batch_size: int
    threads: int
    warmup: int


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default "linear" method).
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
) -> LatencyStats:
    """Times ``model(*inputs)`` on CPU following the protocol in the module docstring.

    Args:
        model: Model to time; its train/eval flags are restored afterwards.
        example_inputs: A tensor or a sequence of tensors, batch first.
        batch_size: Copies of the example input along dim 0 (see ``repeat_batch``).
        threads: Intra-op thread count; ``None`` keeps ``torch.get_num_threads()``.
        warmup: Untimed passes first (allocator, caches, lazy init).
        repeats: Timed passes, at least 1.

    Returns:
        Median and spread of the timed passes, in milliseconds.

    Example:
        >>> stats = measure_latency(nn.Linear(64, 64), torch.zeros(1, 64), threads=1, repeats=5)
        >>> stats.median_ms > 0, stats.threads
        (True, 1)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
    previous_threads = torch.get_num_threads()
    threads = previous_threads if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    benchmark_clock = torch_benchmark().utils.timer.timer

    inputs = repeat_batch(example_inputs, batch_size)
    gc_was_enabled = gc.isenabled()
    samples_ms: list[float] = []
    try:
        torch.set_num_threads(threads)
        gc.collect()
        gc.disable()
        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                model(*inputs)
            for _ in range(repeats):
                start = benchmark_clock()
                model(*inputs)
                samples_ms.append((benchmark_clock() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(previous_threads)
    ordered = sorted(samples_ms)
    return LatencyStats(
        median_ms=_percentile(ordered, 0.5),
        p10_ms=_percentile(ordered, 0.1),
        p90_ms=_percentile(ordered, 0.9),
        samples_ms=tuple(samples_ms),
        batch_size=batch_size,
        threads=threads,
        warmup=warmup,
    )
