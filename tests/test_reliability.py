"""Unreadable images are skipped and reported (or stop the run), odd image modes become correct RGB."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_lora import Food101DataModule
from lit_lora.cli import cli_main
from lit_lora.images import BadImageError

from test_cli import common_args

BAD = {"tomato/0001": "truncated", "matcha/0002": "empty", "banana/0003": "text"}


@pytest.fixture
def dirty_food101(tmp_path: Path, food101_dir: str) -> Path:
    """The Food-101 fixture with a truncated JPEG, a zero-byte file and a text file named .jpg among the training images."""
    root = Path(shutil.copytree(food101_dir, tmp_path / "dirty"))
    truncated = root / "images" / "tomato" / "0001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "images" / "matcha" / "0002.jpg").write_bytes(b"")
    (root / "images" / "banana" / "0003.jpg").write_text("not an image\n")
    return root


def test_unreadable_images_are_skipped_counted_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dirty_food101: Path, tiny_vit: str) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a for a in common_args(tiny_vit, str(dirty_food101))] + ["--data.val_size=0.1"]
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image\(s\) this epoch") as caught:
        cli = cli_main(["fit", *args, "--trainer.max_epochs=2"])
    assert cli.trainer.current_epoch == 2  # the run went on
    listing = Path(cli.trainer.log_dir) / "skipped_images.txt"
    lines = listing.read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).relative_to(dirty_food101 / "images").as_posix()[:-4] for line in lines) == sorted(BAD)
    assert all("\t" in line and line.split("\t")[1] for line in lines)
    # Reported once, not again in the second epoch (nothing new was skipped).
    assert sum("unreadable image" in str(w.message) for w in caught) == 1


def test_on_bad_image_error_stops_naming_the_file(dirty_food101: Path, tiny_vit: str) -> None:
    module = Food101DataModule(data_dir=str(dirty_food101), train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit, on_bad_image="error")
    module.setup("fit")
    with pytest.raises(BadImageError, match=r"cannot read image .*(0001|0002|0003)\.jpg .*on_bad_image skip"):
        for _ in module.train_dataloader():
            pass


def test_decompression_bombs_are_skipped(monkeypatch: pytest.MonkeyPatch, food101_dir: str, tiny_vit: str) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 48x48 images are now "too large" (over twice the limit)
    module = Food101DataModule(data_dir=food101_dir, train_split="train[:4]", val_size=0.5, num_workers=0, image_processor=tiny_vit)
    module.setup("fit")
    batch = module.on_after_batch_transfer(next(iter(module.val_dataloader())), 0)
    assert "pixel_values" not in batch
    assert all("DecompressionBomb" in reason for reason in module.skipped_images.values())
    assert len(module.skipped_images) == 2


def test_bad_images_in_the_cache_are_skipped_too(tmp_path: Path, dirty_food101: Path, tiny_vit: str) -> None:
    module = Food101DataModule(data_dir=str(dirty_food101), train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit, cache_dir=str(tmp_path / "cache"))
    module.setup("fit")
    seen = sum(len(module.on_after_batch_transfer(b, 0).get("labels", [])) for b in module.train_dataloader())
    seen += sum(len(module.on_after_batch_transfer(b, 0).get("labels", [])) for b in module.val_dataloader())
    assert seen == 48 - 3
    assert len(module.skipped_images) == 3


@pytest.mark.parametrize("kind", ["cmyk", "palette_alpha", "sixteen_bit", "exif_rotated", "grayscale"])
def test_odd_image_modes_train_as_rgb(tmp_path: Path, tiny_vit: str, kind: str) -> None:
    root = tmp_path / "folders"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
            path = root / label / f"{i}"
            if kind == "cmyk":
                rgb.convert("CMYK").save(f"{path}.jpg")
            elif kind == "palette_alpha":
                image = rgb.convert("P")
                image.info["transparency"] = 0
                image.save(f"{path}.png", transparency=0)
            elif kind == "sixteen_bit":
                Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(f"{path}.png")
            elif kind == "exif_rotated":
                exif = rgb.getexif()
                exif[0x0112] = 6
                rgb.save(f"{path}.jpg", exif=exif)
            else:
                rgb.convert("L").save(f"{path}.jpg")
    module = Food101DataModule(data_dir=str(root), train_split="train", val_size=0.5, num_workers=0, image_processor=tiny_vit)
    module.setup("fit")
    for loader in (module.train_dataloader(), module.val_dataloader()):
        batch = next(iter(loader))
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and not batch["skipped"]
    image = module.train_table.load(0)
    assert image.mode == "RGB" and (image.size == (40, 60) if kind == "exif_rotated" else image.size == (60, 40))


def test_nan_loss_stops_with_the_step_and_likely_causes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, food101_dir: str, tiny_vit: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FloatingPointError, match=r"loss became nan at optimizer step 1 \(epoch 0, batch 1\).*learning_rate=1e\+30.*precision"):
        cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=1", "--model.learning_rate=1e30", "--model.warmup_steps=0", "--trainer.accumulate_grad_batches=1", "--trainer.limit_train_batches=3"])


def test_command_line_errors_are_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lit_lora", "fit", "--config", "configs/demo.yaml", f"--data.data_dir={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 1
    assert "lit_lora: error: 1 problem(s) in the configuration" in result.stderr and "data.data_dir" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_that_does_not_exist_or_is_not_an_image_classifier(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from lit_lora import LoRAImageClassifier

    with pytest.raises(ValueError, match=r"model '.*nowhere' could not be loaded.*save_pretrained"):
        LoRAImageClassifier(str(tmp_path / "nowhere"), class_names=["a", "b"])
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="is not an image classifier"):
        LoRAImageClassifier(str(tmp_path / "bert"), class_names=["a", "b"])


def test_data_problems_are_named(tmp_path: Path, class_folders_dir: str, food101_dir: str) -> None:
    one_class = tmp_path / "one"
    shutil.copytree(Path(class_folders_dir) / "tomato", one_class / "tomato")
    with pytest.raises(ValueError, match="1 class"):
        Food101DataModule(data_dir=str(one_class))
    empty_class = Path(shutil.copytree(class_folders_dir, tmp_path / "empty-class"))
    (empty_class / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no image.*nothing"):
        Food101DataModule(data_dir=str(empty_class))
    module = Food101DataModule(data_dir=food101_dir, train_split="train[:0]")
    with pytest.raises(ValueError, match=r"train_split 'train\[:0\]' selects no image"):
        module.setup("fit")


def test_unreadable_checkpoint_and_unknown_key_are_named(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    import subprocess
    import sys

    broken = tmp_path / "last.ckpt"
    broken.write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    env = {"HF_HUB_OFFLINE": "1", "PATH": ""}
    cwd = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "lit_lora", "validate", *common_args(tiny_vit, food101_dir), f"--ckpt_path={broken}"], capture_output=True, text=True, cwd=cwd, env=env)
    assert result.returncode == 1 and "is not a readable checkpoint" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "lit_lora", "fit", "--config", "configs/demo.yaml", "--model.rank=8"], capture_output=True, text=True, cwd=cwd, env=env)
    assert result.returncode == 2 and "rank" in result.stderr


def test_configuration_problems_are_reported_together(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lit_lora", "fit", "--config", "configs/demo.yaml", f"--model.model_name_or_path={tmp_path / 'no-model'}",
         f"--data.data_dir={tmp_path / 'no-data'}", "--data.val_size=1.5", "--data.num_workers=-1", f"--ckpt_path={tmp_path / 'no.ckpt'}"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 1
    assert "5 problem(s) in the configuration" in result.stderr
    for fragment in ("no-model' is not a folder", "no-data' does not exist", "val_size must be between 0 and 1", "num_workers must be 0 or more", "no.ckpt' does not exist"):
        assert fragment in result.stderr
