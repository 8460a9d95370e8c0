"""CIFAR-10 ResNet-20/56 (He et al. 2016, section 4.2) matching the shared weights.

The architecture and state_dict keys follow akamaster/pytorch_resnet_cifar10, whose
checkpoints are in ``../shared/data/weights/resnet_cifar10`` (BSD-2-Clause, LICENSE beside
them). The shortcut is "option A": parameter-free, so the residual channels of a stage are
coupled, which is what makes this a useful pruning test case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.assets.paths import require_shared_data

# The checkpoints were trained with ImageNet statistics, not CIFAR-10 ones.
CIFAR_RESNET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR_RESNET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR_RESNET_INPUT_SIZE: tuple[int, int, int] = (3, 32, 32)
# torchvision CIFAR10 class order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Depths with a checkpoint in weights/resnet_cifar10/.
PRETRAINED_DEPTHS: tuple[int, ...] = (20, 56)

_STAGE_CHANNELS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels on both sides.

    A module rather than a lambda, so the model deep-copies, pickles and traces.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad_channels = planes // 4  # per side: in_planes + 2 * pad_channels == planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (B, C, H, W) -> (B, C, H/2, W/2)
        # F.pad pads from the last dim backwards: (W_lo, W_hi, H_lo, H_hi, C_lo, C_hi).
        return F.pad(x, (0, 0, 0, 0, self.pad_channels, self.pad_channels))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        shape_changes = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes) if shape_changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem, three stages of 16/32/64 channels, linear head."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks_per_stage = blocks_per_stage
        self.conv1 = nn.Conv2d(3, _STAGE_CHANNELS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_CHANNELS[0])
        in_planes = _STAGE_CHANNELS[0]
        stages = []
        for stage_index, planes in enumerate(_STAGE_CHANNELS):
            first_stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = first_stride if block_index == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # Same as the original F.avg_pool2d over the full 8x8 map for 32x32 inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(_STAGE_CHANNELS[-1], num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)  # as in the original training code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        out = self.layer3(self.layer2(self.layer1(out)))  # (B, 64, 8, 8)
        out = torch.flatten(self.avgpool(out), 1)  # (B, 64)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a randomly initialised CIFAR ResNet of the given depth.

    Args:
        depth: Number of weighted layers, ``6 * n + 2`` for ``n`` blocks per stage
            (20, 32, 44, 56, 110, ...).
        num_classes: Output size of the ``linear`` head.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: ``depth`` is not of the form ``6 * n + 2`` with ``n >= 1``.

    Example:
        >>> from graphprune.assets import cifar_resnet
        >>> sum(p.numel() for p in cifar_resnet(20).parameters())
        269722
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6*n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    return CifarResNet(blocks_per_stage=(depth - 2) // 6, num_classes=num_classes)


def load_cifar_resnet(depth: int) -> CifarResNet:
    """Build a CIFAR-10 ResNet and load its pretrained weights from the shared data.

    Loads ``weights/resnet_cifar10/resnet{depth}_cifar10.pt`` with ``weights_only=True``
    and ``strict=True``. Inputs must be 32x32 RGB normalised with
    :data:`CIFAR_RESNET_MEAN` / :data:`CIFAR_RESNET_STD`.

    Args:
        depth: 20 or 56 (see :data:`PRETRAINED_DEPTHS`).

    Returns:
        The pretrained model in eval mode.

    Raises:
        ValueError: No checkpoint exists for ``depth``.
        FileNotFoundError: The shared data directory or checkpoint is missing.

    Example:
        >>> from graphprune.assets import load_cifar_resnet
        >>> model = load_cifar_resnet(20)  # doctest: +SKIP
        >>> model(torch.zeros(1, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    if depth not in PRETRAINED_DEPTHS:
        raise ValueError(f"no pretrained CIFAR-10 ResNet of depth {depth}; available depths: {PRETRAINED_DEPTHS}")
    path = require_shared_data("weights", "resnet_cifar10", f"resnet{depth}_cifar10.pt")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = cifar_resnet(depth)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
