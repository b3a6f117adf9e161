"""`Food101DataModule`: Food-101 (or any labelled image folder or `datasets` dataset) for Lightning."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lit_lora import demo, log, optimized
from lit_lora.device_decode import decode_batch
from lit_lora.images import FileTable, ImageDataset, ImageTable, bad_image_error, collate_skipping_bad_images
from lit_lora.sampling import ResumableDataLoader, SeededShuffleSampler
from lit_lora.sources import ImageSource, list_images, open_source
from lit_lora.splits import stratified_split
from lit_lora.transforms import ImageSettings, eval_transform, load_image_settings, train_transform
from lit_lora.workers import WorkerStart

if TYPE_CHECKING:  # litdata is imported where optimized data is read (`lit_lora.streaming` says why)
    from lit_lora.streaming import ChunkCacheUse, OptimizedImages, ResumableStreamingDataLoader


def default_num_workers() -> int:
    """One loader worker per CPU core this process may use, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def settings_problems(
    val_size: float, val_split: str | None, batch_size: int, num_workers: int | None, prefix: str = "",
    optimized_cache_size: str | float | None = None, optimized_train_side: int | None = None, crop: tuple[int, int] | None = None,
    streamed: bool = False,
) -> list[str]:
    """What is wrong with these `Food101DataModule` settings, each problem naming its setting as ``prefix + name``
    (the CLI checks its configuration with this before building anything). ``optimized_train_side``: checked when
    optimized data is used, against the model's ``crop`` when known. ``streamed``: the optimized data is at a URL, read
    through the chunk cache (sized for one process here; `ImageClassificationDataModule.setup` counts a node's)."""
    problems = []
    least = max(crop or (1,))
    if optimized_train_side is not None and optimized_train_side < least:  # every training crop enlarged, or none made
        why = " (the model's crop size: training crops are taken from images this size)" if crop else ""
        problems.append(f"{prefix}optimized_train_side must be at least {least}{why}, got {optimized_train_side}")
    readers = max(1, default_num_workers() if num_workers is None else num_workers) if streamed else None
    cache = optimized.cache_size_problem(optimized_cache_size, readers)  # else litdata refuses it in setup, or hangs
    if cache:
        problems.append(f"{prefix}optimized_cache_size {cache}")
    environment = optimized.environment_cache_problem(optimized_cache_size, readers) if streamed else None
    if environment:
        problems.append(environment if environment.startswith("MAX_CACHE_SIZE") else prefix + environment)
    if val_split is None and not 0.0 < val_size < 1.0:
        problems.append(f"{prefix}val_size must be between 0 and 1 (exclusive), got {val_size}")
    if batch_size < 1:
        problems.append(f"{prefix}batch_size must be at least 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        problems.append(f"{prefix}num_workers must be 0 or more, got {num_workers}")
    return problems


class ImageClassificationDataModule(pl.LightningDataModule):
    """Labelled images for Lightning: a hub dataset, a `datasets` folder, Food-101's archive layout or class folders.

    Training images come from ``train_split``; a seeded, stratified ``val_size`` share of them is held out for
    validation, unless ``val_split`` names images to validate on. The test split is the source's official one
    (Food-101's ``test.txt``, the hub's ``validation``). `Food101DataModule` is this with the PEFT guide's defaults.
    """

    def __init__(
        self,
        dataset: str | None = None,
        data_dir: str | None = None,
        train_split: str = "train",
        test_split: str | None = None,
        val_size: float = 0.1,
        val_split: str | None = None,
        seed: int = 42,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        image_processor: str | None = None,
        predict_dir: str | list[str] | None = None,
        class_names: list[str] | None = None,
        fast_decode: bool = True,
        fast_eval_decode: bool = False,
        decode_on_device: bool = False,
        optimized_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
        optimized_train_side: int = 256,
        optimized_cache_size: str | float | None = None,
        on_bad_image: Literal["skip", "error"] = "skip",
    ) -> None:
        """Describe where the images are and how they are batched.

        Args:
            dataset: a hub dataset id (e.g. ``ethz/food101``) or any path ``datasets.load_dataset`` accepts,
                or a folder written by ``Dataset.save_to_disk``. Ignored when ``data_dir`` is set.
            data_dir: a local folder in Food-101's archive layout (``images/<class>/<id>.jpg`` plus
                ``meta/classes.txt``, ``meta/train.txt``, ``meta/test.txt``) or of class folders
                (``<class>/<image>``, optionally under ``train/`` and ``test/``). Takes precedence over ``dataset``.
            train_split: which training images to use, in `datasets` slicing syntax (``train[:5000]``, ``train[:10%]``).
            test_split: split used by ``test``; by default the source's official test split.
            val_size: share of the selected training images held out for validation (stratified by class).
            val_split: validate on these images instead (same slicing syntax, e.g. ``validation[:10%]``); all of
                ``train_split`` is then trained on and ``val_size`` is not used.
            seed: seed of the train/validation split.
            batch_size: images per training batch (per process).
            eval_batch_size: images per validation/test/predict batch; defaults to ``batch_size``.
            num_workers: loader worker processes, and ``optimize``'s; defaults to the number of CPU cores available
                (at most 16). When the model trains on the CPU, workers run at a lower priority (nice 10) than its
                threads.
            pin_memory: pin host memory of batches for faster copies to the GPU.
            persistent_workers: keep workers alive between epochs. Not on optimized data when the trainer reloads its
                loaders (``reload_dataloaders_every_n_epochs``) or ends epochs early (``limit_train_batches``). For loaders of
                optimized data that you iterate yourself, outside a Trainer, set False: litdata 0.2.76 keeps a dropped
                loader's workers until the garbage collector comes, then waits 5 s for each (Lightning stops them itself).
            image_processor: model id or folder whose image processor gives the crop size, the resize side and the
                interpolation (`transforms.settings_from_processor`); ViT's 224 px defaults when unset. The CLI
                links this to ``model.model_name_or_path``, so it is never configured twice. Pixels leave the data
                module as uint8; the model normalises them.
            predict_dir: folder searched recursively for images (or a list of image files) for ``predict``.
            class_names: label names, index = label id. By default read from the source; when given, the source
                must have exactly these (in this order). ``predict`` needs no source: the names then come from
                here or from the checkpoint.
            fast_decode: for training crops, choose each JPEG's crop from its header and let libjpeg decode only at
                the scale the crop needs (same crop distribution as the guide's transforms, pixels within a few
                levels). False runs the guide's torchvision transforms on fully decoded images.
            fast_eval_decode: the same for validation, test and predict: faster, but an approximation (top-1 almost
                always the same, probabilities within about 1e-2 of what stock tools give). Off by default:
                evaluation and predict then compute exactly what the exported image processor computes.
            decode_on_device: for validation, test and predict, loader workers only read JPEG files; each batch is
                decoded (nvJPEG through torchvision on a GPU), resized and centre-cropped on the model's device,
                with the same evaluation transform. Other files, and files the decoder rejects, take the CPU path.
            optimized_dir: a folder or object-store URL (``s3://bucket/food101``) holding the splits as litdata
                datasets (``python -m lit_lora optimize``): images decoded once, pre-resized uint8, streamed to every
                process and worker (`lit_lora.optimized`). ``fit`` builds a local folder that is missing or empty
                from the source first (once per node, in `prepare_data`; fits started together on it wait for the
                first one's build). With ``data_dir`` set, a dataset built from other images or settings is
                refused. A complete one gives the class names; a hub ``dataset`` is then not opened.
            storage_options: passed to litdata's storage client for ``optimized_dir`` URLs (e.g. ``endpoint_url``);
                the standard ``AWS_*`` variables work without it.
            optimized_train_side: shorter side of the optimized training images, at least the model's crop size (256
                suits 224 px crops); random crops are taken from these.
            optimized_cache_size: how much of an ``optimized_dir`` URL each node keeps in litdata's chunk cache
                (``LITDATA_CACHE_DIR``), e.g. ``200GB`` or ``0.5`` of the free disk; chunks beyond it are deleted once
                read and downloaded again next epoch; at least 24MB for each loader worker of every process on the node.
                By default litdata's: 75 % of the free disk, leaving 50 GB free. litdata puts the environment's
                ``MAX_CACHE_SIZE`` first: one set to another size is refused.
            on_bad_image: what to do with a file that cannot be read (truncated, empty, not an image, too large):
                ``skip`` leaves it out, counts it and lists it at the end of the epoch; ``error`` stops (on an optimized
                dataset that left such files out: before training).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["class_names"])  # the model's hyperparameters hold the labels
        self.dataset = dataset
        self.data_dir = demo.resolve(data_dir) if data_dir else None
        self.train_split = train_split
        self.test_split = test_split
        self.val_size = val_size
        self.val_split = val_split
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.predict_dir = predict_dir
        self.fast_decode = fast_decode
        self.fast_eval_decode = fast_eval_decode
        self.decode_on_device = decode_on_device
        self.optimized_dir = optimized_dir if optimized_dir is None or optimized.is_url(optimized_dir) else str(Path(optimized_dir).expanduser())
        self.storage_options = dict(storage_options or {})
        self.optimized_train_side = optimized_train_side
        self.optimized_cache_size = optimized_cache_size
        self._manifest: dict[str, Any] | None = None
        self.on_bad_image = on_bad_image
        self.skipped_images: dict[str, str] = {}  # file -> reason, filled as batches arrive
        self.image_warnings: dict[str, str] = {}  # file -> what the decoder said about a file it read anyway

        self.image_settings = load_image_settings(demo.resolve(image_processor)) if image_processor else ImageSettings()
        self._check()
        self._class_names = list(class_names) if class_names else None
        self._source: ImageSource | None = None
        if self._class_names is None and not optimized_dir:
            _ = self.source  # find the data and its labels now: a wrong path should fail before any compute
        self.train_table: ImageTable | OptimizedImages | None = None
        self.val_table: ImageTable | OptimizedImages | None = None
        self.test_table: ImageTable | OptimizedImages | None = None
        self.predict_table: FileTable | OptimizedImages | None = None
        self._train_loader: ResumableDataLoader | ResumableStreamingDataLoader | None = None
        self._cache_use: ChunkCacheUse | None = None  # of an optimized_dir URL, while set up
        self._saved_train_state: dict[str, Any] | None = None  # from a checkpoint, for the next training loader
        self._fit_images_of: tuple[Any, ...] = (None, None, None)  # (train table, validation table, their digests)

    def _check(self, optimizing: bool = False) -> None:
        problems = settings_problems(
            self.val_size, self.val_split, self.batch_size, self.num_workers, optimized_cache_size=self.optimized_cache_size,
            optimized_train_side=self.optimized_train_side if self.optimized_dir or optimizing else None, crop=self.image_settings.crop,
            streamed=bool(self.optimized_dir) and optimized.is_url(self.optimized_dir),
        )
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems) + ".")

    @property
    def source(self) -> ImageSource | None:
        """The opened data source (opened on first use; None when neither data_dir nor dataset is set)."""
        if self._source is None and (self.data_dir or self.dataset):
            source = open_source(self.dataset, self.data_dir)
            log.info(f"[lit_lora] data: {source.summary()}")
            if len(source.class_names) < 2:
                raise ValueError(f"{source.location} has {len(source.class_names)} class(es); need at least 2.")
            if self._class_names is not None and self._class_names != source.class_names:
                raise ValueError(
                    f"class_names {self._class_names[:5]}... (the checkpoint's or configured) differ from those of "
                    f"{source.location}: {source.class_names[:5]}... Use data with the same labels."
                )
            self._source = source
        return self._source

    @property
    def class_names(self) -> list[str] | None:
        """Label names, index = label id (linked into the model by the CLI): given ones, else the source's, else
        those of the optimized dataset."""
        if self._class_names is not None:
            return list(self._class_names)
        if self.optimized_dir:
            manifest = self._manifest or optimized.read_manifest(self.optimized_dir, self.storage_options)
            if (manifest or {}).get("state") == "complete" or self.source is None:  # not the hub's copy on a node without it
                return list(self.optimized_manifest(manifest)["class_names"])
        return list(self.source.class_names) if self.source is not None else None

    def _optimized_splits(self) -> tuple[dict[str, ImageTable], dict[str, Any]]:
        """The source's splits as ``optimize`` writes them (fit's, and the test split), and their description."""
        source = self._require_source()
        train, val = self._train_and_val_files()
        tables = {"train": train, "val": val}
        if self.test_split or source.test_split:
            tables["test"] = self._test_files()
        names = list(source.class_names)
        fingerprint = optimized.fingerprint(tables, names, self.image_settings, self.optimized_train_side)
        pixels = optimized.stored_pixels(self.image_settings, self.optimized_train_side)
        description = {"format": optimized.FORMAT, "class_names": names, "source": source.location, "fingerprint": fingerprint, "pixels": pixels}
        return tables, {**description, "split": self._split_settings(), "fit_images": self._fit_images(train, val)}

    def _split_settings(self) -> dict[str, Any]:
        """The settings that select and split the images (``seed`` only where it draws the validation share)."""
        own = {"train_split": self.train_split, "val_split": self.val_split, "test_split": self.test_split}
        return own if self.val_split is not None else {**own, "val_size": self.val_size, "seed": self.seed}

    def optimize(self, output_dir: str, overwrite: bool = False) -> dict[str, Any]:
        """Write the splits ``fit`` and ``test`` use (the same seeded, stratified split) as litdata datasets under
        ``output_dir`` (a folder or URL), with ``num_workers`` processes; return the manifest. An identical dataset
        already there is kept; a process writing into the same local folder is waited for.

        Raises:
            ValueError: ``output_dir`` holds a different dataset (and not ``overwrite``), or other files.
        """
        self._check(optimizing=True)
        with optimized.writing(output_dir):
            return self._optimize(output_dir, overwrite)

    def _optimize(self, output_dir: str, overwrite: bool = False) -> dict[str, Any]:
        tables, description = self._optimized_splits()
        existing = optimized.read_manifest(output_dir, self.storage_options)
        complete = existing is not None and existing.get("state") == "complete"
        if complete and existing.get("fingerprint") == description["fingerprint"]:
            log.info(f"[lit_lora] {output_dir} already holds this optimized dataset ({existing['splits']} images)")
            return existing
        if complete and not overwrite:
            raise ValueError(
                f"{output_dir} holds an optimized dataset built from other images or settings (from {existing.get('source')}); "
                "pass --overwrite true to replace it, or choose another --output_dir."
            )
        local = None if optimized.is_url(output_dir) else Path(output_dir).expanduser()
        if existing is None and local is not None and optimized.holds_files(str(local)):
            raise ValueError(f"{output_dir} is not empty and holds no optimized dataset; choose an empty or new --output_dir.")
        manifest = optimized.write_splits(
            output_dir, tables, description, self.image_settings, self.optimized_train_side, self.num_workers, self.storage_options,
            replace=existing is not None,
        )
        bad = manifest["unreadable"]
        log.info(f"[lit_lora] optimized {manifest['splits']} images into {output_dir}" + (f"; {len(bad)} unreadable image(s) left out" if bad else ""))
        if bad and self.on_bad_image == "error":
            raise bad_image_error(*next(iter(bad.items())))
        self.skipped_images.update(bad)
        return manifest

    def optimized_manifest(self, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest of ``optimized_dir``, checked: complete, with these labels, its pixels cropped and resized for
        this model's image processor, and (with ``data_dir`` set) built from its images.

        Args:
            manifest: the manifest as just read from ``optimized_dir`` (read here when None).

        Raises:
            ValueError: there is no complete optimized dataset there, or it was built from something else.
        """
        if self._manifest is not None:
            return self._manifest
        manifest = manifest or optimized.read_manifest(self.optimized_dir, self.storage_options)
        where = f"data.optimized_dir {self.optimized_dir}"
        if manifest is None or manifest.get("state") != "complete":
            raise ValueError(f"{where} holds no complete optimized dataset; write one with `python -m lit_lora optimize --config ... --output_dir {self.optimized_dir}`.")
        ours = optimized.stored_pixels(self.image_settings, self.optimized_train_side)
        if manifest.get("pixels", ours) != ours:
            raise ValueError(
                f"{where} holds images cropped and resized for another image processor or data.optimized_train_side ({manifest['pixels']}; "
                f"this model needs {ours}): rebuild it for this model with `python -m lit_lora optimize ... --overwrite true`."
            )
        # Local files are cheap to check (a hub dataset would have to be loaded).
        if self.data_dir and manifest["fingerprint"] != self._optimized_splits()[1]["fingerprint"]:
            raise ValueError(
                f"{where} was built from other images or settings than data.data_dir {self.data_dir} (files added, changed or "
                "removed, or another split, seed or processor); rebuild it with `python -m lit_lora optimize ... --overwrite true`, "
                "or drop --data.data_dir to use it as it is."
            )
        stored, ours = manifest.get("split"), self._split_settings()
        differ = [key for key in ours if stored.get(key) != ours[key]] if stored and not self.data_dir else []
        if differ:  # without the source, nothing can be refused: say that the stored splits are the ones used
            rank_zero_warn(
                f"{where} was split with " + ", ".join(f"{key}={stored.get(key)!r}" for key in differ) + " and this run sets "
                + ", ".join(f"{key}={ours[key]!r}" for key in differ) + ": its stored splits are used; to change them, optimize again."
            )
        if self._class_names is not None and self._class_names != manifest["class_names"]:
            raise ValueError(f"class_names {self._class_names[:5]}... (the checkpoint's or configured) differ from those of {where}: {manifest['class_names'][:5]}...")
        unreadable = manifest.get("unreadable") or {}
        if unreadable and self.on_bad_image == "error":  # as optimize itself and a fit on the files would stop
            raise bad_image_error(*next(iter(unreadable.items())))
        self.skipped_images.update(unreadable)
        self._manifest = manifest
        return manifest

    def prepare_data(self) -> None:
        """Build a local ``optimized_dir`` that is missing, empty or half-written (once per node, before any process
        reads it)."""
        if not self.optimized_dir or optimized.is_url(self.optimized_dir):
            return
        if (optimized.read_manifest(self.optimized_dir) or {}).get("state") == "complete":
            return  # nothing to build, nothing to hold (a prebuilt dataset may be on a read-only disk)
        with optimized.writing(self.optimized_dir):  # another fit building it (a sweep started at once): wait, then use it
            existing = optimized.read_manifest(self.optimized_dir)
            if (existing or {}).get("state") == "incomplete" or (existing is None and not optimized.holds_files(self.optimized_dir)):
                # Built here from this source and these settings: setup need not select and fingerprint the files again.
                self._manifest = self._optimize(self.optimized_dir)

    def setup(self, stage: str) -> None:
        """Select and split the images needed for ``stage`` (nothing is decoded here)."""
        if self.optimized_dir and (stage != "predict" or not self.predict_dir):
            self._setup_optimized(stage)
        else:
            self._setup_files(stage)

    def _setup_optimized(self, stage: str) -> None:
        processes = self.trainer.num_devices if self.trainer is not None else 1  # on this node, sharing its chunk cache
        size = optimized.cache_size_in_effect(self.optimized_cache_size)
        cache = optimized.cache_size_problem(size, max(1, self.num_workers) * processes) if optimized.is_url(self.optimized_dir) else None
        if cache and processes > 1:  # with one process, __init__ has said so
            name = "data.optimized_cache_size" if size == self.optimized_cache_size else "MAX_CACHE_SIZE (environment)"
            raise ValueError(f"{name} {cache} ({processes} processes on this node, {self.num_workers} loader workers each).")
        manifest = self.optimized_manifest()
        split = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}[stage]
        if split not in manifest["splits"]:
            raise ValueError(f"data.optimized_dir {self.optimized_dir} has no {split} split (it has {list(manifest['splits'])}).")

        from lit_lora.streaming import ChunkCacheUse, OptimizedImages

        def stream(name: str, **kwargs: Any) -> OptimizedImages:
            location = optimized.join(self.optimized_dir, manifest.get("folders", {}).get(name, name))  # a test split also validated on is stored once, as val
            try:
                return OptimizedImages(location, seed=self.seed, storage_options=self.storage_options, max_cache_size=self.optimized_cache_size, **kwargs)
            except Exception as err:  # litdata's own checks (an AssertionError for an index without chunks) and storage errors
                raise ValueError(
                    f"cannot read the {name} split of data.optimized_dir at {location} ({optimized.error_line(err)}); for a URL, check "
                    "that its storage answers (endpoint, network, credentials: --data.storage_options, AWS_*); if the split is damaged, "
                    "rebuild it with `python -m lit_lora optimize ... --overwrite true`."
                ) from err

        if stage in ("fit", "validate"):
            self.train_table = stream("train", transform=train_transform(self.image_settings), shuffle=not self._overfitting())
            self.val_table = stream("val")
            sizes = manifest["splits"]  # not len(): under DDP, litdata's datasets have this process's share
            log.info(f"[lit_lora] {self.optimized_dir}: {sizes['train']} train / {sizes['val']} validation images")
        elif stage == "test":
            self.test_table = stream("test")
        else:
            self.predict_table = stream("test")
        if optimized.is_url(self.optimized_dir) and (self.trainer is None or self.trainer.local_rank == 0):
            self._cache_use = ChunkCacheUse(self.optimized_dir)
            read = [t for t in (self.train_table, self.val_table) if t is not None] if stage in ("fit", "validate") else [self.test_table or self.predict_table]
            limit = optimized.cache_bytes(self.optimized_cache_size, str(self._cache_use.folder))
            nodes = self.trainer.num_nodes if self.trainer is not None else 1  # litdata caches a node's share of the data
            self._cache_use.acquire(evicts=limit < sum(table.stored_bytes for table in read) / nodes)

    def teardown(self, stage: str) -> None:
        """Let other runs on this node that limit the chunk cache stream this run's ``optimized_dir`` URL."""
        if self._cache_use is not None:
            self._cache_use.release()

    def _setup_files(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_table is None:
            self.train_table, self.val_table = self._train_and_val_files()
        if stage == "test" and self.test_table is None:
            self.test_table = self._test_files()
        if stage == "predict" and self.predict_table is None:
            self.predict_table = self._predict_files()

    def _train_and_val_files(self) -> tuple[ImageTable, ImageTable]:
        """fit's training and validation images: ``train_split`` and ``val_split``, or the seeded, stratified
        ``val_size`` share of ``train_split`` held out."""
        source = self._require_source()
        selected = source.select(self.train_split)
        if len(selected) == 0:
            raise ValueError(f"train_split {self.train_split!r} selects no image from {source.location}.")
        self._warn_if_classes_missing(selected)
        if self.val_split is not None:
            train, validation = selected, source.select(self.val_split)
            if len(validation) == 0:
                raise ValueError(f"val_split {self.val_split!r} selects no image from {source.location}.")
            origin = f"validation: {self.val_split}"
        else:
            train_rows, val_rows = stratified_split(selected.labels, self.val_size, self.seed)
            if not val_rows or not train_rows:
                raise ValueError(
                    f"val_size {self.val_size} of {len(selected)} images leaves an empty train or validation set."
                )
            train, validation = selected.subset(train_rows), selected.subset(val_rows)
            origin = f"val_size={self.val_size}, seed={self.seed}"
        log.info(f"[lit_lora] {self.train_split}: {len(train)} train / {len(validation)} validation images ({origin})")
        return train, self._mixed(validation)

    def _test_files(self) -> ImageTable:
        source = self._require_source()
        split = self.test_split or source.test_split
        if split is None:
            raise ValueError(f"{source.location} has no test split (splits: {list(source.split_sizes)}); set --data.test_split.")
        return self._mixed(source.select(split))

    def _mixed(self, table: ImageTable) -> ImageTable:
        """``table`` in one fixed, seeded order across classes (sources list images grouped by class), so that any
        prefix of the evaluation batches (``limit_val_batches``, an interrupted pass) is a fair sample."""
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(self.seed)).tolist()
        return table.subset(order)

    def _require_source(self) -> ImageSource:
        if self.source is None:
            raise ValueError("no data source: set --data.data_dir (a local folder) or --data.dataset.")
        return self.source

    def _warn_if_classes_missing(self, table: ImageTable) -> None:
        present, total = len(Counter(table.labels)), len(self._require_source().class_names)
        if present < total:
            rank_zero_warn(
                f"train_split {self.train_split!r} covers {present} of {total} classes: "
                "the source lists its images grouped by class, so a leading slice misses the later ones. "
                "Use a percentage or the whole split if every class should be seen."
            )

    def _predict_files(self) -> FileTable:
        if not self.predict_dir:
            raise ValueError("predict needs images: set --data.predict_dir to a folder or a list of image files.")
        entries = [self.predict_dir] if isinstance(self.predict_dir, str) else list(self.predict_dir)
        paths: list[str] = []
        for entry in entries:
            path = Path(entry).expanduser()
            if path.is_dir():
                paths += [str(p) for p in list_images(path)]
            elif path.is_file():
                paths.append(str(path))
            else:
                raise FileNotFoundError(f"predict_dir entry {entry!r} does not exist.")
        if not paths:
            raise ValueError(f"predict_dir {self.predict_dir!r} holds no image files.")
        return FileTable(paths, [-1] * len(paths))

    def _loader(self, table: ImageTable | OptimizedImages | None, train: bool) -> DataLoader:
        assert table is not None, "setup() was not called for this stage"
        workers = self.num_workers
        common = dict(
            collate_fn=collate_skipping_bad_images, batch_size=self.batch_size if train else self.eval_batch_size, num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), persistent_workers=self.persistent_workers and workers > 0,
            worker_init_fn=WorkerStart(lower_priority=self._computing_on_cpu()),
            # A private generator for worker seeds: loading never draws from the global random state, which LoRA
            # dropout uses and checkpoints restore.
            generator=torch.Generator().manual_seed(self.seed),
        )
        if not isinstance(table, ImageTable):  # an optimized split
            from lit_lora.streaming import ResumableStreamingDataLoader

            if train and self.trainer is not None and (isinstance(self.trainer.limit_train_batches, int) or self.trainer.limit_train_batches < 1):
                # litdata's workers go on to the next epoch only when they run out of items: kept alive through the epochs
                # that Lightning ends early, they would serve every epoch the first one's images and crops.
                common["persistent_workers"] = False
            if self.trainer is not None and self.trainer.reload_dataloaders_every_n_epochs > 0:
                # Lightning drops a reloaded loader without stopping its workers, and litdata 0.2.76's kept ones outlive it
                # until the garbage collector, which then waits 5 s for each (measured: a 2.3 s fit of 5 epochs, 2 workers,
                # left 160 s of waiting and 40 worker processes).
                common["persistent_workers"] = False
            # litdata gives each process and worker its share (every evaluation image once across processes).
            loader = ResumableStreamingDataLoader(table, **common)
            # litdata counts epochs in its loader: one made anew during fit (reload_dataloaders_every_n_epochs) would
            # shuffle and crop as in the first epoch every time. It starts where a kept one would be.
            if train and self.trainer is not None:
                loader.current_epoch, loader.trainer = self.trainer.current_epoch, self.trainer
                per_epoch, total = len(table) * self.trainer.world_size, self.optimized_manifest()["splits"]["train"]  # len: one share
                if per_epoch < total:  # litdata's drop_last, on with more than one process
                    log.info(
                        f"[lit_lora] litdata trains {per_epoch} of the {total} training images each epoch on {self.trainer.world_size} processes "
                        "(the same number of batches for each; the images left out differ from epoch to epoch)"
                    )
        else:
            loader = self._file_loader(table, train, common)
        if train and hasattr(loader, "state_dict"):  # not overfit_batches' plain loader
            loader.saved_state, self._saved_train_state = self._saved_train_state, None
            self._train_loader = loader
        return loader

    def _file_loader(self, table: ImageTable, train: bool, common: dict[str, Any]) -> DataLoader:
        transform = train_transform(self.image_settings, self.fast_decode) if train else eval_transform(self.image_settings, self.fast_eval_decode)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        resumable = train and not self._overfitting()
        if resumable:
            sampler = SeededShuffleSampler(len(table), self.seed, num_replicas=world, rank=rank)
        elif world > 1 and not train:
            # Evaluation under DDP: each image on exactly one process. Lightning's default DistributedSampler
            # would pad with repeated images to even out the shards, and count them twice in val/acc.
            sampler = UnrepeatedDistributedSampler(range(len(table)), num_replicas=world, rank=rank, shuffle=False)
        else:
            sampler = None
        dataset = ImageDataset(
            table, transform, self.on_bad_image, encoded=self.decode_on_device and not train, replace_unreadable=train,
            with_path=table is self.predict_table,
        )
        return (ResumableDataLoader if resumable else DataLoader)(dataset, sampler=sampler, drop_last=False, **common)

    def _computing_on_cpu(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CPUAccelerator)

    def _overfitting(self) -> bool:
        """Whether the fit runs with ``overfit_batches``: then training takes the first batches, in order, every epoch
        (Lightning replaces a loader whose sampler is not sequential, and ours kept shuffling: litdata's, or crashed)."""
        return self.trainer is not None and self.trainer.overfit_batches > 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented batches of uint8 images, resumable through the loader's ``state_dict``, which Lightning
        saves and restores (and this data module too: see `state_dict`)."""
        return self._loader(self.train_table, train=True)

    def val_dataloader(self) -> DataLoader:
        """Deterministic batches of the held-out training images."""
        return self._loader(self.val_table, train=False)

    def test_dataloader(self) -> DataLoader:
        """Deterministic batches of the test split."""
        return self._loader(self.test_table, train=False)

    @property
    def predict_paths(self) -> list[str]:
        """The file of each prediction, in the order ``predict`` yields them (its batches also carry ``path``)."""
        if self.predict_table is None:
            self.setup("predict")
        if isinstance(self.predict_table, FileTable):
            return list(self.predict_table.paths)
        return [item["path"] for item in self.predict_table]  # an optimized test split

    def predict_dataloader(self) -> DataLoader:
        """Deterministic batches of the images under ``predict_dir`` (sorted paths), or of the optimized test split."""
        return self._loader(self.predict_table, train=False)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """With ``decode_on_device``: decode, resize and crop the batch's JPEGs on the model's device."""
        if "encoded" in batch:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            batch = decode_batch(batch, self.image_settings, device, self.on_bad_image)
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Collect the names of unreadable images and the decoder's warnings."""
        for path, reason in batch.pop("skipped", []):
            self.skipped_images.setdefault(path, reason)
        for path, notes in batch.pop("image_warnings", []):
            self.image_warnings.setdefault(path, notes)
        return batch

    def _fit_images(self, train: Any = None, val: Any = None) -> dict[str, str] | None:
        """Which images fit trains and validates on, wherever they are (`optimized.images_digest`): of ``train`` and
        ``val``, by default of the tables set up for fit, or as an optimized dataset recorded them; None if unknown."""
        train, val = self.train_table if train is None else train, self.val_table if val is None else val
        if not (isinstance(train, ImageTable) and isinstance(val, ImageTable)):
            return self.optimized_manifest().get("fit_images") if self.optimized_dir and train is not None else None
        if self._fit_images_of[0] is not train or self._fit_images_of[1] is not val:  # once, not per checkpoint (75,000 paths: 0.2 s)
            self._fit_images_of = (train, val, {"train": optimized.images_digest(train, self.data_dir), "val": optimized.images_digest(val, self.data_dir)})
        return self._fit_images_of[2]

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, which Lightning also saves, but drops on resume when ``configure_optimizers``
        reads ``trainer.estimated_stepping_batches`` (its issue #20550; Lightning's documented pattern for schedules).
        The loader takes this copy when it starts iterating without Lightning having given it its own. Also which
        images fit trains and validates on (`load_state_dict` compares them)."""
        loader = {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}
        split = self.optimized_manifest().get("split") if self.optimized_dir and self.train_table is not None else self._split_settings()
        return {**loader, "fit_images": self._fit_images(), "split": split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's training-loader position for the resumed fit's training loader (`state_dict`).

        Raises:
            ValueError: ``fit`` resumes a checkpoint trained or validated on other images (another split, seed or
                source, images added, removed or relabelled): its epochs and best checkpoint would mix two splits.
        """
        self._saved_train_state = state.get("train_loader")
        saved = state.get("fit_images")
        stage = self.trainer.state.fn if self.trainer is not None else None
        if saved and stage in ("validate", "test"):
            self._warn_if_trained_on(saved, state.get("split"), stage)
        ours = self._fit_images() if saved and stage == "fit" else None
        changed = [name for split, name in (("train", "training"), ("val", "validation")) if ours and saved.get(split) != ours.get(split)]
        if changed:
            weights = Path(self.trainer.ckpt_path).parent / "adapter-last" if self.trainer.ckpt_path else "<its run folder>/adapter-last"
            raise ValueError(
                f"this checkpoint was trained with other {' and '.join(changed)} images than this run selects (data_dir, dataset, "
                "train_split, val_size, val_split or seed changed, or images were added, removed or relabelled): its epochs and best "
                "checkpoint would mix two splits, and a new validation share may hold images it trained on. Resume with the data "
                f"settings in that run's config.yaml, or start a new fit from its weights with --ckpt_path {weights}."
            )

    def _warn_if_trained_on(self, saved: dict[str, str], split: dict[str, Any] | None, stage: str) -> None:
        """Warn when a checkpoint is evaluated on images it was trained on: a validation share drawn with other split
        settings than its fit's, or a ``test_split`` set to training images. ``saved``: the checkpoint's `_fit_images`;
        ``split``: its fit's `_split_settings` (None in checkpoints of lit_lora 0.x)."""
        if stage == "validate" and saved.get("val") == (self._fit_images() or {}).get("val"):
            return  # the images its fit validated on
        if stage == "test" and not self.test_split:
            return  # the source's own test split
        metric, table = ("val/acc", self.val_table) if stage == "validate" else ("test/acc", self.test_table)
        config = Path(self.trainer.ckpt_path).parent / "config.yaml" if self.trainer.ckpt_path else None
        settings_of_fit = f"--config {config}" if config is not None and config.is_file() else "its run folder's config.yaml"
        trained = self._trained_files(split) if isinstance(table, ImageTable) and split else None
        if trained is None or optimized.images_digest(trained, self.data_dir) != saved.get("train"):
            if stage == "validate":  # not known which: other data, a changed source, or an older checkpoint
                rank_zero_warn(
                    "this checkpoint's fit validated on other images than this run's validation share (data settings or images "
                    f"differ): some of them may be images it trained on, which would make {metric} no held-out score. Validate "
                    f"with the fit's data settings ({settings_of_fit}) to reproduce its score."
                )
            return
        ours = optimized.image_names(table, self.data_dir)
        overlap = len(set(ours) & set(optimized.image_names(trained, self.data_dir)))
        if overlap:
            settings = ", ".join(f"{key}={value!r}" for key, value in split.items() if value is not None)
            rank_zero_warn(
                f"this checkpoint was trained on {overlap} of these {len(ours)} {'validation' if stage == 'validate' else 'test'} "
                f"images (its fit: {settings}): {metric} is no held-out score. Evaluate with the fit's data settings "
                f"({settings_of_fit}), or on images it did not train on."
            )

    def _trained_files(self, split: dict[str, Any]) -> ImageTable | None:
        """The training images that a fit with these `_split_settings` selected from this source; None where they
        cannot be selected here (the source lacks that split)."""
        try:
            selected = self._require_source().select(split["train_split"])
        except (ValueError, KeyError):
            return None
        if split.get("val_split") is not None:
            return selected
        return selected.subset(stratified_split(selected.labels, split["val_size"], split["seed"])[0])


class Food101DataModule(ImageClassificationDataModule):
    """Food-101 the way the PEFT LoRA guide uses it: the hub's ``ethz/food101`` (or a local copy through
    ``data_dir``), its first 5,000 training images with 10 % held out for validation, batches of 128. Every other
    argument is `ImageClassificationDataModule`'s."""

    def __init__(
        self, dataset: str | None = "ethz/food101", data_dir: str | None = None, train_split: str = "train[:5000]", **kwargs: Any
    ) -> None:
        """Where Food-101 is.

        Args:
            dataset: the hub dataset (or any `datasets` path); ignored when ``data_dir`` is set.
            data_dir: a local Food-101 folder (the unpacked archive: ``images/``, ``meta/``) or class folders.
            train_split: the training images, in `datasets` slicing syntax; the guide's first 5,000 by default.
            **kwargs: any other `ImageClassificationDataModule` argument (``val_size``, ``batch_size``, ...).
        """
        super().__init__(dataset=dataset, data_dir=data_dir, train_split=train_split, **kwargs)
