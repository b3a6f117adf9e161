"""How long the training loader takes to deliver its first batch when its workers start with a given method.

    python benchmarks/worker_start.py --data_dir ../shared/food101-sample --start_method spawn --rounds 2

With spawn or forkserver (macOS's default, Linux's from Python 3.14) each worker is a new interpreter that imports
what the loader's dataset and ``worker_init_fn`` need; with fork it copies this process. Each round is a new loader
(``persistent_workers`` off), so every round starts its workers again; the first batch is read, decoded and cropped.
To compare two commits, run this from a worktree of each (``PYTHONPATH=<worktree>``), alternating.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/food101-sample")
    parser.add_argument("--start_method", default="spawn", choices=multiprocessing.get_all_start_methods())
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    multiprocessing.set_start_method(args.start_method)

    from lit_lora import ImageClassificationDataModule

    data = ImageClassificationDataModule(
        data_dir=args.data_dir, num_workers=args.num_workers, batch_size=args.batch_size, persistent_workers=False, val_size=0.2
    )
    data.setup("fit")
    for round_ in range(1, args.rounds + 1):
        start = time.perf_counter()
        next(iter(data.train_dataloader()))
        print(f"round {round_}: first batch after {time.perf_counter() - start:.2f} s ({args.num_workers} workers, {args.start_method})")


if __name__ == "__main__":
    main()
