"""Decoding evaluation images on the model's device (here the CPU): the same pixels as the exact CPU path, odd files
taking that path, unreadable ones skipped or stopping the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_lora import Food101DataModule
from lit_lora.images import BadImageError


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JPEGs of several shapes, a grayscale and an EXIF-rotated one, a CMYK JPEG, a PNG, and a broken .jpg."""
    from lit_lora.demo import shape_image

    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(3)
    for i, size in enumerate([(61, 47), (47, 61), (90, 40), (48, 48)]):
        Image.fromarray(shape_image("tomato", rng)).resize(size).save(folder / f"a{i}.jpg", quality=90)
    Image.fromarray(shape_image("matcha", rng)).convert("L").save(folder / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    Image.fromarray(shape_image("banana", rng)).resize((60, 40)).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(shape_image("blueberry", rng)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(shape_image("banana", rng)).save(folder / "b.png")
    (folder / "broken.jpg").write_bytes((folder / "a0.jpg").read_bytes()[:200])
    return folder


def predict_batches(folder: Path, tiny_vit: str, **options) -> tuple[torch.Tensor, torch.Tensor, list]:
    module = Food101DataModule(predict_dir=str(folder), class_names=["a", "b"], image_processor=tiny_vit, num_workers=0, batch_size=4, **options)
    module.setup("predict")
    pixels, index = [], []
    for batch in module.predict_dataloader():
        batch = module.on_after_batch_transfer(module.on_before_batch_transfer(batch, 0), 0)
        if "pixel_values" in batch:
            pixels.append(batch["pixel_values"])
            index.append(batch["index"])
    return torch.cat(pixels), torch.cat(index), sorted(module.skipped_images)


def test_device_decoding_gives_the_exact_paths_pixels(odd_images: Path, tiny_vit: str) -> None:
    on_device, index, skipped = predict_batches(odd_images, tiny_vit, decode_on_device=True, fast_decode=False)
    exact, exact_index, exact_skipped = predict_batches(odd_images, tiny_vit, decode_on_device=False, fast_decode=False)
    assert torch.equal(index, exact_index) and len(index) == 8
    assert torch.equal(on_device, exact)  # libjpeg-turbo through torchvision decodes as PIL does, then the same resize
    assert skipped == exact_skipped == [str(odd_images / "broken.jpg")]


def test_device_decoding_stops_on_an_unreadable_file_when_asked(odd_images: Path, tiny_vit: str) -> None:
    with pytest.raises(BadImageError, match=r"cannot read image .*broken.jpg .*--data.on_bad_image skip"):
        predict_batches(odd_images, tiny_vit, decode_on_device=True, on_bad_image="error")
