"""Image tables (rows of image + label from files or a `datasets.Dataset`) and the torch `Dataset` over them."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lit_lora.sampling import seeded_cpu_rng

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright as stored; 5-8 = stored sideways), read from the header only."""
    orientation = image.getexif().get(0x0112, 1)
    return orientation if orientation in range(2, 9) else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` upright in RGB, exactly as ``pipeline("image-classification")`` and the exported image
    processor make it: transformers' ``load_image`` (``exif_transpose``, then PIL's ``convert("RGB")``), then the
    processor's ``convert_to_rgb`` (a colour still marked transparent, as in palette images, is composited onto
    white). So grayscale, CMYK, palette, 16-bit and RGBA files give the pixels stock tools give (an alpha channel is
    dropped by ``load_image``, not composited; 16-bit values are PIL's conversion of them).

    An image that is already upright RGB is returned itself (not a copy): use it before closing ``image``.
    """
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    rgb = image.convert("RGB")
    if rgb.info.get("transparency") is None:
        return rgb
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(rgb, return_numpy=True))


class ImageTable:
    """Rows of (image, label): the common view of every data source.

    Subclasses say how to read row ``i``; slicing and splitting work on row indices.
    """

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def open(self, i: int) -> Image.Image:
        """Return row ``i`` as a lazily opened PIL image (header read, pixels not yet decoded)."""
        raise NotImplementedError

    def read(self, i: int) -> contextlib.AbstractContextManager[Image.Image | torch.Tensor]:
        """Row ``i`` as the transforms take it: a lazily opened PIL image here; a uint8 CHW tensor (a view, no
        copy) in tables that hold decoded pixels. Use as ``with table.read(i) as image:``."""
        return self.open(i)

    def load(self, i: int) -> Image.Image:
        """Return row ``i`` decoded, upright, in RGB."""
        with self.open(i) as image:
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb

    def describe(self, i: int) -> str:
        """Where row ``i`` comes from, for messages and prediction files."""
        raise NotImplementedError

    def read_bytes(self, i: int) -> bytes | None:
        """Row ``i``'s encoded file as stored (for decoding elsewhere), or None where there is none (decoded pixels)."""
        return None

    def subset(self, rows: Sequence[int]) -> ImageTable:
        """Return a table holding only ``rows``, in that order."""
        raise NotImplementedError


class FileTable(ImageTable):
    """Images stored as files, one path per row."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = list(labels)

    def open(self, i: int) -> Image.Image:
        return Image.open(self.paths[i])

    def read_bytes(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def describe(self, i: int) -> str:
        return self.paths[i]

    def subset(self, rows: Sequence[int]) -> FileTable:
        return FileTable([self.paths[r] for r in rows], [self.labels[r] for r in rows])


class HFTable(ImageTable):
    """Rows of a `datasets.Dataset` with an image column and a class-label column.

    ``rows`` are the rows' numbers in the split ``name`` names (what messages, prediction files and the
    optimized dataset's fingerprint refer to); by default ``0..len(dataset)-1``.
    """

    def __init__(self, dataset: Any, image_column: str, label_column: str, name: str = "dataset", rows: Sequence[int] | None = None) -> None:
        from datasets import Image as ImageFeature

        # Undecoded rows (bytes or path), so that decoding happens in the transform, at the scale it needs.
        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column = image_column
        self.label_column = label_column
        self.name = name
        self.labels = list(dataset[label_column])
        self.rows = list(range(len(self.labels))) if rows is None else list(rows)

    def open(self, i: int) -> Image.Image:
        cell = self.dataset[int(i)][self.image_column]
        return Image.open(io.BytesIO(cell["bytes"])) if cell.get("bytes") else Image.open(cell["path"])

    def read_bytes(self, i: int) -> bytes:
        cell = self.dataset[int(i)][self.image_column]
        if cell.get("bytes"):
            return cell["bytes"]
        with open(cell["path"], "rb") as f:
            return f.read()

    def describe(self, i: int) -> str:
        return f"{self.name}[{self.rows[i]}]"

    def subset(self, rows: Sequence[int]) -> HFTable:
        return HFTable(self.dataset.select(list(rows)), self.image_column, self.label_column, self.name, [self.rows[r] for r in rows])


# What a broken, truncated, empty, non-image or oversized file raises while it is opened or decoded.
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, UnidentifiedImageError)


class BadImageError(ValueError):
    """An image that cannot be read, with where it is and what to do."""


def bad_image_error(where: str, reason: str) -> BadImageError:
    """The error for an unreadable image when ``on_bad_image`` is ``error``."""
    return BadImageError(
        f"cannot read image {where} ({reason}). Replace or delete the file, or set --data.on_bad_image skip to leave "
        "such files out and list them at the end of each epoch."
    )


def raised_by_decoder(err: BaseException) -> bool:
    """Whether ``err`` says the file is unreadable (the file system or PIL's decoder raised it), as opposed to a bug
    in a transform, which must not pass for a bad image."""
    if isinstance(err, (OSError, UnidentifiedImageError, Image.DecompressionBombError)):
        return True
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return module == "PIL" or module.startswith("PIL.")


# How many unreadable training images in a row `ImageDataset` passes over before it gives up on the data.
MAX_UNREADABLE_IN_A_ROW = 100


class ImageDataset(torch.utils.data.Dataset):
    """Torch dataset over an `ImageTable`: each item is ``{"pixel_values": uint8 CHW, "labels": int, "index": int}``.

    Pixels stay uint8 until they reach the device (`LoRAImageClassifier` normalises them there), which keeps
    worker-to-main-process traffic at a quarter of float32's.

    A key may be a row index or ``(row, seed)`` as `SeededShuffleSampler` yields it: the random augmentation of
    that item then depends on the seed alone, not on which process or worker draws it, so a resumed run sees
    exactly the crops and flips an uninterrupted one would have seen.

    Unreadable files (the file system or the decoder fails; a transform's own error is raised as it is) are listed
    in the item's ``"unreadable"`` as ``(where, reason)``. With ``on_bad_image="error"`` the first one stops. In
    evaluation (``replace_unreadable=False``) the item then has no pixels and is left out of its batch, so every
    readable image is counted once. In training the next readable row takes its place (same augmentation seed), so
    a batch is never empty and every process runs the same number of steps.

    With ``encoded=True`` (decoding on the model's device), a plain JPEG (RGB or grayscale) is handed over as its
    file's bytes, ``{"encoded": uint8 1-D, ...}``, to be decoded, resized and cropped in batches by
    `device_decode.decode_batch`; anything else is decoded here.
    """

    def __init__(
        self,
        table: ImageTable,
        transform: Callable[[Image.Image | torch.Tensor], torch.Tensor],
        on_bad_image: str = "skip",
        encoded: bool = False,
        replace_unreadable: bool = False,
        with_path: bool = False,
    ) -> None:
        self.table = table
        self.with_path = with_path
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.encoded = encoded
        self.replace_unreadable = replace_unreadable

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        unreadable: list[tuple[str, str]] = []
        for attempt in range(MAX_UNREADABLE_IN_A_ROW if self.replace_unreadable else 1):
            row = (i + attempt) % len(self.table)
            try:
                item = self._read(row, seed)
            except Exception as err:
                if not raised_by_decoder(err):
                    raise
                reason = f"{type(err).__name__}: {err}"
                if self.on_bad_image == "error":
                    raise bad_image_error(self.table.describe(row), reason) from err
                unreadable.append((self.table.describe(row), reason))
                continue
            return {**item, "unreadable": unreadable} if unreadable else item
        if not self.replace_unreadable:
            return {"unreadable": unreadable}
        raise ValueError(
            f"{MAX_UNREADABLE_IN_A_ROW} unreadable images in a row from {self.table.describe(i)} on (the last: "
            f"{unreadable[-1][0]}: {unreadable[-1][1]}); check that the data folder holds images."
        )

    def _read(self, i: int, seed: int | None) -> dict[str, Any]:
        # What PIL says about a file it still reads (a TIFF tag in an EXIF block "larger than file", say) is
        # collected with the item and reported once per run, not printed once per image and epoch.
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            item = self._decode(i, seed)
        if said:
            notes = "; ".join(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in said))
            item["image_warnings"] = [(self.table.describe(i), notes)]
        return item

    def _decode(self, i: int, seed: int | None) -> dict[str, Any]:
        with self.table.read(i) as image:
            if self.encoded and isinstance(image, Image.Image) and image.format == "JPEG" and image.mode in ("RGB", "L"):
                encoded = self.table.read_bytes(i)
                if encoded is not None:
                    data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
                    item = {"encoded": data, "source": self.table.describe(i), "labels": self.table.labels[i], "index": i}
                    return {**item, "path": item["source"]} if self.with_path else item
            if seed is None:
                pixels = self.transform(image)
            else:
                with seeded_cpu_rng(seed):
                    pixels = self.transform(image)
        item = {"pixel_values": pixels, "labels": self.table.labels[i], "index": i}
        return {**item, "path": self.table.describe(i)} if self.with_path else item


def collate_skipping_bad_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`default_collate` over the readable items; the unreadable files travel as ``batch["skipped"]`` (a list of
    ``(where, reason)``). Encoded JPEGs (`ImageDataset` with ``encoded=True``) travel as a list,
    ``batch["encoded"]``, with their places in the batch, ``batch["encoded_at"]``; the others' pixels are stacked
    as ``pixel_values``."""
    good = [item for item in items if "pixel_values" in item or "encoded" in item]
    batch: dict[str, Any] = {}
    if good:
        encoded_at = [n for n, item in enumerate(good) if "encoded" in item]
        batch = torch.utils.data.default_collate([{"labels": item["labels"], "index": item["index"]} for item in good])
        if "path" in good[0]:
            batch["path"] = [item.get("path", item.get("source")) for item in good]
        decoded = [item["pixel_values"] for item in good if "pixel_values" in item]
        if decoded:
            batch["pixel_values"] = torch.utils.data.default_collate(decoded)  # in workers: into shared memory
        if encoded_at:
            batch["encoded"] = [good[n]["encoded"] for n in encoded_at]
            batch["encoded_at"] = encoded_at
            batch["encoded_sources"] = [good[n]["source"] for n in encoded_at]
    batch["skipped"] = [pair for item in items for pair in item.get("unreadable", [])]
    batch["image_warnings"] = [pair for item in items for pair in item.get("image_warnings", [])]
    return batch
