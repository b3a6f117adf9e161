"""`AdapterCheckpoint`: adapter-only checkpoints and PEFT adapter folders in the run folder, interrupts included."""

from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class AdapterCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that writes into the run's own folder (``checkpoints/<name>/version_N/``).

    Beside the best and the last ``.ckpt`` it keeps PEFT adapter folders, ``adapter/`` and ``adapter-last/``,
    which the PEFT guide's inference code and ``--ckpt_path`` load directly.

    What goes into each file is decided by `LoRAImageClassifier.on_save_checkpoint`: the trainable weights
    (adapters and head), optimizer, scheduler and loop state, and the hyperparameters, never the frozen base.
    Defaults follow the guide: keep the best by ``val/acc`` and the last one.
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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None and trainer.loggers and trainer.log_dir:
            self.dirpath = str(Path(trainer.log_dir).resolve())  # absolute: a resumed run compares paths
        with warnings.catch_warnings():
            # The run folder already holds config.yaml and hparams.yaml, and a resumed run its own checkpoints:
            # only somebody else's old checkpoints deserve a warning.
            if self.dirpath and (trainer.ckpt_path or not any(Path(self.dirpath).glob("*.ckpt"))):
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # Ctrl-C stops after the current batch, like SIGTERM, so the checkpoint it leaves has a clean loop state
        # (a KeyboardInterrupt inside a hook would leave a batch trained but not counted). A second Ctrl-C stops now.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.getsignal(signal.SIGINT)

            def stop_after_this_batch(signum: int, frame: Any) -> None:
                rank_zero_info("\n[lit_lora] Ctrl-C: stopping after this batch and saving last.ckpt (press again to stop at once)")
                trainer._signal_connector.received_sigterm = True  # what Lightning's own SIGTERM handler sets
                signal.signal(signal.SIGINT, signal.default_int_handler)

            signal.signal(signal.SIGINT, stop_after_this_batch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        previous = getattr(self, "_previous_sigint", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
            self._previous_sigint = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else the epoch end saves, after top-k
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        # Lightning 2.6 writes last.ckpt only when a top-k checkpoint was written at the same step, so after an
        # epoch that did not improve val/acc, last.ckpt would be an epoch old: a resume would redo that epoch.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On Ctrl-C or SIGTERM (a preempted machine) during fit, save ``last.ckpt`` to resume from."""
        super().on_exception(trainer, pl_module, exception)  # Lightning's own save_on_exception, if turned on
        self._restore_sigint()
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != "fit" or not self.dirpath:
            return
        path = os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(path)  # Lightning writes to a temporary file and renames it: never half-written
        rank_zero_info(
            f"[lit_lora] interrupted at step {trainer.global_step} (epoch {trainer.current_epoch}); saved {path}. "
            f"Resume with: python -m lit_lora fit <same arguments> --ckpt_path {path}"
        )

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero or not hasattr(trainer.lightning_module, "model"):
            return
        from lit_lora.export import save_adapter_folder

        folder = Path(filepath).parent
        if Path(filepath).stem == self.CHECKPOINT_NAME_LAST:
            save_adapter_folder(trainer.lightning_module, folder / "adapter-last")
        elif filepath == self.best_model_path:
            save_adapter_folder(trainer.lightning_module, folder / "adapter")
