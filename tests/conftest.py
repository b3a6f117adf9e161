"""Shared fixtures: tiny models saved with save_pretrained and generated images, all in temporary folders."""

from __future__ import annotations

import os
import shutil
import tempfile

# Before transformers/datasets are imported anywhere: nothing in the tests may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers (pyproject's addopts) share the cores, so torch's threads are split among them (in the processes
# a test starts too): with all the cores each, they spin on each other's. Measured on 2 cores, the whole run: 833 s in
# one process, 803 s in two with 2 threads each, 511 s in two with 1 thread each.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# Caches in one folder of the test run, removed at its end: the demo's assets (built once) and litdata's chunks (set
# before litdata is imported, as it reads this once). Not in ~/.cache, ~/.lightning or /tmp. (optimize stages its
# chunks in a temporary folder of its own, removed after each split.)
# A process that a test starts (a CLI run importing a test module's callback) inherits the run's folder, and only the
# run's own process removes it.
os.environ.setdefault("LIT_LORA_TESTS_PID", str(os.getpid()))
os.environ["LIT_LORA_TESTS_CACHE"] = os.environ.get("LIT_LORA_TESTS_CACHE") or tempfile.mkdtemp(prefix="lit_lora-tests-")
# Under pytest-xdist each worker has its own caches: its own S3 server serves the same URLs, and runs in one worker
# must not find another's chunk-cache locks. A process that a test starts keeps its test's, even without xdist's variables.
if "PYTEST_XDIST_WORKER" in os.environ or os.path.dirname(os.environ.get("LIT_LORA_CACHE", "")) != os.environ["LIT_LORA_TESTS_CACHE"]:
    os.environ["LIT_LORA_CACHE"] = os.path.join(os.environ["LIT_LORA_TESTS_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.environ["LITDATA_CACHE_DIR"] = os.path.join(os.environ["LIT_LORA_CACHE"], "litdata")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_lora.demo import build_tiny_vit, shape_image

CLASSES = ("tomato", "matcha", "blueberry", "banana")
CACHES = os.environ["LIT_LORA_TESTS_CACHE"]
MADE_HERE = os.environ["LIT_LORA_TESTS_PID"] == str(os.getpid())


def bare_env(**variables: str) -> dict[str, str]:
    """An almost empty environment for a fresh interpreter (what a new user's shell may lack), keeping the test
    run's cache folders above, plus ``variables``."""
    caches = ("LIT_LORA_CACHE", "LITDATA_CACHE_DIR", "LIT_LORA_TESTS_CACHE", "LIT_LORA_TESTS_PID")
    return {**{name: os.environ[name] for name in caches}, **variables}


def pytest_unconfigure(config: pytest.Config) -> None:
    if MADE_HERE:
        shutil.rmtree(CACHES, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS over HTTPS on 127.0.0.1), with this process's AWS_* variables pointing at it."""
    from s3_server import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {key: os.environ.get(key) for key in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 4-layer ViT (32 px input) and its image processor, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-vit")
    build_tiny_vit(folder)
    return str(folder)


def write_images(folder: Path, class_name: str, count: int, rng: np.random.Generator, start: int = 0) -> list[str]:
    """Write ``count`` learnable JPEGs of ``class_name`` into ``folder``; return their stems."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(start, start + count):
        Image.fromarray(shape_image(class_name, rng)).save(folder / f"{i:04d}.jpg")
        stems.append(f"{i:04d}")
    return stems


def make_food101(root: Path, train_per_class: int = 12, test_per_class: int = 4, seed: int = 0) -> Path:
    """A Food-101 archive layout (images/<class>/<id>.jpg, meta/*.txt) with one grayscale image."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for name in CLASSES:
        stems = write_images(root / "images" / name, name, train_per_class + test_per_class, rng)
        train += [f"{name}/{s}" for s in stems[:train_per_class]]
        test += [f"{name}/{s}" for s in stems[train_per_class:]]
    gray = root / "images" / CLASSES[0] / "0000.jpg"
    Image.open(gray).convert("L").save(gray)
    (root / "meta").mkdir()
    (root / "meta" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="session")
def food101_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 classes, 12 training and 4 test images each, in Food-101's archive layout."""
    return str(make_food101(tmp_path_factory.mktemp("food101")))


@pytest.fixture(scope="session")
def class_folders_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Plain <class>/<image> folders: 4 classes with 6 images each."""
    root = tmp_path_factory.mktemp("class-folders")
    rng = np.random.default_rng(1)
    for name in CLASSES:
        write_images(root / name, name, 6, rng)
    return str(root)


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """``python -m lit_lora ARGS`` in this process (its ``main()``, exit code and output), without a new
    interpreter's 5 s of imports. Returns ``(exit_code, stdout, stderr)``."""
    import sys

    from lit_lora.__main__ import main

    def run(args: list[str], cwd: Path | None = None) -> tuple[int, str, str]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["lit_lora", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run
