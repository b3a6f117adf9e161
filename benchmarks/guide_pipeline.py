"""The PEFT guide "Image classification using LoRA", as the guide writes it, for timing against lit_lora.

Adapted only where current versions or an offline machine require it, each marked "ADAPTED":
- the data is a local Food-101-layout folder read with the `imagefolder` builder instead of the hub's `food101`;
- `target_modules=["q_proj", "v_proj"]` (transformers 5 renamed ViT's `query`/`value`);
- `eval_strategy` / `processing_class` (renamed Trainer arguments);
- accuracy computed with numpy instead of `evaluate.load("accuracy")`, which downloads its script;
- fp16 only where there is a GPU; no push to the hub.

    python benchmarks/guide_pipeline.py --model_dir M --data_dir D --epochs 3 --result result.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_dir", required=True, help="Food-101 layout (images/<class>/*.jpg) or class folders")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="dataloader_num_workers (the guide leaves the default, 0)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="/tmp/guide-pipeline-output")
    parser.add_argument("--result", required=True, help="JSON file for the measured figures")
    args = parser.parse_args()

    from pathlib import Path

    from datasets import Image as ImageFeature
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        Resize,
        ToTensor,
    )
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

    images = Path(args.data_dir) / "images"
    # ADAPTED: a local folder instead of load_dataset("food101", split="train[:5000]").
    dataset = load_dataset("imagefolder", data_dir=str(images if images.is_dir() else args.data_dir), split="train")
    labels = dataset.features["label"].names
    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = i
        id2label[i] = label

    image_processor = AutoImageProcessor.from_pretrained(args.model_dir)
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_transforms = Compose(
        [RandomResizedCrop(image_processor.size["height"]), RandomHorizontalFlip(), ToTensor(), normalize]
    )
    val_transforms = Compose(
        [Resize(image_processor.size["height"]), CenterCrop(image_processor.size["height"]), ToTensor(), normalize]
    )

    def preprocess_train(example_batch):
        example_batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    def preprocess_val(example_batch):
        example_batch["pixel_values"] = [val_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    splits = dataset.train_test_split(test_size=0.1, seed=args.seed)
    train_ds = splits["train"]
    val_ds = splits["test"]
    # Not the guide's: which images it validates on, so that the comparison can check lit_lora used the same ones.
    val_files = [str(Path(f["path"]).resolve()) for f in val_ds.cast_column("image", ImageFeature(decode=False))["image"]]
    train_ds.set_transform(preprocess_train)
    val_ds.set_transform(preprocess_val)

    model = AutoModelForImageClassification.from_pretrained(
        args.model_dir, label2id=label2id, id2label=id2label, ignore_mismatched_sizes=True
    )
    config = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],  # ADAPTED: ["query", "value"] before transformers 5
        lora_dropout=0.1,
        bias="none",
        modules_to_save=["classifier"],
    )
    lora_model = get_peft_model(model, config)
    lora_model.print_trainable_parameters()

    gpu = torch.cuda.is_available()
    training_args = TrainingArguments(
        args.output_dir,
        remove_unused_columns=False,
        eval_strategy="epoch",  # ADAPTED: evaluation_strategy
        save_strategy="epoch",
        learning_rate=5e-3,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        per_device_eval_batch_size=args.batch_size,
        fp16=gpu,  # ADAPTED: fp16=True needs a GPU
        num_train_epochs=args.epochs,
        logging_steps=10,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        push_to_hub=False,  # ADAPTED: offline
        label_names=["labels"],
        dataloader_num_workers=args.workers,
        seed=args.seed,
        report_to=[],
    )

    def compute_metrics(eval_pred):
        # ADAPTED: evaluate.load("accuracy") downloads its script; this is the same number.
        predictions = np.argmax(eval_pred.predictions, axis=1)
        return {"accuracy": float((predictions == eval_pred.label_ids).mean())}

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    trainer = Trainer(
        lora_model,
        training_args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=image_processor,  # ADAPTED: tokenizer=
        compute_metrics=compute_metrics,
        data_collator=collate_fn,
    )
    start = time.perf_counter()
    train_results = trainer.train()
    seconds = time.perf_counter() - start
    history = [log["eval_accuracy"] for log in trainer.state.log_history if "eval_accuracy" in log]
    result = {
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "epochs": args.epochs,
        "fit_seconds": seconds,
        "fit_images_per_sec": len(train_ds) * args.epochs / seconds,
        "train_runtime": train_results.metrics["train_runtime"],
        "val_acc_per_epoch": history,
        "optimizer_steps": trainer.state.global_step,
        "val_files": val_files,
    }
    if gpu:
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "val_files"}))


if __name__ == "__main__":
    main()
