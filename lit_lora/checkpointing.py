"""`AdapterCheckpoint`: adapter-only checkpoints and PEFT adapter folders in the run folder, interrupts included."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_lora import log
from lit_lora.files import OutputError, output_folder_problems, remove_stale_temporaries
from lit_lora.interrupts import FitInterrupts
from lit_lora.runs import RunLock, use_atomic_checkpoints


class AdapterCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that writes into the run's own folder (``checkpoints/<name>/version_N/``).

    Beside the best and the last ``.ckpt`` it keeps PEFT adapter folders, ``adapter/`` and ``adapter-last/``,
    which the PEFT guide's inference code and ``--ckpt_path`` load directly.

    What goes into each file is decided by `LoRAImageClassifier.on_save_checkpoint`: the trainable weights
    (adapters and head), optimizer, scheduler and loop state, and the hyperparameters, never the frozen base.
    Defaults follow the guide: keep the best by ``val/acc`` and the last one. ``last.ckpt`` follows every
    validation (Lightning 2.6 rewrites it only when a best checkpoint was written at the same step).

    On Ctrl-C or SIGTERM during ``fit`` it saves ``last.ckpt`` (with any gradients accumulated since the last
    optimizer step, see `LoRAImageClassifier.on_save_checkpoint`), so that resuming reproduces the uninterrupted
    run; under DDP, every process stops after the same batch and they save it together (`FitInterrupts`). Ctrl-C stops
    after the current batch only with ``stop_on_interrupt=True`` (the CLI sets it), which installs a SIGINT handler
    for the duration of ``fit``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = "epoch={epoch}-val_acc={val/acc:.4f}",
        monitor: str | None = "val/acc",
        mode: str = "max",
        save_top_k: int = 1,
        save_last: bool | None = True,
        auto_insert_metric_name: bool = False,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        verbose: bool = False,
        stop_on_interrupt: bool = False,
    ) -> None:
        """Choose what is kept.

        Args:
            dirpath: folder for the checkpoints; by default the run's log folder (``checkpoints/<name>/version_N``).
            filename: file name pattern of the kept checkpoints.
            monitor: metric that ranks checkpoints.
            mode: ``max`` or ``min`` of ``monitor``.
            save_top_k: how many of the best checkpoints to keep.
            save_last: also keep ``last.ckpt``, the one to resume from.
            auto_insert_metric_name: prefix metric values with their names in ``filename``.
            every_n_epochs: save every N epochs (default: every validation).
            every_n_train_steps: save every N optimizer steps as well.
            verbose: say when a checkpoint is written.
            stop_on_interrupt: during ``fit``, make Ctrl-C stop after the current batch and save ``last.ckpt``, like
                SIGTERM (a second Ctrl-C stops at once). Installs a SIGINT handler while ``fit`` runs.
        """
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=save_last,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            verbose=verbose,
        )
        self.stop_on_interrupt = stop_on_interrupt
        self._interrupts = FitInterrupts(stop_on_interrupt)
        self._stage: str | None = None
        self._written: dict[str, int] = {}  # checkpoint path -> modification time its adapter folder was made from
        self._found: list[str] = []  # checkpoints in dirpath when fit started

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        use_atomic_checkpoints(trainer)
        if self.dirpath is None and trainer.loggers and trainer.log_dir:
            self.dirpath = str(Path(trainer.log_dir).resolve())  # absolute: a resumed run compares paths
        if stage == "fit" and self.dirpath and trainer.is_global_zero:
            problems = output_folder_problems([("checkpoint.dirpath", self.dirpath)], need_bytes=_bytes_per_checkpoint(pl_module))
            if problems:
                raise OutputError("; ".join(problems) + ".")
            self._lock = RunLock(self.dirpath)
            self._lock.acquire()  # one fit per folder: a second one is refused here, before any compute
            remove_stale_temporaries(self.dirpath)  # what killed writes of an earlier run left
        # Checkpoints already there: another run's, unless this fit resumes one, which is known only in on_fit_start
        # (trainer.ckpt_path is set after setup). Lightning's own warning here is about any file (config.yaml too).
        self._found = sorted(p.name for p in Path(self.dirpath).glob("*.ckpt")) if stage == "fit" and self.dirpath else []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._interrupts.restore()
        self._release_folder()

    def _release_folder(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only a resumed fit carries on the best-model bookkeeping; validate/test/predict write no checkpoint.
        if self._stage in (None, "fit"):
            super().load_state_dict(_moved_with_its_files(state_dict, self.dirpath))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # A resumed run's existing adapter folders belong to its existing checkpoints: rewrite them only with new ones.
        self._written = {"adapter": self._mtime(self.best_model_path), "adapter-last": self._mtime(self.last_model_path)}
        self._interrupts.on_fit_start()
        if self._found and not trainer.ckpt_path:
            rank_zero_warn(
                f"{self.dirpath} already holds another run's checkpoints ({', '.join(self._found[:3])}): this fit writes its own beside "
                f"them (Lightning adds -v1 to a taken name) and replaces that run's adapter folders; to resume that run instead, pass "
                f"its last.ckpt as ckpt_path, or choose an empty folder."
            )

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interrupts.take_signals(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._interrupts.take_signals(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._interrupts.stop_together(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._interrupts.on_validation_start(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._interrupts.on_validation_batch_end(trainer, batch_idx, dataloader_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:  # Lightning 2.6 saves last.ckpt here even when fast_dev_run suppresses checkpointing
            super().on_train_end(trainer, pl_module)
        self._interrupts.restore(signal.SIGTERM)  # before Lightning puts back the handlers it found

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interrupts.restore()
        self._write_missing_adapter_folders(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last_before = self._mtime(self.last_model_path)
        super().on_validation_end(trainer, pl_module)
        if trainer.val_check_interval != 1.0:  # validation inside the epoch: Lightning saves here
            self._keep_last_current(trainer, last_before)
        self._write_adapter_folders(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last_before = self._mtime(self.last_model_path)
        super().on_train_epoch_end(trainer, pl_module)
        self._keep_last_current(trainer, last_before)
        self._write_adapter_folders(trainer)

    def _keep_last_current(self, trainer: pl.Trainer, last_before: int) -> None:
        """Write last.ckpt when Lightning did not (it does only with a new best), else a resume would redo work."""
        if not (self.save_last and self.dirpath and trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run):
            return
        if trainer.strategy.broadcast(self._mtime(self.last_model_path) == last_before):
            path = os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            self.last_model_path = path  # before saving: it is part of this callback's saved state
            trainer.save_checkpoint(path, weights_only=False)

    @staticmethod
    def _mtime(path: str) -> int:
        return os.stat(path).st_mtime_ns if path and os.path.isfile(path) else 0

    def _write_adapter_folders(self, trainer: pl.Trainer) -> None:
        """PEFT adapter folders beside the best and the last checkpoint, whenever either was (re)written."""
        if not trainer.is_global_zero or not hasattr(trainer.lightning_module, "model"):
            return
        from lit_lora.export import save_adapter_folder

        for path, name in ((self.best_model_path, "adapter"), (self.last_model_path, "adapter-last")):
            mtime = self._mtime(path)
            if mtime and self._written.get(name) != mtime:
                save_adapter_folder(trainer.lightning_module, Path(path).parent / name)
                self._written[name] = mtime

    def _write_missing_adapter_folders(self, trainer: pl.Trainer) -> None:
        """Adapter folders that a killed run never finished (or a resume with nothing left to train never wrote),
        made from their checkpoints."""
        if not trainer.is_global_zero or not hasattr(trainer.lightning_module, "model"):
            return
        from lit_lora.export import is_adapter_folder, save_adapter_folder_from_checkpoint

        for path, name in ((self.best_model_path, "adapter"), (self.last_model_path, "adapter-last")):
            folder = Path(path).parent / name if path else None
            if folder is not None and Path(path).is_file() and not is_adapter_folder(folder):
                save_adapter_folder_from_checkpoint(trainer.lightning_module, path, folder)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (a preempted machine) or a first Ctrl-C during fit, save ``last.ckpt`` to resume from, at the
        batch boundary where Lightning stopped. A second Ctrl-C stops at once and saves nothing."""
        super().on_exception(trainer, pl_module, exception)  # Lightning's own save_on_exception, if turned on
        try:
            self._save_on_interrupt(trainer, exception)
        finally:
            self._interrupts.restore()
            self._release_folder()  # a failed fit in a notebook must not keep its folder from the next one

    def _save_on_interrupt(self, trainer: pl.Trainer, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or not self.dirpath or trainer.fast_dev_run:
            return
        path = os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        if isinstance(exception, KeyboardInterrupt):
            kept = f"{path} (step {_saved_step(path)}) is the latest checkpoint" if os.path.isfile(path) else "no checkpoint was written"
            first = "Ctrl-C before training started" if self.stop_on_interrupt else "Ctrl-C"  # else it stops after the batch
            when = "second Ctrl-C" if self._interrupts.signal_name == "SIGINT" else first
            log.info(f"\n[lit_lora] stopped at once ({when}): nothing saved; {kept}.")
            return
        if getattr(exception, "lit_lora_reading", False):
            self._save_on_read_error(trainer, path)
            return
        if not isinstance(exception, SIGTERMException):
            return
        self.last_model_path = path
        trainer.save_checkpoint(path, weights_only=False)  # a temporary in the run folder, renamed: never half-written
        exception.lit_lora_signal = self._interrupts.signal_name or "SIGTERM"  # type: ignore[attr-defined]  # for the exit code
        log.info(
            f"[lit_lora] interrupted at step {trainer.global_step} (epoch {trainer.current_epoch}); saved {path}. "
            f"Resume with: python -m lit_lora fit <same arguments> --ckpt_path {path}"
        )

    def _save_on_read_error(self, trainer: pl.Trainer, path: str) -> None:
        """The data could not be read (object storage unreachable after the storage client's retries, a file that went
        missing): the fit's state is whole at its last batch, so save ``last.ckpt`` there, as on SIGTERM, and a resume
        once the data can be read again loses nothing (a checkpoint from validation validates that epoch again).
        Not under DDP: the failure reaches one process, which cannot save together with the others."""
        if trainer.sanity_checking:
            return
        if trainer.world_size > 1:
            kept = f"{path} (step {_saved_step(path)})" if os.path.isfile(path) else "no checkpoint"
            log.info(f"[lit_lora] reading the data failed on process {trainer.global_rank} of {trainer.world_size}: nothing saved; the latest is {kept}.")
            return
        resume = f"When the data can be read again, resume with: python -m lit_lora fit <same arguments> --ckpt_path {path}"
        if not trainer.validating and trainer.fit_loop.epoch_loop.batch_progress.current.ready == 0:
            # Before the epoch's first batch: the end of the last epoch is the state to resume from (a checkpoint of an
            # epoch started with no batch resumed with the loader one epoch on: measured, other weights).
            ended = os.path.isfile(path) and _saved_step(path) == trainer.global_step
            where = f"{path} holds all that was trained. {resume}" if ended else "nothing of it was trained, and nothing saved."
            log.info(f"[lit_lora] reading the data failed before the first batch of epoch {trainer.current_epoch}: {where}")
            return
        self.last_model_path = path
        trainer.save_checkpoint(path, weights_only=False)
        log.info(f"[lit_lora] reading the data failed at step {trainer.global_step} (epoch {trainer.current_epoch}); saved {path}. {resume}")


def _moved_with_its_files(state: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """``ModelCheckpoint`` state saved in a run folder that has since moved to ``dirpath`` with its checkpoints (copied
    from a bucket, resumed on a node that mounts it elsewhere): its paths put under ``dirpath``. As saved, Lightning
    drops the best score and the last checkpoint's path when the folder's path changed: the first resumed epoch became
    "best" however it scored, replacing ``adapter/``, and ``last-v1.ckpt`` was written beside ``last.ckpt``, so resuming
    from ``last.ckpt`` again went back. State whose files are not in ``dirpath`` (a resume into another folder) is left
    to Lightning, which says so."""
    old = state.get("dirpath")
    if not old or not dirpath or old == dirpath:  # as Lightning compares them
        return state

    def moved(path: Any) -> Any:
        return os.path.join(dirpath, os.path.basename(path)) if path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(old) else path

    saved = [path for path in (state.get("best_model_path"), state.get("last_model_path")) if path]
    if not saved or not all(os.path.isfile(moved(path)) for path in saved):
        return state
    paths = {key: moved(state.get(key)) for key in ("best_model_path", "last_model_path", "kth_best_model_path")}
    return {**state, **paths, "dirpath": dirpath, "best_k_models": {moved(path): score for path, score in (state.get("best_k_models") or {}).items()}}


def _saved_step(path: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", "?")
    except Exception:  # only for a message
        return "?"


def _bytes_per_checkpoint(pl_module: pl.LightningModule) -> int:
    """About what one checkpoint and its adapter folder take: trainable weights, two AdamW moments, an unfinished
    accumulation window's gradients and the adapter's copy, plus some slack."""
    trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
    return 5 * trainable + 1_000_000
