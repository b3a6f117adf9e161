"""Data sources, slicing, the seeded split, RGB conversion, and the batches the data module produces."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, write_images
from PIL import Image
from torchvision import transforms as T

from lit_lora import Food101DataModule
from lit_lora.images import to_rgb
from lit_lora.optimized import read_manifest
from lit_lora.sources import open_hf_dataset, open_local_folder
from lit_lora.splits import slice_indices, stratified_split
from lit_lora.streaming import OptimizedImages


def test_food101_archive_layout_is_detected(food101_dir: str) -> None:
    source = open_local_folder(food101_dir)
    assert source.kind == "Food-101 archive layout"
    assert source.class_names == list(CLASSES)
    assert source.split_sizes == {"train": 48, "test": 16}
    assert source.test_split == "test"
    table = source.select("train[:5]")
    assert [Path(p).relative_to(food101_dir).as_posix() for p in table.paths] == [
        f"images/tomato/{i:04d}.jpg" for i in range(5)
    ]
    assert table.labels == [0] * 5


def test_class_folders_are_detected(class_folders_dir: str) -> None:
    source = open_local_folder(class_folders_dir)
    assert source.kind == "class folders"
    assert source.class_names == sorted(CLASSES)
    assert source.split_sizes == {"train": 24}
    assert source.test_split is None
    assert Counter(source.select("train").labels) == {i: 6 for i in range(4)}


def test_class_folders_per_split_are_detected(tmp_path: Path, class_folders_dir: str) -> None:
    for split in ("train", "test"):
        (tmp_path / split).symlink_to(class_folders_dir, target_is_directory=True)
    source = open_local_folder(tmp_path)
    assert source.kind == "class folders per split"
    assert source.split_sizes == {"test": 24, "train": 24}
    assert source.test_split == "test"


@pytest.mark.parametrize("layout", ["archive", "class_folders"])
def test_a_data_module_with_its_source_open_pickles_as_ddp_spawn_sends_it(layout: str, food101_dir: str, class_folders_dir: str) -> None:
    """Lightning's ddp_spawn pickles the data module into each process it starts: the source's split readers were
    closures ("Can't pickle local object '_file_source.<locals>.read'"), and such a fit stopped before training."""
    module = Food101DataModule(data_dir=food101_dir if layout == "archive" else class_folders_dir, train_split="train", num_workers=0)
    copy = pickle.loads(pickle.dumps(module))
    module.setup("fit")
    copy.setup("fit")
    assert copy.class_names == module.class_names and copy.val_table.paths == module.val_table.paths and len(copy.train_table) > 0


def test_macos_leftovers_and_hidden_files_are_neither_classes_nor_images_and_split_folders_beside_others_are_refused(tmp_path: Path) -> None:
    """A folder unzipped from a macOS archive has ``__MACOSX/<class>/._<image>.jpg`` resource forks: ``__MACOSX`` was
    a class of its own, and the ``._`` files unreadable images. Split folders beside another folder were read as
    classes named train and test. predict_dir is listed the same way."""
    rng = np.random.default_rng(0)
    for root in ("flat", "per_split/train", "per_split/test"):
        for name in ("pizza", "sushi"):
            write_images(tmp_path / root / name, CLASSES[0], 3, rng)
            for junk in (tmp_path / root / name / "._0.jpg", tmp_path / root / "__MACOSX" / name / "._0.jpg", tmp_path / root / name / ".cache" / "0.jpg"):
                junk.parent.mkdir(parents=True, exist_ok=True)
                junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "per_split" / "__MACOSX").mkdir()
    flat = open_local_folder(tmp_path / "flat")
    assert (flat.kind, flat.class_names, flat.split_sizes) == ("class folders", ["pizza", "sushi"], {"train": 6})
    predicting = Food101DataModule(dataset=None, predict_dir=str(tmp_path / "flat"), class_names=["pizza", "sushi"], num_workers=0)
    assert [Path(p).relative_to(tmp_path / "flat").parts[0] for p in predicting.predict_paths] == ["pizza"] * 3 + ["sushi"] * 3
    per_split = open_local_folder(tmp_path / "per_split")
    assert (per_split.kind, per_split.class_names, per_split.split_sizes) == ("class folders per split", ["pizza", "sushi"], {"test": 6, "train": 6})
    write_images(tmp_path / "per_split" / "extra" / "pizza", CLASSES[0], 1, rng)
    with pytest.raises(ValueError, match=r"holds split folders \(test, train\) beside other folders \(extra\): it would be read as class folders"):
        open_local_folder(tmp_path / "per_split")


def test_datasets_dataset_saved_to_disk(tmp_path: Path, class_folders_dir: str) -> None:
    import datasets

    paths = sorted(Path(class_folders_dir).rglob("*.jpg"))
    names = sorted(CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rows = {"image": [str(p) for p in paths], "label": [names.index(p.parent.name) for p in paths]}
    full = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=full.select(range(20)), validation=full.select(range(20, 24))).save_to_disk(tmp_path / "ds")

    source = open_hf_dataset(str(tmp_path / "ds"))
    assert source.kind == "`datasets` dataset on disk"
    assert source.class_names == names
    assert source.split_sizes == {"train": 20, "validation": 4}
    assert source.test_split == "validation"  # as on the hub, where Food-101's test split is "validation"
    table = source.select("train[:50%]")
    assert len(table) == 10 and table.labels == rows["label"][:10]
    assert to_rgb(Image.open(paths[0])).tobytes() == table.load(0).tobytes()

    module = Food101DataModule(dataset=str(tmp_path / "ds"), train_split="train", val_size=0.25, num_workers=0)
    assert module.class_names == names
    assert pickle.loads(pickle.dumps(module)).source.select("train[:50%]").labels == rows["label"][:10]  # ddp_spawn sends it
    module.setup("test")
    assert len(module.test_table) == 4
    # Evaluation rows come in a fixed seeded order across classes; each still names its row of the split.
    assert sorted(module.test_table.describe(i) for i in range(4)) == [f"{tmp_path / 'ds'}:validation[{i}]" for i in range(4)]
    row = next(i for i in range(4) if module.test_table.describe(i).endswith("validation[1]"))
    assert module.test_table.read_bytes(row) == paths[21].read_bytes()
    # Decoding on the device (the CPU here) reads the rows' bytes and gives the exact path's pixels.
    on_device = Food101DataModule(dataset=str(tmp_path / "ds"), train_split="train", num_workers=0, decode_on_device=True, fast_decode=False)
    on_device.setup("test")
    raw = next(iter(on_device.test_dataloader()))
    assert len(raw["encoded"]) == 4 and "pixel_values" not in raw  # workers only read the rows' JPEG bytes
    batch = on_device.on_before_batch_transfer(raw, 0)
    exact_module = Food101DataModule(dataset=str(tmp_path / "ds"), train_split="train", num_workers=0, fast_decode=False)
    exact_module.setup("test")
    exact = next(iter(exact_module.test_dataloader()))
    assert "encoded" not in batch and torch.equal(batch["pixel_values"], exact["pixel_values"])

    # Optimized from the `datasets` rows (forked optimize workers read them): fit's split, and the test rows' exact
    # evaluation pixels, each under its row's name.
    Food101DataModule(dataset=str(tmp_path / "ds"), train_split="train", val_size=0.25, num_workers=2, optimized_dir=str(tmp_path / "optimized")).prepare_data()
    module.setup("fit")
    manifest = read_manifest(str(tmp_path / "optimized"))
    assert manifest["class_names"] == names and manifest["splits"] == {"train": len(module.train_table), "val": len(module.val_table), "test": 4}
    stored = {item["path"]: item["pixel_values"] for item in OptimizedImages(str(tmp_path / "optimized" / "test"))}
    expected = {exact_module.test_table.describe(int(i)): pixels for i, pixels in zip(exact["index"], exact["pixel_values"])}
    assert stored.keys() == expected.keys() and all(torch.equal(stored[name], expected[name]) for name in expected)


def test_slicing_follows_datasets_grammar() -> None:
    sizes = {"train": 200, "test": 50}
    assert slice_indices("train[:5]", sizes) == {"train": [0, 1, 2, 3, 4]}
    assert slice_indices("train[-10%:]", sizes) == {"train": list(range(180, 200))}
    assert slice_indices("train[:2]+test[:1]", sizes) == {"train": [0, 1], "test": [0]}
    with pytest.raises(ValueError, match="Available splits"):
        slice_indices("validation[:5]", sizes)
    from datasets import ReadInstruction

    # A bare split name skips importing `datasets`; it must select what the grammar would.
    whole = ReadInstruction.from_spec("test").to_absolute(sizes)[0]
    assert slice_indices("test", sizes) == {"test": list(range(whole.from_, whole.to))}
    with pytest.raises(ValueError, match="Available splits"):
        slice_indices("validation", sizes)


def test_split_is_seeded_stratified_and_exact() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 21
    train, val = stratified_split(labels, 0.1, seed=42)
    assert len(val) == 10 and len(train) == 91 and not set(train) & set(val)
    assert sorted(train + val) == list(range(101))
    assert Counter(labels[i] for i in val) == {0: 5, 1: 3, 2: 2}
    assert stratified_split(labels, 0.1, seed=42) == (train, val)
    assert stratified_split(labels, 0.1, seed=7)[1] != val
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(labels, 1.5, seed=0)


def test_grayscale_and_other_modes_become_rgb(tmp_path: Path, food101_dir: str) -> None:
    gray = Image.open(Path(food101_dir) / "images" / CLASSES[0] / "0000.jpg")
    assert gray.mode == "L" and to_rgb(gray).mode == "RGB"
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)  # transparent pixels on white
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    rotated = Image.new("RGB", (6, 2), (1, 2, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(tmp_path / "r.jpg", exif=exif)
    assert to_rgb(Image.open(tmp_path / "r.jpg")).size == (2, 6)


def test_batches_match_the_guides_torchvision_preprocessing(food101_dir: str, tiny_vit: str) -> None:
    from lit_lora.transforms import normalize

    module = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit)
    assert module.image_settings.crop == (32, 32) and module.image_settings.resize == 32
    module.setup("fit")
    assert len(module.train_table) == 36 and len(module.val_table) == 12
    assert Counter(module.val_table.labels) == {i: 3 for i in range(4)}

    batch = next(iter(module.val_dataloader()))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[1:] == (3, 32, 32)
    normalised = normalize(batch["pixel_values"], torch.tensor([0.5] * 3), torch.tensor([0.5] * 3))
    guide = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    expected = torch.stack([guide(Image.open(p).convert("RGB")) for p in module.val_table.paths[: len(normalised)]])
    torch.testing.assert_close(normalised, expected, atol=1e-6, rtol=0)

    train_batch = next(iter(module.train_dataloader()))
    assert train_batch["pixel_values"].shape == (36, 3, 32, 32)


def test_split_is_the_same_for_every_data_module(food101_dir: str) -> None:
    first = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, seed=3)
    second = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, seed=3)
    first.setup("fit")
    second.setup("fit")
    assert first.val_table.paths == second.val_table.paths


def test_leading_slice_of_class_sorted_listing_warns(food101_dir: str) -> None:
    module = Food101DataModule(data_dir=food101_dir, train_split="train[:20]", num_workers=0)
    with pytest.warns(UserWarning, match="covers 2 of 4 classes"):
        module.setup("fit")


def test_configuration_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_size must be between 0 and 1"):
        Food101DataModule(data_dir=str(tmp_path), val_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Food101DataModule(data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither in Food-101's archive layout .* nor a folder of class folders"):
        Food101DataModule(data_dir=str(tmp_path))


def test_default_workers_come_from_the_cpu_count(food101_dir: str) -> None:
    import os

    module = Food101DataModule(data_dir=food101_dir)
    assert module.num_workers == min(len(os.sched_getaffinity(0)), 16) > 0


def test_item_seeds_fix_the_augmentation_without_touching_the_callers_random_stream(food101_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_lora.images import ImageDataset
    from lit_lora.transforms import ImageSettings, train_transform

    table = open_local_folder(food101_dir).select("train")
    dataset = ImageDataset(table, train_transform(ImageSettings(crop=(24, 24), resize=24)))
    torch.manual_seed(11)
    with Image.open(table.paths[5]) as image:
        expected = dataset.transform(image)

    def seeds_every_device(*args: object) -> None:
        raise AssertionError("torch.manual_seed also seeds CUDA (and formats a stack trace) on every image")

    monkeypatch.setattr(torch, "manual_seed", seeds_every_device)
    before = torch.get_rng_state()
    item = dataset[(5, 11)]
    assert torch.equal(item["pixel_values"], expected)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(dataset[(5, 12)]["pixel_values"], expected)


def test_val_split_validates_on_those_images_and_trains_on_all_of_train_split(food101_dir: str) -> None:
    module = Food101DataModule(data_dir=food101_dir, train_split="train", val_split="test[:6]", val_size=0, num_workers=0)
    module.setup("fit")
    source = open_local_folder(food101_dir)
    assert module.train_table.paths == source.select("train").paths  # nothing held out
    assert sorted(module.val_table.paths) == sorted(source.select("test[:6]").paths)
    with pytest.raises(ValueError, match="val_split 'test\\[5:5\\]' selects no image"):
        Food101DataModule(data_dir=food101_dir, train_split="train", val_split="test[5:5]", num_workers=0).setup("fit")


def test_validation_order_is_seeded_and_mixes_the_classes(food101_dir: str) -> None:
    """Sources list images class by class; validation batches do not, so any prefix of them (limit_val_batches,
    an interrupted pass) is a fair sample. The order is the same in every run."""
    def labels(seed: int) -> list[int]:
        module = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.5, num_workers=0, seed=seed, batch_size=6)
        module.setup("fit")
        module.setup("test")
        first = next(iter(module.val_dataloader()))["labels"].tolist()
        assert len(set(first)) >= 3  # the first batch of 6 already covers most of the 4 classes
        assert module.test_table.labels != sorted(module.test_table.labels)
        return module.val_table.labels

    assert labels(0) == labels(0) and labels(0) != sorted(labels(0))


class _Niceness(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        import os

        return os.nice(0)


def test_loader_workers_yield_the_cpu_to_training_on_the_cpu(food101_dir: str) -> None:
    import os

    import lightning.pytorch as pl

    module = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=1)
    module.setup("fit")
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    probe = torch.utils.data.DataLoader(_Niceness(), num_workers=1, worker_init_fn=module.train_dataloader().worker_init_fn)
    assert list(probe) == [torch.tensor(os.nice(0) + 10)] * 2
    module.trainer = None  # a loader built outside a CPU trainer leaves its workers' priority alone
    probe = torch.utils.data.DataLoader(_Niceness(), num_workers=1, worker_init_fn=module.train_dataloader().worker_init_fn)
    assert list(probe) == [torch.tensor(os.nice(0))] * 2


@pytest.mark.parametrize("fast_decode", [True, False])
def test_the_loaders_datasets_pickle_for_spawned_workers(food101_dir: str, tiny_vit: str, fast_decode: bool) -> None:
    """Loader workers started with spawn or forkserver (macOS's default, Linux's from Python 3.14) receive the dataset,
    its transforms included, pickled."""
    import pickle

    module = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit, fast_decode=fast_decode)
    module.setup("fit")
    for loader, key in ((module.train_dataloader(), (0, 7)), (module.val_dataloader(), 0)):
        copy = pickle.loads(pickle.dumps(loader.dataset))
        assert torch.equal(copy[key]["pixel_values"], loader.dataset[key]["pixel_values"])
        # Its worker_init_fn takes an event to spawned workers only: copied or pickled otherwise, it goes without.
        assert pickle.loads(pickle.dumps(loader.worker_init_fn)).main_exiting is None


def test_food101_data_module_is_the_general_one_with_the_guides_defaults(class_folders_dir: str) -> None:
    from lit_lora import ImageClassificationDataModule

    general = ImageClassificationDataModule(data_dir=class_folders_dir, num_workers=0)
    assert general.dataset is None and general.train_split == "train" and general.class_names == sorted(CLASSES)
    food = Food101DataModule(data_dir=class_folders_dir, num_workers=0, batch_size=16)
    assert isinstance(food, ImageClassificationDataModule)
    assert food.dataset == "ethz/food101" and food.train_split == "train[:5000]" and food.batch_size == 16
    assert food.hparams.batch_size == 16 and food.hparams.train_split == "train[:5000]"  # saved with checkpoints
