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


def test_cached_pixels_get_the_guides_training_crops_within_one_level(tmp_path: Path) -> None:
    # The cache hands out in-memory RGB images: same seed -> the guide's crop box and flip, cropped as a view and
    # resized by torch's uint8 antialiased bilinear kernel instead of PIL's (same filter, rounding may differ by 1).
    table = cached(FileTable([str(photo(tmp_path / "a.jpg", (320, 240)))], [0]), 96, tmp_path / "cache", num_workers=0)
    for seed in range(10):
        torch.manual_seed(seed)
        fast = train_transform(SETTINGS, True)(table.open(0))
        torch.manual_seed(seed)
        guide = train_transform(SETTINGS, False)(table.open(0))
        assert fast.shape == guide.shape == (3, 64, 64) and fast.dtype == guide.dtype == torch.uint8
        difference = (fast.int() - guide.int()).abs()
        assert difference.max() <= 1 and difference.float().mean() < 0.3  # most pixels equal, none off by more than 1
    # Cached validation images are stored at the evaluation size: the centre crop is a plain crop, the same
    # whether fast_decode is on or not.
    evaluation = cached(FileTable([str(tmp_path / "a.jpg")], [0]), 64, tmp_path / "cache", num_workers=0)
    with evaluation.read(0) as pixels:
        assert pixels.shape == (3, 64, 85)  # 240 -> 64, 320 -> int(64 * 320 / 240): torchvision's rule
        assert torch.equal(eval_transform(SETTINGS, True)(pixels), eval_transform(SETTINGS, False)(pixels))


def test_cache_built_by_worker_processes_equals_one_built_in_process(tmp_path: Path) -> None:
    paths = [str(photo(tmp_path / f"{i}.jpg", (90 + 7 * i, 60), seed=i)) for i in range(37)]  # 3 chunks, uneven sizes
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    table = FileTable(paths + [str(tmp_path / "broken.jpg")], [0] * 38)
    alone = cached(table, 40, tmp_path / "alone", num_workers=0)
    workers = cached(table, 40, tmp_path / "workers", num_workers=2)
    assert (tmp_path / "alone" / cache_key(table, 40) / "pixels.u8").read_bytes() == (tmp_path / "workers" / cache_key(table, 40) / "pixels.u8").read_bytes()
    assert list(workers.bad) == list(alone.bad) == [False] * 37 + [True]
    assert np.asarray(workers.open(0)).shape == (40, 60, 3) and np.asarray(workers.open(36)).shape == (40, 228, 3)


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

    monkeypatch.setattr(cache_module, "_ResizeInto", no_rebuild)
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
    original = cache_module._ResizeInto._write

    def dies_at_third(self, i):
        if i == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the build
        return original(self, i)

    monkeypatch.setattr(cache_module._ResizeInto, "_write", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        cached(table, 32, tmp_path / "cache", num_workers=0)
    assert not (tmp_path / "cache" / cache_key(table, 32)).exists()
    assert not list((tmp_path / "cache").iterdir())  # the staging folder is gone too
    monkeypatch.setattr(cache_module._ResizeInto, "_write", original)
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


def test_cached_images_reach_the_transforms_as_views_of_the_cache_file(tmp_path: Path) -> None:
    # No PIL round trip for cached pixels: the same crops as through a PIL image of them, without the two copies.
    from lit_lora.images import ImageDataset

    paths = [str(photo(tmp_path / f"{i}.jpg", (160, 120), seed=i)) for i in range(3)]
    table = cached(FileTable(paths, [0, 1, 0]), 72, tmp_path / "cache", num_workers=0)
    with table.read(1) as pixels:
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape == (3, 72, 96)
        assert np.shares_memory(pixels.numpy(), table._pixels)  # a view of the memory-mapped file
        assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.asarray(table.open(1))))
    for make in (train_transform, eval_transform):
        for fast in (True, False):
            dataset = ImageDataset(table, make(SETTINGS, fast))
            for i in range(3):
                torch.manual_seed(i)  # what the dataset's item seed i does for the augmentation
                assert torch.equal(dataset[(i, i)]["pixel_values"], make(SETTINGS, fast)(table.open(i)))
