"""Training order and augmentation seeds that are a pure function of ``(seed, epoch)``, and a loader that knows where
it is in the epoch, so a resumed run sees exactly the batches an uninterrupted one would have seen."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to ``seed``, then restore the caller's random state.

    Not ``torch.manual_seed``: on a CUDA build that also queues a seeding of every accelerator, formatting a
    stack trace each time in processes that never initialise CUDA (loader workers): 127 us per image against
    6 us here, about a fifth of a loader worker's time per pre-resized image on 2 CPU cores.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def marking_read_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield ``batches``; an exception raised while reading the next one (storage gone, a file that cannot be read with
    ``on_bad_image="error"``) gets ``lit_lora_reading = True``: the data failed, not training, so the fit's state at
    its last batch is whole and `AdapterCheckpoint` saves it to resume from."""
    try:
        yield from batches
    except Exception as err:
        err.lit_lora_reading = True  # type: ignore[attr-defined]
        raise


class SeededShuffleSampler(DistributedSampler):
    """Shuffles rows anew each epoch as a pure function of ``(seed, epoch)``, and gives each item its own seed.

    Items are ``(row, seed)``: `ImageDataset` seeds that item's augmentation with it, so the crops and flips
    depend on neither the process nor the worker that draws it. Lightning calls `set_epoch` before every epoch.
    Under DDP each process takes every ``num_replicas``-th item of the same permutation (padded, as
    `DistributedSampler` does, so all processes run the same number of batches). Being a `DistributedSampler`,
    Lightning uses it as it is instead of wrapping it, which would freeze each image's augmentation seed.
    ``skip`` leaves the permutation's first that many items out of the next pass, the ones that processes with any
    batch size and number have trained on when they stopped (`ResumableDataLoader` sets it).
    """

    def __init__(self, num_rows: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_rows), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        num_rows = len(self.dataset)
        order = torch.randperm(num_rows, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (num_rows,), generator=generator).tolist()
        items = list(zip(order, seeds))
        skip, self.skip = self.skip, 0
        rest = items[skip:]
        rest += items[: -len(rest) % self.num_replicas]  # pad with the first items, so that every process gets as many
        return iter(rest[self.rank :: self.num_replicas])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` over a `SeededShuffleSampler` that is resumable the way torchdata's ``StatefulDataLoader`` and
    litdata's ``StreamingDataLoader`` are: its `state_dict` says which epoch it is in, how many batches of it were
    delivered and how many of the epoch's images all processes together have had; Lightning saves that in checkpoints
    and hands it to `load_state_dict` before a resumed fit iterates, and the next pass of that epoch starts after those
    images (loading the same state twice is harmless).

    A batch counts as it is handed out: Lightning fetches none ahead from a loader that has a length, so at a
    checkpoint the count is the batches trained. A run resumed mid-epoch with another batch size or number of
    processes trains the rest of the epoch, each image once, unless Lightning would end the epoch before its last images
    (`check_rest_of_epoch`).

    Not torchdata's ``StatefulDataLoader`` itself: its state loads only into a loader with the same ``num_workers``
    (0.11 fails an assertion otherwise: saved with 2 workers, loaded with 0 or 1), which defaults to the machine's
    cores, so a preempted run resumed on another kind of node could not go on. This state is any worker count's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.batches, self.images = 0, 0, 0
        self.resume_at: dict[str, int] | None = None
        self.saved_state: dict[str, Any] | None = None  # loaded at the first pass if Lightning loaded none (see the data module's state_dict)

    def state_dict(self) -> dict[str, int]:
        self._take_saved_state()
        if self.resume_at is not None:  # loaded, and no pass started from it yet (Lightning validates first on some resumes)
            return dict(self.resume_at)
        geometry = {"batch_size": self.batch_size, "processes": self.sampler.num_replicas}
        return {"epoch": self.epoch, "batches": self.batches, "images": self.images, **geometry}

    def _take_saved_state(self) -> None:
        if self.saved_state is not None and self.resume_at is None:
            self.load_state_dict(self.saved_state)
        self.saved_state = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"epoch", "batches"} <= state.keys() <= {"epoch", "batches", "images", "batch_size", "processes"}:  # litdata's: other data
            raise ValueError(
                "the checkpoint was saved while training on other data than these image files (an optimized dataset): resume with "
                "the data it was trained on, or start a new fit without --ckpt_path."
            )
        # Saved by lit_lora 0.x, with batches only: in this run's batch size and processes, as then assumed.
        resume = {"batch_size": self.batch_size, "processes": self.sampler.num_replicas, **{k: int(v) for k, v in state.items()}}
        self.resume_at = {"images": resume["batches"] * resume["batch_size"] * resume["processes"], **resume}

    def __iter__(self) -> Iterator[Any]:
        self._take_saved_state()
        sampler = self.sampler
        resume, self.resume_at = self.resume_at, None
        if resume is None or resume["epoch"] != sampler.epoch:
            resume = {"batches": 0, "images": 0}
        elif (resume["batch_size"], resume["processes"]) != (self.batch_size, sampler.num_replicas):
            left = math.ceil(max(0, len(sampler.dataset) - resume["images"]) / sampler.num_replicas)
            check_rest_of_epoch(resume, left, len(self), self.batch_size, sampler.num_replicas)
        sampler.skip = resume["images"]
        self.epoch, self.batches, self.images = sampler.epoch, resume["batches"], resume["images"]
        for batch in marking_read_errors(super().__iter__()):
            self.batches += 1
            self.images += self.batch_size * sampler.num_replicas
            yield batch


def check_rest_of_epoch(saved: dict[str, int], images_left: int, batches_in_epoch: int, batch_size: int, processes: int) -> None:
    """Refuse to resume an epoch whose images left need more batches than Lightning will run.

    Lightning counts a resumed epoch's batches on from the saved count (``saved["batches"]``, in the batch sizes they
    had) and ends the epoch after ``batches_in_epoch`` of this run's: with a larger batch size or more processes than
    the epoch was saved with, its last images would not be trained (with a smaller or equal global batch the loader
    runs out first, every image trained once).

    Args:
        saved: the saved position: ``batches``, and the ``batch_size`` and ``processes`` it was saved with.
        images_left: images each process of this run has left in the epoch.
        batches_in_epoch: the epoch's batches per process with this run's batch size.
        batch_size: this run's images per batch.
        processes: this run's processes.

    Raises:
        ValueError: naming both batch sizes and process counts, and about how many images the epoch would leave out.
    """
    runs = batches_in_epoch - saved["batches"]
    if math.ceil(images_left / batch_size) > runs:
        lost = (images_left - runs * batch_size) * processes
        raise ValueError(
            f"the checkpoint was saved {saved['batches']} batches into an epoch, with {saved['batch_size']} images per batch on "
            f"{saved['processes']} process(es), and this run has {batch_size} on {processes}: Lightning would end that epoch about {lost} "
            f"images early. Resume with data.batch_size {saved['batch_size']} on {saved['processes']} process(es) (or a smaller "
            "batch size), or from a checkpoint written at the end of an epoch."
        )
