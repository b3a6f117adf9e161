"""Per-image cost and pixel difference of the guide's torchvision preprocessing vs lit_lora's fast decode.

    python benchmarks/decode.py --data_dir ../shared/food101-sample --size 224

Runs on one core (no workers), each image through both paths, and prints ms/image for each, the ratio, and
the mean and 99th-percentile absolute difference in uint8 levels of the evaluation crops (deterministic).
For the random training crop the same crop parameters are drawn for both paths (same seed per image).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lit_lora.images import FileTable
from lit_lora.sources import is_image_file
from lit_lora.transforms import ImageSettings, eval_transform, train_transform


def run(table: FileTable, transform, seeds: list[int]) -> tuple[float, list[torch.Tensor]]:
    outputs = []
    start = time.perf_counter()
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        with table.open(i) as image:
            outputs.append(transform(image))
    return (time.perf_counter() - start) / len(seeds) * 1000, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/food101-sample")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the images (the best is reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted(str(p) for p in Path(args.data_dir).rglob("*") if is_image_file(p))
    table = FileTable(paths, [0] * len(paths))
    settings = ImageSettings(crop=(args.size, args.size), resize=args.size)
    seeds = list(range(len(paths)))
    print(f"{len(paths)} images from {args.data_dir}, output {args.size}px, 1 thread")
    for name, make in (("train", train_transform), ("eval", eval_transform)):
        guide_ms = min(run(table, make(settings, fast_decode=False), seeds)[0] for _ in range(args.repeat))
        fast_ms = min(run(table, make(settings, fast_decode=True), seeds)[0] for _ in range(args.repeat))
        _, guide_out = run(table, make(settings, fast_decode=False), seeds)
        _, fast_out = run(table, make(settings, fast_decode=True), seeds)
        diff = torch.cat([(a.int() - b.int()).abs().flatten() for a, b in zip(guide_out, fast_out)]).float().numpy()
        print(
            f"{name:5s}: guide {guide_ms:.2f} ms/image, fast {fast_ms:.2f} ms/image, {guide_ms / fast_ms:.2f}x; "
            f"|difference| mean {diff.mean():.2f}, p99 {np.percentile(diff, 99):.0f} (uint8 levels)"
        )


if __name__ == "__main__":
    main()
