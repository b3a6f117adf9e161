"""Do stock tools predict what lit_lora predicts? Fine-tune a small random ViT on real photos, then compare, image by
image, ``python -m lit_lora predict`` (fast_decode off and on) with ``pipeline("image-classification")`` on the
merged export and with ``PeftModel.from_pretrained`` plus the exported image processor.

    python benchmarks/agreement.py --data_dir ../shared/food101-sample

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/food101-sample")
    parser.add_argument("--epochs", type=int, default=3)
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
    images = sorted(str(p) for p in (data_dir / "images").rglob("*.jpg"))
    sizes = [Image.open(p).size for p in images]
    print(f"{len(images)} images, {sum(w != h for w, h in sizes)} not square")

    common = [f"--model.model_name_or_path={work / 'vit'}", "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false"]
    run("fit", *common, f"--data.data_dir={data_dir}", "--data.train_split=train", f"--trainer.max_epochs={options.epochs}", "--data.batch_size=32", "--trainer.logger.init_args.save_dir=runs", cwd=work)
    adapter = next(work.glob("runs/*/version_0/adapter-last"))
    for fast in ("false", "true"):
        run("predict", *common, f"--ckpt_path={adapter}", f"--data.predict_dir={data_dir / 'images'}", f"--data.fast_decode={fast}", f"--predictions.output_path={work / f'fast_{fast}.csv'}", cwd=work)
    run("export", f"--ckpt_path={adapter}", f"--output_dir={work / 'merged'}", "--merge=true", cwd=work)

    from peft import PeftConfig, PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

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
            probs = peft_model(**processor(Image.open(p), return_tensors="pt")).logits.softmax(-1)[0]
            top = probs.topk(5)
            peft_rows[p] = {base.config.id2label[int(i)]: float(s) for s, i in zip(top.values, top.indices)}

    exact, fast = read_predictions(work / "fast_false.csv"), read_predictions(work / "fast_true.csv")
    results = {
        "pipeline(merged) vs predict": compare("pipeline on the merged export vs lit_lora predict (fast_decode false)", exact, piped),
        "PeftModel vs predict": compare("PeftModel + exported processor vs lit_lora predict (fast_decode false)", exact, peft_rows),
        "fast_decode true vs false": compare("lit_lora predict, fast_decode true vs false", exact, fast),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
