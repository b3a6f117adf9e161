"""Preprocessing resolved from the model's image processor (size, mean, std), as the PEFT guide builds it.

Workers do the geometric part and hand over uint8 tensors; scaling to [0, 1] and normalising happen on the
device after transfer (`normalize_on_device`), which gives the guide's numbers with a quarter of the traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

# ViTImageProcessor's defaults, used when no image processor is named.
DEFAULT_SIZE = 224
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageSettings:
    """What the model expects of its input: side length after cropping, and per-channel mean and std."""

    size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def settings_from_processor(name_or_path: str) -> ImageSettings:
    """Read size, mean and std from the image processor of a model (hub id or local folder).

    Mirrors the guide: ``size["height"]`` (or ``size["shortest_edge"]``), ``image_mean``, ``image_std``.
    """
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the image processor of {name_or_path!r}: {err}. Pass a hub id that is cached "
            "(offline) or a local folder holding preprocessor_config.json, or set image_size/image_mean/image_std."
        ) from err
    size = processor.size
    if "shortest_edge" in size:
        side: int | tuple[int, int] = int(size["shortest_edge"])
    elif size["height"] == size["width"]:
        side = int(size["height"])
    else:
        side = (int(size["height"]), int(size["width"]))
    return ImageSettings(side, tuple(float(m) for m in processor.image_mean), tuple(float(s) for s in processor.image_std))


def train_transform(settings: ImageSettings) -> v2.Compose:
    """The guide's training augmentation, ending in uint8: RandomResizedCrop, RandomHorizontalFlip."""
    return v2.Compose([v2.RandomResizedCrop(settings.size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])


def eval_transform(settings: ImageSettings) -> v2.Compose:
    """The guide's evaluation preprocessing, ending in uint8: Resize, CenterCrop."""
    return v2.Compose([v2.Resize(settings.size, antialias=True), v2.CenterCrop(settings.size), v2.PILToTensor()])


def normalize_on_device(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW → float32 ``(x / 255 - mean) / std``, i.e. the guide's ``ToTensor`` + ``Normalize``."""
    return (pixels.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
