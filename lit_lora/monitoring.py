"""Callbacks that watch a run and say what happened: throughput, learning rate, skipped images, reports, summary."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn

from lit_lora import console, log
from lit_lora.files import write_text


class ThroughputLogger(pl.Callback):
    """Logs training images/s per epoch (``train/images_per_sec``) and says at the end how fast fit and predict ran.

    Counts images from batch shapes (no device sync per step) and reads the clock at epoch boundaries only.
    """

    def __init__(self) -> None:
        self.images = 0
        self.started = 0.0
        self.fit_images = 0
        self.fit_started = 0.0
        self.summary: dict[str, float] = {}
        self.val_images = 0
        self.val_started = 0.0

    @staticmethod
    def _count(batch: Any) -> int:
        pixels = batch.get("pixel_values") if isinstance(batch, dict) else None
        return int(pixels.shape[0]) if pixels is not None else 0

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_images, self.fit_started = 0, self._now(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images, self.started = 0, self._now(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += self._count(batch) * trainer.world_size

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self._now(pl_module) - self.started
        self.fit_images += self.images
        if self.images:  # a resumed run's interrupted epoch may have had no batch left to train
            # Every process's figure is the whole run's images over its own clock: their mean, once an epoch.
            pl_module.log("train/images_per_sec", self.images / max(seconds, 1e-9), sync_dist=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            self.summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 1e9

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self._now(pl_module) - self.fit_started
        self.summary.update(fit_images=self.fit_images, fit_seconds=seconds, fit_images_per_sec=self.fit_images / max(seconds, 1e-9))
        memory = f"; peak GPU memory {self.summary['peak_gpu_memory_gb']:.1f} GB" if "peak_gpu_memory_gb" in self.summary else ""
        log.info(
            f"[lit_lora] fit: {self.fit_images} training images in {seconds:.1f} s (validation included): "
            f"{self.summary['fit_images_per_sec']:.0f} images/s{memory}"
        )

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images, self.started = 0, self._now(pl_module)

    @staticmethod
    def _everyone(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> int:
        """The sum of ``count`` over the processes (a collective under DDP): evaluation shares can be uneven."""
        return int(trainer.strategy.reduce(torch.tensor(count, device=pl_module.device), reduce_op="sum"))

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.images += self._count(batch)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images = self._everyone(trainer, pl_module, self.images)
        seconds = self._now(pl_module) - self.started
        self.summary.update(predict_images=self.images, predict_seconds=seconds, predict_images_per_sec=self.images / max(seconds, 1e-9))
        log.info(f"[lit_lora] predict: {self.images} images in {seconds:.1f} s: {self.summary['predict_images_per_sec']:.0f} images/s")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_images, self.val_started = 0, self._now(pl_module)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val_images += self._count(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return
        self.val_images = self._everyone(trainer, pl_module, self.val_images)
        seconds = self._now(pl_module) - self.val_started
        self.summary.update(validate_images=self.val_images, validate_images_per_sec=self.val_images / max(seconds, 1e-9))
        log.info(f"[lit_lora] validate: {self.val_images} images in {seconds:.1f} s: {self.summary['validate_images_per_sec']:.0f} images/s")


def _gathered(trainer: pl.Trainer, found: dict[str, str]) -> dict[str, str]:
    """``found`` of every process (a collective under DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, found)
        return {path: reason for part in gathered for path, reason in part.items()}
    return found


class SkippedImagesReport(pl.Callback):
    """At the end of every epoch, names the images the data module skipped as unreadable (all processes), and
    writes the full list to ``skipped_images.txt`` in the run folder. Images read with a warning from the decoder
    (PIL's ``Tag data larger than file`` on some Food-101 JPEGs, say) are counted in one line and listed in
    ``image_warnings.txt``, instead of a warning per image and epoch."""

    def __init__(self) -> None:
        self.reported: set[str] = set()
        self.noted: set[str] = set()

    def _report(self, trainer: pl.Trainer) -> None:
        datamodule = trainer.datamodule
        skipped = _gathered(trainer, dict(getattr(datamodule, "skipped_images", {}) or {}))
        odd = _gathered(trainer, dict(getattr(datamodule, "image_warnings", {}) or {}))
        new = {path: reason for path, reason in skipped.items() if path not in self.reported}
        new_odd = {path: notes for path, notes in odd.items() if path not in self.noted}
        self.reported.update(new)
        self.noted.update(new_odd)
        if not new and not new_odd:
            return
        log_dir = Path(trainer.log_dir or ".")  # a collective under DDP: every process asks
        if not trainer.is_global_zero:
            return
        if new_odd:
            listing = log_dir / "image_warnings.txt"
            write_text(listing, "".join(f"{path}\t{notes}\n" for path, notes in sorted(odd.items())))
            example = next(iter(new_odd.values()))
            log.info(f"[lit_lora] {len(odd)} image(s) read with a warning from the decoder (e.g. {example}); listed in {listing}")
        if not new:
            return
        listing = log_dir / "skipped_images.txt"
        write_text(listing, "".join(f"{path}\t{reason}\n" for path, reason in sorted(skipped.items())))
        shown = "; ".join(f"{path} ({reason})" for path, reason in sorted(new.items())[:5])
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        rank_zero_warn(
            f"skipped {len(new)} unreadable image(s) this epoch ({len(skipped)} in all): {shown}{more}. "
            f"Full list: {listing}. Fix or remove them, or set --data.on_bad_image error to stop at the first one."
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)


