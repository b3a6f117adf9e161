"""Preprocessing resolved from the model's image processor, the way that processor means it.

`settings_from_processor` reads what a model expects (crop size, the shorter side to resize to before the centre
crop, interpolation, mean and std) from its image processor, as timm's ``resolve_data_config`` does with
``crop_pct``: ViT and Swin (``size`` 224, no crop; BEiT's transformers 5 defaults too) get the guide's
resize-224-then-crop-224; DeiT (``size`` 256, ``crop_size`` 224), DINOv2 (``shortest_edge`` 256, crop 224) and
ConvNeXt (``shortest_edge`` 224, ``crop_pct`` 0.875) resize the shorter side to 256 and crop 224. Training crops are ``RandomResizedCrop`` at the
crop size.

Evaluation is exactly what `transformers`' ``BitImageProcessor`` (torchvision backend, the default) does with
``size={"shortest_edge": R}``, ``crop_size`` and the same resample: `export_processor` writes that processor next
to every adapter and merged model, so ``pipeline("image-classification")`` and ``AutoImageProcessor`` give the
pixels lit_lora validated on (`eval_pixels`, tested against it).

Workers hand over uint8 tensors; scaling and normalising happen in the model (`normalize`), on the device.

``fast_decode`` computes the crops from the JPEG header first (`FastTrainCrop`, `FastEvalCrop`), so libjpeg can
decode at 1/2, 1/4 or 1/8 scale (``Image.draft``) whenever the crop keeps full output resolution; a box on whole
decoded pixels is then cropped and resized by torch's antialiased kernel, any other by one PIL box resize. Training
crops have the guide's distribution (on by default: augmentation is random anyway); evaluation pixels would differ
from the exact path by about a grey level (`benchmarks/decode.py` measures it), so evaluation and predict use it only
when asked (``fast_eval_decode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvF

from lit_lora.images import exif_orientation, to_rgb

# ViTImageProcessor's defaults, used when no image processor is named.
DEFAULT_SIZE = 224
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
# PIL resample codes (what processors store) that torchvision and PIL both offer with antialiasing.
RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}

# What the transforms take: a lazily opened PIL image, or decoded uint8 CHW pixels (optimized images).
Picture = Image.Image | torch.Tensor


@dataclass(frozen=True)
class ImageSettings:
    """What the model expects of its input.

    Attributes:
        crop: (height, width) of the pixels the model receives.
        resize: evaluation resizes the shorter side to this, then centre-crops ``crop``; None resizes straight to
            ``crop`` (only for processors that ask for a non-square size without a crop).
        mean: per-channel mean, in [0, 1] units.
        std: per-channel std, in [0, 1] units.
        interpolation: ``bilinear`` or ``bicubic`` (the processor's resample), antialiased.
    """

    crop: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)
    resize: int | None = DEFAULT_SIZE
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    interpolation: str = "bilinear"


def _size_dict(size: Any) -> dict[str, int]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    items = dict(size.items()) if hasattr(size, "items") else dict(vars(size))
    return {key: int(value) for key, value in items.items() if value is not None}


def settings_from_processor(processor: Any) -> ImageSettings:
    """Resolve crop, resize side, interpolation, mean and std from a transformers image processor.

    - ``do_center_crop`` with ``crop_size``: crop that; resize the shorter side to ``size`` (``shortest_edge``, or
      the smaller of ``height``/``width``): DeiT, DINOv2, BEiT processors that crop.
    - ``shortest_edge`` with ``crop_pct`` (ConvNeXt): below 384 px, resize to ``shortest_edge / crop_pct`` and crop
      ``shortest_edge``; from 384 px on, the processor warps to a square: resize and crop at ``shortest_edge``.
    - square ``size`` without a crop (ViT, Swin): the guide's resize-then-centre-crop at that size.
    """
    size = _size_dict(getattr(processor, "size", None))
    crop_size = _size_dict(getattr(processor, "crop_size", None))
    shortest = size.get("shortest_edge")
    crop_pct = getattr(processor, "crop_pct", None)
    resize: int | None
    if getattr(processor, "do_center_crop", False) and crop_size.get("height"):
        crop = (crop_size["height"], crop_size["width"])
        resize = shortest or min(size.get("height", crop[0]), size.get("width", crop[1]))
    elif shortest and crop_pct:
        crop = (shortest, shortest)
        resize = int(shortest / crop_pct) if shortest < 384 else shortest
    elif shortest:
        crop, resize = (shortest, shortest), shortest
    elif size.get("height") and size.get("width"):
        crop = (size["height"], size["width"])
        resize = crop[0] if crop[0] == crop[1] else None
    else:
        raise ValueError(f"{type(processor).__name__} has no size lit_lora understands ({size}); save a processor with size and crop_size.")
    resample = int(getattr(processor, "resample", 2) or 2)
    return ImageSettings(
        crop=crop,
        resize=resize,
        mean=tuple(float(m) for m in processor.image_mean),
        std=tuple(float(s) for s in processor.image_std),
        interpolation=RESAMPLE_NAMES.get(resample, "bilinear"),
    )


def load_image_settings(name_or_path: str) -> ImageSettings:
    """`settings_from_processor` of the image processor saved with a model (hub id or local folder).

    Raises:
        ValueError: there is no loadable image processor there.
    """
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the image processor of {name_or_path!r} ({' '.join(str(err).split())}). Pass a hub "
            "id that is cached (offline) or a local folder holding preprocessor_config.json."
        ) from err
    return settings_from_processor(processor)


def export_processor(settings: ImageSettings) -> Any:
    """A stock transformers image processor (``BitImageProcessor``) that computes exactly `eval_pixels` followed by
    the model's normalisation: what adapter folders and merged exports carry, so stock tools predict what lit_lora
    validated."""
    from transformers import BitImageProcessor

    resample = {name: code for code, name in RESAMPLE_NAMES.items()}[settings.interpolation]
    height, width = settings.crop
    common = dict(resample=resample, image_mean=list(settings.mean), image_std=list(settings.std), do_convert_rgb=True)
    if settings.resize is None:
        return BitImageProcessor(size={"height": height, "width": width}, do_center_crop=False, **common)
    return BitImageProcessor(
        size={"shortest_edge": settings.resize}, crop_size={"height": height, "width": width}, do_center_crop=True, **common
    )


def shorter_side_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``side``: torchvision's ``Resize(side)`` and transformers'
    ``shortest_edge`` rule (the longer side is truncated, not rounded)."""
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def center_crop_box(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of transformers' centre crop: offsets rounded down (torchvision's ``CenterCrop`` rounds half to
    even, one pixel apart on some sizes)."""
    return int((height - crop[0]) / 2.0), int((width - crop[1]) / 2.0)


def _interpolation(settings: ImageSettings) -> v2.InterpolationMode:
    return v2.InterpolationMode(settings.interpolation)


def eval_pixels(pixels: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """uint8 CHW pixels resized and centre-cropped for evaluation, as the exported ``BitImageProcessor`` does it
    (same torchvision kernel, same sizes and offsets). Works on any device, for one image or a batch."""
    mode = _interpolation(settings)
    if settings.resize is None:
        return tvF.resize(pixels, list(settings.crop), interpolation=mode, antialias=True)
    height, width = pixels.shape[-2:]
    shape = shorter_side_shape(height, width, settings.resize)
    if shape != (height, width):
        pixels = tvF.resize(pixels, list(shape), interpolation=mode, antialias=True)
    height, width = shape
    if settings.crop[0] > height or settings.crop[1] > width:  # transformers pads small images with zeros
        pad_w, pad_h = max(settings.crop[1] - width, 0), max(settings.crop[0] - height, 0)
        pixels = tvF.pad(pixels, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
        height, width = pixels.shape[-2:]
    top, left = center_crop_box(height, width, settings.crop)
    return pixels[..., top : top + settings.crop[0], left : left + settings.crop[1]]


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """uint8 CHW pixels as an RGB PIL image (the inverse of `_to_tensor`)."""
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _upright_pixels(image: Picture) -> torch.Tensor:
    """uint8 CHW pixels of an upright RGB image (optimized images are already that)."""
    return image if isinstance(image, torch.Tensor) else _to_tensor(to_rgb(image))


class EvalTransform:
    """Evaluation preprocessing ending in uint8: decode, then `eval_pixels` (exactly the exported processor)."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings

    def __call__(self, image: Picture) -> torch.Tensor:
        return eval_pixels(_upright_pixels(image), self.settings).contiguous()


class GuideTrainTransform:
    """The guide's training augmentation, ending in uint8: RandomResizedCrop, RandomHorizontalFlip. A class, not a
    closure: loader workers started with ``spawn`` or ``forkserver`` (macOS's and Python 3.14's default) receive the
    dataset, transforms included, pickled."""

    def __init__(self, settings: ImageSettings) -> None:
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(settings.crop, interpolation=_interpolation(settings), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
            ]
        )

    def __call__(self, image: Picture) -> torch.Tensor:
        return self.augment(_to_pil(image) if isinstance(image, torch.Tensor) else to_rgb(image))


