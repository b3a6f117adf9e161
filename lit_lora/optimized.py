"""Optimized datasets: the splits ``fit`` uses, decoded once and written by litdata's ``optimize`` to a folder or an
object-store URL (``s3://``, ``gs://``, ``azure://``), then streamed to every process by ``StreamingDataset``.

A dataset is three litdata datasets, ``train/``, ``val/`` and ``test/`` (when the source has a test split, and is not
the one validated on: that is stored once, as ``val/``), plus
``lit_lora_dataset.json``, which describes them (class names, split sizes, the images left out, and a fingerprint of
the source images and settings), written to a URL with litdata's own storage client (one set of credentials:
``storage_options``, ``AWS_*`` variables). It is written first as ``incomplete`` and last as ``complete``: a killed
``optimize`` is never mistaken for a dataset.

Training images are stored upright RGB uint8 with the shorter side at ``train_side`` (never enlarged); random crops
are taken from them. Validation and test images are stored as the evaluation transform's output (the exported image
processor's resize and centre crop, on the fully decoded image), so evaluating an optimized dataset computes
exactly what evaluating the files does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from lit_lora import log
from lit_lora.files import free_bytes, write_text
from lit_lora.images import FileTable, HFTable, ImageTable, exif_orientation, raised_by_decoder, to_rgb
from lit_lora.runs import LOCK_NAME, RunLock
from lit_lora.sampling import seeded_cpu_rng
from lit_lora.transforms import ImageSettings, eval_transform, shorter_side_shape

with warnings.catch_warnings():  # litdata adds warning filters for everyone as it is imported: they stay in here
    from litdata import StreamingDataLoader, StreamingDataset, optimize  # noqa: F401 (StreamingDataLoader: for datamodule.py)

FORMAT = 1
MANIFEST = "lit_lora_dataset.json"
# Small chunks, each decoded whole once it is local. litdata 0.2.76 memory-maps a downloaded chunk only when one loader
# worker alone reads it; a chunk that several workers share (most of them, shuffled) is read from disk whole for every
# few items it serves. With 64 MB chunks that made shuffled training from S3 run at 12 % of the same dataset on local
# disk (233 vs 1,929 images/s, 2 workers, warm cache); with 8 MB chunks decoded whole, 101 % (1,803 vs 1,776):
# `python benchmarks/streaming.py --images 3000` on the 2-core CPU machine (benchmarks/README.md).
CHUNK_BYTES = "8MB"
BATCH_DECODE = "chunk"


def is_url(location: str) -> bool:
    """Whether ``location`` is an object-store URL (``s3://...``) rather than a local folder."""
    return "://" in str(location)


def join(location: str, name: str) -> str:
    """``location/name`` for folders and URLs alike."""
    return f"{str(location).rstrip('/')}/{name}"


@contextlib.contextmanager
def writing(location: str) -> Any:
    """Hold a local ``location`` for writing a dataset into it (an ``flock`` on its ``.lit_lora.lock``, released
    even if the process is killed); a second process waits for the first, then finds its dataset. Sweeps start
    several fits on one new folder at once: unheld, each rebuilt it over the others' files and left a dataset marked
    complete with empty splits. Not held: URLs (object stores have no such lock) and folders with other files (refused
    by the caller, and left without a lock file)."""
    folder = None if is_url(location) else Path(location).expanduser()
    if folder is None or (holds_files(str(folder)) and not (folder / MANIFEST).exists() and not (folder / LOCK_NAME).exists()):
        yield
        return
    lock = RunLock(folder)
    try:
        lock.acquire(wait=True)
    except OSError:  # a folder that cannot take a lock file (read-only) cannot take a dataset either: the write says so
        yield
        return
    try:
        yield
    finally:
        lock.release()


def holds_files(folder: str) -> bool:
    """Whether the local ``folder`` exists and holds anything but the lock of `writing`."""
    path = Path(folder).expanduser()
    return path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())


def table_fingerprint(table: ImageTable) -> str:
    """A digest that changes whenever the table's images (files: path, size, modification time; `datasets`: its
    files and rows), their order or their labels change."""
    digest = hashlib.sha1()
    if isinstance(table, FileTable):
        for path in table.paths:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    elif isinstance(table, HFTable):
        for entry in table.dataset.cache_files:
            stat = os.stat(entry["filename"])
            digest.update(f"{entry['filename']}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        digest.update(f"{table.name}\t{table.rows}".encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(table).__name__}")
    digest.update(str(table.labels).encode())
    return digest.hexdigest()


