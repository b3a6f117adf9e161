"""The training loader alone, images/s per epoch, from three places in one run on this machine: the JPEG folder, the
optimized (litdata) dataset on local disk, and the same dataset on a real S3 server (SeaweedFS over HTTPS on
127.0.0.1, started here); plus the time ``optimize`` takes to write each. Not part of the test suite.

    python benchmarks/streaming.py                                  # 2,000 generated 512 px JPEGs, 2 epochs
    python benchmarks/streaming.py --images 5000 --result benchmarks/results/streaming-cpu-2core.json

Every loader hands out the same thing: batches of 128 uint8 training crops at 224 px (the random ViT's processor),
with the data module's default loader workers (one per core). The S3 run starts with an empty litdata chunk cache
(``LITDATA_CACHE_DIR``): epoch 1 downloads the chunks, epoch 2 reads them from that cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the S3 server the tests use
sys.path.insert(0, str(REPO / "benchmarks"))


def epochs_per_second(module, epochs: int) -> list[float]:
    """Iterate the module's training loader ``epochs`` times; images/s of each pass."""
    loader = module.train_dataloader()
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
    parser.add_argument("--epochs", type=int, default=2)
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
        results["jpeg folder"] = epochs_per_second(files, args.epochs)

        start = time.perf_counter()
        Food101DataModule(**common).optimize(str(work / "optimized"))
        results["optimize to local disk s"] = time.perf_counter() - start
        local = Food101DataModule(**common, optimized_dir=str(work / "optimized"))
        local.setup("fit")
        results["optimized, local disk"] = epochs_per_second(local, args.epochs)

        with s3_server(work / "s3") as server:
            os.environ.update(server.env)
            start = time.perf_counter()
            Food101DataModule(**common).optimize(server.url("food"))
            results["optimize to S3 s"] = time.perf_counter() - start
            remote = Food101DataModule(optimized_dir=server.url("food"), image_processor=str(model), dataset=None)
            remote.setup("fit")
            results["optimized, S3 (SeaweedFS, HTTPS, 127.0.0.1)"] = epochs_per_second(remote, args.epochs)

    print(f"\n{args.images} images ({int(args.images * 0.9)} training), {args.epochs} epochs, {results['machine']}")
    print("| training loader reads from | " + " | ".join(f"epoch {e + 1} images/s" for e in range(args.epochs)) + " |")
    print("| --- | " + " | ".join("---" for _ in range(args.epochs)) + " |")
    for name in ("jpeg folder", "optimized, local disk", "optimized, S3 (SeaweedFS, HTTPS, 127.0.0.1)"):
        print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in results[name]) + " |")
    s3_last, local_last = results["optimized, S3 (SeaweedFS, HTTPS, 127.0.0.1)"][-1], results["optimized, local disk"][-1]
    results["s3 / local, last epoch"] = s3_last / local_last
    print(f"S3 / local disk in epoch {args.epochs}: {s3_last / local_last:.0%}; optimize: {results['optimize to local disk s']:.1f} s to disk, "
          f"{results['optimize to S3 s']:.1f} s to S3")
    if args.result:
        args.result.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
