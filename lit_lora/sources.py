"""Where images come from: a Food-101 archive folder, class folders, or a `datasets` dataset (hub id or disk).

Each source knows its class names and split sizes without decoding a single image, so the data module can
report them (and the CLI can link them into the model) at construction time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_lora.images import IMAGE_EXTENSIONS, FileTable, HFTable, ImageTable
from lit_lora.splits import slice_indices

SPLIT_FOLDER_NAMES = ("train", "validation", "val", "test")


@dataclass
class ImageSource:
    """A data source resolved to class names and named splits.

    Attributes:
        kind: which layout was found, e.g. ``"food101 archive"``.
        location: the folder or dataset id it was read from.
        class_names: label names, index = label id.
        split_sizes: number of images in each split.
        test_split: the split that serves as the official test set, if the source has one.
    """

    kind: str
    location: str
    class_names: list[str]
    split_sizes: dict[str, int]
    test_split: str | None
    _read_split: Callable[[str, list[int]], ImageTable] = field(repr=False)

    def select(self, spec: str) -> ImageTable:
        """Return the rows a split expression such as ``"train[:5000]"`` selects, in source order."""
        tables = [self._read_split(name, rows) for name, rows in slice_indices(spec, self.split_sizes).items()]
        if len(tables) == 1:
            return tables[0]
        if not all(isinstance(t, FileTable) for t in tables):
            raise ValueError(f"split {spec!r} combines several splits, which only local image folders support.")
        return FileTable([p for t in tables for p in t.paths], [label for t in tables for label in t.labels])

    def summary(self) -> str:
        """One line saying what was found."""
        sizes = ", ".join(f"{name} {n}" for name, n in self.split_sizes.items())
        return f"{self.kind} at {self.location}: {len(self.class_names)} classes; {sizes} images"


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image file extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _ignored(name: str) -> bool:
    """Hidden files and folders, and what macOS adds to folders and zip archives (``__MACOSX/``, ``._<name>``
    resource forks with image extensions): not images, and never classes."""
    return name.startswith(".") or name == "__MACOSX"


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder``, at any depth, sorted; not hidden ones or macOS's leftovers (`_ignored`)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p) and not any(_ignored(part) for part in p.relative_to(folder).parts))


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _ignored(p.name))


# The split readers are classes, not closures: a data module holding its source is pickled by Lightning's ddp_spawn.
@dataclass
class _ReadFiles:
    """Rows of image files listed per split as (paths, labels)."""

    splits: dict[str, tuple[list[str], list[int]]]

    def __call__(self, split: str, rows: list[int]) -> ImageTable:
        paths, labels = self.splits[split]
        return FileTable([paths[r] for r in rows], [labels[r] for r in rows])


@dataclass
class _ReadDataset:
    """Rows of a `datasets` dataset: ``splits`` loaded from disk, or None to load the split from the hub's cache."""

    dataset: str
    image_column: str
    label_column: str
    splits: Any = None

    def __call__(self, split: str, rows: list[int]) -> ImageTable:
        import datasets

        full = self.splits[split] if self.splits is not None else datasets.load_dataset(self.dataset, split=split)
        return HFTable(full.select(rows), self.image_column, self.label_column, f"{self.dataset}:{split}", rows)


def _file_source(kind: str, root: Path, class_names: list[str], splits: dict[str, tuple[list[str], list[int]]]) -> ImageSource:
    """An `ImageSource` over image files listed per split as (paths, labels)."""
    sizes = {name: len(paths) for name, (paths, _) in splits.items()}
    return ImageSource(kind, str(root), class_names, sizes, "test" if "test" in splits else None, _ReadFiles(splits))


def open_food101_archive(root: Path) -> ImageSource:
    """Read the original Food-101 archive layout: ``images/<class>/<id>.jpg`` and ``meta/{classes,train,test}.txt``."""
    class_names = (root / "meta" / "classes.txt").read_text().split()
    label_of = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, tuple[list[str], list[int]]] = {}
    for split in ("train", "test"):
        listing = root / "meta" / f"{split}.txt"
        if not listing.exists():
            continue
        entries = listing.read_text().split()
        unknown = sorted({e.split("/")[0] for e in entries} - set(label_of))
        if unknown:
            raise ValueError(f"{listing} names classes missing from meta/classes.txt: {unknown[:5]}")
        paths = [str(root / "images" / f"{entry}.jpg") for entry in entries]
        splits[split] = (paths, [label_of[e.split("/")[0]] for e in entries])

    return _file_source("Food-101 archive layout", root, class_names, splits)


def open_class_folders(root: Path) -> ImageSource:
    """Read ``<class>/<image>`` folders, or ``<split>/<class>/<image>`` with split folders named train/val/test."""
    subfolders = _class_folders(root)
    split_folders = {p.name: p for p in subfolders if p.name in SPLIT_FOLDER_NAMES}
    if split_folders and len(split_folders) == len(subfolders):
        per_split = {("validation" if name == "val" else name): folder for name, folder in split_folders.items()}
        kind = "class folders per split"
    elif split_folders and all(_class_folders(folder) for folder in split_folders.values()):  # train/ and test/ as two classes?
        others = sorted(p.name for p in subfolders if p.name not in split_folders)
        raise ValueError(
            f"data_dir {str(root)!r} holds split folders ({', '.join(sorted(split_folders))}) beside other folders ({', '.join(others[:5])}): "
            "it would be read as class folders, with the splits as classes. Keep only the split folders there (each of class folders), "
            "or only class folders."
        )
    else:
        per_split = {"train": root}
        kind = "class folders"
    class_names = sorted({c.name for folder in per_split.values() for c in _class_folders(folder)})
    label_of = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, tuple[list[str], list[int]]] = {}
    empty = []
    for split, folder in per_split.items():
        paths, labels = [], []
        for class_folder in _class_folders(folder):
            images = list_images(class_folder)
            if not images:
                empty.append(str(class_folder))
            paths += [str(p) for p in images]
            labels += [label_of[class_folder.name]] * len(images)
        splits[split] = (paths, labels)
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) hold no image ({', '.join(IMAGE_EXTENSIONS)}): {empty[:5]}. "
            "Add images or remove the folders."
        )

    return _file_source(kind, root, class_names, splits)


def open_local_folder(data_dir: str | os.PathLike) -> ImageSource:
    """Detect the layout of a local image folder and open it.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder is neither in Food-101's layout nor made of class folders.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {str(root)!r} does not exist or is not a folder.")
    if (root / "meta" / "classes.txt").is_file() and (root / "images").is_dir():
        return open_food101_archive(root)
    if (root / "food-101" / "meta" / "classes.txt").is_file():
        return open_food101_archive(root / "food-101")
    if _class_folders(root):
        return open_class_folders(root)
    raise ValueError(
        f"data_dir {str(root)!r} is neither in Food-101's archive layout (images/<class>/<id>.jpg with "
        "meta/classes.txt, meta/train.txt, meta/test.txt) nor a folder of class folders (<class>/<image>)."
    )


def _find_columns(features: Any, where: str) -> tuple[str, str]:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    images = [name for name, f in features.items() if isinstance(f, ImageFeature)]
    labels = [name for name, f in features.items() if isinstance(f, ClassLabel)]
    if not images or not labels:
        raise ValueError(
            f"{where} needs an Image column and a ClassLabel column; its features are {dict(features)}."
        )
    return images[0], labels[0]


def open_hf_dataset(dataset: str) -> ImageSource:
    """Open a `datasets` dataset: a folder written by ``save_to_disk``, or anything ``load_dataset`` accepts."""
    import datasets

    path = Path(dataset).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        splits = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        features = next(iter(splits.values())).features
        image_column, label_column = _find_columns(features, f"dataset {dataset!r}")
        sizes = {name: len(split) for name, split in splits.items()}
        reader = _ReadDataset(dataset, image_column, label_column, splits)
        kind = "`datasets` dataset on disk"
    else:
        try:
            builder = datasets.load_dataset_builder(dataset)
        except Exception as err:  # datasets raises many types for "not found" and "offline"
            raise ValueError(
                f"dataset {dataset!r} could not be opened ({type(err).__name__}: {err}). Without network access "
                "(HF_HUB_OFFLINE=1) it must already be in the Hugging Face cache; otherwise pass a local copy "
                "with --data.data_dir PATH (Food-101 layout or class folders) or --data.dataset PATH."
            ) from err
        features = builder.info.features
        image_column, label_column = _find_columns(features, f"dataset {dataset!r}")
        sizes = {name: info.num_examples for name, info in (builder.info.splits or {}).items()}
        reader = _ReadDataset(dataset, image_column, label_column)
        kind = "`datasets` dataset"
    test_split = "test" if "test" in sizes else ("validation" if "validation" in sizes else None)
    return ImageSource(kind, dataset, list(features[label_column].names), sizes, test_split, reader)


def open_source(dataset: str | None, data_dir: str | None) -> ImageSource:
    """Open ``data_dir`` if given, else ``dataset``."""
    if data_dir:
        return open_local_folder(data_dir)
    if dataset:
        return open_hf_dataset(dataset)
    raise ValueError("no data source: set data_dir (a local folder) or dataset (a `datasets` id or path).")
