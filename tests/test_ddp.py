"""Two processes (DDP over gloo on the CPU) through the real CLI: the same numbers and files as one process."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import common_args, finish_cli, run_cli, start_cli

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


def logged(run: Path, key: str) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.slow  # 70 s; tests/test_streaming.py runs fit, validate and predict on two processes in the default run
def test_fit_validate_predict_on_two_processes(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    # val_size 0.3 of 48 -> 14 validation images: uneven over 2 processes (a padded sampler would count 2 twice).
    args = [a for a in common_args(tiny_vit, food101_dir) if "val_size" not in a] + ["--data.val_size=0.3", "--data.batch_size=4"]
    fitted = run_cli(["fit", *args, *DDP, "--trainer.max_epochs=2"], tmp_path)
    assert "sync_dist=True" not in fitted.stdout + fitted.stderr  # train/images_per_sec is reduced across processes
    run = tmp_path / "checkpoints" / "run" / "version_0"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith((".", "events.out.tfevents"))) == sorted(
        ["adapter", "adapter-last", "config.yaml", "hparams.yaml", "last.ckpt", "metrics.csv", "training_curves.png", next(run.glob("epoch=*.ckpt")).name]
    )
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 2 * 5  # 34 images / 2 processes / 4 -> 5 steps

    # Validation on two processes gives exactly the single-process figures: each image counted once.
    # validate writes its report into its own subfolder of the checkpoint's run folder, not a new logger version.
    run_cli(["validate", *args, *DDP, f"--ckpt_path={run / 'last.ckpt'}"], tmp_path)
    two = json.loads((run / "validate" / "validate_report" / "metrics.json").read_text())
    run_cli(["validate", *args, f"--ckpt_path={run / 'last.ckpt'}"], tmp_path)
    one = json.loads((run / "validate" / "validate_report" / "metrics.json").read_text())
    assert two["val/acc"] == pytest.approx(one["val/acc"], abs=1e-6)
    assert two["val/loss"] == pytest.approx(one["val/loss"], abs=1e-5)
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]

    # One predictions.csv with every image exactly once, in sorted order.
    out = tmp_path / "predictions.csv"
    images = sorted(str(p) for p in (Path(food101_dir) / "images").rglob("*.jpg"))
    run_cli(["predict", *args, *DDP, f"--ckpt_path={run / 'adapter-last'}", f"--data.predict_dir={Path(food101_dir) / 'images'}", f"--predictions.output_path={out}"], tmp_path)
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == images
    assert not list(tmp_path.glob(".predictions.csv.*"))  # the per-process parts are merged and removed
    assert yaml.safe_load((run / "hparams.yaml").read_text())["class_names"] == ["tomato", "matcha", "blueberry", "banana"]


def test_a_ddp_spawn_fit_through_the_cli_trains_and_says_what_it_wrote(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Lightning's ddp_spawn pickles the data module into the processes it starts: its source's split readers were
    closures, and the fit stopped before training. Those processes are new interpreters, without the command line's
    console: rank 0's lit_lora lines and end-of-fit summary were lost, and the warnings it filters shown."""
    spawn = ["--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    fitted = run_cli(["fit", *common_args(tiny_vit, food101_dir), *spawn, "--trainer.max_epochs=1", "--data.num_workers=0"], tmp_path)
    assert "[lit_lora] trainable params" in fitted.stderr and "[lit_lora] fit finished" in fitted.stderr, fitted.stderr[-3000:]
    assert "LeafSpec" not in fitted.stderr  # one of the library warnings the command line leaves out
    assert (tmp_path / "checkpoints" / "run" / "version_0" / "adapter-last" / "adapter_model.safetensors").is_file()


class RecordPixels(__import__("lightning").pytorch.Callback):
    """Appends (epoch, image index, pixel sum) of every training image this process sees to pixels-rank<N>.txt."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(f"pixels-rank{trainer.global_rank}.txt", "a") as f:
            for index, pixels in zip(batch["index"], batch["pixel_values"]):
                f.write(f"{trainer.current_epoch} {int(index)} {float(pixels.sum()):.3f}\n")


def preempted_fit(tiny_vit: str, food101_dir: str) -> list[str]:
    """2 processes, 34 training images in batches of 4 (5 per process and epoch), 2 epochs, accumulation 2; 14
    validation images (2 batches per process)."""
    args = [a for a in common_args(tiny_vit, food101_dir) if "val_size" not in a] + ["--data.val_size=0.3", "--data.batch_size=4"]
    return [*args, *DDP, "--trainer.max_epochs=2", "--trainer.accumulate_grad_batches=2"]


@pytest.fixture(scope="module")
def straight_ddp_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit: str, food101_dir: str) -> Iterator[Callable[[], Path]]:
    """`preempted_fit` straight through, started at once in the background (it overlaps the run a test stops, mostly
    in imports); calling the result waits for it and gives the run folder whose last.ckpt and metrics the preempted
    runs must equal."""
    folder = tmp_path_factory.mktemp("straight-ddp")
    process = start_cli(["fit", *preempted_fit(tiny_vit, food101_dir)], folder)

    @functools.cache
    def finished() -> Path:
        finish_cli(process)
        return folder / "checkpoints" / "run" / "version_0"

    yield finished
    if process.poll() is None:  # a test failed before it waited
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def assert_same_weights(run: Path, straight: Path) -> None:
    resumed, expected = (torch.load(folder / "last.ckpt", weights_only=True)["state_dict"] for folder in (run, straight))
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_ddp_epochs_cover_every_image_once_with_fresh_augmentations_across_a_preemption(
    tmp_path: Path, tiny_vit: str, food101_dir: str, straight_ddp_run: Callable[[], Path]
) -> None:
    args = preempted_fit(tiny_vit, food101_dir)
    # SIGTERM reaches one process only, mid-epoch and mid-window (as when a scheduler signals each task on its own):
    # both processes stop after the same batch and save one checkpoint together (Lightning 2.6 alone deadlocks here:
    # its issue #20806), from which the run resumes as if never stopped.
    args.append("--trainer.callbacks+=test_ddp.RecordPixels")
    stop = ["--trainer.callbacks+=test_checkpoints.SignalAtBatch", "--trainer.callbacks.init_args.epoch=1", "--trainer.callbacks.init_args.rank=1"]
    stopped = run_cli(["fit", *args, *stop], tmp_path, check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "checkpoints" / "run" / "version_0" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3 + 1  # 5 batches (3 steps) per epoch; then 3 batches in
    run_cli(["fit", *args, f"--ckpt_path={last}"], tmp_path)
    assert_same_weights(last.parent, straight_ddp_run())

    seen = [line.split() for rank in (0, 1) for line in (tmp_path / f"pixels-rank{rank}.txt").read_text().splitlines()]
    for epoch in ("0", "1"):
        indices = sorted(int(i) for e, i, _ in seen if e == epoch)
        assert indices == list(range(34))  # 34 training images, each once per epoch across both processes
    pixels = {(e, i): p for e, i, p in seen}
    changed = sum(pixels[("0", str(i))] != pixels[("1", str(i))] for i in range(34))
    assert changed >= 30  # a new random crop and flip for (nearly) every image in the second epoch


class SignalDuringValidation(__import__("lightning").pytorch.Callback):
    """SIGTERM to the process of global rank 1 after its first validation batch: of the sanity check (before
    training started), or with ``sanity=False`` of epoch 0's validation."""

    def __init__(self, sanity: bool = True) -> None:
        self.sanity = sanity

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import os
        import signal

        if trainer.sanity_checking == self.sanity and trainer.current_epoch == 0 and batch_idx == 0 and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow  # 20 s; the mid-epoch preemption above runs in the default run
def test_ddp_sigterm_during_the_sanity_check_stops_after_the_first_batch(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    args = [*common_args(tiny_vit, food101_dir), *DDP, "--trainer.max_epochs=2", "--trainer.callbacks+=test_ddp.SignalDuringValidation"]
    stopped = run_cli(["fit", *args], tmp_path, check=False)  # Lightning 2.6 alone: hangs in its handler's broadcast
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "run" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 1


@pytest.mark.slow  # 40 s
def test_ddp_sigterm_during_validation_stops_there_and_resumes_by_validating_again(
    tmp_path: Path, tiny_vit: str, food101_dir: str, straight_ddp_run: Callable[[], Path]
) -> None:
    args = preempted_fit(tiny_vit, food101_dir)
    stopped = run_cli(["fit", *args, "--trainer.callbacks+=test_ddp.SignalDuringValidation", "--trainer.callbacks.init_args.sanity=false"], tmp_path, check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run = tmp_path / "checkpoints" / "run" / "version_0"
    assert "val/acc" not in (run / "metrics.csv").read_text()  # stopped inside epoch 0's validation, not after it
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 3
    run_cli(["fit", *args, f"--ckpt_path={run / 'last.ckpt'}"], tmp_path)
    assert_same_weights(run, straight_ddp_run())
    assert logged(run, "val/acc") == logged(straight_ddp_run(), "val/acc")  # epoch 0 validated again, whole
