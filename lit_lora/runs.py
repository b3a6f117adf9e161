"""Run folders that belong to one run: checkpoints written in place, a version folder taken atomically and held.

- `AtomicCheckpointIO` writes each ``.ckpt`` to a temporary in its own folder and renames it into place.
  Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary lives in ``TMPDIR``: across
  filesystems (a tmpfs ``/tmp``, a scratch or network run folder) its commit is a copy into the final name, which
  a kill or a full disk leaves truncated, and every kill leaves a checkpoint-sized orphan in ``TMPDIR``.
- `claim_version` takes ``<save_dir>/<name>/version_N`` with ``mkdir`` (atomic: two runs started together get two
  folders), and `RunLock` holds a run folder for a fit's lifetime (an ``flock``, released by the kernel even when
  the process is killed), so a second fit into it is refused in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lit_lora import log
from lit_lora.files import OutputError, atomic_write

LOCK_NAME = ".lit_lora.lock"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes local checkpoints to a temporary beside them and renames it into place
    (remote URLs go through Lightning's own writer). A failed write raises a one-line `files.OutputError` and
    leaves the previous file, and no partial one, under the checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True, what="checkpoint")


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` an `AtomicCheckpointIO` when it uses Lightning's default checkpoint writer (a writer the
    user configured is left alone)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def run_versions(root: Path) -> dict[int, Path]:
    """The ``version_N`` folders under ``root`` (a logger's ``<save_dir>/<name>``), by N."""
    if not root.is_dir():
        return {}
    return {int(m.group(1)): p for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))}


def claim_version(save_dir: str | os.PathLike, name: str | None) -> int:
    """Create the next free ``version_N`` under ``save_dir/name`` and return N. ``mkdir`` fails for all but one of
    several processes asking for the same N, so concurrent runs never share a version folder."""
    root = Path(save_dir) / (name or "")
    root.mkdir(parents=True, exist_ok=True)
    version = max(run_versions(root), default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def remove_unused_run_folder(folder: Path | None) -> None:
    """Remove the version folder that `claim_version` made for a fit that failed before training a batch, when it holds
    only what a fit writes as it starts (config, hyperparameters, logs without rows, the lock): the next fit takes its
    number again, so ``version_0`` is the first fit that trained."""
    if folder is None or not folder.is_dir():
        return
    files = list(folder.iterdir())
    started = {"config.yaml", "hparams.yaml", "metrics.csv", LOCK_NAME}
    if any(not p.is_file() or not (p.name in started or p.name.startswith("events.out.tfevents.")) for p in files):
        return
    for path in files:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something written meanwhile: keep it
        folder.rmdir()


def sign_lock(fd: int) -> None:
    """Write into a lock file just taken (its descriptor ``fd``) which process holds it, for `lock_holder`."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def lock_holder(fd: int) -> str:
    """Who signed the lock file open as ``fd`` (`sign_lock`): ``pid N on HOST``, or "" if nobody did."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip()


class RunLock:
    """An exclusive hold on a run folder (or an optimized dataset being written) for one process: ``acquire`` fails in
    one line, or waits, while another process holds it. The lock is an ``flock`` on ``<folder>/.lit_lora.lock``, so
    the kernel releases it when the process ends, however it ends; the file itself says who holds it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        """Hold the folder. While another process holds it: with ``wait``, say so and wait for it; else raise
        `files.OutputError` naming that process."""
        if self._fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd) or "another process"
            if wait:
                log.info(f"[lit_lora] {self.folder} is being written by {holder}; waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise OutputError(
                    f"{self.folder} is in use by another fit ({holder}); two runs in one folder would mix their "
                    "checkpoints. Wait for it to finish, or give this run another folder (--checkpoint.dirpath, or "
                    "leave it unset for a new version_N)."
                ) from None
        sign_lock(fd)
        self._fd = fd

    def release(self) -> None:
        """Let other runs use the folder again."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ResumedLogs:
    """The metrics a run logged before the checkpoint it resumes from, put back into its ``metrics.csv``.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it opens a version folder again; resuming in the
    same folder would lose the run's history. Rows logged after the checkpoint (an interrupted epoch's) are left
    out: the resumed run logs them again.
    """

    def __init__(self, run: Path, rows: list[dict[str, str]], fields: list[str]) -> None:
        self.run = run
        self.rows = rows
        self.fields = fields

    @classmethod
    def read(cls, run: Path, ckpt_path: Path) -> ResumedLogs:
        """The rows of ``run/metrics.csv`` logged before ``ckpt_path`` was saved."""
        import csv

        step = int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
        metrics = run / "metrics.csv"
        if not metrics.is_file():
            return cls(run, [], [])
        with metrics.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if row.get("step", "").isdigit() and int(row["step"]) < step]
            return cls(run, rows, list(reader.fieldnames or []))

    def restore(self, trainer: Any) -> None:
        """Write the kept rows back through the trainer's CSVLogger for this run folder (process 0 only)."""
        import csv

        from lightning.pytorch.loggers import CSVLogger

        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger) or Path(logger.log_dir).resolve() != self.run or not self.rows:
                continue
            with warnings.catch_warnings():  # "Previous log files ... will be deleted": not these rows, written back here
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
                writer = logger.experiment  # opening it removes the old metrics.csv
            if not isinstance(getattr(writer, "metrics_file_path", None), str):  # not process 0 (a no-op stand-in)
                continue

            def write(f: Any) -> None:
                out = csv.DictWriter(f, fieldnames=self.fields)
                out.writeheader()
                out.writerows(self.rows)

            atomic_write(writer.metrics_file_path, write)
            writer.metrics_keys = sorted(self.fields)  # new rows are appended under the same header