def fingerprint(tables: dict[str, ImageTable], class_names: list[str], settings: ImageSettings, train_side: int) -> str:
    """What an optimized dataset was built from: the images of each split, the labels and the pixel settings."""
    digest = hashlib.sha1(f"lit_lora-optimized-{FORMAT}\t{train_side}\t{settings}\t{class_names}".encode())
    for split in sorted(tables):
        digest.update(f"{split}:{table_fingerprint(tables[split])}\n".encode())
    return digest.hexdigest()[:24]


class WriteImage:
    """litdata ``optimize``'s function for one split: row -> ``{"image": uint8 HWC, "label", "name"}``.

    Training rows are resized (never enlarged) to ``train_side`` on the shorter side, decoding JPEGs at reduced scale
    where libjpeg can; evaluation rows (``settings`` given) get the exact evaluation transform. A file that cannot be
    read is left out (None) and noted, with the reason, in a file of ``notes_dir`` (optimize's workers are processes).
    """

    def __init__(self, table: ImageTable, notes_dir: str, train_side: int | None = None, settings: ImageSettings | None = None) -> None:
        self.table = table
        self.notes_dir = notes_dir
        self.train_side = train_side
        self.evaluate = eval_transform(settings) if settings is not None else None
        self._pid: int | None = None

    def __call__(self, row: int) -> dict[str, Any] | None:
        if self._pid != os.getpid():
            # A forked worker: one torch thread, as torch's own DataLoader workers do (a forked copy of the parent's
            # OpenMP pool can deadlock), and the worker is one of several already.
            torch.set_num_threads(1)
            # litdata stops a failed optimize (a full disk, an error in here) by terminating its workers, and each
            # worker's helper process (its "remover") then waits forever, orphaned, on a queue nobody writes to
            # (litdata 0.2.76): every failed optimize left one process per worker behind (500 MB resident, mostly
            # shared), holding its caller's output pipes open. Terminated, a worker takes its helpers with it. Only in
            # optimize's own worker processes, which exist for this function.
            signal.signal(signal.SIGTERM, _end_with_helpers)
            self._pid = os.getpid()
        try:
            with self.table.open(row) as image:
                pixels = self.evaluate(image) if self.evaluate is not None else self._resized(image)
        except Exception as err:
            if not raised_by_decoder(err):
                raise
            with open(Path(self.notes_dir) / f"unreadable-{os.getpid()}.tsv", "a") as notes:
                notes.write(f"{self.table.describe(row)}\t{type(err).__name__}: {' '.join(str(err).split())}\n")
            return None
        # The name as bytes: litdata would store a string that names an existing image file as that image.
        # HWC in the chunk: read back as a CHW view with channels-last strides, which torch's uint8 antialiased resize
        # takes on its vectorised path (1.2 against 0.5 ms per 224 px training crop on a 2-core EPYC).
        return {"image": pixels.permute(1, 2, 0).contiguous(), "label": int(self.table.labels[row]), "name": self.table.describe(row).encode()}

    def _resized(self, image: Image.Image) -> torch.Tensor:
        sideways = exif_orientation(image) >= 5
        width, height = image.size[::-1] if sideways else image.size  # as shown, upright
        shape = (height, width) if min(width, height) <= self.train_side else shorter_side_shape(height, width, self.train_side)
        image.draft("RGB", shape if sideways else shape[::-1])  # in stored orientation: (width, height)
        pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy()).permute(2, 0, 1)
        return tvF.resize(pixels, list(shape), antialias=True) if tuple(pixels.shape[1:]) != shape else pixels


def _end_with_helpers(signum: int, frame: Any) -> None:
    """SIGTERM in an optimize worker: end its helper processes, then the worker (as SIGTERM would)."""
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(128 + signum)


def _provider(url: str, storage_options: dict[str, Any]) -> Any:
    """litdata's own client for the URL's object store (the one its ``optimize`` uploads and its readers download
    with)."""
    from litdata.streaming.fs_provider import GCPFsProvider, R2FsProvider, S3FsProvider

    scheme = url.split("://", 1)[0]
    providers = {"s3": S3FsProvider, "gs": GCPFsProvider, "r2": R2FsProvider}
    if scheme not in providers:
        raise ValueError(f"optimized datasets at {scheme}:// URLs are not supported; use one of {[p + '://' for p in providers]} or a local folder.")
    return providers[scheme](storage_options=dict(storage_options))


