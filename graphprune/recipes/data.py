"""Target-task data for the recipes: ImageFolder splits with timm's preprocessing, checked up front.

``TransferData`` is what every recipe takes: a training loader, a validation loader (model
selection and early stopping read only this one, never a test split) and the class names.
:func:`image_folder_data` builds it the timm way, ``resolve_data_config(model=model)`` +
``create_transform`` (random-resized-crop, flip and colour jitter for training; resize and
centre crop for evaluation), at a configurable image size, and refuses a missing split or
train/val class folders that differ before anything is trained.

Small datasets are decoded once (:class:`DecodedImages`): every image is read, converted to
RGB and resized so its short side is what the eval transform needs (``image_size /
crop_pct``), then kept in memory as a ``uint8`` tensor; timm's transforms run on those tensors
(``use_prefetcher=True`` leaves them ``uint8``) and :class:`NormalizeCollate` turns a batch
into normalized floats in one vectorized step. JPEG decoding and PIL resizing, which cost
more than the forward pass of a small model on the CPU, then happen once per image instead of
once per image and epoch.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import timm.data
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.transforms import functional as TF

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class TransferData:
    """The data of one transfer task.

    Attributes:
        train: re-iterable of ``(images, labels)`` training batches (a ``DataLoader``).
        val: validation batches: model selection only.
        class_names: class ``i`` is ``class_names[i]`` in both splits.
        train_eval: the training split without augmentation (the linear probe and class means
            read it); ``None``: they read ``train``.
    """

    train: DataLoader
    val: DataLoader
    class_names: tuple[str, ...]
    train_eval: DataLoader | None = None

    @property
    def num_classes(self) -> int:
        """Number of target classes."""
        return len(self.class_names)

    @property
    def unaugmented_train(self) -> DataLoader:
        """The training split as the probe, class means and BatchNorm re-estimates read it:
        ``train_eval`` when there is one, else ``train``."""
        return self.train_eval if self.train_eval is not None else self.train

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


class DecodedImages(Dataset):
    """An ImageFolder split decoded once into memory: ``uint8`` tensors ``(3, H, W)`` and labels.

    Args:
        folder: a torchvision ``ImageFolder`` (its ``samples`` are read; its transform is not used).
        short_side_px: resize each image so its shorter side is at most this many pixels
            (aspect kept, antialiased); ``None`` keeps the decoded size.
        transform: applied to each ``uint8`` tensor on access (timm's ``create_transform``
            with ``use_prefetcher=True``).

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "cat").mkdir()
        >>> Image.new("RGB", (60, 40)).save(root / "cat" / "a.png")
        >>> images = DecodedImages(datasets.ImageFolder(str(root)), short_side_px=20)
        >>> images[0][0].shape, images[0][0].dtype, images.classes
        (torch.Size([3, 20, 30]), torch.uint8, ['cat'])
    """

    def __init__(self, folder: datasets.ImageFolder, short_side_px: int | None = None, transform=None) -> None:
        self.classes = list(folder.classes)
        self.root = folder.root
        self.targets = list(folder.targets)
        self.transform = transform
        self.images: list[torch.Tensor] = []
        for path, _ in folder.samples:
            image = folder.loader(path).convert("RGB")
            if short_side_px is not None and min(image.size) > short_side_px:
                width, height = image.size
                scale = short_side_px / min(width, height)
                image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                     resample=3)  # PIL bicubic, antialiased on downsizing
            self.images.append(TF.pil_to_tensor(image))

    def __len__(self) -> int:
        return len(self.images)

    def with_transform(self, transform) -> DecodedImages:
        """The same decoded images (shared, not copied) under another transform."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


class NormalizeCollate:
    """Collate ``uint8`` images into one float batch normalized with timm's mean and std.

    Example:
        >>> collate = NormalizeCollate((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> images, labels = collate([(torch.full((3, 2, 2), 255, dtype=torch.uint8), 1)])
        >>> images.flatten()[:2].tolist(), labels.tolist()
        ([1.0, 1.0], [1])
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in samples]).float()  # (B, 3, H, W), 0..255
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        return (images - self.mean) / self.std, labels


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


def _folder(root: Path, split: str, per_class: int | None, seed: int) -> datasets.ImageFolder:
    """The split's ImageFolder, reduced to a balanced subset in place (so only those images are decoded)."""
    folder = datasets.ImageFolder(str(root / split))
    if per_class is not None:
        keep = _balanced_subset(folder, per_class, seed).indices
        folder.samples = [folder.samples[i] for i in keep]
        folder.imgs = folder.samples
        folder.targets = [folder.targets[i] for i in keep]
    return folder


