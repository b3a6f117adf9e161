"""The training loader alone, images/s per epoch, from three places in one run on this machine: the JPEG folder, the
optimized (litdata) dataset on local disk, and the same dataset on a real S3 server (SeaweedFS over HTTPS on
127.0.0.1, started here); plus the time ``optimize`` takes to write each. Not part of the test suite.

    python benchmarks/streaming.py                                  # 2,000 generated 512 px JPEGs, 3 epochs
    python benchmarks/streaming.py --images 8000 --result benchmarks/results/streaming-cpu-2core-8000.json

Every loader hands out the same thing: batches of 128 uint8 training crops at 224 px (the random ViT's processor),
with the data module's default loader workers (one per core). The S3 loader starts with an empty litdata chunk cache
(``LITDATA_CACHE_DIR``): epoch 1 downloads the chunks, later epochs read them from that cache. The two optimized
loaders take turns, an epoch each, while the server runs: an epoch lasts about 1.5 s on 2 cores, and measured minutes
apart (before 2026-12-01) the same code gave 78 to 109 % in epoch 2; taking turns, 94 to 110 % an epoch (medians
103-110 %).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the S3 server the tests use
sys.path.insert(0, str(REPO / "benchmarks"))


LOCAL, S3 = "optimized, local disk", "optimized, S3 (SeaweedFS, HTTPS, 127.0.0.1)"


def epochs_per_second(loader, epochs: int) -> list[float]:
    """Iterate a training loader ``epochs`` times; images/s of each pass."""
    rates = []
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch") and not hasattr(loader.dataset, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch["labels"])
        rates.append(count / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--result", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": args.images}
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="streaming-") as work:
        work = Path(work)
        os.environ["LITDATA_CACHE_DIR"] = str(work / "litdata-cache")  # before litdata is imported: it reads it once
        from compare import make_images, make_model
        from s3_server import s3_server

        from lit_lora import Food101DataModule

        model = make_model(args.work_dir / "vit-small", vit_b16=False)
        data = make_images(args.work_dir / f"images-{args.images}", args.images)
        common = dict(data_dir=str(data), train_split="train", val_size=0.1, image_processor=str(model))
        files = Food101DataModule(**common)
        files.setup("fit")
        results["jpeg folder"] = epochs_per_second(files.train_dataloader(), args.epochs)

        start = time.perf_counter()
        Food101DataModule(**common).optimize(str(work / "optimized"))
        results["optimize to local disk s"] = time.perf_counter() - start

        with s3_server(work / "s3") as server:
            os.environ.update(server.env)
            start = time.perf_counter()
            Food101DataModule(**common).optimize(server.url("food"))
            results["optimize to S3 s"] = time.perf_counter() - start
            # Both read by nodes without the images; their epochs alternate, with the server running for both.
            loaders = {}
            for name, location in ((LOCAL, str(work / "optimized")), (S3, server.url("food"))):
                module = Food101DataModule(**{**common, "data_dir": None}, optimized_dir=location, dataset=None)
                module.setup("fit")
                loaders[name] = module.train_dataloader()
            for name in loaders:
                results[name] = []
            for _ in range(args.epochs):
                for name, loader in loaders.items():
                    results[name] += epochs_per_second(loader, 1)

    print(f"\n{args.images} images ({int(args.images * 0.9)} training), {args.epochs} epochs, {results['machine']}")
    print("| training loader reads from | " + " | ".join(f"epoch {e + 1} images/s" for e in range(args.epochs)) + " |")
    print("| --- | " + " | ".join("---" for _ in range(args.epochs)) + " |")
    for name in ("jpeg folder", LOCAL, S3):
        print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in results[name]) + " |")
    ratios = [s3 / local for s3, local in zip(results[S3][1:], results[LOCAL][1:])]  # epoch 1 downloads the chunks
    results["s3 / local, epochs 2+"] = ratios
    print(f"S3 / local disk from epoch 2 on: {', '.join(f'{r:.0%}' for r in ratios)} (median {statistics.median(ratios):.0%}); optimize: "
          f"{results['optimize to local disk s']:.1f} s to disk, {results['optimize to S3 s']:.1f} s to S3")
    if args.result:
        args.result.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
