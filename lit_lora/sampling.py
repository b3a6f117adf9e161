"""Training order and augmentation seeds that are a pure function of ``(seed, epoch)``, and a loader that knows where
it is in the epoch, so a resumed run sees exactly the batches an uninterrupted one would have seen."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


class SeededShuffleSampler(DistributedSampler):
    """Shuffles rows anew each epoch as a pure function of ``(seed, epoch)``, and gives each item its own seed.

    Items are ``(row, seed)``: `ImageDataset` seeds that item's augmentation with it, so the crops and flips
    depend on neither the process nor the worker that draws it. Lightning calls `set_epoch` before every epoch.
    Under DDP each process takes every ``num_replicas``-th item of the same permutation (padded, as
    `DistributedSampler` does, so all processes run the same number of batches). Being a `DistributedSampler`,
    Lightning uses it as it is instead of wrapping it, which would freeze each image's augmentation seed.
    ``skip`` leaves that many of this process's items out of the next pass (`ResumableDataLoader` sets it).
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
        items += items[: self.total_size - len(items)]  # pad so that every process gets num_samples items
        skip, self.skip = self.skip, 0
        return iter(items[self.rank : self.total_size : self.num_replicas][skip:])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` over a `SeededShuffleSampler` that is resumable the way torchdata's ``StatefulDataLoader`` and
    litdata's ``StreamingDataLoader`` are: its `state_dict` says which epoch it is in and how many batches of it were
    delivered; Lightning saves that in checkpoints and hands it to `load_state_dict` before a resumed fit iterates,
    and the next pass of that epoch starts after those batches (loading the same state twice is harmless).

    A batch counts as it is handed out: Lightning fetches none ahead from a loader that has a length, so at a
    checkpoint the count is the batches trained.

    Not torchdata's ``StatefulDataLoader`` itself: its state loads only into a loader with the same ``num_workers``
    (0.11 fails an assertion otherwise: saved with 2 workers, loaded with 0 or 1), which defaults to the machine's
    cores, so a preempted run resumed on another kind of node could not go on. This state is any worker count's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.batches = 0, 0
        self.resume_at: tuple[int, int] | None = None
        self.saved_state: dict[str, Any] | None = None  # loaded at the first pass if Lightning loaded none (see the data module's state_dict)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.keys() != {"epoch", "batches"}:  # another loader saved it (litdata's): a position in other data
            raise ValueError(
                "the checkpoint was saved while training on other data than these image files (an optimized dataset): resume with "
                "the data it was trained on, or start a new fit without --ckpt_path."
            )
        self.resume_at = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:
        if self.saved_state is not None and self.resume_at is None:
            self.load_state_dict(self.saved_state)
        sampler, self.saved_state = self.sampler, None
        resume, self.resume_at = self.resume_at, None
        skip = resume[1] if resume is not None and resume[0] == sampler.epoch else 0
        sampler.skip = skip * self.batch_size
        self.epoch, self.batches = sampler.epoch, skip
        for batch in super().__iter__():
            self.batches += 1
            yield batch
