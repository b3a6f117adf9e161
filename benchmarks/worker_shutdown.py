"""How often a spawned loader worker dies of SIGABRT when its loader is shut down mid-epoch, with torch's plain
workers and with lit_lora's ``worker_init_fn`` (`lit_lora.workers.WorkerStart`), alternating in one run.

    python benchmarks/worker_shutdown.py --rounds 30

A fit stopped mid-epoch (SIGTERM, Ctrl-C, ``max_steps``) shuts its loaders down while their workers are still sending
batches. A spawned worker ends with Python's full exit, which ends its queue's sending thread where it stands; the
worker can die of SIGABRT ("terminate called without an active exception"), and the main process then fails with
"DataLoader worker ... is killed by signal: Aborted". Each round starts persistent workers with spawn, takes a few
batches of large images (so that more are on their way), and shuts the loader down; it counts the rounds in which a
worker did not end with status 0. torch reports the failure as "Exception ignored in ... __del__" here: these lines
are expected in the plain rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import warnings

import torch
from torch.utils.data import DataLoader, Dataset

from lit_lora.workers import WorkerStart


class LargeImages(Dataset):
    """Uninitialised images of ``size`` pixels: the workers make them about as fast as they can send them."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return 100_000

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.empty(3, self.size, self.size), index


def shutdown_fails(worker_init_fn: WorkerStart | None, args: argparse.Namespace) -> bool:
    """Start the workers, take ``args.batches`` batches, shut the loader down; whether a worker ended abnormally."""
    loader = DataLoader(
        LargeImages(args.image_size), batch_size=args.batch_size, num_workers=args.num_workers, prefetch_factor=args.prefetch_factor,
        persistent_workers=True, multiprocessing_context="spawn", worker_init_fn=worker_init_fn,
    )
    batches = iter(loader)
    for _ in range(args.batches):
        next(batches)
    workers = multiprocessing.active_children()
    del batches, loader  # torch shuts the workers down here (a loader with persistent workers holds its iterator)
    for worker in workers:
        worker.join(30)
    return any(worker.exitcode != 0 for worker in workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="shutdowns in all, alternating plain and WorkerStart")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--prefetch_factor", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="batches taken before the shutdown")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    names = ("torch's plain workers", "WorkerStart")
    failed, rounds = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for round_ in range(args.rounds):
        name = names[round_ % 2]
        failed[name] += shutdown_fails(WorkerStart() if name == "WorkerStart" else None, args)
        rounds[name] += 1
    for name in names:
        print(f"{name}: a worker ended abnormally in {failed[name]} of {rounds[name]} shutdowns")


if __name__ == "__main__":
    main()
