"""Do stock tools predict what lit_lora predicts? Fine-tune a small random ViT on real photos, then compare, image by
image, ``python -m lit_lora predict`` as it comes (no option) with ``pipeline("image-classification")`` on the
merged export and with ``PeftModel.from_pretrained`` plus the exported image processor (on transformers'
``load_image``, what the pipeline reads files with); and predict with ``--data.fast_eval_decode true`` (the
approximation a user may opt into) against the default. Besides the photos: an RGBA PNG with real transparency, a
palette PNG with a transparent colour, a 16-bit PNG, a CMYK JPEG and an EXIF-rotated JPEG made from them.

    python benchmarks/agreement.py --data_dir ../shared/food101-sample --out benchmarks/results/agreement-cpu.json

Prints the number of images, how many are not square, top-1 agreements and the largest probability differences.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lit_lora", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])


def read_predictions(path: Path) -> dict[str, dict[str, float]]:
    """image path -> {label: probability} for the top labels of each row."""
    rows = {}
    for row in csv.DictReader(path.open()):
        labels = [row["label"]] + [row[f"label_{i}"] for i in range(2, 6) if f"label_{i}" in row]
        scores = [row["score"]] + [row[f"score_{i}"] for i in range(2, 6) if f"score_{i}" in row]
        rows[row["path"]] = {label: float(score) for label, score in zip(labels, scores)}
    return rows


def compare(name: str, ours: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]]) -> dict[str, float]:
    same_top1 = sum(max(ours[p], key=ours[p].get) == max(theirs[p], key=theirs[p].get) for p in ours)
    worst = max(abs(ours[p][label] - theirs[p].get(label, 0.0)) for p in ours for label in ours[p])
    print(f"{name}: same top-1 on {same_top1}/{len(ours)} images; largest probability difference {worst:.2e}")
    return {"same_top1": same_top1, "images": len(ours), "max_prob_diff": worst}


def write_odd_files(photos: list[str], folder: Path) -> list[str]:
    """Files stock tools read in their own way, made from the first photos."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rgb = [Image.open(p).convert("RGB") for p in photos[:5]]
    rgba = rgb[0].copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    rgb[1].quantize(64).save(folder / "palette.png", transparency=0)
    Image.fromarray((np.asarray(rgb[2].convert("L"), dtype=np.uint16) * 257).astype(np.uint16)).save(folder / "sixteen_bit.png")
    rgb[3].convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb[4].save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    return sorted(str(p) for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/food101-sample")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    options = parser.parse_args()
    data_dir = Path(options.data_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="lit_lora-agreement-"))

    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    ViTModel(config).save_pretrained(work / "vit")
    ViTImageProcessor().save_pretrained(work / "vit")
    photos = sorted(str(p) for p in (data_dir / "images").rglob("*.jpg"))
    sizes = [Image.open(p).size for p in photos]
    print(f"{len(photos)} photos, {sum(w != h for w, h in sizes)} not square")
    odd = write_odd_files(photos, work / "odd")
    images = photos + odd

    common = [f"--model.model_name_or_path={work / 'vit'}", "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false"]
    run("fit", *common, f"--data.data_dir={data_dir}", "--data.train_split=train", f"--trainer.max_epochs={options.epochs}", "--data.batch_size=32", "--trainer.logger.init_args.save_dir=runs", cwd=work)
    adapter = next(work.glob("runs/*/version_0/adapter-last"))
    folders = json.dumps([str(data_dir / "images"), str(work / "odd")])
    run("predict", *common, f"--ckpt_path={adapter}", f"--data.predict_dir={folders}", f"--predictions.output_path={work / 'default.csv'}", cwd=work)
    run("predict", *common, f"--ckpt_path={adapter}", f"--data.predict_dir={folders}", "--data.fast_eval_decode=true", f"--predictions.output_path={work / 'fast.csv'}", cwd=work)
    run("export", f"--ckpt_path={adapter}", f"--output_dir={work / 'merged'}", "--merge=true", cwd=work)

    from peft import PeftConfig, PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
    from transformers.image_utils import load_image

    classify = pipeline("image-classification", model=str(work / "merged"), device="cpu")
    piped = {p: {r["label"]: r["score"] for r in classify(p, top_k=5)} for p in images}
    labels = json.loads((adapter / "labels.json").read_text())
    base = AutoModelForImageClassification.from_pretrained(
        PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path, id2label={int(k): v for k, v in labels["id2label"].items()}, label2id=labels["label2id"]
    )
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    processor = AutoImageProcessor.from_pretrained(str(adapter))
    peft_rows = {}
    with torch.no_grad():
        for p in images:
            probs = peft_model(**processor(load_image(p), return_tensors="pt")).logits.softmax(-1)[0]
            top = probs.topk(5)
            peft_rows[p] = {base.config.id2label[int(i)]: float(s) for s, i in zip(top.values, top.indices)}

    default, fast = read_predictions(work / "default.csv"), read_predictions(work / "fast.csv")
    odd_only = {p: default[p] for p in odd}
    results = {
        "pipeline(merged) vs predict": compare("pipeline on the merged export vs lit_lora predict (default)", default, piped),
        "PeftModel vs predict": compare("PeftModel + exported processor vs lit_lora predict (default)", default, peft_rows),
        "odd files: pipeline(merged) vs predict": compare("  of which RGBA, palette, 16-bit, CMYK, EXIF-rotated", odd_only, piped),
        "fast_eval_decode true vs default": compare("lit_lora predict, fast_eval_decode true vs the default", default, fast),
    }
    report = {
        "command": "python benchmarks/agreement.py --data_dir ../shared/food101-sample",
        "machine": "2-core AMD EPYC developer machine, CPU only; torch 2.14.1, transformers 5.24.0, peft 0.21.2, lightning 2.6.6",
        "photos": len(photos),
        "not_square": sum(w != h for w, h in sizes),
        "odd_files": [Path(p).name for p in odd],
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if options.out:
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
