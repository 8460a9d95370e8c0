"""Where a recipe runs: the device, the precision, the memory layout, and batches moved there.

:class:`Placement` is resolved once per run from :class:`~graphprune.recipes.RunConfig`'s
``device`` / ``precision`` / ``channels_last`` settings, and every stage uses it: the model is
moved to the device (and to ``channels_last`` for conv nets), :class:`DeviceLoader` moves each
batch as it is read, so the scorers, the training loop and evaluation all see tensors where
the model is, and :meth:`Placement.autocast` runs forward passes in bf16 when asked.

Defaults (``"auto"``) and why:

* **device**: CUDA when ``torch.cuda.is_available()``, else the CPU.
* **precision**: bf16 autocast on CUDA (Ampere and newer run bf16 matmuls and convolutions
  at tensor-core speed, and bf16 needs no loss scaling); fp32 on the CPU, where CPUs without
  AVX-512 BF16 / AMX run bf16 autocast slower than fp32 (measured on this project's AMD EPYC:
  a Lite0 training step at 12.0 img/s in bf16 vs 30.8 img/s in fp32, channels_last, 1 thread).
* **channels_last**: on for conv nets (any ``Conv2d`` with a kernel larger than 1x1 beyond
  the stem), off otherwise: on the CPU a Lite0 training step at 128 px ran x1.4-1.6 faster
  in channels_last (oneDNN's native layout); a ViT's patch embedding gains nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LAYOUTS = ("auto", "on", "off")


def resolve_device(spec: str | torch.device) -> torch.device:
    """The device a setting names: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        InvalidArgumentError: an unknown name, or CUDA asked for where there is none.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("tpu")
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: unknown device 'tpu'; use one of 'auto', 'cpu', 'cuda' or 'cuda:N'
    """
    text = str(spec)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (not index.isdigit() or kind == "cpu")):
        raise InvalidArgumentError(f"unknown device {text!r}; use one of 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {text!r} was asked for but CUDA is not available here "
                                       "(torch.cuda.is_available() is False); use device='cpu' or 'auto'")
        if index and int(index) >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(text)


def is_conv_net(model: nn.Module) -> bool:
    """True when ``model`` has spatial convolutions past a stem (where ``channels_last`` pays).

    Example:
        >>> import timm
        >>> is_conv_net(timm.create_model("resnet18")), is_conv_net(timm.create_model("vit_tiny_patch16_224"))
        (True, False)
    """
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    return len(spatial) > 1


@dataclass(frozen=True)
class Placement:
    """A resolved device, precision and memory layout.

    Attributes:
        device: where the model and the batches live.
        bf16: run forward passes under bf16 autocast.
        channels_last: keep 4-D weights and batches in ``torch.channels_last``.
    """

    device: torch.device = torch.device("cpu")
    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def resolve(cls, model: nn.Module, device: str = "auto", precision: str = "auto",
                channels_last: str = "auto") -> Placement:
        """Turn the ``"auto"`` settings into decisions for ``model``.

        Example:
            >>> import timm
            >>> Placement.resolve(timm.create_model("resnet18"), device="cpu")
            Placement(device=device(type='cpu'), bf16=False, channels_last=True)
        """
        where = resolve_device(device)
        if precision not in PRECISIONS:
            raise InvalidArgumentError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        if channels_last not in LAYOUTS:
            raise InvalidArgumentError(f"unknown channels_last setting {channels_last!r}; use one of {LAYOUTS}")
        bf16 = where.type == "cuda" if precision == "auto" else precision == "bf16"
        layout = is_conv_net(model) if channels_last == "auto" else channels_last == "on"
        return cls(where, bf16, layout)

    @property
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` or ``torch.contiguous_format``."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def model_(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and memory layout, in place (idempotent).

        Example:
            >>> Placement().model_(torch.nn.Conv2d(3, 4, 3)).weight.device.type
            'cpu'
        """
        return model.to(device=self.device, memory_format=self.memory_format)

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device; 4-D tensors in the memory layout.

        Example:
            >>> Placement(channels_last=True).tensor(torch.zeros(1, 3, 4, 4)).is_contiguous(
            ...     memory_format=torch.channels_last)
            True
        """
        if tensor.dim() == 4 and self.channels_last:
            return tensor.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return tensor.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device when enabled, else a no-op.

        Example:
            >>> with Placement().autocast():
            ...     torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype
            torch.float32
        """
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to_dict(self) -> dict:
        """JSON-ready description, for records.

        Example:
            >>> Placement().to_dict()
            {'device': 'cpu', 'bf16': False, 'channels_last': False}
        """
        return {"device": str(self.device), "bf16": self.bf16, "channels_last": self.channels_last}


class DeviceLoader:
    """A loader whose ``(inputs, targets)`` batches arrive on a :class:`Placement`'s device.

    It keeps what the recipes read of a ``DataLoader``: ``len()``, ``dataset``, ``sampler``,
    ``batch_size`` and ``loader`` (the wrapped one, for sharding under DDP).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> inner = DataLoader(TensorDataset(torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])), batch_size=2)
        >>> loader = DeviceLoader(inner, Placement(channels_last=True))
        >>> len(loader), next(iter(loader))[0].is_contiguous(memory_format=torch.channels_last)
        (2, True)
    """

    def __init__(self, loader, placement: Placement) -> None:
        self.loader = loader.loader if isinstance(loader, DeviceLoader) else loader
        self.placement = placement

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name in ("loader", "placement"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                inputs, targets = batch
                inputs = (self.placement.tensor(inputs) if isinstance(inputs, torch.Tensor)
                          else type(inputs)(self.placement.tensor(t) for t in inputs))
                yield inputs, targets.to(self.placement.device, non_blocking=True)
            else:
                yield batch


def unwrap(loader):
    """The ``DataLoader`` under a :class:`DeviceLoader` (the loader itself otherwise).

    Example:
        >>> unwrap([1, 2])
        [1, 2]
    """
    return loader.loader if isinstance(loader, DeviceLoader) else loader
