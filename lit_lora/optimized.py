"""Optimized datasets: the splits ``fit`` uses, decoded once and written by litdata's ``optimize`` to a folder or an
object-store URL (``s3://``, ``gs://``, ``r2://``: the stores litdata 0.2.76 has a storage client for), then streamed
to every process by ``StreamingDataset`` (`lit_lora.streaming`).

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
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
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
from lit_lora.transforms import ImageSettings, eval_transform, shorter_side_shape

FORMAT = 1
MANIFEST = "lit_lora_dataset.json"
# Small chunks, each decoded whole once it is local. litdata 0.2.76 memory-maps a downloaded chunk only when one loader
# worker alone reads it; a chunk that several workers share (most of them, shuffled) is read from disk whole for every
# few items it serves. With 64 MB chunks that made shuffled training from S3 run at 12 % of the same dataset on local
# disk (233 vs 1,929 images/s, 2 workers, warm cache); with 8 MB chunks decoded whole, 101 % (1,803 vs 1,776):
# `python benchmarks/streaming.py --images 3000` on the 2-core CPU machine (benchmarks/README.md).
CHUNK_MB = 8
CHUNK_BYTES = f"{CHUNK_MB}MB"
BATCH_DECODE = "chunk"
LITDATA_DEFAULT_SHARE = 0.75  # of the free disk: litdata 0.2.76's chunk cache size when none is given
_UNITS = {"tb": 1e12, "gb": 1e9, "mb": 1e6, "kb": 1e3, "t": 1e12, "g": 1e9, "m": 1e6, "k": 1e3, "b": 1}  # litdata's: decimal


def cache_size_problem(value: str | float | None, readers: int | None = None) -> str | None:
    """What is wrong with ``value`` as the size of litdata's chunk cache, or None: it must be bytes with an optional unit
    (``200GB``, ``500m``) or a share of the free disk in (0, 1] (None: litdata's default).

    With ``readers`` (the loaders of one node reading a split at a URL: every process's workers, or the process itself
    without workers) a size in bytes must also hold about three chunks per reader, the one it reads and two downloaded
    ahead: they share the node's cache folder, and with less room litdata 0.2.76 waits for a chunk that never comes, then
    stops after 120 s with a ChunkWaitTimeoutError (2 workers, 7 MB chunks: 32 MB hung, 40 MB trained).
    """
    if value is None:
        return None
    size = _parse_cache_size(value)
    if size is None:
        return f"must be a size such as 200GB or a share of the free disk such as 0.5, got {value!r}"
    in_bytes, _ = size
    least = 3 * CHUNK_MB * 1e6 * (readers or 0)
    if in_bytes is not None and in_bytes < least:
        return (
            f"{value!r} is too small for {readers} loader(s) reading one split (each holds about 3 chunks of {CHUNK_BYTES}, and "
            f"litdata waits forever for a chunk it has no room for): give at least {math.ceil(least / 1e6)}MB, or fewer data.num_workers"
        )
    return None


def _parse_cache_size(value: str | float) -> tuple[float | None, float | None] | None:
    """``(bytes, None)`` or ``(None, share of the free disk)`` for a chunk cache size, None if it is neither."""
    text = str(value).strip().lower()
    size = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(tb|gb|mb|kb|t|g|m|k|b)?", text)
    number = float(size.group(1)) if size else 0.0
    if not size or number <= 0 or (size.group(2) is None and number > 1 and not text.isdigit()):
        return None
    if size.group(2) or number > 1:
        return number * _UNITS[size.group(2) or "b"], None
    return None, number


def cache_size_in_effect(value: str | float | None) -> str | float | None:
    """The chunk cache size litdata 0.2.76 uses when given ``value``: the environment's ``MAX_CACHE_SIZE`` comes first."""
    return os.environ.get("MAX_CACHE_SIZE", "").strip() or value


def environment_cache_problem(value: str | float | None, readers: int | None = None) -> str | None:
    """What is wrong with the environment's ``MAX_CACHE_SIZE``, which litdata 0.2.76 uses instead of the size lit_lora
    gives it (``value``, ``data.optimized_cache_size``): as `cache_size_problem`, or a size other than ``value``."""
    env = os.environ.get("MAX_CACHE_SIZE", "").strip()
    problem = cache_size_problem(env, readers) if env else None
    if problem:
        return f"MAX_CACHE_SIZE (environment) {problem}"
    if env and value is not None and _parse_cache_size(value) != _parse_cache_size(env):
        return f"optimized_cache_size {value!r} differs from the environment's MAX_CACHE_SIZE {env!r}, which litdata uses instead: unset one of them"
    return None


def cache_bytes(value: str | float | None, folder: str) -> float:
    """The most bytes litdata's chunk cache under ``folder`` holds with ``value`` (or ``MAX_CACHE_SIZE``) as its size: a
    share is of the free disk; unset, litdata's default is at most 75 % of it (less where that leaves under 50 GB)."""
    size = _parse_cache_size(cache_size_in_effect(value) or LITDATA_DEFAULT_SHARE)
    in_bytes, share = size or (math.inf, None)  # not a size: refused before setup (`cache_size_problem`)
    return in_bytes if in_bytes is not None else share * free_bytes(folder)


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


def image_names(table: ImageTable, root: str | None) -> list[str]:
    """The table's images, named independently of where the files are: paths relative to ``root``, the data folder;
    `datasets` rows as ``split[row]``."""
    relative = bool(root) and isinstance(table, FileTable)
    return [os.path.relpath(table.describe(row), root) if relative else table.describe(row) for row in range(len(table))]


def images_digest(table: ImageTable, root: str | None) -> str:
    """A digest of the table's images (`image_names`) and labels, in order, that does not depend on where the files are
    (what a resumed fit compares)."""
    digest = hashlib.sha1()
    for name, label in zip(image_names(table, root), table.labels):
        digest.update(f"{name}\t{label}\n".encode())
    return digest.hexdigest()[:24]


def fingerprint(tables: dict[str, ImageTable], class_names: list[str], settings: ImageSettings, train_side: int) -> str:
    """What an optimized dataset was built from: the images of each split, the labels and the pixel settings."""
    digest = hashlib.sha1(f"lit_lora-optimized-{FORMAT}\t{train_side}\t{settings}\t{class_names}".encode())
    for split in sorted(tables):
        digest.update(f"{split}:{table_fingerprint(tables[split])}\n".encode())
    return digest.hexdigest()[:24]


def stored_pixels(settings: ImageSettings, train_side: int) -> dict[str, Any]:
    """What the stored pixels depend on (the manifest's ``pixels``): the evaluation crop, resize and interpolation of
    the image processor, and the training images' shorter side. The mean and std are applied later, by the model."""
    return {"crop": list(settings.crop), "resize": settings.resize, "interpolation": settings.interpolation, "train_side": train_side}


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


def _provider(url: str, storage_options: dict[str, Any]) -> Any:
    """litdata's own client for the URL's object store (the one its ``optimize`` uploads and its readers download
    with)."""
    from litdata.streaming.fs_provider import GCPFsProvider, R2FsProvider, S3FsProvider

    scheme = url.split("://", 1)[0]
    providers = {"s3": S3FsProvider, "gs": GCPFsProvider, "r2": R2FsProvider}
    if scheme not in providers:
        raise ValueError(f"optimized datasets at {scheme}:// URLs are not supported; use one of {[p + '://' for p in providers]} or a local folder.")
    return providers[scheme](storage_options=dict(storage_options))


def _checking(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` for the first look at an ``s3://`` URL: a wrong endpoint, port or network fails in seconds
    (10 s to connect, 3 attempts). litdata's client, made for long streaming runs, retries 1,000 times: a refused
    connection went on for over 200 s without a word. The user's own ``config`` wins."""
    if not url.startswith("s3://"):
        return storage_options
    import botocore.config

    return {"config": botocore.config.Config(connect_timeout=10, retries={"max_attempts": 3, "mode": "standard"}), **storage_options}


_looking: dict[str, Any] = {}  # URL scheme, storage options and environment -> client, see `_looking_provider`


def _looking_provider(url: str, storage_options: dict[str, Any]) -> Any:
    """litdata's client for reading manifests and listing splits (`_checking`'s options), one per store, options and
    ``AWS_*`` variables in a process: each new one costs 0.2-0.7 s of CPU on 2 cores, and a run looks at its dataset
    several times as it starts."""
    environment = sorted((name, value) for name, value in os.environ.items() if name.startswith(("AWS_", "SSL_CERT", "GOOGLE_")))
    key = f"{url.split('://', 1)[0]}|{sorted(storage_options.items())!r}|{environment!r}"
    if key not in _looking:
        _looking[key] = _provider(url, _checking(url, storage_options))
    return _looking[key]


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
    provider = _looking_provider(location, storage_options or {})
    try:
        if not provider.exists(join(location, MANIFEST)):
            return None
        with tempfile.TemporaryDirectory(prefix="lit_lora-manifest-") as folder:
            provider.download_file(join(location, MANIFEST), str(Path(folder) / MANIFEST))
            return json.loads((Path(folder) / MANIFEST).read_text())
    except Exception as err:  # the storage client's own errors (boto3, google-cloud-storage)
        raise ValueError(
            f"cannot read the optimized dataset at {location} ({error_line(err)}); check the URL, "
            "--data.storage_options and the AWS_* variables"
        ) from err


def stored_files(location: str, storage_options: dict[str, Any] | None = None) -> dict[str, int] | None:
    """Name -> bytes of the files directly in ``location``, a folder or an ``s3://`` / ``r2://`` URL (one listing request
    per 1,000 files, through litdata's client); None for a store that does not list sizes here (``gs://``), or that
    lets these credentials read objects but not list them (``AccessDenied``: litdata itself does not list).

    Raises:
        the storage client's errors (endpoint, credentials, network).
    """
    if not is_url(location):
        return {path.name: path.stat().st_size for path in Path(location).iterdir() if path.is_file()}
    if location.split("://", 1)[0] not in ("s3", "r2"):
        return None
    import botocore.exceptions

    bucket, _, prefix = location.split("://", 1)[1].partition("/")
    prefix = prefix.rstrip("/") + "/"
    client = _looking_provider(location, storage_options or {}).client.client  # litdata's boto3 client
    files = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            files.update({item["Key"][len(prefix):]: item["Size"] for item in page.get("Contents", [])})
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("AccessDenied", "403"):
            return None
        raise
    return files


def _optimize_split(split: str, output_dir: str, work_dir: str, **options: Any) -> None:
    """litdata's ``optimize`` for one split, run in a child process that leads its own process group (``work_dir``:
    the caller's temporary folder for this split, which the child removes if the caller dies first).

    litdata changes process-wide state and leaves it so (the multiprocessing start method, forced; its own SIGINT
    handler; the random generators of ``random``, NumPy and torch, seeded with its seed); on Ctrl-C its handler exits
    with status 0 and leaves its workers writing; and when it stops on an error, each worker's helper process (its
    "remover") waits forever, orphaned, on a queue (litdata 0.2.76; 500 MB resident each, holding the caller's output
    pipes open). In a child, the caller keeps its own state, and once the split is written, has failed or is
    interrupted, the child's process group (the child, litdata's workers and their helpers) is ended whole. An
    interruption is one: `KeyboardInterrupt` here.

    Raises:
        ValueError: the write failed (a full disk, an error in the image code), naming the root error.
        KeyboardInterrupt: Ctrl-C, or SIGINT to this process or to the child.
    """
    context = multiprocessing.get_context(_start_method())
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_optimize_in_child, args=(sender, output_dir, work_dir, options), name=f"lit_lora optimize {split}")
    child.start()
    sender.close()
    stopped = KeyboardInterrupt(f"interrupted while writing {split} into {output_dir}; the dataset there is marked incomplete: run the same command to rebuild it")
    silent = object()
    try:
        outcome = receiver.recv()
    except EOFError:  # ended without a word
        outcome = silent
    except KeyboardInterrupt:  # in a terminal, Ctrl-C reaches this process's group only: the child's ends below
        outcome = stopped
    finally:
        _end_group_of(child)
    if outcome is silent:  # killed, or (exit status 0) stopped by litdata's SIGINT handler
        outcome = stopped if child.exitcode in (0, -signal.SIGINT) else OSError(f"the writing process ended with exit status {child.exitcode}")
    if isinstance(outcome, KeyboardInterrupt):
        raise stopped from None
    if outcome is not None:
        cause = first_error(str(outcome)) if isinstance(outcome, RuntimeError) else error_line(outcome)
        raise ValueError(
            f"optimize stopped while writing {split} into {output_dir} ({cause}); the dataset there is marked incomplete: "
            "fix the cause and run it again (fit rebuilds a local one itself)."
        ) from outcome


def _end_group_of(child: multiprocessing.process.BaseProcess) -> None:
    """Kill what is left of ``child``'s process group, the child included, then reap the child (after: until it is
    reaped, its pid cannot name another process group)."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left, or the child had no group yet
            os.killpg(child.pid, signal.SIGKILL)
    child.kill()
    child.join()


def _optimize_in_child(sender: Any, output_dir: str, work_dir: str, options: dict[str, Any]) -> None:
    """`_optimize_split`'s child: optimize, then send None, or the exception (litdata's RuntimeError holds a worker's
    traceback). Leads a process group of its own, which it ends when its parent is gone (killed before it could end
    it, or clean up its ``work_dir``: a SIGTERM's default action skips Python's cleanup).

    litdata stages chunks in ``$TMPDIR/chunks`` and ``$TMPDIR/data`` by default and empties both when it starts: a
    user's own ``/tmp/data`` would be deleted, and two builds on one machine would delete each other's chunks. Its
    two folders (``DATA_OPTIMIZER_CACHE_FOLDER``, ``DATA_OPTIMIZER_DATA_CACHE_FOLDER``) are set here, in the child,
    inside ``work_dir``, which is this split's alone (and inside the caller's ``DATA_OPTIMIZER_CACHE_FOLDER``, when
    set); the caller's environment is left as it is."""
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = os.path.join(work_dir, "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = os.path.join(work_dir, "data")
    if hasattr(os, "setpgrp"):
        os.setpgrp()
        parent = os.getppid()

        def watch_parent() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            shutil.rmtree(work_dir, ignore_errors=True)
            os.killpg(0, signal.SIGKILL)

        threading.Thread(target=watch_parent, name="lit_lora: watch parent", daemon=True).start()
    outcome: BaseException | None = None
    try:
        # litdata prints a dozen lines per split on standard output ("Create an account on lightning.ai", each
        # worker's start and end); its progress bar (standard error) is on only on a terminal (``verbose``).
        # litdata is imported here, in the child: its import fixes the start method and adds warning filters.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            from litdata import optimize

            optimize(output_dir=output_dir, start_method=_start_method(), **options)
    except BaseException as err:  # noqa: BLE001 (all of them go to the parent)
        outcome = err
    try:
        sender.send(outcome)
    except BrokenPipeError:  # the parent is gone
        pass
    except Exception:  # an exception that does not pickle
        sender.send(RuntimeError(f"{type(outcome).__name__}: {outcome}"))


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
    sizes, folders = {}, stored_as(tables)
    # Each split is staged in the temporary folder, or in the one the user chose for litdata's staging.
    staging = os.environ.get("DATA_OPTIMIZER_CACHE_FOLDER") or None
    if staging:
        os.makedirs(staging, exist_ok=True)
    for split, table in tables.items():
        if split in folders:
            sizes[split] = sizes[folders[split]]
            continue
        log.info(f"[lit_lora] optimizing {split}: {len(table)} images into {join(location, split)}")
        start = time.perf_counter()
        # A folder per split, for the workers' notes and litdata's staging: between two splits none exists that a kill
        # could leave behind.
        with tempfile.TemporaryDirectory(prefix="lit_lora-optimize-", dir=staging) as work:
            fn = WriteImage(table, work, train_side=train_side) if split == "train" else WriteImage(table, work, settings=settings)
            _optimize_split(
                split, join(location, split), work, fn=fn, inputs=list(range(len(table))), chunk_bytes=CHUNK_BYTES,
                num_workers=max(1, min(num_workers, len(table))), mode="overwrite" if replace else None, keep_data_ordered=True,
                storage_options=storage_options, verbose=sys.stderr.isatty(),
            )
            seconds = time.perf_counter() - start
            log.info(f"[lit_lora] optimized {split} in {seconds:.1f} s ({len(table) / seconds:.0f} images/s)")
            found = [line.split("\t", 1) for path in sorted(Path(work).glob("unreadable-*.tsv")) for line in path.read_text().splitlines()]
        unreadable.update(found)
        sizes[split] = len(table) - len(found)
    complete = {**manifest, "state": "complete", "splits": sizes, "folders": folders, "unreadable": unreadable}
    write_manifest(location, complete, storage_options)
    return complete


def stored_as(tables: dict[str, ImageTable]) -> dict[str, str]:
    """Evaluation splits with the same images and labels as one before them (a test split also validated on), each
    with the split it is stored as, once: ``{"test": "val"}``."""
    first: dict[tuple, str] = {}  # (images, labels) -> the first split with them
    same: dict[str, str] = {}
    for split, table in tables.items():
        if split != "train":
            key = (tuple(map(table.describe, range(len(table)))), tuple(table.labels))
            if first.setdefault(key, split) != split:
                same[split] = first[key]
    return same


def estimated_bytes(tables: dict[str, ImageTable], settings: ImageSettings, train_side: int, sample: int = 64) -> int:
    """About how many bytes `write_splits` writes: evaluation images at the crop size, training images at
    ``train_side`` on the shorter side (their mean size read from up to ``sample`` image headers)."""
    total = 0
    stored_elsewhere = stored_as(tables)
    for split, table in tables.items():
        if split in stored_elsewhere:
            continue
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


def error_line(err: BaseException) -> str:
    """``SomeError: message`` on one line, at most 300 characters of message (storage clients' messages span lines)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def first_error(text: str) -> str:
    """The first ``SomeError: message`` line of a traceback's text (the root cause), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return (causes[0] if causes else lines[-1] if lines else text)[:300]
