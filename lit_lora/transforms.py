"""Preprocessing resolved from the model's image processor (size, mean, std), as the PEFT guide builds it.

Workers do the geometric part and hand over uint8 tensors; scaling to [0, 1] and normalising happen on the
device after transfer (`normalize_on_device`), which gives the guide's numbers with a quarter of the traffic.

Two ways to do the geometric part, both taking a lazily opened PIL image (or, from the image cache, a uint8 CHW
tensor viewing the cached pixels) and returning uint8 CHW:

- the guide's torchvision transforms on the fully decoded image (`guide_train_transform`, `guide_eval_transform`);
- the same crops computed from the image header first (`FastTrainCrop`, `FastEvalCrop`), so that the JPEG
  decoder can skip what the crop throws away: libjpeg decodes at 1/2, 1/4 or 1/8 scale (``Image.draft``)
  whenever the crop still has at least the output's resolution at that scale, and crop + resize are one
  antialiased ``Image.resize(box=...)``. torchvision cannot do this: its transforms start from decoded pixels.
  Pixels from the image cache are already decoded: they arrive as a tensor view of the cache file, are cropped as
  a view and resized with torch's uint8 antialiased bilinear kernel (PIL's filter to within one grey level, about
  3x faster than PIL's resize), without ever being copied whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms import v2

from lit_lora.images import exif_orientation, to_rgb

# ViTImageProcessor's defaults, used when no image processor is named.
DEFAULT_SIZE = 224
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)

# What the transforms take: a lazily opened PIL image, or decoded uint8 CHW pixels (`CachedTable.read`).
Picture = Image.Image | torch.Tensor


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


def _decoded(transform: Callable[[Image.Image], torch.Tensor]) -> Callable[[Picture], torch.Tensor]:
    """``transform`` (torchvision on PIL images) applied to an upright RGB image; cached pixels become one first."""

    def apply(image: Picture) -> torch.Tensor:
        return transform(_to_pil(image) if isinstance(image, torch.Tensor) else to_rgb(image))

    return apply


def guide_train_transform(settings: ImageSettings) -> Callable[[Picture], torch.Tensor]:
    """The guide's training augmentation, ending in uint8: RandomResizedCrop, RandomHorizontalFlip."""
    return _decoded(v2.Compose([v2.RandomResizedCrop(settings.size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]))


def guide_eval_transform(settings: ImageSettings) -> Callable[[Picture], torch.Tensor]:
    """The guide's evaluation preprocessing, ending in uint8: Resize, CenterCrop."""
    return _decoded(v2.Compose([v2.Resize(settings.size, antialias=True), v2.CenterCrop(settings.size), v2.PILToTensor()]))


def _output_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the crop."""
    return (size, size) if isinstance(size, int) else size


def _width_height(image: Picture) -> tuple[int, int]:
    return (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size


def _crop_first(image: Picture) -> bool:
    """Whether the crop can be computed before decoding: a JPEG upright as stored (EXIF rotation would move the
    crop), or pixels already decoded (the image cache's: a tensor, or an in-memory RGB image)."""
    if isinstance(image, torch.Tensor):
        return True
    if image.format is None:
        return image.mode == "RGB"
    return image.format == "JPEG" and exif_orientation(image) == 1


def _crop_resize(image: Picture, box: tuple[float, float, float, float], out_hw: tuple[int, int]) -> torch.Tensor:
    """Crop ``box`` (in the image's full-size coordinates) and resize it to ``out_hw`` (uint8 CHW), decoding as
    little as possible."""
    whole_pixels = all(float(v).is_integer() for v in box)
    if isinstance(image, Image.Image) and image.format is None and whole_pixels:
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # in memory already: the tensor path
    if isinstance(image, torch.Tensor):
        if whole_pixels:
            # Decoded pixels: crop as a view, resize with torch's antialiased bilinear kernel for uint8, which is
            # PIL's filter (within one grey level) at about a third of PIL's time.
            left, top, right, bottom = (int(v) for v in box)
            return resize_uint8(image[:, top:bottom, left:right], *out_hw)
        image = _to_pil(image)  # a fractional box: PIL's box resize below
    full_w, full_h = image.size
    left, top, right, bottom = box
    out_h, out_w = out_hw
    if image.format == "JPEG":
        # Ask for the smallest decode in which the box still has at least the output's pixels.
        need_w = math.ceil(full_w * out_w / max(right - left, 1e-6))
        need_h = math.ceil(full_h * out_h / max(bottom - top, 1e-6))
        if need_w < full_w and need_h < full_h:
            image.draft("RGB", (need_w, need_h))
    sx, sy = image.size[0] / full_w, image.size[1] / full_h
    image = to_rgb(image) if image.mode not in ("RGB", "L") else image
    # One resize of the box (no cropped copy); unlike crop-then-resize, the filter also weighs in the pixels just
    # outside the box at its edges (0.06-0.09 grey levels on average on real photos: benchmarks/decode.py).
    resized = image.resize((out_w, out_h), Image.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy))
    return _to_tensor(resized.convert("RGB") if resized.mode != "RGB" else resized)


def resize_uint8(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 CHW pixels resized to ``height`` x ``width`` with torch's antialiased bilinear kernel for uint8: PIL's
    filter to within one grey level, in a third to a half of PIL's time. Pixels already that size are returned.

    Pixels that are channels-last in memory (views of an HWC array, as decoded images and the image cache's are)
    come back channels-last too: torch's uint8 kernel works that way inside, and writing its result straight into
    such an output skips its conversion back to CHW (0.095 against 0.16 ms for a crop to 224 px; 0.23 against
    0.60 ms for a 512x384 photo to 341x256 when the cache then wants HWC). `stack_images` keeps that layout.
    """
    if pixels.shape[1:] == (height, width):
        return pixels
    if pixels.stride(0) != 1:  # CHW planes: torch's own layout choice
        return torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True)[0]
    out = torch.empty((1, pixels.shape[0], height, width), dtype=torch.uint8, memory_format=torch.channels_last)
    torch.ops.aten._upsample_bilinear2d_aa.out(pixels[None], [height, width], False, None, None, out=out)
    return out[0]


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """uint8 CHW pixels as an RGB PIL image (the inverse of `_to_tensor`)."""
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class FastTrainCrop:
    """The guide's RandomResizedCrop + RandomHorizontalFlip, with the crop chosen before decoding.

    Crop parameters come from torchvision (`RandomResizedCrop.get_params`, the same distribution), computed on
    the header's size; the decoder then works at the smallest scale that keeps the crop at full output resolution.
    Images that are neither plain JPEGs nor cached pixels take the guide's path.
    """

    def __init__(self, settings: ImageSettings, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.out_hw = _output_size(settings.size)
        self.scale = list(scale)
        self.ratio = list(ratio)
        self.fallback = guide_train_transform(settings)

    def __call__(self, image: Picture) -> torch.Tensor:
        if not _crop_first(image):
            return self.fallback(image)
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        cropped = _crop_resize(image, (left, top, left + width, top + height), self.out_hw)
        return cropped.flip(-1) if torch.rand(1).item() < 0.5 else cropped


class FastEvalCrop:
    """The guide's Resize(shorter side) + CenterCrop as one box resize, decoding at reduced scale where possible."""

    def __init__(self, settings: ImageSettings) -> None:
        self.size = settings.size
        self.out_hw = _output_size(settings.size)
        self.fallback = guide_eval_transform(settings)

    def __call__(self, image: Picture) -> torch.Tensor:
        if not _crop_first(image):
            return self.fallback(image)
        w, h = _width_height(image)
        # The size torchvision's Resize would produce, then CenterCrop's offsets, mapped back to full size.
        resized_h, resized_w = F._compute_resized_output_size((h, w), [self.size] if isinstance(self.size, int) else list(self.size))
        out_h, out_w = self.out_hw
        top, left = round((resized_h - out_h) / 2.0), round((resized_w - out_w) / 2.0)
        sx, sy = w / resized_w, h / resized_h
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return _crop_resize(image, box, self.out_hw)


def train_transform(settings: ImageSettings, fast_decode: bool = True) -> Callable[[Picture], torch.Tensor]:
    """Training augmentation ending in uint8: `FastTrainCrop`, or the guide's torchvision transforms."""
    return FastTrainCrop(settings) if fast_decode else guide_train_transform(settings)


def eval_transform(settings: ImageSettings, fast_decode: bool = True) -> Callable[[Picture], torch.Tensor]:
    """Evaluation preprocessing ending in uint8: `FastEvalCrop`, or the guide's torchvision transforms."""
    return FastEvalCrop(settings) if fast_decode else guide_eval_transform(settings)


def normalize_on_device(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW → float32 ``(x / 255 - mean) / std``, i.e. the guide's ``ToTensor`` + ``Normalize``.

    Computed as ``x * (1 / (255 std)) - mean / std`` in place: one float copy of the batch instead of three. The
    result is contiguous NCHW whatever the batch's memory layout (`stack_images` may give channels-last).
    """
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device).copy_(pixels).mul_(scale).sub_(shift)