class _FromPil:
    """PIL image -> RGB ``uint8`` tensor -> ``transform`` (picklable, for DataLoader workers)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return self.transform(TF.pil_to_tensor(image.convert("RGB")))


class _Split:
    """One split's images, shared by the augmented and the plain view (decoded at most once)."""

    def __init__(self, folder: datasets.ImageFolder, config: dict, cache: bool) -> None:
        self.folder = folder
        self.cache = cache
        crop_pct = config.get("crop_pct") or 1.0
        self.short_side_px = int(math.floor(config["input_size"][-1] / crop_pct))
        self._decoded: DecodedImages | None = None

    def view(self, transform) -> Dataset:
        if not self.cache:
            view = datasets.ImageFolder(self.folder.root, transform=_FromPil(transform))
            view.samples, view.imgs, view.targets = self.folder.samples, self.folder.samples, self.folder.targets
            return view
        if self._decoded is None:
            self._decoded = DecodedImages(self.folder, self.short_side_px)
        return self._decoded.with_transform(transform)


def _transforms(config: dict, augment: bool, scale: tuple[float, float]):
    common = {k: v for k, v in config.items() if k not in ("mean", "std")}
    train = timm.data.create_transform(**common, is_training=augment, use_prefetcher=True,
                                       **({"scale": scale} if augment else {}))
    plain = timm.data.create_transform(**common, is_training=False, use_prefetcher=True)
    return train, plain


def image_folder_data(root: str | os.PathLike, model: nn.Module, *, image_size: int = 128, batch_size: int = 32,
                      per_class: int | None = None, val_per_class: int | None = None, augment: bool = True,
                      scale: tuple[float, float] = (0.08, 1.0), seed: int = 0, num_workers: int = 0,
                      cache: bool = True) -> TransferData:
    """Train/val loaders over ``root/train`` and ``root/val`` with ``model``'s timm preprocessing.

    Args:
        root: a folder with ``train/`` and ``val/`` in torchvision ImageFolder layout.
        model: the timm model whose ``pretrained_cfg`` gives mean, std, interpolation, crop.
        image_size: square input side in pixels.
        batch_size: images per batch.
        per_class: training images per class (a seeded, class-balanced subset); ``None``: all.
        val_per_class: the same for validation.
        augment: timm's training augmentation (random resized crop over ``scale`` of the
            area, horizontal flip, colour jitter 0.4) on ``train``; ``False`` uses the eval
            transform for both.
        scale: area range of the random resized crop (timm's ImageNet default is
            ``(0.08, 1.0)``; few-shot fine-tuning keeps more of the object).
        seed: subset choice and shuffle order.
        num_workers: DataLoader worker processes (each seeded from the loader's generator,
            so runs stay reproducible); 0 augments in the main process.
        cache: decode every image once into memory (:class:`DecodedImages`); ``False`` reads
            and decodes the files on every access (datasets too large for memory).

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
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) for v in scale) or not 0 < scale[0] <= scale[1] <= 1):
        raise InvalidArgumentError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
    train_tf, plain_tf = _transforms(config, augment, tuple(scale))
    collate = NormalizeCollate(config["mean"], config["std"])
    base = Path(root)
    train = _Split(_folder(base, "train", per_class, seed), config, cache)
    val = _Split(_folder(base, "val", val_per_class, seed), config, cache)
    loader = {"batch_size": batch_size, "num_workers": num_workers, "collate_fn": collate,
              "persistent_workers": num_workers > 0}
    return TransferData(
        train=DataLoader(train.view(train_tf), shuffle=True, generator=torch.Generator().manual_seed(seed), **loader),
        val=DataLoader(val.view(plain_tf), shuffle=False, **loader),
        class_names=names,
        train_eval=DataLoader(train.view(plain_tf), shuffle=False, **loader),
    )


def eval_loader(root: str | os.PathLike, split: str, model: nn.Module, *, image_size: int = 128,
                batch_size: int = 64, per_class: int | None = None, seed: int = 0, cache: bool = True) -> DataLoader:
    """An unaugmented loader over ``root/<split>`` (e.g. the test split, for reporting only).

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> test = eval_loader("../shared/data/flowers17", "test", model, image_size=96)  # doctest: +SKIP
    """
    check_splits(root, ("train", split))
    config = data_config(model, image_size)
    _, plain_tf = _transforms(config, False, (1.0, 1.0))
    images = _Split(_folder(Path(root), split, per_class, seed), config, cache)
    return DataLoader(images.view(plain_tf), batch_size=batch_size, shuffle=False,
                      collate_fn=NormalizeCollate(config["mean"], config["std"]))
