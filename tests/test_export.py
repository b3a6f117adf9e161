"""Adapter folders, merged export and predict: what other tools load must agree with lit_lora."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_cli import common_args

from lit_lora.cli import cli_main
from lit_lora.export import load_module, save_adapter_folder
from lit_lora.transforms import eval_transform


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit: str, food101_dir: str) -> Path:
    """One short fit through the CLI; returns its run folder."""
    import os

    cwd = os.getcwd()
    folder = tmp_path_factory.mktemp("trained")
    os.chdir(folder)
    try:
        cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=3", "--model.learning_rate=0.01"])
    finally:
        os.chdir(cwd)
    return folder / "checkpoints" / "run" / "version_0"


PHOTO_SIZES = [(61, 47), (47, 61), (80, 45), (45, 80), (48, 48), (73, 50), (50, 73), (99, 64), (64, 99)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """JPEGs of several aspect ratios (portrait, landscape, square; one grayscale) with the demo's learnable content."""
    import numpy as np

    from lit_lora.demo import shape_image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    paths = []
    for i, size in enumerate(PHOTO_SIZES):
        image = Image.fromarray(shape_image(["tomato", "matcha", "blueberry", "banana"][i % 4], rng)).resize(size, Image.BICUBIC)
        path = folder / f"{i:02d}.jpg"
        (image.convert("L") if i == 3 else image).save(path, quality=92)
        paths.append(path)
    return paths


def lit_lora_logits(ckpt: Path, images: list[Path]) -> torch.Tensor:
    """lit_lora's evaluation of ``images``: its exact transform (fast_decode off) and the model's normalisation."""
    module = load_module(ckpt)
    transform = eval_transform(module.image_settings, fast_decode=False)
    pixels = torch.stack([transform(Image.open(p)) for p in images])
    with torch.no_grad():
        return module(pixels)


def read_labels(folder: Path) -> tuple[dict, dict]:
    labels = json.loads((folder / "labels.json").read_text())
    return labels["label2id"], {int(i): name for i, name in labels["id2label"].items()}


def test_fit_writes_peft_adapter_folders_for_best_and_last(trained_run: Path) -> None:
    for name in ("adapter", "adapter-last"):
        folder = trained_run / name
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "preprocessor_config.json"} <= files
        assert "config.json" not in files  # it would make transformers take the folder for a whole model
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["r"] == 16 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
        assert adapter["modules_to_save"] == ["classifier"]
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["image_processor_type"] == "BitImageProcessor" and processor["size"] == {"shortest_edge": 32}
        assert processor["crop_size"] == {"height": 32, "width": 32} and processor["do_center_crop"]
    best = load_module(trained_run / "adapter")
    from_ckpt = load_module(next(trained_run.glob("epoch=*.ckpt")))
    for key, value in from_ckpt.trainable_state_dict().items():
        assert torch.equal(best.trainable_state_dict()[key], value), key


