"""The GPU benchmark's summary, from what `gpu.sh` collected: the runs, the ceilings and the ratios issue 14 asks for.

    python benchmarks/gpu_report.py gpu_result.json step.json gpu.txt
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(result_path: str, step_path: str, machine_path: str) -> None:
    runs = json.loads(Path(result_path).read_text())
    step = json.loads(Path(step_path).read_text())
    machine = Path(machine_path).read_text().splitlines()[0]
    by_name = {re.sub(r"-round\d+$", "", r["name"]): r for r in runs}
    print(f"# GPU benchmark on {machine}\n")
    print("| run | process wall s | images/s | training loop images/s per epoch | fixed cost s | peak GPU GB | val acc per epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in by_name.items():
        speed = r.get("fit_images_per_sec", r.get("predict_images_per_sec", 0))
        loop = " / ".join(f"{v:.0f}" for v in r.get("epoch_images_per_sec", []))
        # Process wall minus the fit loop (training and validation, ThroughputLogger's fit time).
        fixed = f"{r['wall_seconds'] - r['fit_seconds']:.1f}" if "fit_seconds" in r and name.startswith("lit_lora") else ""
        gpu = f"{r['peak_gpu_memory_gb']:.1f}" if "peak_gpu_memory_gb" in r else ""
        accs = " / ".join(f"{a:.3f}" for a in r.get("val_acc_per_epoch", []))
        print(f"| {name} | {r['wall_seconds']:.1f} | {speed:.0f} | {loop} | {fixed} | {gpu} | {accs} |")
    bare = step["bare_step_images_per_sec"]
    print(f"\nbare training step {bare:.0f} images/s (batch {step['batch_size']}, input {step['input']}); bare inference "
          f"{step['bare_inference_images_per_sec']:.0f} images/s; training loader alone {step['loader_epoch1_images_per_sec']:.0f} / "
          f"{step['loader_epoch2_images_per_sec']:.0f} images/s (epochs 1 / 2)")
    for name in ("lit_lora", "lit_lora-optimized"):
        epochs = by_name.get(name, {}).get("epoch_images_per_sec", [])
        if epochs:
            print(f"{name}: training loop in its last epoch at {epochs[-1] / bare:.0%} of the bare step")
    guide = by_name.get("guide-workers0")
    ours = by_name.get("lit_lora")
    if guide and ours:
        print(f"lit_lora fit: {guide['wall_seconds'] / ours['wall_seconds']:.1f}x faster than the guide as written (process wall)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
