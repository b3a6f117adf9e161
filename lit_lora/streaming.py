"""Reading optimized datasets (`lit_lora.optimized`) with litdata: `OptimizedImages`, one split as the model's items,
and `ResumableStreamingDataLoader`.

Imported only where optimized data is read, and litdata with it: importing litdata fixes the process's
multiprocessing start method (it creates a ``multiprocessing.Lock`` at import), after which a script's own
``multiprocessing.set_start_method("spawn")`` fails with "context has already been set". Training on image files
leaves that choice to the user (`tests/test_library.py`).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lit_lora.optimized import BATCH_DECODE, is_url, join, stored_files
from lit_lora.runs import lock_holder, sign_lock
from lit_lora.sampling import check_rest_of_epoch, marking_read_errors, seeded_cpu_rng

with warnings.catch_warnings():  # litdata adds warning filters for everyone as it is imported: they stay in here
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.utilities.dataset_utilities import get_default_cache_dir

INDEX_ATTEMPTS = 30  # a second apart: see `OptimizedImages`


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
        advice = logging.getLogger("litdata.streaming.dataset")  # for this call only: the user's logging is left as it is
        advice.addFilter(_not_litdata_cache_advice)
        try:
            for attempt in range(INDEX_ATTEMPTS):
                try:
                    super().__init__(
                        location, shuffle=shuffle, seed=seed, drop_last=None if transform is not None else False,
                        storage_options=dict(storage_options or {}), max_cache_size=max_cache_size, batch_decode=BATCH_DECODE,
                    )
                    break
                except ValueError as err:
                    # litdata 0.2.76 downloads a URL's index.json into the node's cache under a file lock that it waits 1 s
                    # for; a process that waits longer (the node's other processes starting on 2 busy cores) goes on
                    # without the file and stops: "doesn't contain any index.json file" (1 DDP predict in 3 in the tests).
                    # The process holding the lock publishes the file moments later.
                    if not is_url(location) or "index.json" not in str(err) or attempt == INDEX_ATTEMPTS - 1:
                        raise
                    time.sleep(1)
        finally:
            advice.removeFilter(_not_litdata_cache_advice)
        self.augment = transform
        chunks = json.loads((Path(self.input_dir.path) / "index.json").read_text())["chunks"]  # the index litdata just fetched
        _check_chunks(location, chunks, storage_options)
        self.stored_bytes: int = sum(chunk["chunk_bytes"] for chunk in chunks)  # of this split's chunks, as its index lists them

    def __getitem__(self, index: Any) -> dict[str, Any]:
        item = super().__getitem__(index)
        position = int(getattr(index, "index", index))
        pixels = item["image"].permute(2, 0, 1)
        if self.augment is not None:
            with seeded_cpu_rng(hash((self.seed, self.current_epoch, position)) & (2**62 - 1)):
                pixels = self.augment(pixels)
        return {"pixel_values": pixels, "labels": item["label"], "index": position, "path": bytes(item["name"]).decode()}


def _not_litdata_cache_advice(record: logging.LogRecord) -> bool:
    """False for litdata's advice to give any cache size under 25GB more (it assumes its ~64MB chunks; lit_lora's are 8MB,
    and `optimized.cache_size_problem` checks the size against them): printed once per split, it contradicted ours."""
    return "is less than 25GB" not in record.getMessage()


def _check_chunks(location: str, chunks: list[dict[str, Any]], storage_options: dict[str, Any] | None) -> None:
    """Fail at once when a chunk of the split at ``location`` is missing or has another size than its index's
    ``chunks`` say: a copy cut short, an upload interrupted, a chunk deleted from the bucket. litdata would find
    out in a loader worker, once the fit had started, with a page of tracebacks (locally: after waiting for the chunk to
    grow). One listing of the split; not checked where the store does not list sizes (`optimized.stored_files`).

    Raises:
        OSError: naming the first such chunk.
    """
    stored = stored_files(location, storage_options)
    if stored is None:
        return
    for chunk in chunks:
        where, size = join(location, chunk["filename"]), stored.get(chunk["filename"])
        if size is None:
            raise OSError(f"{where} is missing")
        if size != chunk["chunk_bytes"]:
            raise OSError(f"{where} has {size} bytes, its index says {chunk['chunk_bytes']}: a copy or upload cut short?")


class ResumableStreamingDataLoader(StreamingDataLoader):
    """litdata's `StreamingDataLoader`, resumable through its own `state_dict` (Lightning saves and restores it), also
    in a run that read the same chunks from another local folder.

    litdata's state names the folder the chunks were read from, and refuses to resume from any other: a preempted run
    resumed on a node whose ``LITDATA_CACHE_DIR`` differs, or on a local dataset copied elsewhere, would stop in a loader
    worker. When the saved state's URL and chunks are this dataset's, the folder is taken to be this one's; a state
    saved on other data (another dataset, or image files) is refused in one line. A run resumed mid-epoch on another number
    of processes is refused (image files allow it), and so is one with a batch size that Lightning would end the epoch
    early with, as on image files (`check_rest_of_epoch`). ``saved_state``: see
    `ImageClassificationDataModule.state_dict`.
    """

    saved_state: dict[str, Any] | None = None
    trainer: Any = None  # the Lightning trainer it trains (set by the data module): its epochs can be shorter than the loader
    _state_loaded = False
    _position = {"batches": 0, "epoch_done": False}  # of the current pass, saved beside litdata's state
    _resumed_batches = 0  # batches of the epoch a loaded state stopped in, for the next pass's count
    _replaying = False  # this pass goes on from a loaded state
    _unapplied: dict[str, Any] | None = None  # a loaded state no pass has started from yet

    def __iter__(self) -> Any:
        self._take_saved_state()
        self._unapplied = None
        if self._replaying:
            # litdata leaves its loaded state on (``restore``) until a pass runs out, and Lightning asks a loader with a
            # length for no batch after the epoch's last: the next pass replayed the loaded state's end, an epoch of
            # nothing without loader workers; with workers, it left the loader's epoch count one behind.
            self.restore = False
        self._replaying = self.restore
        self._position, self._resumed_batches = {"batches": self._resumed_batches, "epoch_done": False}, 0
        for batch in marking_read_errors(super().__iter__()):
            self._position["batches"] += 1
            yield batch
        self._position["epoch_done"] = True

    def state_dict(self) -> dict[str, Any]:
        self._take_saved_state()
        if self._unapplied is not None:
            # Loaded, and no pass started from it yet (Lightning validates first on some resumes, and checkpoints): that
            # state, as loaded. litdata 0.2.76 would write its dataset's epoch into it, the one before the saved epoch.
            return copy.deepcopy(self._unapplied)
        state = super().state_dict()
        # litdata 0.2.76 saves its main-process dataset's epoch, which a resumed pass with loader workers leaves at the
        # epoch before (the workers iterate copies): a checkpoint of that pass resumed with the previous epoch's order.
        state["dataset"] = {**state["dataset"], "current_epoch": state["current_epoch"]}
        # Lightning fetches no batch past an epoch's last: its own (limit_train_batches) or the loader's. An epoch it ended
        # early, resumed, would go on with the images after its last batch instead of starting the next epoch.
        epoch = min(len(self), getattr(self.trainer, "num_training_batches", math.inf))
        done = self._position["epoch_done"] or self._position["batches"] >= epoch
        return {**state, "lit_lora": {"batches": self._position["batches"], "epoch_done": done}}

    def _take_saved_state(self) -> None:
        if self.saved_state is not None and not self._state_loaded:
            self.load_state_dict(self.saved_state)
        self.saved_state = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state_loaded = True
        self._unapplied = copy.deepcopy(state)
        saved, dataset = state.get("dataset") or {}, self.dataset
        chunks = (saved.get("input_dir_url"), saved.get("subsampled_files"), [list(r) for r in saved.get("region_of_interest", [])])
        if chunks != (dataset.input_dir.url, list(dataset.subsampled_files), [list(r) for r in dataset.region_of_interest]):
            raise ValueError(
                f"the checkpoint was saved while training on other data than {dataset.input_dir.url or dataset.input_dir.path} (another "
                "optimized dataset, or the image files): resume with the data it was trained on, or start a new fit without --ckpt_path."
            )
        position = state.get("lit_lora") or {"batches": 0, "epoch_done": False}  # saved by lit_lora 0.x: not checked
        if position["epoch_done"]:
            # Nothing of that epoch is left: start the next as a kept loader would. litdata 0.2.76 resumes a finished epoch
            # saved with another batch size or process count as that same epoch, and the next epoch trains on nothing.
            self.current_epoch = int(state["current_epoch"])
        else:
            processes = dataset.distributed_env.world_size
            resumed = {"batches": position["batches"], "batch_size": int(saved["batch_size"]), "processes": int(saved["world_size"])}
            if resumed["processes"] != processes:
                # litdata 0.2.76 drops an epoch's last items to even out processes (drop_last, on for more than one) and
                # rebuilds the saved epoch's order without them: another count repeats and skips images (measured), or
                # stops on its "drop_last state doesn't match" error.
                raise ValueError(
                    f"the checkpoint was saved {position['batches']} batches into an epoch of optimized data on {resumed['processes']} "
                    f"process(es), and this run has {processes}: litdata cannot go on with that epoch on another number of processes. "
                    f"Resume on {resumed['processes']} process(es), or from a checkpoint written at the end of an epoch."
                )
            if position["batches"] and resumed["batch_size"] != self.batch_size:
                left = len(dataset) - math.ceil(int(saved.get("sample_in_epoch", 0)) / processes)  # len: this process's share
                check_rest_of_epoch(resumed, left, len(self), self.batch_size, processes)
            self._resumed_batches = position["batches"]
            super().load_state_dict({**state, "dataset": {**saved, "input_dir_path": dataset.input_dir.path}})
        theirs, ours = int(saved.get("num_workers") or 1), max(1, self.num_workers)
        if theirs != ours:  # data.num_workers defaults to the machine's cores: another kind of node has another count
            from lightning.pytorch.utilities import rank_zero_warn  # here: loader workers import this module, not Lightning

            rank_zero_warn(
                f"the checkpoint was saved with {theirs} loader worker(s) per process and this run has {ours}: litdata resumes this "
                f"epoch exactly, but orders the later ones by the worker count; for the uninterrupted run's order, set data.num_workers "
                f"to {theirs}."
            )


class ChunkCacheUse:
    """A run's use of litdata's local chunk cache (``LITDATA_CACHE_DIR``) for the optimized dataset at ``url``, held by one
    process per node (processes of one run share the cache as litdata means them to).

    litdata 0.2.76 shares that cache with every process that streams the same URL through that folder, and one that
    evicts chunks (a cache smaller than its node's share of the splits it reads: `optimized.cache_bytes`) deletes chunks
    that another run is about to read. Measured with two fits of a sweep on one S3 dataset, 24MB caches in one folder:
    one waited 120 s for a deleted chunk and failed (``ChunkWaitTimeoutError``), the other ran 5x slower; in folders of
    their own, both ran as fast as alone. So a run that evicts holds the cache alone, any other shares it (an
    ``flock``, which the kernel releases when the process ends, however it ends; on a shared disk, nodes of one run
    that evict are refused too: litdata's cache is a node's own), and a run that would break another is refused in one
    line before any compute. Runs in one process follow each other (a notebook's, one that failed included): each
    takes over the process's hold.
    """

    _held: dict[Path, int] = {}  # lock file -> this process's descriptor

    def __init__(self, url: str) -> None:
        self.url = url
        self.folder = Path(get_default_cache_dir())
        self.path = self.folder / f".lit_lora-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"

    def acquire(self, evicts: bool) -> None:
        """Hold the cache: alone if this run ``evicts`` chunks, else shared.

        Raises:
            ValueError: another process streams ``url`` through the same cache folder, and one of the two evicts.
        """
        try:
            if self.path not in self._held:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._held[self.path] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fd = self._held[self.path]
            fcntl.flock(fd, (fcntl.LOCK_EX if evicts else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd) if not evicts else ""  # one that evicts signs the lock
            self.release()
            which = "this run's" if evicts else f"that run's ({holder or 'another process'})"
            raise ValueError(
                f"another run streams {self.url} through litdata's chunk cache {self.folder}, and {which} cache is smaller than "
                "the data (data.optimized_cache_size, MAX_CACHE_SIZE or 75 % of the free disk): litdata would delete chunks the "
                "other is about to read (a 120 s wait, then a failure). Give each run, and each node, a cache folder of its own on "
                "a local disk (LITDATA_CACHE_DIR=<folder> python -m lit_lora ...), or wait for the other run to end."
            ) from None
        except OSError as err:  # a disk without locks (ENOLCK on some network mounts): nothing to guard with, nothing refused
            self.release()
            logging.getLogger("lit_lora").debug(f"[lit_lora] not guarding the chunk cache {self.folder}: {err}")
            return
        if evicts:
            sign_lock(fd)

    def release(self) -> None:
        """Let runs that evict use the cache again."""
        fd = self._held.pop(self.path, None)
        if fd is not None:
            with contextlib.suppress(OSError):  # a disk without locks
                fcntl.flock(fd, fcntl.LOCK_UN)  # not only close: loader workers forked while it was held share the lock
            os.close(fd)
