"""Every architecture the README names trains at its processor's crop size through the CLI, then predicts."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_cli import common_args

from lit_lora.cli import cli_main


def tiny_family(name: str, folder: Path) -> tuple[tuple[int, int], list[str]]:
    """Save a tiny random backbone of ``name`` with the image processor its model cards ship (class and sizes).

    Returns:
        The crop size the model must receive, and LoRA targets for it.
    """
    import transformers as tf

    torch.manual_seed(0)
    vit_like = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if name == "vit":  # google/vit-base-patch16-224-in21k: 224 px, no crop
        model, processor = tf.ViTModel(tf.ViTConfig(image_size=224, patch_size=16, **vit_like)), tf.ViTImageProcessor()
    elif name == "deit":  # facebook/deit-*-patch16-224: resize 256, crop 224, bicubic
        model, processor = tf.DeiTModel(tf.DeiTConfig(image_size=224, patch_size=16, **vit_like)), tf.DeiTImageProcessor()
    elif name == "swin":  # microsoft/swin-tiny-patch4-window7-224: ViTImageProcessor at 224
        config = tf.SwinConfig(image_size=224, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=7)
        model, processor = tf.SwinModel(config), tf.ViTImageProcessor(**imagenet)
    elif name == "dinov2":  # facebook/dinov2-*: BitImageProcessor, shortest edge 256, crop 224, bicubic
        model = tf.Dinov2Model(tf.Dinov2Config(image_size=224, patch_size=14, **vit_like))
        processor = tf.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **imagenet)
    elif name == "convnext":  # facebook/convnext-tiny-224: shortest edge 224 with crop_pct 0.875 (resize 256)
        model = tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
        processor = tf.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, **imagenet)
    elif name == "beit":  # microsoft/beit-base-patch16-224: BeitImageProcessor's defaults
        model, processor = tf.BeitModel(tf.BeitConfig(image_size=224, patch_size=16, **vit_like)), tf.BeitImageProcessor()
    else:
        raise ValueError(name)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) and processor.crop_size else None
    size = processor.size
    expected = (crop.height, crop.width) if crop else (size.shortest_edge,) * 2 if size.shortest_edge else (size.height, size.width)
    return expected, ["pwconv1", "pwconv2"] if name == "convnext" else ["query", "value"]


class RecordInputSize(pl.Callback):
    """Remembers the (height, width) of every batch the model receives, in training and prediction."""

    seen: list[tuple[str, tuple[int, int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordInputSize.seen.append(("fit", tuple(batch["pixel_values"].shape[-2:])))

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        RecordInputSize.seen.append(("predict", tuple(batch["pixel_values"].shape[-2:])))


@pytest.mark.parametrize("family", ["vit", "deit", "swin", "dinov2", "convnext", "beit"])
def test_family_trains_and_predicts_at_the_processors_crop_size(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, food101_dir: str) -> None:
    model_dir = tmp_path / family
    expected, targets = tiny_family(family, model_dir)
    monkeypatch.chdir(tmp_path)
    RecordInputSize.seen = []
    args = common_args(str(model_dir), food101_dir) + [
        f"--model.target_modules={targets}",
        "--trainer.callbacks+=test_families.RecordInputSize",
        "--data.batch_size=4",
    ]
    fit = cli_main(["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    assert fit.trainer.global_step == 2
    assert fit.model.image_settings.crop == expected
    # Evaluation resizes the shorter side to this, then centre-crops (timm's crop_pct; transformers' crop_size).
    assert fit.model.image_settings.resize == {"deit": 256, "dinov2": 256, "convnext": 256}.get(family, 224)
    assert fit.datamodule.image_settings == fit.model.image_settings
    ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
    predict_args = [a for a in args if not a.startswith("--data.data_dir")]
    out = tmp_path / "predictions.csv"
    images = Path(food101_dir) / "images" / "banana"
    cli_main(["predict", *predict_args, f"--ckpt_path={ckpt}", f"--data.predict_dir={images}", f"--predictions.output_path={out}"])
    assert len(list(csv.DictReader(out.open()))) == len(list(images.glob("*.jpg")))
    stages = {stage for stage, _ in RecordInputSize.seen}
    assert stages == {"fit", "predict"} and {size for _, size in RecordInputSize.seen} == {expected}
