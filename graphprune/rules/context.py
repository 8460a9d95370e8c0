"""What a coupling rule sees: the call that ran and the element bookkeeping."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..elements import ElementStore, TensorInfo


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors in ``obj`` (nested lists, tuples and dicts), in order.

    Example:
        >>> t = torch.zeros(1)
        >>> len(flat_tensors((t, [t, 3], {"a": t})))
        3
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in flat_tensors(item)]
    return []


@dataclass
class Call:
    """One torch function call recorded during the forward pass."""

    name: str
    func: Any
    args: tuple
    kwargs: dict
    out: Any
    module: str
    index: int
    dynamic: set = field(default_factory=set)  # integer arguments a rule found to be read from a tensor's shape
    attributes: set = field(default_factory=set)  # integer attributes the executing module's forward reads

    @functools.cached_property
    def tensor_args(self) -> list[torch.Tensor]:
        return flat_tensors((self.args, self.kwargs))

    @functools.cached_property
    def outputs(self) -> list[torch.Tensor]:
        return flat_tensors(self.out)

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        """Argument by position or keyword."""
        if name in self.kwargs:
            return self.kwargs[name]
        if len(self.args) > position:
            return self.args[position]
        return default


class Context:
    """Element infos of the tensors seen so far, and the element store."""

    def __init__(self, store: ElementStore, state_names: dict[int, str]):
        self.store = store
        self._infos: dict[int, TensorInfo] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while tracing
        self._state_names = state_names  # id(param or buffer) -> qualified name
        self.state_infos: dict[str, TensorInfo] = {}
        self.costs: list[tuple[int, tuple[np.ndarray, ...]]] = []
        self.shape_reads: dict[str, list[np.ndarray]] = {}

    def module_entered(self, name: str) -> None:
        """A module's forward begins: forget the shapes read in its previous call."""
        self.shape_reads[name] = []

    def shape_read(self, module: str, tensor: torch.Tensor) -> None:
        """``tensor.shape`` was read in ``module``: its channel sizes may come back as arguments."""
        reads = self.shape_reads.setdefault(module, [])
        for dim in self.info(tensor).dims:
            if dim is not None and not any(dim is r for r in reads):
                reads.append(dim)

    def numbers_used(self, call: Call) -> None:
        """Any call (channels or not): a channel count read from a shape that reaches it as a
        number freezes those channels (:mod:`graphprune.rules.shape_numbers`)."""
        from .shape_numbers import freeze_counts_used_as_numbers

        freeze_counts_used_as_numbers(self, call)

    def add_cost(self, macs: int, dims: list[np.ndarray | None]) -> None:
        """Record ``macs`` multiply-adds that scale with the kept fraction of each channel dim in ``dims``."""
        self.costs.append((int(macs), tuple(d for d in dims if d is not None)))

    def info(self, tensor: torch.Tensor) -> TensorInfo:
        """Info of a tensor; parameters and floating buffers get fresh elements on first sight."""
        key = id(tensor)
        found = self._infos.get(key)
        if found is not None:
            return found
        name = self._state_names.get(key)
        if name is not None and tensor.is_floating_point():
            info = TensorInfo(tuple(self._fresh(n) for n in tensor.shape))
            self.state_infos[name] = info
        else:
            info = TensorInfo.free(tensor.dim())
        self.set_info(tensor, info)
        return info

    def state_name(self, tensor: torch.Tensor | None) -> str | None:
        """Qualified name of a parameter or buffer of the traced model (``None`` for any other tensor)."""
        return None if tensor is None else self._state_names.get(id(tensor))

    def _fresh(self, n: int) -> np.ndarray | None:
        return self.store.new(n) if n > 1 else None

    def set_info(self, tensor: torch.Tensor, info: TensorInfo) -> None:
        if len(info.dims) != tensor.dim():
            raise AssertionError(f"info with {len(info.dims)} dims for a {tensor.dim()}-d tensor")
        self._infos[id(tensor)] = info
        self._alive.append(tensor)

    def is_tracked(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor carries channel elements (or is model state that would)."""
        found = self._infos.get(id(tensor))
        if found is not None:
            return found.has_channels
        return id(tensor) in self._state_names and tensor.is_floating_point()

    def freeze_all(self, tensors: list[torch.Tensor]) -> None:
        """Freeze every element of every channel dimension of ``tensors``."""
        for t in tensors:
            for dim in self.info(t).dims:
                if dim is not None:
                    self.store.freeze(dim)

    def new_dim(self, n: int) -> np.ndarray | None:
        """Fresh elements for a new channel dimension of size ``n`` (``None`` when ``n <= 1``)."""
        return self._fresh(n)


def merge_dims(store: ElementStore, dims: list[tuple[np.ndarray | None, int]], size: int) -> np.ndarray | None:
    """Couple dimensions that index the same channels (one broadcast output dim).

    Args:
        store: where unions and freezes are recorded.
        dims: ``(elements or None, size)`` of each input's dimension; size 1 broadcasts.
        size: size of the output dimension.

    Returns:
        The output dimension's elements, or ``None`` if it is not a channel dimension.
        A channel dimension that meets a non-channel dimension of the same size is
        frozen: its size is tied to something that cannot change.
    """
    active = [d for d, n in dims if n == size]
    channels = [d for d in active if d is not None]
    if not channels:
        return None
    if size <= 1 or len(channels) < len(active):
        for d in channels:
            store.freeze(d)
        return None
    out = channels[0].copy()
    for other in channels[1:]:
        store.union(channels[0], other)
        out[other == -1] = -1
    return out