class EvaluationReport(pl.Callback):
    """After ``validate`` and ``test``: per-class precision/recall/F1/support (CSV and Markdown), the most confused
    pairs and a confusion-matrix PNG, in ``<run>/validate_report/`` or ``<run>/test_report/``."""

    def __init__(self, enabled: bool = True) -> None:
        """Choose whether to write it.

        Args:
            enabled: write the report after validate and test.
        """
        self.enabled = enabled
        self.folder: Path | None = None

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, name: str) -> None:
        confusion_metric = getattr(pl_module, f"{stage}_confusion", None)
        if not self.enabled or confusion_metric is None or trainer.sanity_checking:
            return
        confusion = confusion_metric.compute().cpu().numpy()  # every process takes part in the reduction
        log_dir = Path(trainer.log_dir or ".")  # so does asking for the log folder
        if not trainer.is_global_zero:
            return
        from lit_lora.report import write_report

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        self.folder = write_report(confusion, list(pl_module.class_names), log_dir / f"{name}_report", name, metrics)
        log.info(f"[lit_lora] {name} report (per-class metrics, confused pairs, confusion matrix): {self.folder}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "val", "validate")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "test", "test")


class LearningRateLogger(LearningRateMonitor):
    """Lightning's `LearningRateMonitor`, quiet instead of failing when the run has no logger."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class RunSummary(pl.Callback):
    """At the end of ``fit``: a training-curves PNG, and a short summary of what the run produced and how fast."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cli_console": console.cli_console()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a process that Lightning's ddp_spawn started from the command line: a new interpreter, without
        # the command line's console (Python's spawn does not run `python -m lit_lora` again), whose rank 0 trains and
        # reports. The CLI always adds this callback, and the Trainer that carries it is unpickled before any hook.
        self.__dict__.update(state)
        if state.get("cli_console"):
            console.set_up_cli_console(**state["cli_console"])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls this only once a run ended normally (never after an error). In a process that ddp_spawn started
        # (multiprocessing's child) nothing runs after the run but handing rank 0's results back, so the process group
        # goes here, as `python -m lit_lora` lets it go in its own process (`console.release_process_group`).
        if multiprocessing.parent_process() is not None:
            console.release_process_group()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = Path(trainer.log_dir) if trainer.log_dir else None  # a collective under DDP: every process asks
        if not trainer.is_global_zero:
            return
        from lit_lora.report import human_size, plot_training_curves

        bar = trainer.progress_bar_callback
        if bar is not None:
            # Let the progress bar draw its last frame now (its own teardown, which Lightning calls again later and
            # which then does nothing): drawn after the summary, it would overwrite the summary's last lines.
            bar.teardown(trainer, pl_module, "fit")
        lines = ["[lit_lora] fit finished"]
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            best = Path(checkpoint.best_model_path)
            epoch = torch.load(best, map_location="cpu", weights_only=True).get("epoch", "?") if best.is_file() else "?"
            score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
            lines.append(f"  best {checkpoint.monitor}: {score:.4f} (epoch {epoch})")
            for path in (best, Path(checkpoint.last_model_path or ""), best.parent / "adapter", best.parent / "adapter-last"):
                if path.is_file():
                    lines.append(f"  {path}  {human_size(path.stat().st_size)}")
                elif path.is_dir() and path.name.startswith("adapter"):
                    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
                    lines.append(f"  {path}/  {human_size(size)} (PEFT adapter folder)")
        throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputLogger)), None)
        if throughput is not None and "fit_seconds" in throughput.summary:
            lines.append(f"  wall time {throughput.summary['fit_seconds']:.1f} s, {throughput.summary['fit_images_per_sec']:.0f} training images/s")
        for logger in trainer.loggers:
            logger.save()
        if log_dir is not None:
            curves = plot_training_curves(log_dir / "metrics.csv", log_dir / "training_curves.png")
            if curves is not None:
                lines.append(f"  training curves: {curves}")
        log.info("\n".join(lines))