def test_guides_inference_code_loads_the_adapter_folder_and_agrees(trained_run: Path, photos: list[Path]) -> None:
    from peft import PeftConfig, PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = str(trained_run / "adapter")
    label2id, id2label = read_labels(trained_run / "adapter")
    # The guide's code, unchanged:
    config = PeftConfig.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(
        config.base_model_name_or_path, label2id=label2id, id2label=id2label, ignore_mismatched_sizes=True
    )
    inference_model = PeftModel.from_pretrained(model, folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)

    encoding = image_processor([Image.open(p).convert("RGB") for p in photos], return_tensors="pt")
    with torch.no_grad():
        theirs = inference_model.eval()(**encoding).logits.softmax(-1)
    # Non-square photos too: the exported processor resizes the shorter side and centre-crops, as lit_lora does.
    ours = lit_lora_logits(trained_run / "adapter", photos).softmax(-1)
    assert id2label[0] == "tomato"
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_loads_the_adapter_folder_natively_and_matches_the_merged_export(trained_run: Path, tmp_path: Path, photos: list[Path]) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    label2id, id2label = read_labels(trained_run / "adapter")
    native = AutoModelForImageClassification.from_pretrained(str(trained_run / "adapter"), id2label=id2label, label2id=label2id).eval()
    merged_dir = cli_main(["export", f"--ckpt_path={trained_run / 'adapter'}", f"--output_dir={tmp_path / 'merged'}", "--merge=true"])
    merged = AutoModelForImageClassification.from_pretrained(str(merged_dir)).eval()
    assert merged.config.architectures == ["ViTForImageClassification"] and merged.config.id2label == id2label
    inputs = AutoImageProcessor.from_pretrained(str(trained_run / "adapter"))([Image.open(p) for p in photos], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(native(**inputs).logits, merged(**inputs).logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def odd_photos(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> list[Path]:
    """The photos as files stock tools read in their own way: RGBA with real transparency, a palette PNG with a
    transparent colour, 16-bit grayscale, CMYK JPEG, and an EXIF-rotated JPEG."""
    import numpy as np

    folder = tmp_path_factory.mktemp("odd-photos")
    rgb = [Image.open(p).convert("RGB") for p in photos[:5]]
    rgba = rgb[0].copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    palette = rgb[1].quantize(16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    wide = (np.asarray(rgb[2].convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(folder / "sixteen.png")  # mode I;16
    rgb[3].convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    rgb[4].save(folder / "rotated.jpg", exif=exif, quality=95)
    return sorted(folder.iterdir())


def test_default_predict_equals_pipeline_on_the_merged_export(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, photos: list[Path], odd_photos: list[Path]) -> None:
    """``predict`` as it comes (no option) gives what ``pipeline("image-classification")`` on the merged export
    gives, to 1e-4, for JPEGs of several shapes and for RGBA, palette, 16-bit, CMYK and EXIF-rotated files."""
    out = tmp_path / "merged"
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={out}", "--merge=true"])
    monkeypatch.chdir(tmp_path)
    args = [a for a in common_args(tiny_vit, food101_dir) if not a.startswith("--data.data_dir")]
    csv_path = tmp_path / "predictions.csv"
    files = photos + odd_photos
    cli_main(["predict", *args, f"--ckpt_path={trained_run / 'last.ckpt'}", f"--data.predict_dir={[str(p) for p in files]}", f"--predictions.output_path={csv_path}"])
    ours = {row["path"]: row for row in csv.DictReader(csv_path.open())}
    assert len(ours) == len(files)

    # A fresh interpreter in which peft cannot be imported: the merged folder must not need it.
    script = f"""
import sys, json
sys.modules["peft"] = None
from transformers import pipeline
classify = pipeline("image-classification", model={str(out)!r}, device="cpu")
print(json.dumps([classify(p, top_k=4) for p in {[str(p) for p in files]!r}]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    for path, row in zip(files, predictions):
        mine = ours[str(path)]
        assert row[0]["label"] == mine["label"], path.name
        assert row[0]["score"] == pytest.approx(float(mine["score"]), abs=1e-4), path.name
        assert row[1]["score"] == pytest.approx(float(mine["score_2"]), abs=1e-4), path.name


def test_model_trains_from_a_plain_dataloader_over_image_processor_output(trained_run: Path, food101_dir: str, tiny_vit: str) -> None:
    """No Food101DataModule: float pixel_values from the image processor train the model, and give the same logits
    as the data module's uint8 batches of the same images."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor

    from lit_lora import Food101DataModule, LoRAImageClassifier

    data = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit, fast_decode=False)
    data.setup("fit")
    processor = AutoImageProcessor.from_pretrained(str(trained_run / "adapter"))
    images = [Image.open(p) for p in data.val_table.paths]
    encoded = processor(images, return_tensors="pt")["pixel_values"]
    plain = DataLoader(
        [{"pixel_values": x, "labels": y} for x, y in zip(encoded, data.val_table.labels)], batch_size=4, shuffle=True
    )
    model = LoRAImageClassifier(tiny_vit, class_names=data.class_names)
    pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(model, plain)
    model.eval()
    uint8 = next(iter(data.val_dataloader()))["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model(encoded), model(uint8), atol=1e-5, rtol=0)
    assert model.hparams.lr_scheduler_type == "linear" and model.global_step == 3


def test_export_refuses_a_folder_with_other_files_and_keeps_them(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"output_dir .*mine.* is not empty .*precious.txt.*--overwrite true"):
        cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={folder}"])
    assert (folder / "precious.txt").read_text() == "keep me" and len(list(folder.iterdir())) == 1
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={folder}", "--overwrite=true"])
    assert (folder / "precious.txt").read_text() == "keep me" and (folder / "adapter_model.safetensors").is_file()
    # A previous export may be replaced without --overwrite: a merged model now, the adapter's files go.
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={folder}", "--merge=true", "--overwrite=true"])
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_model.safetensors").exists()
    export_only = tmp_path / "export-only"
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={export_only}"])
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={export_only}", "--merge=true"])
    assert {p.name for p in export_only.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json", "lit_lora_export.json"}
    # The current folder works too.
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", "--output_dir=."])
    assert (here / "adapter_model.safetensors").is_file()


def test_export_writes_an_adapter_folder_from_a_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    out = cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={tmp_path / 'a'}"])
    assert (out / "adapter_model.safetensors").is_file()
    again = load_module(out)
    for key, value in load_module(trained_run / "last.ckpt").trainable_state_dict().items():
        assert torch.equal(again.trainable_state_dict()[key], value)


@pytest.mark.parametrize("source", ["last.ckpt", "adapter-last"])
def test_predict_writes_one_sorted_row_per_image(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, source: str) -> None:
    monkeypatch.chdir(tmp_path)
    images_dir = Path(food101_dir) / "images"
    out = tmp_path / "predictions.csv"
    args = [a for a in common_args(tiny_vit, food101_dir) if not a.startswith("--data.data_dir")]
    cli_main(["predict", *args, f"--ckpt_path={trained_run / source}", f"--data.predict_dir={images_dir}", f"--predictions.output_path={out}", "--data.fast_decode=false"])

    rows = list(csv.DictReader(out.open()))
    images = sorted(str(p) for p in images_dir.rglob("*.jpg"))
    assert [r["path"] for r in rows] == images
    assert list(rows[0]) == ["path", "label", "score", "label_2", "score_2", "label_3", "score_3", "label_4", "score_4"]
    probs = lit_lora_logits(trained_run / "last.ckpt", [Path(p) for p in images]).softmax(-1)
    names = load_module(trained_run / "last.ckpt").class_names
    for row, p in zip(rows, probs):
        assert row["label"] == names[int(p.argmax())]
        assert float(row["score"]) == pytest.approx(float(p.max()), abs=1e-5)
        assert float(row["score"]) >= float(row["score_2"]) >= float(row["score_3"])


def test_vit_b16_adapter_for_101_classes_is_about_2_6_mb(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from lit_lora import LoRAImageClassifier

    torch.manual_seed(0)
    ViTModel(ViTConfig()).save_pretrained(tmp_path / "vit-b16")  # like google/vit-base-patch16-224-in21k: no head
    ViTImageProcessor().save_pretrained(tmp_path / "vit-b16")
    module = LoRAImageClassifier(str(tmp_path / "vit-b16"), class_names=[f"class_{i}" for i in range(101)])
    folder = save_adapter_folder(module, tmp_path / "adapter")
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert 667_493 * 4 <= size < 667_493 * 4 + 100_000  # 2.67 MB: LoRA matrices and head in fp32, nothing else