def _width_height(image: Picture) -> tuple[int, int]:
    return (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size


def _crop_first(image: Picture) -> bool:
    """Whether the crop can be computed before decoding: a JPEG upright as stored (EXIF rotation would move the
    crop), or pixels already decoded (optimized images)."""
    if isinstance(image, torch.Tensor):
        return True
    return image.format == "JPEG" and exif_orientation(image) == 1


def _whole_pixels(box: tuple[float, float, float, float]) -> tuple[int, int, int, int] | None:
    """``box`` in whole pixels, or None when a side falls between pixels."""
    return tuple(int(v) for v in box) if all(float(v).is_integer() for v in box) else None  # type: ignore[return-value]


def _resize_crop(crop: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """uint8 CHW ``crop`` resized to the crop size by torch's antialiased kernel (PIL's filter within a level)."""
    return tvF.resize(crop, list(settings.crop), interpolation=_interpolation(settings), antialias=True)


def _crop_resize(image: Picture, box: tuple[float, float, float, float], settings: ImageSettings) -> torch.Tensor:
    """Crop ``box`` (in the image's full-size coordinates) and resize it to the crop size (uint8 CHW), decoding as
    little as possible."""
    if isinstance(image, torch.Tensor):
        whole = _whole_pixels(box)
        if whole is not None:  # decoded pixels: crop as a view
            left, top, right, bottom = whole
            return _resize_crop(image[:, top:bottom, left:right], settings)
        image = _to_pil(image)  # a fractional box: PIL's box resize below
    full_w, full_h = image.size
    left, top, right, bottom = box
    out_h, out_w = settings.crop
    if image.format == "JPEG":
        # Ask for the smallest decode in which the box still has at least the output's pixels.
        need_w = math.ceil(full_w * out_w / max(right - left, 1e-6))
        need_h = math.ceil(full_h * out_h / max(bottom - top, 1e-6))
        if need_w < full_w and need_h < full_h:
            image.draft("RGB", (need_w, need_h))
    sx, sy = image.size[0] / full_w, image.size[1] / full_h
    scaled = (left * sx, top * sy, right * sx, bottom * sy)
    whole = _whole_pixels(scaled)
    if image.mode == "RGB" and whole is not None:
        # The box on whole pixels of the decode (any box at full scale): a copy of the decoded box, resized by torch
        # (0.11-0.16 ms against PIL's box resize 0.59 ms for 150-500 px boxes to 224 px on one thread: a fifth to a
        # quarter of a loader worker's time per image from 512 px JPEGs).
        left, top, right, bottom = whole
        return _resize_crop(torch.from_numpy(np.array(np.asarray(image)[top:bottom, left:right])).permute(2, 0, 1), settings)
    image = to_rgb(image) if image.mode not in ("RGB", "L") else image
    resample = Image.BICUBIC if settings.interpolation == "bicubic" else Image.BILINEAR
    # One resize of the box (no cropped copy); unlike crop-then-resize, the filter also weighs in the pixels just
    # outside the box at its edges (0.06-0.09 grey levels on average on real photos: benchmarks/decode.py).
    resized = image.resize((out_w, out_h), resample, box=scaled)
    return _to_tensor(resized.convert("RGB") if resized.mode != "RGB" else resized)


class FastTrainCrop:
    """The guide's RandomResizedCrop + RandomHorizontalFlip, with the crop chosen before decoding.

    Crop parameters come from torchvision (`RandomResizedCrop.get_params`, the same distribution), computed on
    the header's size; the decoder then works at the smallest scale that keeps the crop at full output resolution.
    Images that are neither plain JPEGs nor decoded pixels take the guide's path.
    """

    def __init__(self, settings: ImageSettings, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        self.settings = settings
        self.scale = list(scale)
        self.ratio = list(ratio)
        self.fallback = GuideTrainTransform(settings)

    def __call__(self, image: Picture) -> torch.Tensor:
        if isinstance(image, Image.Image) and image.format is None and image.mode == "RGB":
            image = _to_tensor(image)  # pixels in memory already: crop them as a tensor
        if not _crop_first(image):
            return self.fallback(image)
        width, height = _width_height(image)
        top, left, h, w = v2.RandomResizedCrop.get_params(torch.empty(0, height, width), self.scale, self.ratio)
        cropped = _crop_resize(image, (left, top, left + w, top + h), self.settings)
        return cropped.flip(-1) if torch.rand(1).item() < 0.5 else cropped


class FastEvalCrop:
    """`EvalTransform`'s resize and centre crop as one box resize, decoding JPEGs at reduced scale where possible."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings
        self.exact = EvalTransform(settings)

    def __call__(self, image: Picture) -> torch.Tensor:
        if isinstance(image, torch.Tensor) or not _crop_first(image) or self.settings.resize is None:
            return self.exact(image)
        w, h = _width_height(image)
        resized_h, resized_w = shorter_side_shape(h, w, self.settings.resize)
        if self.settings.crop[0] > resized_h or self.settings.crop[1] > resized_w:
            return self.exact(image)
        top, left = center_crop_box(resized_h, resized_w, self.settings.crop)
        sx, sy = w / resized_w, h / resized_h
        out_h, out_w = self.settings.crop
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return _crop_resize(image, box, self.settings)


def train_transform(settings: ImageSettings, fast_decode: bool = True) -> Callable[[Picture], torch.Tensor]:
    """Training augmentation ending in uint8: `FastTrainCrop`, or the guide's torchvision transforms."""
    return FastTrainCrop(settings) if fast_decode else GuideTrainTransform(settings)


def eval_transform(settings: ImageSettings, fast_decode: bool = False) -> Callable[[Picture], torch.Tensor]:
    """Evaluation preprocessing ending in uint8: exactly the exported processor's, or (an approximation the user
    opts into) `FastEvalCrop`."""
    return FastEvalCrop(settings) if fast_decode else EvalTransform(settings)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW → float32 ``(x - 255 mean) / (255 std)``: transformers' fused rescale-and-normalise, to the bit.

    ``mean`` and ``std`` are in [0, 1] units, as processors store them. The subtraction and division work in place
    on the one float copy (on 2 CPU cores 27 against 64 ms for a 128-image batch at 224 px; same rounding).
    """
    scale = 1.0 / (1.0 / 255.0)  # transformers divides by its rescale_factor (1/255), not multiplies by 255
    shift = (mean * scale).view(1, -1, 1, 1)
    spread = (std * scale).view(1, -1, 1, 1)
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).sub_(shift).div_(spread)


def float_pixels_problem(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[str, bool] | None:
    """What is wrong with a batch of float ``pixels`` that should be the image processor's output (rescaled to [0, 1],
    then normalised with ``mean`` and ``std``), as ``(message, certain)``; None when they may be.

    ``certain``: values beyond anything normalisation gives (0-255 floats: ``.float()`` on uint8 pixels). Otherwise
    (not certain) every value in [0, 1] where normalisation gives negative values: torchvision's ``ToTensor`` output,
    not normalised (a batch of very bright images only could be both). Either way the model would learn on inputs that
    stock tools, which normalise, never give it."""
    low, high = (float(v) for v in torch.aminmax(pixels.detach().float()))
    lowest = min((0.0 - m) / s for m, s in zip(mean, std))
    highest = max((1.0 - m) / s for m, s in zip(mean, std))
    expected = f"uint8 0-255 (normalised by the model) or floats rescaled to [0, 1] and normalised with mean {list(mean)} and std {list(std)} (the image processor's output)"
    if high > 2 * highest + 1:
        return f"float pixel_values reach {high:.1f}, beyond the {highest:.2f} that normalised pixels reach: give {expected}", True
    if lowest < 0 and 0.0 <= low and high <= 1.0:
        return f"float pixel_values all lie in [0, 1], as torchvision's ToTensor gives, but are not normalised: give {expected}", False
    return None
