"""lit_lora against the PEFT guide's own pipeline, one after the other, on the same machine, model and images.

    python benchmarks/compare.py                      # CPU: small random ViT (224 px), 5,000 generated 512 px JPEGs
    python benchmarks/compare.py --model_dir M --data_dir ../shared/food101-sample --epochs 3
    python benchmarks/compare.py --gpu --vit_b16 --workers 16 --compiled --predict   # the GPU variant

Both runs use the same images (90/10 train/validation), batch size, gradient accumulation, epochs and precision
(fp16 mixed on a GPU, fp32 on a CPU, where the guide has no fp16). For each run it prints the whole process's
wall time, training images/s over fit (validation included, as both pipelines validate every epoch), peak
memory, and validation accuracy per epoch; then the ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("apple_pie", "bibimbap", "caesar_salad", "donuts", "edamame", "falafel", "gyoza", "hummus", "nachos", "ramen")


def make_model(folder: Path, vit_b16: bool) -> Path:
    """A randomly initialised ViT saved with save_pretrained: ViT-B/16, or hidden 64 x 2 layers at 224 px."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig() if vit_b16 else ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def _write_image(job: tuple[str, int, int]) -> None:
    from PIL import Image

    path, label, seed = job
    rng = np.random.default_rng(seed)
    height = int(rng.choice([342, 384, 512]))
    field = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((512, height), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32)
    hue = np.array([(label * 97) % 255, (label * 53 + 80) % 255, (label * 31 + 160) % 255], dtype=np.float32)
    yy, xx = np.mgrid[:height, :512]
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * 512, rng.uniform(60, 160)
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = hue
    pixels += rng.normal(0, 8, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_images(root: Path, count: int) -> Path:
    """``count`` learnable 512 px JPEGs of 10 classes in Food-101's layout (all listed in meta/train.txt)."""
    if (root / "meta" / "train.txt").exists() and len((root / "meta" / "train.txt").read_text().split()) == count:
        return root
    jobs, entries = [], []
    for i in range(count):
        label = i % len(CLASSES)
        (root / "images" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        entries.append(f"{CLASSES[label]}/{i:06d}")
        jobs.append((str(root / "images" / f"{entries[-1]}.jpg"), label, i))
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_image, jobs, chunksize=64)
    (root / "meta").mkdir(exist_ok=True)
    (root / "meta" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "meta" / "train.txt").write_text("\n".join(sorted(entries)) + "\n")
    return root


def guide_split(data: Path, seed: int, work: Path) -> Path:
    """The guide's own train/validation split of ``data`` as a Food-101-layout folder lit_lora can read.

    The guide loads the images with the ``imagefolder`` builder and holds out ``train_test_split(test_size=0.1,
    seed)``; the same call here lists its training images in ``meta/train.txt`` and its validation images in
    ``meta/test.txt`` (the images folder is linked, not copied), so that lit_lora, run with
    ``--data.val_split test``, trains and validates on exactly the guide's images.
    """
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    root = (data / "images" if (data / "images").is_dir() else data).resolve()
    dataset = load_dataset("imagefolder", data_dir=str(root), split="train")
    splits = dataset.train_test_split(test_size=0.1, seed=seed)
    folder = work / f"{data.name}-guide-split-{seed}"
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        (folder / "images").symlink_to(root)
    (folder / "meta" / "classes.txt").write_text("\n".join(dataset.features["label"].names) + "\n")
    for split, listing in (("train", "train.txt"), ("test", "test.txt")):
        files = splits[split].cast_column("image", ImageFeature(decode=False))["image"]
        entries = [Path(f["path"]).relative_to(root).with_suffix("").as_posix() for f in files]
        (folder / "meta" / listing).write_text("\n".join(entries) + "\n")
    return folder


def run(name: str, command: list[str], log: Path) -> dict:
    """Run ``command``; return its wall time, peak RSS of it and its children, and its output."""
    print(f"--- {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    text = log.read_text()
    if status != 0:
        print(text[-4000:])
        raise SystemExit(f"{name} failed (status {status}); log: {log}")
    return {"name": name, "wall_seconds": wall, "peak_rss_gb": usage.ru_maxrss / 1e6, "log": text}


def lit_lora_command(subcommand: str, args: argparse.Namespace, work: Path, *options: str) -> list[str]:
    """``python -m lit_lora SUBCOMMAND`` with the recipe config, this benchmark's device, precision, loader
    workers and run folder, then ``options``."""
    command = [
        sys.executable, "-m", "lit_lora", subcommand, "--config", "configs/food101_vit_lora.yaml",
        f"--trainer.accelerator={'gpu' if args.gpu else 'cpu'}", f"--trainer.precision={'16-mixed' if args.gpu else '32-true'}",
        f"--trainer.logger.init_args.save_dir={work / 'runs'}", "--trainer.enable_progress_bar=false",
    ]
    if args.workers is not None:
        command.append(f"--data.num_workers={args.workers}")
    return command + list(options)


def lit_lora_run(name: str, args: argparse.Namespace, model: Path, data: Path, work: Path, extra: list[str]) -> dict:
    runs = work / "runs"
    command = lit_lora_command(
        "fit", args, work,
        f"--model.model_name_or_path={model}", f"--data.data_dir={data}", "--data.train_split=train", "--data.val_split=test",
        f"--data.batch_size={args.batch_size}", f"--data.eval_batch_size={args.batch_size}",
        f"--trainer.accumulate_grad_batches={args.accumulation}", f"--trainer.max_epochs={args.epochs}",
        f"--trainer.logger.init_args.name={name}", f"--seed_everything={args.seed}", f"--data.seed={args.seed}",
    )
    result = run(name, command + extra, work / f"{name}.log")
    match = re.search(r"fit: (\d+) training images in ([\d.]+) s .*?: (\d+) images/s", result["log"])
    result["fit_seconds"], result["fit_images_per_sec"] = float(match.group(2)), float(match.group(3))
    memory = re.search(r"peak GPU memory ([\d.]+) GB", result["log"])
    if memory:
        result["peak_gpu_memory_gb"] = float(memory.group(1))
    run_dir = max((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    result["val_acc_per_epoch"] = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    # Training loop only, per epoch (the first includes worker start-up and, compiled, compilation).
    result["epoch_images_per_sec"] = [float(r["train/images_per_sec"]) for r in rows if r.get("train/images_per_sec")]
    result["run_dir"] = str(run_dir)
    return result


def guide_run(name: str, args: argparse.Namespace, model: Path, data: Path, split: Path, work: Path, workers: int) -> dict:
    out = work / f"{name}.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "guide_pipeline.py"), f"--model_dir={model}", f"--data_dir={data}",
        f"--epochs={args.epochs}", f"--batch_size={args.batch_size}", f"--accumulation={args.accumulation}",
        f"--workers={workers}", f"--seed={args.seed}", f"--output_dir={work / name}", f"--result={out}",
    ]
    result = run(name, command, work / f"{name}.log")
    result.update(json.loads(out.read_text()))
    ours = {str((split / "images" / f"{e}.jpg").resolve()) for e in (split / "meta" / "test.txt").read_text().split()}
    if set(result.pop("val_files")) != ours:
        raise SystemExit(f"{name} validated on other images than {split}/meta/test.txt: the accuracies would not compare")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, help="a local model folder (default: a random ViT built here)")
    parser.add_argument("--data_dir", type=Path, help="a Food-101-layout folder (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=5000, help="generated images (90%% train, 10%% validation)")
    parser.add_argument("--vit_b16", action="store_true", help="build a random ViT-B/16 instead of the small ViT")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--workers", type=int, help="lit_lora loader workers (default: its own, one per core)")
    parser.add_argument("--guide_workers", type=int, nargs="*", default=[0], help="guide runs with these dataloader_num_workers")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU in fp16 mixed precision")
    parser.add_argument("--compiled", action="store_true", help="also run lit_lora with --model.compile true")
    parser.add_argument("--predict", action="store_true", help="also measure lit_lora predict (inference) throughput")
    parser.add_argument("--optimized", action="store_true", help="also run lit_lora on an optimized (litdata) dataset, built (cold) inside that run")
    parser.add_argument("--validate", action="store_true", help="also measure lit_lora validate (inference on the held-out images)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything this many times, alternating (noisy machines)")
    parser.add_argument("--skip_guide", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--result", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = args.model_dir or make_model(args.work_dir / ("vit-b16" if args.vit_b16 else "vit-small"), args.vit_b16)
    data = args.data_dir or make_images(args.work_dir / f"images-{args.images}", args.images)
    split = guide_split(data, args.seed, args.work_dir)  # lit_lora trains and validates on the guide's split
    print(f"assets ready in {time.perf_counter() - t0:.0f} s: model {model}, images {data}, the guide's split {split}", flush=True)

    results = []
    for round_ in range(1, args.rounds + 1):  # rounds alternate the runs, so slow spells of the machine hit both
        tag = f"-round{round_}" if args.rounds > 1 else ""
        if not args.skip_guide:
            for workers in args.guide_workers:
                results.append(guide_run(f"guide-workers{workers}{tag}", args, model, data, split, args.work_dir, workers))
        results.append(lit_lora_run(f"lit_lora{tag}", args, model, split, args.work_dir, []))
        optimized_dir = args.work_dir / f"optimized-{os.getpid()}-{round_}"  # cold: built inside the measured run
        if args.optimized:
            results.append(lit_lora_run(f"lit_lora-optimized{tag}", args, model, split, args.work_dir, [f"--data.optimized_dir={optimized_dir}"]))
            shutil.rmtree(optimized_dir)  # measured cold: no later run reads it (1.2 GB for 5,000 images)
        if args.compiled:
            results.append(lit_lora_run(f"lit_lora-compiled{tag}", args, model, split, args.work_dir, ["--model.compile=true"]))
    fitted = results[-1]
    if args.validate:
        ckpt = Path(fitted["run_dir"]) / "last.ckpt"
        command = lit_lora_command(
            "validate", args, args.work_dir, f"--ckpt_path={ckpt}", f"--data.data_dir={split}", "--data.train_split=train",
            "--data.val_split=test", f"--data.eval_batch_size={args.batch_size * 2}",
        )
        result = run("lit_lora-validate", command, args.work_dir / "lit_lora-validate.log")
        match = re.search(r"validate: (\d+) images in ([\d.]+) s: (\d+) images/s", result["log"])
        result["predict_images_per_sec"] = float(match.group(3))
        results.append(result)
    if args.predict:
        adapter = Path(fitted["run_dir"]) / "adapter-last"
        command = lit_lora_command(
            "predict", args, args.work_dir, f"--ckpt_path={adapter}", f"--data.predict_dir={data}",
            f"--data.eval_batch_size={args.batch_size * 2}", f"--predictions.output_path={args.work_dir / 'predictions.csv'}",
        )
        result = run("lit_lora-predict", command, args.work_dir / "lit_lora-predict.log")
        match = re.search(r"predict: (\d+) images in ([\d.]+) s: (\d+) images/s", result["log"])
        result["predict_images_per_sec"] = float(match.group(3))
        results.append(result)

    print("\n| run | process wall s | images/s (fit, or predict) | train loop images/s per epoch | peak RSS GB | peak GPU GB | val acc per epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        speed = r.get("fit_images_per_sec", r.get("predict_images_per_sec", 0))
        accs = " ".join(f"{a:.3f}" for a in r.get("val_acc_per_epoch", []))
        epochs = " ".join(f"{v:.0f}" for v in r.get("epoch_images_per_sec", []))
        gpu = f"{r['peak_gpu_memory_gb']:.1f}" if "peak_gpu_memory_gb" in r else "-"
        print(f"| {r['name']} | {r['wall_seconds']:.1f} | {speed:.0f} | {epochs} | {r['peak_rss_gb']:.2f} | {gpu} | {accs} |")
    def base(name: str) -> str:
        return re.sub(r"-round\d+$", "", name)

    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for ours in (r for r in results if base(r["name"]) in ("lit_lora", "lit_lora-optimized", "lit_lora-compiled")):
        round_tag = ours["name"][len(base(ours["name"])):]
        for r in results:
            if r["name"].startswith("guide") and r["name"][len(base(r["name"])):] == round_tag:
                ratios.setdefault((base(ours["name"]), base(r["name"])), []).append(
                    (ours["wall_seconds"] / r["wall_seconds"], ours["fit_images_per_sec"] / r["fit_images_per_sec"])
                )
    for (ours_name, guide_name), pairs in ratios.items():
        each = ", ".join(f"{w:.2f}x" for w, _ in pairs)
        print(
            f"{ours_name} vs {guide_name}: wall time {statistics.median(p[0] for p in pairs):.2f}x (lit_lora / guide; "
            f"median of {len(pairs)} round(s): {each}), training throughput {statistics.median(p[1] for p in pairs):.2f}x"
        )
    if args.result:
        args.result.write_text(json.dumps([{k: v for k, v in r.items() if k != "log"} for r in results], indent=2))


if __name__ == "__main__":
    main()
