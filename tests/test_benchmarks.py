"""The prepared GPU benchmark runs end to end on a CPU with tiny sizes, so it never fails on the device for a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 90 s on 2 cores: run it with `pytest -m slow` before a device session
def test_gpu_benchmark_dry_run(tmp_path: Path) -> None:
    env = {
        **os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work"), "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = tmp_path / "out"
    runs = {r["name"] for r in json.loads((out / "gpu_result.json").read_text())}
    assert runs == {"guide-workers0", "lit_lora", "lit_lora-optimized", "lit_lora-validate", "lit_lora-predict"}
    step = json.loads((out / "step.json").read_text())
    assert step["bare_step_images_per_sec"] > 0 and step["bare_inference_images_per_sec"] > 0 and step["loader_epoch2_images_per_sec"] > 0
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU benchmark on dry run on the CPU") and "of the bare step" in summary and "faster than the guide" in summary


def test_the_decode_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/decode.py (fast_decode's cost and pixel difference): it stopped running once when ImageSettings
    changed, unnoticed until the next measurement."""
    from test_pipeline import photo

    for i, size in enumerate(((96, 64), (64, 80), (120, 90))):
        photo(tmp_path / f"{i}.jpg", size, seed=i)
    result = subprocess.run(
        [sys.executable, "benchmarks/decode.py", f"--data_dir={tmp_path}", "--size=32", "--repeat=1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("3 images") and [line.split(":")[0].strip() for line in lines[1:]] == ["train", "eval"]


def test_the_worker_start_benchmark_runs(class_folders_dir: str) -> None:
    """benchmarks/worker_start.py (the first batch of a loader whose workers are spawned) runs as its docstring says."""
    result = subprocess.run(
        [sys.executable, "benchmarks/worker_start.py", f"--data_dir={class_folders_dir}", "--start_method=spawn", "--num_workers=1", "--rounds=1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("round 1: first batch after ") and result.stdout.rstrip().endswith("(1 workers, spawn)")


def test_the_worker_shutdown_benchmark_runs() -> None:
    """benchmarks/worker_shutdown.py (spawned workers shut down mid-epoch, plain and with WorkerStart) runs and counts
    both kinds of rounds."""
    result = subprocess.run(
        [sys.executable, "benchmarks/worker_shutdown.py", "--rounds=2", "--num_workers=1", "--image_size=8", "--batch_size=2", "--batches=1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["torch's plain workers", "WorkerStart"]
    assert result.stdout.splitlines()[1] == "WorkerStart: a worker ended abnormally in 0 of 1 shutdowns"
