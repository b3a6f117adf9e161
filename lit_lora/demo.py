"""Offline demo assets: a small random ViT and a generated image set with learnable classes.

``configs/demo.yaml`` names them as ``demo://vit-tiny`` and ``demo://food-shapes``. `resolve` builds each one
once into the cache folder (``$LIT_LORA_CACHE``, default ``~/.cache/lit_lora``) and returns its path; anything
else passes through unchanged. Builds go to a temporary folder renamed into place, so an interrupted build is
never mistaken for a finished one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lit_lora.files import write_folder

SCHEME = "demo://"
# Each class is a food with a telling colour; the shape (disc or bar), place, size and background vary.
DEMO_COLORS = {
    "tomato": (200, 40, 40),
    "matcha": (50, 160, 60),
    "blueberry": (50, 70, 200),
    "banana": (225, 210, 50),
    "eggplant": (120, 50, 150),
    "orange": (235, 130, 30),
    "coconut": (240, 240, 235),
    "chocolate": (100, 60, 30),
}
DEMO_CLASSES = tuple(DEMO_COLORS)


def cache_root() -> Path:
    """Folder holding built demo assets."""
    return Path(os.environ.get("LIT_LORA_CACHE", Path.home() / ".cache" / "lit_lora")).expanduser()


def resolve(name_or_path: str) -> str:
    """Return a local path for a ``demo://`` asset (building it on first use); return anything else unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith(SCHEME):
        return name_or_path
    name = name_or_path[len(SCHEME) :]
    builders: dict[str, Callable[[Path], None]] = {"vit-tiny": build_tiny_vit, "food-shapes": build_shape_images}
    if name not in builders:
        raise ValueError(f"unknown demo asset {name_or_path!r}; available: {[SCHEME + n for n in builders]}.")
    return str(write_folder(cache_root() / "demo" / name, builders[name], replace=False))


def build_tiny_vit(folder: Path, image_size: int = 32, seed: int = 0) -> None:
    """Save a randomly initialised 4-layer ViT backbone (hidden size 64, 8 px patches, no classification head, like
    ``google/vit-base-patch16-224-in21k``) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
    )
    with torch.random.fork_rng():  # the caller's random stream (seed_everything) stays as it was
        torch.manual_seed(seed)
        model = ViTModel(config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)


def shape_image(class_name: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """One RGB image of ``class_name``: a disc or bar of its colour on a noisy background, at a random place."""
    shape = rng.choice(["disc", "bar"])
    image = rng.integers(90, 170, (size, size, 3)).astype(np.float32)
    image += rng.normal(0, 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    if shape == "disc":
        radius = rng.uniform(0.12, 0.25) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        half_w, half_h = rng.uniform(0.05, 0.1) * size, rng.uniform(0.2, 0.4) * size
        mask = (abs(xx - cx) <= half_w) & (abs(yy - cy) <= half_h)
    color = np.array(DEMO_COLORS[class_name]) + rng.normal(0, 30, 3)
    image[mask] = color
    return np.clip(image, 0, 255).astype(np.uint8)


def build_shape_images(folder: Path, train_per_class: int = 60, test_per_class: int = 15, seed: int = 0) -> None:
    """Write a small image set in Food-101's archive layout (``images/``, ``meta/``), one grayscale image included."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "meta").mkdir(parents=True)
    listings: dict[str, list[str]] = {"train": [], "test": []}
    for class_name in DEMO_CLASSES:
        (folder / "images" / class_name).mkdir(parents=True)
        for i in range(train_per_class + test_per_class):
            entry = f"{class_name}/{i:04d}"
            Image.fromarray(shape_image(class_name, rng)).save(folder / "images" / f"{entry}.jpg", quality=90)
            listings["train" if i < train_per_class else "test"].append(entry)
    # Food-101 has grayscale images; so does the demo.
    first = folder / "images" / f"{DEMO_CLASSES[0]}/0000.jpg"
    Image.open(first).convert("L").save(first)
    (folder / "meta" / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")
    for split, entries in listings.items():
        (folder / "meta" / f"{split}.txt").write_text("\n".join(entries) + "\n")
