"""The per-op timing table: what one conv, linear or norm costs on this device, cached on disk.

An :class:`OpSpec` names one op at one shape (batch included), dtype and device kind; the
:class:`LatencyTable` times it once with ``torch.utils.benchmark.Timer`` (a few untimed calls,
then ``blocked_autorange``: the median over blocks of repeated calls) and keeps the median in
milliseconds in a JSON file. The cache key is the device's name, the torch version, the
intra-op thread count and the spec, so a different dtype, batch size, thread count or machine
is a different entry, never a stale hit. Writes are atomic (a temporary file, then
``os.replace``), so two processes sharing the cache see the old file or the new one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..measurement.latency import torch_benchmark

__all__ = ["CACHE_ENV_VAR", "LatencyTable", "OpSpec", "default_cache_path", "device_name", "time_op"]

CACHE_ENV_VAR = "GRAPHPRUNE_CACHE"
KINDS = ("conv2d", "linear", "batch_norm", "layer_norm")


@dataclass(frozen=True)
class OpSpec:
    """One op at one shape, as the table times it.

    Attributes:
        kind: ``"conv2d"``, ``"linear"``, ``"batch_norm"`` or ``"layer_norm"``.
        in_width: input channels (conv: all of them, not per group; linear: in features;
            norms: the normalized channels).
        out_width: output channels (equal to ``in_width`` for norms).
        batch: leading size of the input (the user's batch times the example's).
        spatial: the rest of the input's shape: ``(H, W)`` for conv and batch norm,
            the token dims for linear and layer norm (``()`` for a plain ``(B, C)``).
        kernel, stride, padding, dilation: conv geometry, ``(h, w)`` each (``()`` otherwise).
        groups: conv groups.
        dtype: ``str(torch.dtype)``, e.g. ``"torch.float32"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    kind: str
    in_width: int
    out_width: int
    batch: int
    spatial: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    dtype: str = "torch.float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"unknown op kind {self.kind!r}; known: {list(KINDS)}")
        if self.in_width < 1 or self.out_width < 1 or self.batch < 1 or self.groups < 1:
            raise InvalidArgumentError(f"widths, batch and groups must be >= 1: {self}")

    def key(self) -> str:
        """The spec as a canonical string (part of the cache key)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def with_widths(self, in_width: int, out_width: int, groups: int | None = None) -> OpSpec:
        """The same op at other widths (and, for a grouped conv, another group count)."""
        fields = asdict(self)
        fields.update(in_width=int(in_width), out_width=int(out_width))
        if groups is not None:
            fields["groups"] = int(groups)
        return OpSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def device_name(device: str = "cpu") -> str:
    """What the cache calls this machine's device: the CPU model string, or the CUDA device name.

    Example:
        >>> isinstance(device_name("cpu"), str)
        True
    """
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_cache_path() -> Path:
    """``$GRAPHPRUNE_CACHE/latency.json``, else ``~/.cache/graphprune/latency.json``.

    Example:
        >>> default_cache_path().name
        'latency.json'
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root) if root else Path.home() / ".cache" / "graphprune"
    return base / "latency.json"


