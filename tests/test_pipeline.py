"""The fast input pipeline: header-first JPEG crops and the on-disk image cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_lora import cache as cache_module
from lit_lora.cache import CachedTable, cache_key, cached
from lit_lora.images import FileTable
from lit_lora.transforms import ImageSettings, eval_transform, train_transform

SETTINGS = ImageSettings(64, (0.5,) * 3, (0.5,) * 3)


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


def test_fast_eval_crop_matches_the_guides_within_a_few_levels(tmp_path: Path) -> None:
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


def test_non_jpeg_images_take_the_guides_path_exactly(tmp_path: Path) -> None:
    path = photo(tmp_path / "a.png", (100, 80), fmt="PNG")
    for make in (train_transform, eval_transform):
        assert torch.equal(run(make(SETTINGS, True), path, 3), run(make(SETTINGS, False), path, 3))


def test_cache_serves_resized_images_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [str(photo(tmp_path / f"{i}.jpg", (120, 90), seed=i)) for i in range(5)]
    paths.append(str(tmp_path / "gray.jpg"))
    Image.open(paths[0]).convert("L").save(paths[-1])
    table = FileTable(paths, [0, 1, 0, 1, 0, 1])
    served = cached(table, 48, tmp_path / "cache", num_workers=0)
    assert isinstance(served, CachedTable) and served.labels == table.labels
    for i in range(len(table)):
        image = served.open(i)
        assert image.mode == "RGB" and min(image.size) == 48 and image.size[0] / image.size[1] == pytest.approx(120 / 90, abs=0.03)
        original = np.asarray(table.load(i).resize(image.size, Image.BILINEAR), dtype=float)
        assert np.abs(np.asarray(image, dtype=float) - original).mean() < 3.0
    subset = served.subset([4, 1])
    assert subset.labels == [0, 1] and subset.describe(0) == paths[4]
    assert np.array_equal(np.asarray(subset.open(1)), np.asarray(served.open(1)))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(cache_module, "_Resize", no_rebuild)
    cached(table, 48, tmp_path / "cache", num_workers=0)  # same images: read, not rebuilt


def test_cache_key_follows_the_images(tmp_path: Path) -> None:
    paths = [str(photo(tmp_path / f"{i}.jpg", (60, 60), seed=i)) for i in range(2)]
    table = FileTable(paths, [0, 1])
    key = cache_key(table, 48)
    assert cache_key(table, 64) != key
    assert cache_key(table.subset([1, 0]), 48) != key
    photo(Path(paths[0]), (60, 60), seed=9)
    import os

    os.utime(paths[0], ns=(0, 10**9))
    assert cache_key(table, 48) != key


def test_interrupted_cache_build_leaves_nothing_that_reads_as_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [str(photo(tmp_path / f"{i}.jpg", (60, 60), seed=i)) for i in range(4)]
    table = FileTable(paths, [0, 1, 0, 1])
    original = cache_module._Resize.__getitem__

    def dies_at_third(self, i):
        if i == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the build
        return original(self, i)

    monkeypatch.setattr(cache_module._Resize, "__getitem__", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        cached(table, 32, tmp_path / "cache", num_workers=0)
    assert not (tmp_path / "cache" / cache_key(table, 32)).exists()
    assert not list((tmp_path / "cache").iterdir())  # the staging folder is gone too
    monkeypatch.setattr(cache_module._Resize, "__getitem__", original)
    assert len(cached(table, 32, tmp_path / "cache", num_workers=0)) == 4


def test_data_module_reads_from_the_cache(tmp_path: Path, food101_dir: str, tiny_vit: str) -> None:
    from lit_lora import Food101DataModule

    module = Food101DataModule(
        data_dir=food101_dir, train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit,
        cache_dir=str(tmp_path / "cache"), cache_short_side=40,
    )
    module.setup("fit")
    module.setup("test")
    assert isinstance(module.train_table, CachedTable) and isinstance(module.val_table, CachedTable)
    assert min(module.train_table.open(0).size) == 40 and min(module.val_table.open(0).size) == 32
    assert len(list((tmp_path / "cache").iterdir())) == 3  # train, validation and test
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (36, 3, 32, 32)
    plain = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit)
    plain.setup("fit")
    assert module.val_table.names == plain.val_table.paths  # same split, same order, reported by source path
