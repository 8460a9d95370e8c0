"""The kernel-pruned convolution: each output channel reads its own k input channels.

Kernel (filter) pruning removes individual ``kh x kw`` kernels of a dense conv, i.e.
(output, input) channel pairs, the same number ``k`` for every output channel. The result
runs as a gather and a grouped convolution (Towards compute-optimal transfer learning, 2023)::

    x                      (B, in, H, W)
    x[:, index.flatten()]  (B, out * k, H, W)    output o's inputs at o*k .. o*k+k-1
    conv2d(groups=out)     (B, out, H', W')      weight (out, k, kh, kw): group o is output o

so it costs ``out * k * kh * kw * H' * W'`` MACs (``k / in`` of the dense conv) plus the
gather, which copies ``out * k / in`` times the input: the price of the saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError


class KernelConv2d(nn.Module):
    """A drop-in for a dense ``nn.Conv2d`` of which ``kernels_per_output`` kernels per output channel remain.

    Args:
        in_channels: the dense conv's input channels.
        out_channels: output channels (also the group count of the inner conv).
        kernels_per_output: ``k``, the input channels each output reads, ``1 <= k <= in_channels``.
        kernel_size: ``(kh, kw)``.
        stride: as ``nn.Conv2d``.
        padding: as ``nn.Conv2d`` (ints, or ``"same"`` / ``"valid"``); zero padding only.
        dilation: as ``nn.Conv2d``.
        bias: whether there is a bias.

    Attributes:
        weight: ``(out, k, kh, kw)``; ``weight[o, j]`` is the dense ``weight[o, input_index[o, j]]``.
        bias: ``(out,)`` or ``None``.
        input_index: int64 buffer ``(out, k)``: the input channels of each output, increasing in each row.

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, padding=1)
        >>> pruned = KernelConv2d.from_conv(conv, torch.arange(4).repeat(6, 1)[:, :2])
        >>> pruned(torch.randn(1, 4, 8, 8)).shape, tuple(pruned.weight.shape)
        (torch.Size([1, 6, 8, 8]), (6, 2, 3, 3))
    """

    def __init__(self, in_channels: int, out_channels: int, kernels_per_output: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        check_kernels_per_output(kernels_per_output, in_channels)
        self.in_channels, self.out_channels, self.kernels_per_output = in_channels, out_channels, kernels_per_output
        self.kernel_size, self.stride, self.padding, self.dilation = tuple(kernel_size), tuple(stride), padding, tuple(
            dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, kernels_per_output, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        # a valid placeholder (the first k inputs); from_conv or load_state_dict sets the real one
        first = torch.arange(kernels_per_output, device=device).expand(out_channels, -1)
        self.register_buffer("input_index", first.clone())

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_index: torch.Tensor) -> KernelConv2d:
        """Keep, for each output ``o``, the kernels of inputs ``input_index[o]`` of the dense ``conv``.

        Args:
            conv: a dense ``nn.Conv2d`` (``groups=1``, zero padding); not modified.
            input_index: ``(out_channels, k)`` distinct input channels per row; sorted here.

        Example:
            >>> conv = nn.Conv2d(3, 2, 1, bias=False)
            >>> KernelConv2d.from_conv(conv, torch.tensor([[2, 0], [1, 2]])).input_index.tolist()
            [[0, 2], [1, 2]]
        """
        check_dense_conv(conv)
        index = torch.as_tensor(input_index, device=conv.weight.device)
        if index.dim() != 2 or index.shape[0] != conv.out_channels:
            raise InvalidArgumentError(f"input_index must be (out_channels={conv.out_channels}, k), got "
                                       f"{tuple(index.shape)}")
        index = index.to(torch.int64).sort(dim=1).values
        check_index(index, conv.in_channels)
        module = cls(conv.in_channels, conv.out_channels, index.shape[1], conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            module.input_index.copy_(index)
            rows = torch.arange(conv.out_channels, device=index.device)[:, None]  # (out, 1)
            module.weight.copy_(conv.weight[rows, index])  # (out, k, kh, kw)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        module.weight.requires_grad_(conv.weight.requires_grad)
        if module.bias is not None:
            module.bias.requires_grad_(conv.bias.requires_grad)
        module.train(conv.training)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = x.index_select(1, self.input_index.flatten())  # (B, out * k, H, W)
        return F.conv2d(gathered, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        groups=self.out_channels)  # (B, out, H', W')

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d``, the removed kernels zero (for export or checks).

        Example:
            >>> conv = nn.Conv2d(3, 2, 3).double()
            >>> x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
            >>> pruned = KernelConv2d.from_conv(conv, torch.tensor([[0, 2], [1, 2]]))
            >>> torch.allclose(pruned.to_dense()(x), pruned(x), rtol=0, atol=1e-12)
            True
        """
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None, device=self.weight.device,
                          dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.zero_()
            rows = torch.arange(self.out_channels, device=self.weight.device)[:, None]
            dense.weight[rows, self.input_index] = self.weight
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernels_per_output={self.kernels_per_output}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # an index from a file: refuse one that would gather the wrong (or no) channels
        index = state_dict.get(prefix + "input_index")
        if index is not None:
            try:
                if index.dtype != torch.int64 or tuple(index.shape) != tuple(self.input_index.shape):
                    raise InvalidArgumentError(f"is {index.dtype} {tuple(index.shape)}, expected int64 "
                                               f"{tuple(self.input_index.shape)}")
                check_index(index, self.in_channels)
            except InvalidArgumentError as error:
                error_msgs.append(f"{prefix}input_index {error}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def check_kernels_per_output(k: int, in_channels: int) -> int:
    """``k`` if ``1 <= k <= in_channels``; else an error naming the problem.

    Example:
        >>> check_kernels_per_output(5, 4)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: kernels_per_output k=5 is more than the conv's 4 input channels
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"kernels_per_output must be an int >= 1, got {k!r}")
    if k > in_channels:
        raise InvalidArgumentError(f"kernels_per_output k={k} is more than the conv's {in_channels} input channels")
    return k


def check_dense_conv(conv: nn.Module) -> None:
    """Refuse what kernel pruning does not handle: anything but an exact ``nn.Conv2d`` with ``groups=1``,
    zero padding.

    Example:
        >>> check_dense_conv(nn.Conv2d(4, 4, 3, groups=4))
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: kernel pruning needs a dense conv (groups=1); this one has groups=4
    """
    if type(conv) is not nn.Conv2d:
        raise InvalidArgumentError(f"kernel pruning takes an nn.Conv2d (exact type, whose forward is known), "
                                   f"got {type(conv).__name__}")
    if conv.groups != 1:
        raise InvalidArgumentError(f"kernel pruning needs a dense conv (groups=1); this one has groups={conv.groups}")
    if conv.padding_mode != "zeros":
        raise InvalidArgumentError(f"kernel pruning supports zero padding only, got padding_mode={conv.padding_mode!r}")


def check_index(index: torch.Tensor, in_channels: int) -> None:
    """Every row strictly increasing (distinct, sorted) and inside ``[0, in_channels)``.

    Example:
        >>> check_index(torch.tensor([[0, 0]]), 2)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: input_index rows must be strictly increasing (distinct inputs)
    """
    if index.numel() == 0:
        raise InvalidArgumentError("input_index is empty")
    if int(index.min()) < 0 or int(index.max()) >= in_channels:
        raise InvalidArgumentError(f"input_index has values outside [0, {in_channels})")
    if index.shape[1] > 1 and not bool((index[:, 1:] > index[:, :-1]).all()):
        raise InvalidArgumentError("input_index rows must be strictly increasing (distinct inputs)")
