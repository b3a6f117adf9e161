"""This checkout's fit on an optimized dataset built in the run, against lit_lora at another commit with its own
fast path (its data option, built in the run too) and the PEFT guide's pipeline, alternating in one call.

    git worktree add /tmp/old 7a5093d     # the commit with the image cache that litdata replaced
    python benchmarks/against_commit.py --checkout /tmp/old --option='--data.cache_dir={folder}' --rounds 2

Same model, images, split and settings as `compare.py` (whose functions it uses); the other commit runs from its
checkout with this environment's packages. Prints wall and fit seconds per run; ``--result`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, required=True, help="a git worktree of the other commit")
    parser.add_argument("--option", required=True, help="its fast-path option; {folder} becomes a new folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work_dir", type=Path, default=compare.REPO / "benchmarks" / ".cache")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    settings = argparse.Namespace(epochs=3, batch_size=128, accumulation=4, workers=None, gpu=False, seed=42)
    work, here = args.work_dir, compare.REPO
    model, data = compare.make_model(work / "vit-small", False), compare.make_images(work / "images-5000", 5000)
    split = compare.guide_split(data, settings.seed, work)
    results = []
    for round_ in range(1, args.rounds + 1):
        results.append(compare.guide_run(f"guide-round{round_}", settings, model, data, split, work, 0))
        for name, checkout, option in (("other", args.checkout.resolve(), args.option), ("optimized", here, "--data.optimized_dir={folder}")):
            folder = work / f"{name}-{os.getpid()}-{round_}"
            compare.REPO = checkout  # the run's working folder (its configs/) and, through PYTHONPATH, its package
            os.environ["PYTHONPATH"] = str(checkout)
            try:
                results.append(compare.lit_lora_run(f"{name}-round{round_}", settings, model, split, work, [option.format(folder=folder)]))
            finally:
                compare.REPO = here
                os.environ.pop("PYTHONPATH")
                shutil.rmtree(folder, ignore_errors=True)  # cold in every round
    for r in results:
        r.pop("log", None)
        print(f"{r['name']}: wall {r['wall_seconds']:.1f} s, fit {r.get('fit_seconds', '-')} s")
    for offset, name in ((1, "other"), (2, "optimized")):  # each round: guide, other, optimized
        ratios = [ours["wall_seconds"] / guide["wall_seconds"] for ours, guide in zip(results[offset::3], results[::3])]
        print(f"{name}: median {statistics.median(ratios):.2f}x the guide's wall time ({', '.join(f'{r:.2f}' for r in ratios)})")
    if args.result:
        args.result.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
