"""Offline assets for tests and benchmarks: data paths, datasets and pretrained models."""

from graphprune.assets.cifar_resnet import (
    CIFAR10_CLASSES,
    CIFAR_RESNET_INPUT_SIZE,
    CIFAR_RESNET_MEAN,
    CIFAR_RESNET_STD,
    PRETRAINED_DEPTHS,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
    load_cifar_resnet,
)
from graphprune.assets.datasets import (
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    class_names,
    image_folder,
    image_transform,
    subset_loader,
)
from graphprune.assets.efficientnet_lite0 import LITE0_MEAN, LITE0_STD, load_efficientnet_lite0
from graphprune.assets.paths import DATA_ENV_VAR, require_shared_data, shared_data_dir

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR_RESNET_INPUT_SIZE",
    "CIFAR_RESNET_MEAN",
    "CIFAR_RESNET_STD",
    "DATASET_NAMES",
    "DATA_ENV_VAR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE0_MEAN",
    "LITE0_STD",
    "PRETRAINED_DEPTHS",
    "SPLITS",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet",
    "class_names",
    "image_folder",
    "image_transform",
    "load_cifar_resnet",
    "load_efficientnet_lite0",
    "require_shared_data",
    "shared_data_dir",
    "subset_loader",
]
