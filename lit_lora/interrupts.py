"""Ctrl-C and SIGTERM during ``fit``: stop after a batch, the same one on every process, so that the checkpoint
written on the way out (`AdapterCheckpoint`) is one that all processes save together."""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

import lightning.pytorch as pl
import torch

from lit_lora import log


class FitInterrupts:
    """The signal handlers `AdapterCheckpoint` installs while ``fit`` runs (main thread only), and what stopped it.

    SIGTERM is Lightning's own handling: it stops after the current batch (``trainer.received_sigterm``). With
    ``stop_on_interrupt``, a first Ctrl-C does the same (it raises SIGTERM); a second one stops at once.

    Under DDP, Lightning 2.6 deadlocks instead (Lightning issue #20806, reproduced here with two CPU processes: a
    preempted run hangs until it is killed and saves nothing): its SIGTERM handler broadcasts from inside the handler,
    wherever each process happens to be, and each process stops after whichever batch it was in. So with more than
    one process, a SIGTERM only records that it came; after every training (and validation) batch the processes agree
    whether any of them got one (one all-reduce of a flag, like Lightning's own per-batch broadcast), and if so all of
    them call Lightning's handler there, at the same point, and stop after that same batch. This handler is process-wide, so it
    is installed only with more than one process and only while training runs; what it buys is a preempted run that
    is saved and resumes bit-exact instead of hanging (``tests/test_ddp.py`` fails without it).
    """

    def __init__(self, stop_on_interrupt: bool) -> None:
        self.stop_on_interrupt = stop_on_interrupt
        self.signal_name: str | None = None  # "SIGINT" or "SIGTERM", once one arrived
        self._saved: dict[int, Any] = {}  # signal -> the handler to put back
        self._pid: int | None = None  # the process that installed the handlers (forked loader workers inherit them)
        self._shared_val_batches = 0

    def on_fit_start(self) -> None:
        """Forget what stopped an earlier fit."""
        self.signal_name = None

    def take_signals(self, trainer: pl.Trainer) -> None:
        """With ``stop_on_interrupt``, make Ctrl-C stop after this batch; under DDP, take SIGTERM from Lightning until
        the processes agree on it. Call once Lightning has installed its handlers (at the start of the sanity check and
        of training): it records every handler then and puts them all back when the fit ends, after the callbacks'
        ``on_exception``, so a handler installed before (in ``on_fit_start``) would outlive a failed fit. `restore`
        with ``signal.SIGTERM`` before Lightning puts back its own original handlers (``on_train_end``)."""
        if self.stop_on_interrupt:
            self._install(signal.SIGINT, self._stop_after_this_batch)
        if trainer.world_size > 1:
            self._install(signal.SIGTERM, self._record_sigterm)

    def on_validation_start(self, trainer: pl.Trainer) -> None:
        """Under DDP: how many batches of the first validation loader every process has (the processes may have one
        batch more or less: each image is validated once); the processes agree on a SIGTERM after those only."""
        self._shared_val_batches = 0
        if signal.SIGTERM in self._saved:
            counts = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
            mine = counts[0] if counts and math.isfinite(counts[0]) else 0
            self._shared_val_batches = int(trainer.strategy.reduce(torch.tensor(int(mine), device=trainer.strategy.root_device), reduce_op="min"))

    def on_validation_batch_end(self, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> None:
        """Under DDP: a SIGTERM stops every process after the same validation batch (not a process's last: Lightning
        then stops after validation), and the checkpoint restarts that validation on resume."""
        if dataloader_idx == 0 and batch_idx < self._shared_val_batches - 1:
            self.stop_together(trainer)

    def stop_together(self, trainer: pl.Trainer) -> None:
        """Under DDP, after a training batch (or a validation batch every process has): when any process got a SIGTERM,
        make every process call Lightning's handler here, so that all of them stop after this batch."""
        lightning_handler = self._saved.get(signal.SIGTERM)
        if lightning_handler is None or not trainer.strategy.reduce_boolean_decision(self.signal_name is not None, all=False):
            return
        del self._saved[signal.SIGTERM]  # ours stays installed: SIGTERMs that Lightning forwards to the others land there
        self.signal_name = self.signal_name or "SIGTERM"
        if callable(lightning_handler):
            lightning_handler(signal.SIGTERM, None)

    def restore(self, *signums: int) -> None:
        """Put back the handlers these signals (by default all) had before."""
        for signum in signums or list(self._saved):
            handler = self._saved.pop(signum, None)
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)

    def _install(self, signum: int, handler: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._saved.setdefault(signum, signal.getsignal(signum))
            self._pid = os.getpid()
            signal.signal(signum, handler)

    def _record_sigterm(self, signum: int, frame: Any) -> None:
        self.signal_name = self.signal_name or "SIGTERM"

    def _stop_after_this_batch(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a loader worker of somebody's own loader (Ctrl-C reaches the whole process group)
            return  # it keeps serving until the main process, stopping after this batch, shuts it down
        log.info("\n[lit_lora] Ctrl-C: stopping after this batch and saving last.ckpt (press again to stop at once, saving nothing)")
        self.signal_name = "SIGINT"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.raise_signal(signal.SIGTERM)  # Lightning's SIGTERM handling (or, under DDP, ours) stops after this batch