def _op_callable(spec: OpSpec) -> Callable[[], torch.Tensor]:
    """A zero-argument function that runs the op on fresh random tensors of the spec's shape."""
    dtype = getattr(torch, spec.dtype.removeprefix("torch."))
    opts = {"dtype": dtype, "device": spec.device}
    if spec.kind == "conv2d":
        x = torch.randn(spec.batch, spec.in_width, *spec.spatial, **opts)
        w = torch.randn(spec.out_width, spec.in_width // spec.groups, *spec.kernel, **opts)
        return lambda: F.conv2d(x, w, None, spec.stride, spec.padding, spec.dilation, spec.groups)
    if spec.kind == "linear":
        x = torch.randn(spec.batch, *spec.spatial, spec.in_width, **opts)
        w = torch.randn(spec.out_width, spec.in_width, **opts)
        b = torch.randn(spec.out_width, **opts)
        return lambda: F.linear(x, w, b)
    if spec.kind == "batch_norm":  # eval mode: a per-channel affine map
        x = torch.randn(spec.batch, spec.in_width, *spec.spatial, **opts)
        mean, var = torch.zeros(spec.in_width, **opts), torch.ones(spec.in_width, **opts)
        return lambda: F.batch_norm(x, mean, var, var, mean, False)
    x = torch.randn(spec.batch, *spec.spatial, spec.in_width, **opts)
    w, b = torch.ones(spec.in_width, **opts), torch.zeros(spec.in_width, **opts)
    return lambda: F.layer_norm(x, (spec.in_width,), w, b)


def time_op(spec: OpSpec, threads: int, min_run_time: float = 0.01) -> float:
    """Median milliseconds of one call of the op: 3 untimed calls, then ``blocked_autorange``.

    Args:
        spec: The op and shape.
        threads: Intra-op threads (``Timer(num_threads=...)`` sets and restores them).
        min_run_time: Seconds ``blocked_autorange`` spends at least.

    Example:
        >>> time_op(OpSpec("linear", 16, 16, batch=1), threads=1, min_run_time=0.001) > 0
        True
    """
    fn = _op_callable(spec)
    timer = torch_benchmark().Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    with torch.inference_mode():
        timer.timeit(3)
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


class LatencyTable:
    """Timings of ops on this device, looked up by :class:`OpSpec`, each measured once.

    Args:
        path: JSON cache file (``None``: :func:`default_cache_path`; ``False``: memory only).
        threads: Intra-op threads the timings are for (``None``: ``torch.get_num_threads()``).
        timer: ``(spec, threads) -> ms``; :func:`time_op` by default (tests pass a fake).
        min_run_time: Seconds per timing given to the default timer.
        refresh: Time every op again on first use instead of trusting the file's entry (the new
            timing replaces it): for a cache recorded under another load, or on another machine
            under the same device name.

    Attributes:
        timed: How many timings this table ran.
        hits: How many lookups the cache file answered (0 with ``refresh``).

    Example:
        >>> table = LatencyTable(path=False, threads=1, timer=lambda spec, threads: 1e-3 * spec.in_width)
        >>> table.latency_ms(OpSpec("linear", 64, 32, batch=1)), table.timed
        (0.064, 1)
        >>> table.latency_ms(OpSpec("linear", 64, 32, batch=1)), table.timed
        (0.064, 1)
    """

    def __init__(self, path: str | os.PathLike | bool | None = None, *, threads: int | None = None,
                 timer: Callable[[OpSpec, int], float] | None = None, min_run_time: float = 0.01,
                 refresh: bool = False):
        self.path = None if path is False else Path(default_cache_path() if path in (None, True) else path)
        self.threads = torch.get_num_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads!r}")
        self.timer = timer or (lambda spec, threads: time_op(spec, threads, min_run_time))
        self.timed, self.hits, self.refresh = 0, 0, bool(refresh)
        self._entries: dict[str, float] = self._read()
        self._fresh: set[str] = set()  # keys timed by this table
        self._dirty = False

    def _read(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a damaged cache is rebuilt, not trusted
            return {}
        entries = data.get("entries", {}) if isinstance(data, dict) else {}
        return {k: float(v) for k, v in entries.items() if isinstance(v, (int, float))}

    def key(self, spec: OpSpec) -> str:
        """The cache key: device name, torch version, thread count and the spec."""
        return json.dumps([device_name(spec.device), torch.__version__, self.threads, spec.key()],
                          separators=(",", ":"))

    def latency_ms(self, spec: OpSpec) -> float:
        """Median milliseconds of one call of ``spec``, timed on first use."""
        key = self.key(spec)
        found = self._entries.get(key)
        if found is None or (self.refresh and key not in self._fresh):
            found = float(self.timer(spec, self.threads))
            self.timed += 1
            self._entries[key] = found
            self._fresh.add(key)
            self._dirty = True
        elif key not in self._fresh:
            self.hits += 1
        return found

    def save(self) -> None:
        """Write new timings to the cache file (atomically; merged with entries another process added)."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(), **self._entries}
        fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": "graphprune.latency/1", "unit": "ms", "entries": merged}, f, indent=0,
                          sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._dirty = False
