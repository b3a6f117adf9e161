"""Image tables (rows of image + label from files or a `datasets.Dataset`) and the torch `Dataset` over them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` upright (EXIF orientation applied) in RGB, as every model here expects.

    Food-101 contains grayscale JPEGs; other folders hold CMYK, palette and 16-bit images. All become 8-bit RGB.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        # 16-bit grayscale (PNG opens as "I" or "I;16"): scale to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


class ImageTable:
    """Rows of (image, label): the common view of every data source.

    Subclasses say how to read row ``i``; slicing and splitting work on row indices.
    """

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        """Return row ``i`` as an RGB PIL image."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where row ``i`` comes from, for messages and prediction files."""
        raise NotImplementedError

    def subset(self, rows: Sequence[int]) -> ImageTable:
        """Return a table holding only ``rows``, in that order."""
        raise NotImplementedError


class FileTable(ImageTable):
    """Images stored as files, one path per row."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = list(labels)

    def load(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as image:
            return to_rgb(image)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def subset(self, rows: Sequence[int]) -> FileTable:
        return FileTable([self.paths[r] for r in rows], [self.labels[r] for r in rows])


class HFTable(ImageTable):
    """Rows of a `datasets.Dataset` with an image column and a class-label column."""

    def __init__(self, dataset: Any, image_column: str, label_column: str, name: str = "dataset") -> None:
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.name = name
        self.labels = list(dataset[label_column])

    def load(self, i: int) -> Image.Image:
        return to_rgb(self.dataset[int(i)][self.image_column])

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def subset(self, rows: Sequence[int]) -> HFTable:
        return HFTable(self.dataset.select(list(rows)), self.image_column, self.label_column, self.name)


class ImageDataset(torch.utils.data.Dataset):
    """Torch dataset over an `ImageTable`: each item is ``{"pixel_values": uint8 CHW, "labels": int, "index": int}``.

    Pixels stay uint8 until they reach the device (see `Food101DataModule.on_after_batch_transfer`), which keeps
    worker-to-main-process traffic at a quarter of float32's.
    """

    def __init__(self, table: ImageTable, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.table = table
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.transform(self.table.load(i)), "labels": self.table.labels[i], "index": i}
