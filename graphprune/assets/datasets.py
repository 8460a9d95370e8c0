"""The offline image datasets (torchvision ImageFolder layout) and small loaders for tests.

Layout: ``<shared data>/<name>/<split>/<class_name>/<file>``. Every split has the same class
folders, so the class index (position of the class name in sorted order) is the same in every
split. Counts and sources are in ``../shared/data/MANIFEST.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import timm.data
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from graphprune.assets.paths import require_shared_data

DATASET_NAMES: tuple[str, ...] = ("cub100", "dtd10", "flowers17", "gtsrb_small", "hymenoptera")
SPLITS: tuple[str, ...] = ("train", "val", "test")
TRANSFORM_STYLES: tuple[str, ...] = ("timm", "cifar")
IMAGENET_MEAN: tuple[float, float, float] = tuple(timm.data.IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(timm.data.IMAGENET_DEFAULT_STD)

TransformStyle = Literal["timm", "cifar"]


def _check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return split


def image_transform(
    image_size: int,
    *,
    train: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    style: TransformStyle = "timm",
) -> Callable:
    """Build the image transform used by :func:`image_folder`.

    ``style="timm"`` is ``timm.data.create_transform`` at ``(3, image_size, image_size)``:
    for eval, resize to ``image_size / 0.875`` and center-crop; for training,
    RandomResizedCrop, horizontal flip and color jitter.
    ``style="cifar"`` is for the CIFAR ResNets (use ``image_size=32``): resize the shorter
    side to ``image_size``, center-crop, ``ToTensor``, ``Normalize``. Its training variant adds
    ``RandomCrop(image_size, padding=4)`` but no horizontal flip, because flipping would turn
    gtsrb_small's "turn left" signs into "turn right" ones.

    Args:
        image_size: Output height and width in pixels.
        train: Use the random training augmentation instead of the deterministic one.
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation std (RGB).
        style: ``"timm"`` or ``"cifar"``.

    Returns:
        A callable mapping a PIL image to a ``(3, image_size, image_size)`` float tensor.

    Raises:
        ValueError: ``style`` is unknown.

    Example:
        >>> from PIL import Image
        >>> from graphprune.assets import image_transform
        >>> tf = image_transform(32, style="cifar")
        >>> tf(Image.new("RGB", (48, 64))).shape
        torch.Size([3, 32, 32])
    """
    if style == "timm":
        return timm.data.create_transform(
            input_size=(3, image_size, image_size), is_training=train, mean=tuple(mean), std=tuple(std)
        )
    if style == "cifar":
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        if train:
            steps.append(transforms.RandomCrop(image_size, padding=4))
        steps += [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
        return transforms.Compose(steps)
    raise ValueError(f"unknown transform style {style!r}; known styles: {', '.join(TRANSFORM_STYLES)}")


def image_folder(
    name: str,
    split: str,
    *,
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    style: TransformStyle = "timm",
) -> datasets.ImageFolder:
    """Open one split of a shared dataset as a torchvision ``ImageFolder``.

    For a timm model, pass its own statistics:
    ``cfg = timm.data.resolve_data_config(model=model)`` then ``mean=cfg["mean"]``,
    ``std=cfg["std"]``. For the CIFAR ResNets use ``image_size=32, style="cifar"`` with the
    default (ImageNet) statistics.

    Args:
        name: One of :data:`DATASET_NAMES`.
        split: One of :data:`SPLITS`.
        image_size: Output height and width in pixels.
        train: Use random training augmentation (see :func:`image_transform`).
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation std (RGB).
        style: ``"timm"`` or ``"cifar"`` (see :func:`image_transform`).

    Returns:
        The dataset; ``class_to_idx`` is the same for every split of ``name``.

    Raises:
        ValueError: ``name``, ``split`` or ``style`` is unknown (the message lists the known ones).
        FileNotFoundError: The shared data directory is missing.

    Example:
        >>> from graphprune.assets import image_folder
        >>> val = image_folder("flowers17", "val", image_size=224)  # doctest: +SKIP
        >>> len(val), val[0][0].shape  # doctest: +SKIP
        (170, torch.Size([3, 224, 224]))
    """
    _check_name(name)
    _check_split(split)
    transform = image_transform(image_size, train=train, mean=mean, std=std, style=style)
    root = require_shared_data(name, split)  # only after every argument is validated
    return datasets.ImageFolder(root=str(root), transform=transform)


def class_names(name: str) -> tuple[str, ...]:
    """Return a dataset's class names in class-index order (sorted folder names).

    Args:
        name: One of :data:`DATASET_NAMES`.

    Returns:
        The class names; ``class_names(name)[i]`` is the name of label ``i``.

    Raises:
        ValueError: ``name`` is unknown.
        FileNotFoundError: The shared data directory is missing.

    Example:
        >>> from graphprune.assets import class_names
        >>> class_names("hymenoptera")  # doctest: +SKIP
        ('ants', 'bees')
    """
    classes, _ = datasets.folder.find_classes(str(require_shared_data(_check_name(name), "train")))
    return tuple(classes)


def subset_loader(
    dataset: Dataset,
    *,
    per_class: int | None,
    batch_size: int,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """A deterministic, single-process DataLoader over a class-balanced subset.

    The subset takes ``per_class`` samples of every class, drawn with a generator seeded by
    ``seed`` and kept in dataset order, so the same arguments give the same samples. The
    shuffle order is seeded by ``seed`` too. Random *augmentations* in the dataset's
    transform still use the global torch RNG.

    Args:
        dataset: A dataset with a ``targets`` list (e.g. an ``ImageFolder``).
        per_class: Samples per class; ``None`` uses the whole dataset.
        batch_size: Samples per batch.
        shuffle: Reshuffle the samples every epoch (seeded).
        seed: Seed for the subset choice and the shuffle order.

    Returns:
        A ``DataLoader`` with ``num_workers=0``.

    Raises:
        TypeError: ``dataset`` has no ``targets``.
        ValueError: ``per_class`` is below 1 or larger than the smallest class.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from graphprune.assets import subset_loader
        >>> data = TensorDataset(torch.arange(6.0))
        >>> data.targets = [0, 0, 0, 1, 1, 1]
        >>> loader = subset_loader(data, per_class=2, batch_size=8, shuffle=False, seed=0)
        >>> len(loader.dataset)
        4
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"subset_loader needs a dataset with a `targets` list, got {type(dataset).__name__}")
    generator = torch.Generator().manual_seed(seed)
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
        targets = torch.as_tensor(targets)
        chosen = []
        for label in torch.unique(targets).tolist():
            indices = torch.nonzero(targets == label).flatten()
            if len(indices) < per_class:
                raise ValueError(f"class {label} has only {len(indices)} samples, fewer than per_class={per_class}")
            picks = torch.randperm(len(indices), generator=generator)[:per_class]
            chosen += indices[picks].tolist()
        dataset = Subset(dataset, sorted(chosen))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )
