"""Split arithmetic shared by every data source: `datasets`-style slicing and a seeded, stratified hold-out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def slice_indices(spec: str, split_sizes: Mapping[str, int]) -> dict[str, list[int]]:
    """Resolve a `datasets` split expression into row indices per split.

    Uses `datasets.ReadInstruction`, so the grammar is exactly the one `datasets.load_dataset(split=...)` accepts:
    ``"train"``, ``"train[:5000]"``, ``"train[10%:]"``, ``"train[:100]+test[:50]"``.

    Args:
        spec: the split expression.
        split_sizes: number of rows of each split the source has.

    Returns:
        For each split named in ``spec``, the selected row indices in source order.

    Raises:
        ValueError: the expression is malformed or names a split the source does not have.
    """
    if spec in split_sizes:  # a whole split: no grammar to apply, and no need to import `datasets` (~1 s)
        return {spec: list(range(split_sizes[spec]))}
    from datasets import ReadInstruction

    try:
        instructions = ReadInstruction.from_spec(spec).to_absolute(dict(split_sizes))
    except (ValueError, AssertionError) as err:
        raise ValueError(
            f"split {spec!r} cannot be read: {err}. Available splits: {dict(split_sizes)}; "
            "write it as in `datasets`, e.g. 'train', 'train[:5000]' or 'train[:10%]'."
        ) from err
    selected: dict[str, list[int]] = {}
    for instruction in instructions:
        selected.setdefault(instruction.splitname, []).extend(range(instruction.from_, instruction.to))
    return selected


def stratified_split(labels: Sequence[int], val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(labels)-1`` into train and validation, keeping class proportions.

    Each class gives ``val_size`` of its rows to validation; the rounding remainders are handed out so that the
    validation set has exactly ``round(val_size * len(labels))`` rows. The result depends only on the labels,
    ``val_size`` and ``seed``, so every process and every run gets the same split.

    Args:
        labels: class index of each row.
        val_size: fraction of rows held out for validation, in (0, 1).
        seed: seed of the permutation.

    Returns:
        ``(train_positions, val_positions)``, each sorted.
    """
    if not 0.0 < val_size < 1.0:
        raise ValueError(f"val_size must be between 0 and 1 (exclusive), got {val_size}.")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    classes = np.unique(labels_array)
    members = {c: rng.permutation(np.flatnonzero(labels_array == c)) for c in classes}
    exact = {c: val_size * len(members[c]) for c in classes}
    take = {c: int(np.floor(exact[c])) for c in classes}
    missing = int(round(val_size * len(labels_array))) - sum(take.values())
    # Largest remainders first; ties broken by a seeded shuffle so no class is always favoured.
    order = sorted(rng.permutation(classes), key=lambda c: exact[c] - take[c], reverse=True)
    for c in order[: max(missing, 0)]:
        take[c] += 1
    val = np.concatenate([members[c][: take[c]] for c in classes]) if len(classes) else np.array([], int)
    train = np.setdiff1d(np.arange(len(labels_array)), val)
    return sorted(train.tolist()), sorted(val.tolist())
