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

from lit_lora.cli import cli_main
from lit_lora.export import load_module, save_adapter_folder
from lit_lora.transforms import eval_transform, normalize_on_device, settings_from_processor

from test_cli import common_args


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


def lit_lora_logits(ckpt: Path, images: list[Path], processor_source: str) -> torch.Tensor:
    module = load_module(ckpt)
    settings = settings_from_processor(processor_source)
    pixels = torch.stack([eval_transform(settings)(Image.open(p).convert("RGB")) for p in images])
    mean, std = torch.tensor(settings.mean), torch.tensor(settings.std)
    with torch.no_grad():
        return module(normalize_on_device(pixels, mean, std))


def test_fit_writes_peft_adapter_folders_for_best_and_last(trained_run: Path) -> None:
    for name in ("adapter", "adapter-last"):
        folder = trained_run / name
        assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "preprocessor_config.json"} <= {
            p.name for p in folder.iterdir()
        }
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["r"] == 16 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
        assert adapter["modules_to_save"] == ["classifier"]
    best = load_module(trained_run / "adapter")
    from_ckpt = load_module(next(trained_run.glob("epoch=*.ckpt")))
    for key, value in from_ckpt.trainable_state_dict().items():
        assert torch.equal(best.trainable_state_dict()[key], value), key


def test_guides_inference_code_loads_the_adapter_folder_and_agrees(trained_run: Path, food101_dir: str) -> None:
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    folder = str(trained_run / "adapter")
    labels = AutoConfig.from_pretrained(folder)  # where label2id/id2label come from
    label2id, id2label = labels.label2id, labels.id2label
    # The guide's code, unchanged:
    config = PeftConfig.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(
        config.base_model_name_or_path, label2id=label2id, id2label=id2label, ignore_mismatched_sizes=True
    )
    inference_model = PeftModel.from_pretrained(model, folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)

    images = sorted(Path(food101_dir, "images").rglob("*.jpg"))[:6]
    encoding = image_processor([Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    with torch.no_grad():
        theirs = inference_model.eval()(**encoding).logits
    # The processor squashes to 32x32 where lit_lora resizes and crops; both see 48x48 squares, so they agree.
    ours = lit_lora_logits(trained_run / "adapter", images, folder)
    assert id2label[0] == "tomato"
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_merge_loads_with_plain_transformers_and_agrees(trained_run: Path, tmp_path: Path, food101_dir: str) -> None:
    out = tmp_path / "merged"
    cli_main(["export", f"--ckpt_path={trained_run / 'last.ckpt'}", f"--output_dir={out}", "--merge=true"])
    images = sorted(Path(food101_dir, "images").rglob("*.jpg"))[:5]
    ours = lit_lora_logits(trained_run / "last.ckpt", images, str(out)).softmax(-1)

    # A fresh interpreter in which peft cannot be imported: the merged folder must not need it.
    script = f"""
import sys, json
sys.modules["peft"] = None
from transformers import pipeline
classify = pipeline("image-classification", model={str(out)!r}, device="cpu")
print(json.dumps([classify(p, top_k=4) for p in {[str(p) for p in images]!r}]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    names = load_module(trained_run / "last.ckpt").class_names
    for row, probs in zip(predictions, ours):
        theirs = torch.tensor([next(p["score"] for p in row if p["label"] == name) for name in names])
        torch.testing.assert_close(theirs, probs, atol=1e-4, rtol=0)


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
    cli_main(["predict", *args, f"--ckpt_path={trained_run / source}", f"--data.predict_dir={images_dir}", f"--predictions.output_path={out}"])

    rows = list(csv.DictReader(out.open()))
    images = sorted(str(p) for p in images_dir.rglob("*.jpg"))
    assert [r["path"] for r in rows] == images
    assert list(rows[0]) == ["path", "label", "score", "label_2", "score_2", "label_3", "score_3", "label_4", "score_4"]
    probs = lit_lora_logits(trained_run / "last.ckpt", [Path(p) for p in images], tiny_vit).softmax(-1)
    names = load_module(trained_run / "last.ckpt").class_names
    for row, p in zip(rows, probs):
        assert row["label"] == names[int(p.argmax())]
        assert float(row["score"]) == pytest.approx(float(p.max()), abs=1e-5)
        assert float(row["score"]) >= float(row["score_2"]) >= float(row["score_3"])


def test_vit_b16_adapter_for_101_classes_is_about_2_6_mb(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from lit_lora import LoRAImageClassifier

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig()).save_pretrained(tmp_path / "vit-b16")
    ViTImageProcessor().save_pretrained(tmp_path / "vit-b16")
    module = LoRAImageClassifier(str(tmp_path / "vit-b16"), class_names=[f"class_{i}" for i in range(101)])
    folder = save_adapter_folder(module, tmp_path / "adapter")
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert 667_493 * 4 <= size < 667_493 * 4 + 100_000  # 2.67 MB: LoRA matrices and head in fp32, nothing else
