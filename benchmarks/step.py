"""The ceilings a fit loop is measured against: the bare training step, bare inference, and the training loader
alone, for one model and one image folder, on one device.

    python benchmarks/step.py --model_dir M --data_dir D [--device cuda] [--result out.json]

- bare step: `LoRAImageClassifier` on uint8 batches already on the device, the recipe's precision (fp16 autocast
  with a gradient scaler on a GPU), gradient clipping at 1.0, AdamW every ``accumulation`` batches;
- bare inference: forward passes in eval mode at twice the batch size;
- loader alone: `Food101DataModule`'s training loader for one epoch, no model (what the CPUs can feed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="timed training batches (after 8 warm-up batches)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()

    import torch

    from lit_lora import Food101DataModule, LoRAImageClassifier

    data = Food101DataModule(data_dir=args.data_dir, train_split="train", batch_size=args.batch_size, num_workers=args.workers, image_processor=args.model_dir)
    model = LoRAImageClassifier(args.model_dir, class_names=data.class_names).to(args.device)
    height, width = model.image_settings.crop
    gpu = args.device.startswith("cuda")
    pixels = torch.randint(0, 256, (args.batch_size, 3, height, width), dtype=torch.uint8, device=args.device)
    labels = torch.randint(0, len(data.class_names), (args.batch_size,), device=args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=gpu)
    autocast = torch.autocast(device_type="cuda" if gpu else "cpu", dtype=torch.float16 if gpu else torch.bfloat16, enabled=gpu)
    if gpu:
        torch.cuda.reset_peak_memory_stats()

    def train(batches: int) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        for i in range(batches):
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(pixels), labels) / args.accumulation
            scaler.scale(loss).backward()
            if (i + 1) % args.accumulation == 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        return time.perf_counter() - start

    model.train()
    train(8)
    seconds = train(args.steps)
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu", "batch_size": args.batch_size, "input": [height, width]}
    result["bare_step_images_per_sec"] = args.steps * args.batch_size / seconds

    model.eval()
    batch = torch.cat([pixels, pixels])
    with torch.no_grad(), autocast:
        for _ in range(3):
            model(batch)
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(max(args.steps // 2, 1)):
            model(batch)
        synchronize(args.device)
    result["bare_inference_images_per_sec"] = max(args.steps // 2, 1) * len(batch) / (time.perf_counter() - start)
    if gpu:
        result["bare_step_peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9

    data.setup("fit")
    loader = data.train_dataloader()
    for epoch in range(2):  # the first epoch includes starting the workers
        loader.sampler.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += len(batch.get("labels", []))
        result[f"loader_epoch{epoch + 1}_images_per_sec"] = images / (time.perf_counter() - start)
    print(json.dumps(result, indent=2))
    if args.result:
        args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