def write_manifest(location: str, manifest: dict[str, Any], storage_options: dict[str, Any]) -> None:
    """Write ``manifest`` as ``location/lit_lora_dataset.json`` (replacing any previous one; locally through a
    temporary file, so a reader sees the old or the new one whole)."""
    text = json.dumps(manifest, indent=1)
    if not is_url(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        write_text(Path(location) / MANIFEST, text)
        return
    with tempfile.TemporaryDirectory(prefix="lit_lora-manifest-") as folder:
        local = Path(folder) / MANIFEST
        local.write_text(text)
        _provider(location, storage_options).upload_file(str(local), join(location, MANIFEST))


def read_manifest(location: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of the optimized dataset at ``location``; None when there is none (nothing optimized there).

    Raises:
        ValueError: ``location`` is a URL that cannot be read (credentials, endpoint, network), with the reason.
    """
    if not is_url(location):
        path = Path(location).expanduser() / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None
    provider = _provider(location, storage_options or {})
    try:
        if not provider.exists(join(location, MANIFEST)):
            return None
        with tempfile.TemporaryDirectory(prefix="lit_lora-manifest-") as folder:
            provider.download_file(join(location, MANIFEST), str(Path(folder) / MANIFEST))
            return json.loads((Path(folder) / MANIFEST).read_text())
    except Exception as err:  # the storage client's own errors (boto3, google-cloud-storage)
        reason = " ".join(str(err).split())[:300]
        raise ValueError(
            f"cannot read the optimized dataset at {location} ({type(err).__name__}: {reason}); check the URL, "
            "--data.storage_options and the AWS_* variables"
        ) from err


@contextlib.contextmanager
def _keeping_process_state() -> Any:
    """Put back what litdata's ``optimize`` changes for the whole process and leaves so: the multiprocessing start
    method (``set_start_method(..., force=True)``), the SIGINT handler (its own, bound to a finished job) and the
    global random generators of ``random``, NumPy and torch (it seeds all three with its own seed). The user's pools,
    Ctrl-C handling (Lightning's, the CLI's) and seeded runs keep theirs: a fit that builds its dataset first
    initialises its weights as a fit on a dataset built before does."""
    method, handler = multiprocessing.get_start_method(allow_none=True), signal.getsignal(signal.SIGINT)
    generators = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        multiprocessing.set_start_method(method, force=True)
        signal.signal(signal.SIGINT, handler)
        random.setstate(generators[0])
        np.random.set_state(generators[1])
        torch.set_rng_state(generators[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _start_method() -> str:
    # Forked workers start at once; spawned ones import torch again (about 6 s each on a 2-core machine, for each
    # split). A process that has started CUDA must not fork.
    return "spawn" if torch.cuda.is_initialized() or os.name != "posix" else "fork"


def write_splits(
    location: str, tables: dict[str, ImageTable], manifest: dict[str, Any], settings: ImageSettings, train_side: int,
    num_workers: int, storage_options: dict[str, Any], replace: bool,
) -> dict[str, Any]:
    """Optimize each split of ``tables`` into ``location/<split>``, then write the manifest (returned, completed with
    the split sizes, the unreadable images, ``{name: reason}``, and ``folders``: an evaluation split with the same
    images as one before it, e.g. a test split also validated on, is written once, ``{"test": "val"}``)."""
    storage_options = dict(storage_options or {})
    if not is_url(location):
        location = str(Path(location).expanduser().resolve())
        _check_free_space(location, estimated_bytes(tables, settings, train_side), replace)
    write_manifest(location, {**manifest, "state": "incomplete"}, storage_options)
    unreadable: dict[str, str] = {}
    sizes, folders, evaluation_splits = {}, {}, {}  # evaluation_splits: (rows, labels) -> the split written with them
    with tempfile.TemporaryDirectory(prefix="lit_lora-optimize-") as notes, _keeping_process_state():
        for split, table in tables.items():
            if split != "train":
                same = evaluation_splits.setdefault((tuple(map(table.describe, range(len(table)))), tuple(table.labels)), split)
                if same != split:
                    folders[split], sizes[split] = same, sizes[same]
                    continue
            fn = WriteImage(table, notes, train_side=train_side) if split == "train" else WriteImage(table, notes, settings=settings)
            log.info(f"[lit_lora] optimizing {split}: {len(table)} images into {join(location, split)}")
            start = time.perf_counter()
            # litdata prints a dozen lines per split on standard output ("Create an account on lightning.ai", each
            # worker's start and end). Its progress bar, on standard error, stays on a terminal; in a log file (a
            # batch job's, CI's) it would be dozens of lines of cursor-movement codes, so there it is off.
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    optimize(
                        fn=fn, inputs=list(range(len(table))), output_dir=join(location, split), chunk_bytes=CHUNK_BYTES,
                        num_workers=max(1, min(num_workers, len(table))), mode="overwrite" if replace else None, keep_data_ordered=True,
                        storage_options=storage_options, start_method=_start_method(), verbose=sys.stderr.isatty(),
                    )
            except RuntimeError as err:  # litdata's: "We found the following error <a worker's traceback>"
                raise ValueError(
                    f"optimize stopped while writing {split} into {join(location, split)} ({_first_error(str(err))}); the dataset there is "
                    "marked incomplete: fix the cause and run it again (fit rebuilds a local one itself)."
                ) from err
            seconds = time.perf_counter() - start
            log.info(f"[lit_lora] optimized {split} in {seconds:.1f} s ({len(table) / seconds:.0f} images/s)")
            before = len(unreadable)
            for path in sorted(Path(notes).glob("unreadable-*.tsv")):
                for line in path.read_text().splitlines():
                    name, reason = line.split("\t", 1)
                    unreadable[name] = reason
                path.unlink()
            sizes[split] = len(table) - (len(unreadable) - before)
    complete = {**manifest, "state": "complete", "splits": sizes, "folders": folders, "unreadable": unreadable}
    write_manifest(location, complete, storage_options)
    return complete


def estimated_bytes(tables: dict[str, ImageTable], settings: ImageSettings, train_side: int, sample: int = 64) -> int:
    """About how many bytes `write_splits` writes: evaluation images at the crop size, training images at
    ``train_side`` on the shorter side (their mean size read from up to ``sample`` image headers)."""
    total = 0
    for split, table in tables.items():
        if split != "train":
            total += len(table) * settings.crop[0] * settings.crop[1] * 3
            continue
        areas = []
        for row in sorted({int(r) for r in np.linspace(0, len(table) - 1, min(sample, len(table)))}):
            try:
                with table.open(row) as image:
                    width, height = image.size
            except Exception:  # an unreadable image: optimize leaves it out and says why
                continue
            areas.append(height * width if min(height, width) <= train_side else math.prod(shorter_side_shape(height, width, train_side)))
        total += int(len(table) * 3 * (sum(areas) / len(areas) if areas else train_side**2))
    return total


def _check_free_space(location: str, need: int, replace: bool) -> None:
    """Refuse, before decoding anything, to write ``need`` bytes into a folder whose disk has less free (counting a
    dataset there that this one replaces)."""
    free = free_bytes(location)
    if replace and Path(location).is_dir():
        free += sum(f.stat().st_size for f in Path(location).rglob("*") if f.is_file())
    if free < need:
        raise ValueError(
            f"{location}: the optimized dataset needs about {need / 1e9:.2f} GB and its disk has {free / 1e9:.2f} GB free; "
            "free some space or write it elsewhere."
        )


def _first_error(text: str) -> str:
    """The first ``SomeError: message`` line of a traceback's text (the root cause), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return (causes[0] if causes else lines[-1] if lines else text)[:300]


class OptimizedImages(StreamingDataset):
    """One split of an optimized dataset, as the model's items: ``{"pixel_values": uint8 CHW, "labels", "index",
    "path"}`` (``path``: the source file or row the image was made from).

    Training items (``transform`` given) are cropped and flipped under a seed that is a function of ``(seed, epoch,
    index)`` alone: the same augmentation whichever process or worker reads the item, so a resumed run sees exactly
    what an uninterrupted one would have. Evaluation items are served as stored (already the evaluation crop).

    Args:
        location: the split's folder or URL (``<optimized_dir>/train``).
        transform: training augmentation on uint8 CHW tensors; None serves the stored pixels.
        shuffle: shuffle chunks and items anew each epoch (litdata's seeded shuffle).
        seed: seed of the shuffle and of the augmentation.
        storage_options: passed to litdata's storage client (``endpoint_url``, credentials, ...).
        max_cache_size: how much of a remote split litdata keeps in its local chunk cache (``LITDATA_CACHE_DIR``):
            ``"200GB"``, or a fraction of the free disk; None: litdata's default (75 % of the free disk, leaving 50 GB
            free where it can).
    """

    def __init__(
        self, location: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None, shuffle: bool = False, seed: int = 42,
        storage_options: dict[str, Any] | None = None, max_cache_size: str | float | None = None,
    ) -> None:
        # Evaluation keeps every item (drop_last False: no rank pads its share with repeats); training lets litdata
        # even out the ranks' shares (its default under DDP), so that every process runs the same number of steps.
        super().__init__(
            location, shuffle=shuffle, seed=seed, drop_last=None if transform is not None else False,
            storage_options=dict(storage_options or {}), max_cache_size=max_cache_size, batch_decode=BATCH_DECODE,
        )
        self.augment = transform

    def __getitem__(self, index: Any) -> dict[str, Any]:
        item = super().__getitem__(index)
        position = int(getattr(index, "index", index))
        pixels = item["image"].permute(2, 0, 1)
        if self.augment is not None:
            with seeded_cpu_rng(hash((self.seed, self.current_epoch, position)) & (2**62 - 1)):
                pixels = self.augment(pixels)
        return {"pixel_values": pixels, "labels": item["label"], "index": position, "path": bytes(item["name"]).decode()}
