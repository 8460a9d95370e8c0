"""Target-task data for the recipes: ImageFolder splits with timm's preprocessing, checked up front.

``TransferData`` is what every recipe takes: a training loader, a validation loader (model
selection and early stopping read only this one, never a test split) and the class names.
:func:`image_folder_data` builds it the timm way, ``resolve_data_config(model=model)`` +
``create_transform``, at a configurable image size, and refuses a missing split or
train/val class folders that differ before anything is trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import timm.data
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class TransferData:
    """The data of one transfer task.

    Attributes:
        train: re-iterable of ``(images, labels)`` training batches (a ``DataLoader``).
        val: validation batches: model selection only.
        class_names: class ``i`` is ``class_names[i]`` in both splits.
    """

    train: DataLoader
    val: DataLoader
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of target classes."""
        return len(self.class_names)

    def example_inputs(self) -> torch.Tensor:
        """One validation image, batch 1: the example input the recipes trace with.

        Example:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> loader = DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])), batch_size=2)
            >>> TransferData(loader, loader, ("a", "b")).example_inputs().shape
            torch.Size([1, 3, 8, 8])
        """
        images, _ = next(iter(self.val))
        return images[:1].clone()


def check_splits(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")) -> tuple[str, ...]:
    """Check that ``root/<split>`` exists for every split and all hold the same class folders.

    Returns:
        The class names (sorted folder names, i.e. ImageFolder's class order).

    Raises:
        InvalidArgumentError: a split folder is missing or empty, or the class folders differ.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for split in ("train", "val"):
        ...     (root / split / "cat").mkdir(parents=True)
        >>> check_splits(root)
        ('cat',)
        >>> (root / "train" / "dog").mkdir()
        >>> check_splits(root)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: class folders differ between splits: 'val' lacks ['dog']
    """
    base = Path(root)
    found: dict[str, tuple[str, ...]] = {}
    for split in splits:
        folder = base / split
        if not folder.is_dir():
            raise InvalidArgumentError(f"split {split!r} is missing: {folder} is not a directory")
        classes = tuple(sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()))
        if not classes:
            raise InvalidArgumentError(f"split {split!r} has no class folders under {folder}")
        found[split] = classes
    first, reference = splits[0], found[splits[0]]
    for split, classes in found.items():
        if classes != reference:
            lacks = sorted(set(reference) - set(classes))
            extra = sorted(set(classes) - set(reference))
            detail = f"{split!r} lacks {lacks}" if lacks else f"{split!r} has extra {extra} not in {first!r}"
            raise InvalidArgumentError(f"class folders differ between splits: {detail}")
    return reference


def data_config(model: nn.Module, image_size: int) -> dict:
    """timm's preprocessing for ``model`` (mean, std, interpolation, crop) at ``image_size`` px.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> data_config(model, 96)["input_size"]
        (3, 96, 96)
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise InvalidArgumentError(f"image_size must be an int >= 8 pixels, got {image_size!r}")
    config = timm.data.resolve_data_config(model=model)
    config["input_size"] = (config["input_size"][0], image_size, image_size)
    return config


def _balanced_subset(dataset: datasets.ImageFolder, per_class: int | None, seed: int):
    if per_class is None:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(dataset.targets)
    chosen: list[int] = []
    for label in range(len(dataset.classes)):
        indices = torch.nonzero(targets == label).flatten()
        if len(indices) == 0:
            raise InvalidArgumentError(f"class {dataset.classes[label]!r} has no images in {dataset.root}")
        chosen += indices[torch.randperm(len(indices), generator=generator)[:per_class]].tolist()
    return Subset(dataset, sorted(chosen))


def image_folder_data(root: str | os.PathLike, model: nn.Module, *, image_size: int = 224, batch_size: int = 32,
                      per_class: int | None = None, val_per_class: int | None = None, augment: bool = True,
                      seed: int = 0, num_workers: int = 0) -> TransferData:
    """Train/val loaders over ``root/train`` and ``root/val`` with ``model``'s timm preprocessing.

    Args:
        root: a folder with ``train/`` and ``val/`` in torchvision ImageFolder layout.
        model: the timm model whose ``pretrained_cfg`` gives mean, std, interpolation, crop.
        image_size: square input side in pixels.
        batch_size: images per batch.
        per_class: training images per class (a seeded, class-balanced subset); ``None``: all.
        val_per_class: the same for validation.
        augment: timm's training augmentation (random resized crop, flip, colour jitter) on
            ``train``; ``False`` uses the eval transform for both.
        seed: subset choice and shuffle order.
        num_workers: DataLoader worker processes.

    Raises:
        InvalidArgumentError: a missing split, class folders that differ, a bad ``image_size``.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> data = image_folder_data("../shared/data/flowers17", model, image_size=96)  # doctest: +SKIP
        >>> data.num_classes, data.example_inputs().shape  # doctest: +SKIP
        (17, torch.Size([1, 3, 96, 96]))
    """
    names = check_splits(root, ("train", "val"))
    config = data_config(model, image_size)
    train_tf = timm.data.create_transform(**config, is_training=augment)
    val_tf = timm.data.create_transform(**config, is_training=False)
    base = Path(root)
    train = _balanced_subset(datasets.ImageFolder(str(base / "train"), transform=train_tf), per_class, seed)
    val = _balanced_subset(datasets.ImageFolder(str(base / "val"), transform=val_tf), val_per_class, seed)
    return TransferData(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                         generator=torch.Generator().manual_seed(seed)),
        val=DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers),
        class_names=names,
    )


def eval_loader(root: str | os.PathLike, split: str, model: nn.Module, *, image_size: int = 224,
                batch_size: int = 64, per_class: int | None = None, seed: int = 0) -> DataLoader:
    """An unaugmented loader over ``root/<split>`` (e.g. the test split, for reporting only).

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> test = eval_loader("../shared/data/flowers17", "test", model, image_size=96)  # doctest: +SKIP
    """
    check_splits(root, ("train", split))
    transform = timm.data.create_transform(**data_config(model, image_size), is_training=False)
    dataset = _balanced_subset(datasets.ImageFolder(str(Path(root) / split), transform=transform), per_class, seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
