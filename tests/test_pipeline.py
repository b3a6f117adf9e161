"""The fast input pipeline: header-first JPEG crops, and optimized (pre-resized) images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lit_lora.transforms import ImageSettings, eval_transform, train_transform

SETTINGS = ImageSettings(crop=(64, 64), resize=64)


def photo(path: Path, size: tuple[int, int], seed: int = 0, fmt: str = "JPEG") -> Path:
    """A smooth image with detail at every scale (like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    Image.blend(base, detail, 0.3).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def run(transform, path: Path, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with Image.open(path) as image:
        return transform(image).int()


def test_fast_eval_crop_matches_the_exact_path_within_a_few_levels(tmp_path: Path) -> None:
    path = photo(tmp_path / "a.jpg", (320, 240))  # decoded at 1/2 scale: 160x120 still covers a 64 px crop
    fast, guide = run(eval_transform(SETTINGS, True), path, 0), run(eval_transform(SETTINGS, False), path, 0)
    assert fast.shape == guide.shape == (3, 64, 64) and fast.dtype == torch.int32
    difference = (fast - guide).abs().float()
    assert difference.mean() < 2.0 and difference.max() <= 24


def test_fast_train_crop_draws_the_guides_crops(tmp_path: Path) -> None:
    path = photo(tmp_path / "a.jpg", (320, 240))
    differences = [
        (run(train_transform(SETTINGS, True), path, seed) - run(train_transform(SETTINGS, False), path, seed)).abs().float().mean()
        for seed in range(20)
    ]
    # Same seed -> same crop box and flip; only the decoder's scaling differs.
    assert max(differences) < 4.0
    assert not torch.equal(run(train_transform(SETTINGS, True), path, 0), run(train_transform(SETTINGS, True), path, 1))


def test_non_jpeg_images_take_the_exact_path(tmp_path: Path) -> None:
    path = photo(tmp_path / "a.png", (100, 80), fmt="PNG")
    for make in (train_transform, eval_transform):
        assert torch.equal(run(make(SETTINGS, True), path, 3), run(make(SETTINGS, False), path, 3))



def test_optimized_images_train_on_the_guides_crops_and_evaluate_on_exactly_the_files_pixels(tmp_path: Path, tiny_vit: str) -> None:
    from lit_lora import Food101DataModule
    from lit_lora.streaming import OptimizedImages
    from lit_lora.transforms import load_image_settings

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(4):
            photo(tmp_path / "images" / label / f"{i}.jpg", (160 + 8 * i, 120), seed=i + (label == "b") * 10)
    module = Food101DataModule(data_dir=str(tmp_path / "images"), train_split="train", val_size=0.5, num_workers=1, image_processor=tiny_vit,
                               optimized_dir=str(tmp_path / "optimized"), optimized_train_side=40)
    module.prepare_data()
    module.setup("fit")
    files = Food101DataModule(data_dir=str(tmp_path / "images"), train_split="train", val_size=0.5, num_workers=0, image_processor=tiny_vit)
    files.setup("fit")
    settings = load_image_settings(tiny_vit)
    stored = {item["path"]: item["pixel_values"] for item in OptimizedImages(str(tmp_path / "optimized" / "val"))}
    assert sorted(stored) == sorted(files.val_table.paths)
    for path, pixels in stored.items():  # the exported processor's pixels, to the bit
        with Image.open(path) as image:
            assert torch.equal(pixels, eval_transform(settings)(image))
    raw = OptimizedImages(str(tmp_path / "optimized" / "train"))
    assert all(min(item["pixel_values"].shape[1:]) == 40 for item in raw)  # pre-resized to the training side

    def crops(epoch: int) -> dict[str, torch.Tensor]:
        module.train_table.set_epoch(epoch)
        return {item["path"]: item["pixel_values"] for item in module.train_table}

    first = crops(1)
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.uint8 for c in first.values())
    # The augmentation is a function of (seed, epoch, index): read again, the same crops; next epoch, new ones.
    assert all(torch.equal(c, first[path]) for path, c in crops(1).items())
    assert sum(not torch.equal(c, first[path]) for path, c in crops(2).items()) >= 3

