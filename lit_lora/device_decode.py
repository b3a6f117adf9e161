"""Evaluation and prediction images decoded on the model's device.

With ``decode_on_device``, loader workers only read JPEG files; the batch's JPEGs are decoded together by
``torchvision.io.decode_jpeg`` on the device the model runs on (nvJPEG on a GPU, libjpeg-turbo on a CPU), then
resized and centre-cropped there by `transforms.eval_pixels`, the evaluation transform every other path uses. On the
CPU the decoded pixels equal PIL's (all 201 photos of ``../shared/food101-sample``), so predictions are those of
``fast_decode: false``. A file the batch decoder rejects is decoded alone, then by PIL on the CPU; one that nothing
reads is skipped and reported like any unreadable image (or stops the run with ``on_bad_image: error``).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from lit_lora.images import BAD_IMAGE_ERRORS, bad_image_error
from lit_lora.transforms import EvalTransform, ImageSettings, eval_pixels


def _decode_each(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """Decode JPEGs together on ``device``; if the batch call fails, one by one, keeping each one's error."""
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError:
        pass
    decoded: list[torch.Tensor | Exception] = []
    for data in encoded:
        try:
            decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
        except RuntimeError as err:
            decoded.append(err)
    return decoded


def decode_batch(batch: dict[str, Any], settings: ImageSettings, device: torch.device, on_bad_image: str = "skip") -> dict[str, Any]:
    """Replace ``batch["encoded"]`` (JPEG bytes, see `images.collate_skipping_bad_images`) by evaluation pixels on
    ``device``, merged in order with the batch's other pixels. Unreadable files go to ``batch["skipped"]``."""
    encoded, encoded_at, sources = batch.pop("encoded", None), batch.pop("encoded_at", None), batch.pop("encoded_sources", None)
    if not encoded:
        return batch
    total = len(batch["labels"])
    others = iter(batch.pop("pixel_values", torch.empty(0)).to(device))
    encoded_pixels = {}
    failed: dict[int, str] = {}
    where = dict(zip(encoded_at, sources))
    fallback = EvalTransform(settings)
    for place, data, decoded in zip(encoded_at, encoded, _decode_each(encoded, device)):
        if isinstance(decoded, torch.Tensor):
            encoded_pixels[place] = eval_pixels(decoded, settings)
            continue
        try:  # what the device's decoder rejects, PIL may still read (and if it cannot, says why)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                encoded_pixels[place] = fallback(image).to(device)
        except BAD_IMAGE_ERRORS as err:
            failed[place] = f"{type(err).__name__}: {err}"
    keep = [n for n in range(total) if n not in failed]
    pixels = [encoded_pixels[n] if n in encoded_pixels else next(others) for n in range(total) if n not in failed]
    if failed:
        if on_bad_image == "error":
            first = min(failed)
            raise bad_image_error(where[first], failed[first])
        batch["skipped"] = list(batch.get("skipped", [])) + [(where[n], failed[n]) for n in failed]
        batch["labels"], batch["index"] = batch["labels"][keep], batch["index"][keep]
        if "path" in batch:
            batch["path"] = [batch["path"][n] for n in keep]
    if pixels:
        batch["pixel_values"] = torch.stack([p.contiguous() for p in pixels])
    else:
        for key in ("labels", "index", "path"):
            batch.pop(key, None)
    return batch
