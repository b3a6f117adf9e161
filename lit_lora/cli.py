"""``python -m lit_lora``: LightningCLI over `LoRAImageClassifier` and `Food101DataModule`, plus ``export`` and
``optimize``."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_lora import log
from lit_lora.checkpoint_contents import check_readable_checkpoint
from lit_lora.checkpointing import AdapterCheckpoint
from lit_lora.console import set_up_cli_console
from lit_lora.datamodule import Food101DataModule, settings_problems
from lit_lora.export import adapter_folder_settings, export, is_adapter_folder, load_adapter_weights
from lit_lora.files import output_folder_problems
from lit_lora.model import LoRAImageClassifier
from lit_lora.monitoring import EvaluationReport, LearningRateLogger, RunSummary, SkippedImagesReport, ThroughputLogger
from lit_lora.optimized import is_url as optimized_is_url
from lit_lora.predictions import PredictionWriter
from lit_lora.runs import ResumedLogs, claim_version, remove_unused_run_folder, run_versions
from lit_lora.schedules import scheduler_problems

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "precision": "16-mixed",  # without a GPU the CLI trains in 32-true instead and says so in one line
    "default_root_dir": "checkpoints",
    "enable_model_summary": False,  # fit prints the guide's trainable-parameters line instead
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "checkpoints", "name": "lit_lora"},
    },
}

TOP_LEVEL_PROG = "python -m lit_lora"
OPTIMIZE_DESCRIPTION = """Write the training, validation and test splits fit uses (same seeded, stratified split) as litdata
datasets under --output_dir (a folder or s3:// URL): images decoded once and pre-resized; then fit, validate and test
with --data.optimized_dir."""
DESCRIPTION = """LoRA fine-tuning of image classifiers on PyTorch Lightning, with PEFT and transformers: fit, validate,
test and predict (LightningCLI), export, and optimize."""


class LitLoRACLI(LightningCLI):
    """LightningCLI with the links that keep every value in one place.

    - ``data.class_names`` → ``model.class_names`` (the data knows its labels);
    - ``model.model_name_or_path`` → ``data.image_processor`` (the model knows its input size, mean and std);
    - an `AdapterCheckpoint` under ``checkpoint.*`` and a `PredictionWriter` under ``predictions.*``, on by default;
    - Ctrl-C during ``fit`` stops after the current batch and saves ``last.ckpt`` (``checkpoint.stop_on_interrupt``);
    - ``--ckpt_path`` may also be a PEFT adapter folder written by ``fit`` or ``export``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.claimed_run: Path | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.fit_loop.epoch_loop.batch_progress.total.started == 0:
                remove_unused_run_folder(self.claimed_run)  # a fit that failed before training: its version_N is free again
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AdapterCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(SkippedImagesReport, "skipped_images")
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(LearningRateLogger, "lr_monitor")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.set_defaults({"checkpoint.stop_on_interrupt": True})
        parser.link_arguments("model.model_name_or_path", "data.image_processor")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check the configuration and the checkpoint's readability before anything is built."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        unnamed = resolve_checkpoint_name(subcommand, config)
        problems = ([unnamed] if unnamed else []) + preflight_problems(subcommand, config)
        if problems:
            raise ValueError(
                f"{len(problems)} problem(s) in the configuration, found before loading anything:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_readable_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        choose_precision(subcommand, config.trainer)
        folder = evaluation_folder(subcommand, config)
        if folder is not None:  # validate/test/predict of a run's checkpoint: their own subfolder of that run
            config.trainer.logger = False
            config.trainer.default_root_dir = str(folder)
        self.adapter_folder = ckpt_path if ckpt_path and is_adapter_folder(ckpt_path) else None
        self.resumed_logs = None
        if self.adapter_folder:
            # Rebuild the model the folder was saved from; its weights are loaded after instantiation.
            settings = adapter_folder_settings(self.adapter_folder)
            class_names = settings.pop("class_names")
            given = config.data.get("class_names")
            if given and list(given) != list(class_names):
                raise ValueError(
                    f"data.class_names {list(given)[:5]}... differ from the labels adapter folder {self.adapter_folder} "
                    f"was trained with ({class_names[:5]}..., in this order); its labels.json is authoritative: drop "
                    "--data.class_names, or use an adapter trained with these labels."
                )
            for key, value in settings.items():
                config.model[key] = value
            config.data.image_processor = settings["model_name_or_path"]  # the link ran before this change
            config.ckpt_path = None
        else:
            # LightningCLI has already copied a checkpoint's hyperparameters (its labels too) into config.model.
            class_names = config.model.get("class_names")
            if subcommand == "fit" and ckpt_path and Path(ckpt_path).is_file():
                self.resumed_logs = continue_in_run_folder(config, Path(ckpt_path))
        if subcommand == "fit" and not ckpt_path:
            self.claimed_run = claim_run_folder(config.trainer)
        # predict needs no labelled data: take the labels from the checkpoint. validate/test compare them with the
        # data's (a different label set is refused, naming both) instead of loading weights of the wrong shape.
        if class_names and not config.data.get("class_names") and (subcommand == "predict" or self.adapter_folder):
            config.data.class_names = list(class_names)
        if not config.data.get("data_dir") and (subcommand == "predict" or built_elsewhere(config.data.get("optimized_dir"))):
            config.data.dataset = None  # labels come from the checkpoint or the optimized dataset, not the hub

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if getattr(self, "adapter_folder", None):
            load_adapter_weights(self.model, self.adapter_folder)
        if getattr(self, "resumed_logs", None) is not None:
            self.resumed_logs.restore(self.trainer)
        add_tensorboard_beside_csv(self.trainer)


def built_elsewhere(optimized_dir: str | None) -> bool:
    """Whether ``optimized_dir`` is a URL or a local folder with something in it: used as it is, not built from
    ``data.dataset`` (so a hub id by default, such as Food-101's, is not opened)."""
    if not optimized_dir:
        return False
    folder = Path(optimized_dir).expanduser()
    return optimized_is_url(optimized_dir) or (folder.is_dir() and any(folder.iterdir()))


def add_tensorboard_beside_csv(trainer: Any) -> None:
    """When tensorboard is installed and the run logs to one CSVLogger, also log to TensorBoard, in the same
    run folder (``tensorboard --logdir checkpoints``). Any other logger setup is left as configured."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if importlib.util.find_spec("tensorboard") is None or len(trainer.loggers) != 1 or type(trainer.loggers[0]) is not CSVLogger:
        return
    csv_logger = trainer.loggers[0]
    board = TensorBoardLogger(save_dir=csv_logger.save_dir, name=csv_logger.name, version=csv_logger.version, default_hp_metric=False)
    trainer.loggers = [csv_logger, board]


def _looks_local(name: str) -> bool:
    """Whether a model name is meant as a folder, not a hub id (``org/name``): an absolute, home or dotted path,
    more than one ``/``, or a first component that is a folder here (``models/vit-micro`` with ``models/``)."""
    if "://" in name:  # demo:// assets
        return False
    path = Path(name).expanduser()
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or path.exists() or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


def preflight_problems(subcommand: str, config: Any) -> list[str]:
    """Every problem that can be seen in the parsed configuration alone, so that all are reported at once."""
    data, model = config.data, config.model
    name, data_dir = model.get("model_name_or_path") or "", data.get("data_dir")
    problems = folder_problems(name, data_dir)
    streamed = data.get("optimized_dir")
    if not data_dir and not data.get("dataset") and not streamed and subcommand != "predict":
        problems.append("no data: set data.data_dir (a local folder), data.dataset (a `datasets` id or path) or data.optimized_dir")
    problems += data_settings_problems(data, optimized=bool(streamed))
    if data.get("eval_batch_size") is not None and int(data.get("eval_batch_size")) < 1:
        problems.append(f"data.eval_batch_size must be at least 1, got {data.get('eval_batch_size')}")
    if subcommand == "predict" and not data.get("predict_dir") and not streamed:
        problems.append("predict needs images: set data.predict_dir to a folder or a list of image files (or data.optimized_dir: its test split)")
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).exists():
        problems.append(f"ckpt_path {ckpt_path!r} does not exist")
    if float(model.get("learning_rate", 1.0)) < 0 and subcommand == "fit":
        problems.append(f"model.learning_rate must not be negative, got {model.get('learning_rate')}")
    trainer = config.trainer
    endless = subcommand == "fit" and trainer.get("max_epochs") == -1 and trainer.get("max_steps") in (None, -1)
    problems += scheduler_problems(
        model.get("lr_scheduler_type", "linear"), model.get("lr_scheduler_kwargs"), "model.", endless,
        int(model.get("warmup_steps") or 0), float(model.get("warmup_ratio") or 0),
    )
    problems += lora_problems(model)
    problems += device_problems(trainer)
    problems += output_folder_problems(output_folders(subcommand, config))
    problems += hub_problems(name, data.get("dataset") if not data_dir and not streamed and subcommand != "predict" else None)
    return problems


def data_settings_problems(data: Any, optimized: bool) -> list[str]:
    """`settings_problems` of the configuration's data options; with ``optimized``, the optimized dataset's too."""
    batch_size, workers = data.get("batch_size"), data.get("num_workers")
    return settings_problems(
        float(data.get("val_size", 0.1)), data.get("val_split"), 1 if batch_size is None else int(batch_size),
        None if workers is None else int(workers), prefix="data.", optimized_cache_size=data.get("optimized_cache_size"),
        optimized_train_side=int(data.get("optimized_train_side", 256)) if optimized else None,
        streamed=optimized and optimized_is_url(data.get("optimized_dir") or ""),
    )


def folder_problems(model_name_or_path: str, data_dir: str | None) -> list[str]:
    """A model or data folder that is not there."""
    problems = []
    if _looks_local(model_name_or_path) and not Path(model_name_or_path).expanduser().is_dir():
        problems.append(f"model.model_name_or_path {model_name_or_path!r} is not a folder here (give a save_pretrained folder that exists, or a hub id)")
    if data_dir and not str(data_dir).startswith("demo://") and not Path(data_dir).expanduser().is_dir():
        problems.append(f"data.data_dir {data_dir!r} does not exist or is not a folder")
    return problems


def lora_problems(model: Any) -> list[str]:
    """LoRA settings PEFT would refuse later (after the data scan), named by their options."""
    problems = []
    if int(model.get("r", 16)) < 1:
        problems.append(f"model.r must be a positive LoRA rank (the recipe's is 16), got {model.get('r')}")
    if float(model.get("lora_alpha", 16)) <= 0:
        problems.append(f"model.lora_alpha must be positive, got {model.get('lora_alpha')}")
    if not 0.0 <= float(model.get("lora_dropout", 0.0)) < 1.0:
        problems.append(f"model.lora_dropout must be in [0, 1), got {model.get('lora_dropout')}")
    return problems


PRECISIONS = ("64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")


def device_problems(trainer: Any) -> list[str]:
    """Precision and accelerator settings this machine cannot run, named by their options."""
    problems = []
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        problems.append(f"trainer.precision {precision!r} is not one of {', '.join(PRECISIONS[:10])}")
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"trainer.accelerator {accelerator!r} asks for a GPU, and this machine has none that torch can use; use --trainer.accelerator cpu (or auto)")
    elif accelerator == "mps" and not torch.backends.mps.is_available():
        problems.append("trainer.accelerator 'mps' asks for Apple's GPU, which this machine does not have; use --trainer.accelerator cpu (or auto)")
    devices = trainer.get("devices")
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available() and isinstance(devices, int) and devices > torch.cuda.device_count():
        problems.append(f"trainer.devices {devices} asks for more GPUs than the {torch.cuda.device_count()} this machine has")
    return problems


def _offline(*variables: str) -> bool:
    import os

    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on") for v in variables)


def hub_unreachable(timeout: float = 1.0) -> str | None:
    """The hub's host name when it cannot be reached from here within ``timeout`` seconds (instead of the
    libraries' minute of retries), else None."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)  # DNS lookups ignore socket timeouts
    probe.start()
    probe.join(timeout)
    return None if reached else host


def uncached_hub_id(name: str | None, filename: str, repo_type: str = "model", offline: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> bool:
    """Whether ``name`` is a hub id whose ``filename`` is not in the local hub cache (and no offline mode says that
    only the cache counts)."""
    if not name or _looks_local(name) or "://" in name or Path(name).expanduser().exists() or _offline(*offline):
        return False
    from huggingface_hub import try_to_load_from_cache

    return not isinstance(try_to_load_from_cache(name, filename, repo_type=repo_type), str)


def hub_problems(model: str | None, dataset: str | None, timeout: float = 1.0) -> list[str]:
    """For the model's and the dataset's hub ids that are not cached, while the hub cannot be reached (probed once,
    within ``timeout`` seconds): what to do instead."""
    model = model if uncached_hub_id(model, "config.json") else None
    dataset = dataset if uncached_hub_id(dataset, "README.md", "dataset", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) else None
    host = hub_unreachable(timeout) if model or dataset else None
    if host is None:
        return []
    problems = []
    if model:
        problems.append(
            f"model.model_name_or_path {model!r} is a Hugging Face Hub id that is not in the local cache, and the hub "
            f"({host}) cannot be reached from this machine. On a machine with network, save it with "
            f"AutoModelForImageClassification.from_pretrained({model!r}).save_pretrained('DIR') and "
            f"AutoImageProcessor.from_pretrained({model!r}).save_pretrained('DIR'), copy DIR here and pass "
            "--model.model_name_or_path DIR (or set HF_HUB_OFFLINE=1 to use the cache only)"
        )
    if dataset:
        problems.append(
            f"data.dataset {dataset!r} is a Hugging Face Hub dataset that is not in the local cache, and the hub ({host}) "
            "cannot be reached from this machine. Pass a local copy with --data.data_dir DIR (Food-101's archive layout "
            "or <class>/<image> folders), or set HF_DATASETS_OFFLINE=1 if `datasets` has it in its own cache"
        )
    return problems


def choose_precision(subcommand: str, trainer: Any) -> None:
    """Without a GPU, ``16-mixed`` (the recipe's) would become bf16-mixed, slower than fp32 on most CPUs: use 32-true,
    and say so where it matters (training; evaluation gives the same numbers either way)."""
    wants_gpu = trainer.get("accelerator") in ("gpu", "cuda")
    if str(trainer.get("precision")) in ("16-mixed", "16") and not torch.cuda.is_available() and not wants_gpu:
        trainer.precision = "32-true"
        if subcommand == "fit":
            log.info("[lit_lora] no GPU: training in 32-true precision (the config's 16-mixed needs a GPU)")


def _is_default_logger(logger: Any) -> bool:
    configured = logger.get("class_path") if hasattr(logger, "get") else None
    return configured == TRAINER_DEFAULTS["logger"]["class_path"] or logger is None or logger is True


def _logger_init_args(trainer: Any, default_only: bool = False) -> Any | None:
    """The configured logger's ``init_args`` (None without a configured class; with ``default_only``, None unless
    it is the default CSVLogger)."""
    logger = trainer.get("logger")
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    return None if default_only and not _is_default_logger(logger) else init_args


def evaluation_folder(subcommand: str, config: Any) -> Path | None:
    """Where validate, test and predict of a checkpoint (or adapter folder) inside a run folder write: their own
    subfolder, ``<run>/<subcommand>/`` (config, report, predictions, skipped images), so the fit's files stay as
    they were. None when the run is not a lit_lora run folder or another logger or place was configured."""
    ckpt_path = config.get("ckpt_path")
    if subcommand == "fit" or not ckpt_path or not Path(ckpt_path).exists():
        return None
    path = Path(ckpt_path)
    run = path.resolve().parent if path.is_file() or path.name.startswith("adapter") else None
    if run is None or not ((run / "hparams.yaml").is_file() or any(run.glob("*.ckpt"))):
        return None
    if not _is_default_logger(config.trainer.get("logger")) or config.trainer.get("default_root_dir") != TRAINER_DEFAULTS["default_root_dir"]:
        return None
    return run / subcommand


def output_folders(subcommand: str, config: Any) -> list[tuple[str, Any]]:
    """The folders a command will write into, each with the option that sets it."""
    optimized_dir = config.data.get("optimized_dir")
    # A local optimized_dir that is missing or empty: the data module builds it (prepare_data), whatever the command.
    building = [("data.optimized_dir", optimized_dir)] if optimized_dir and not built_elsewhere(optimized_dir) else []
    folder = evaluation_folder(subcommand, config)
    if folder is not None:
        return [(f"the {subcommand} output folder (set --trainer.default_root_dir to write elsewhere)", folder), *building]
    folders: list[tuple[str, Any]] = [("trainer.default_root_dir", config.trainer.get("default_root_dir"))]
    init_args = _logger_init_args(config.trainer)
    if init_args is not None and init_args.get("save_dir"):
        folders.append(("trainer.logger.init_args.save_dir", init_args.get("save_dir")))
    if subcommand == "fit" and config.checkpoint.get("dirpath"):
        folders.append(("checkpoint.dirpath", config.checkpoint.get("dirpath")))
    ckpt_path = config.get("ckpt_path")
    if subcommand == "fit" and ckpt_path and Path(ckpt_path).is_file():
        folders.append(("the run folder of ckpt_path (a resumed fit writes there)", Path(ckpt_path).resolve().parent))
    if subcommand == "predict" and config.predictions.get("output_path"):
        folders.append(("predictions.output_path's folder", Path(config.predictions.get("output_path")).parent))
    return folders + building


def claim_run_folder(trainer: Any) -> Path | None:
    """A new fit takes the next ``version_N`` of the default logger atomically (two fits started together never
    share one), on the launching process only (under DDP the others are told the folder by Lightning); returns it."""
    from lightning.pytorch.utilities import rank_zero_only

    init_args = _logger_init_args(trainer, default_only=True)
    if rank_zero_only.rank != 0 or init_args is None or init_args.get("version") is not None or trainer.get("fast_dev_run"):
        return None  # fast_dev_run: Lightning writes no log
    root = _runs_root(init_args, trainer)
    init_args.version = claim_version(root.parent, root.name)
    return root / f"version_{init_args.version}"


def _runs_root(init_args: Any, trainer: Any) -> Path:
    """``<save_dir>/<name>`` of the default logger: where each fit's ``version_N`` is."""
    return Path(init_args.get("save_dir") or trainer.get("default_root_dir")) / (init_args.get("name") or "")


def resolve_checkpoint_name(subcommand: str, config: Any) -> str | None:
    """Make Lightning's ``--ckpt_path last`` and ``best`` name the last and the best checkpoint of the newest run of this
    config's logger that has a ``last.ckpt``: Lightning looks in the new run's folder, where lit_lora's per-run
    ``version_N`` never holds one, so a job requeued with ``fit --ckpt_path last`` started over every time. With no
    such run, ``fit --ckpt_path last`` starts a new one (as Lightning does); otherwise the problem is returned."""
    name = config.get("ckpt_path")
    init_args = _logger_init_args(config.trainer, default_only=True)
    if name not in ("last", "best") or init_args is None or config.checkpoint.get("dirpath") or init_args.get("version") is not None:
        return None  # another logger or folder: Lightning's own meaning
    runs = _runs_root(init_args, config.trainer)
    versions = run_versions(runs)
    newest = next((versions[n] / "last.ckpt" for n in sorted(versions, reverse=True) if (versions[n] / "last.ckpt").is_file()), None)
    if newest is not None and name == "best":
        newest = _best_beside(newest)
    if newest is None and subcommand == "fit" and name == "last":
        log.info(f"[lit_lora] ckpt_path last: no run under {runs} has a last.ckpt yet; starting one")
        config.ckpt_path = None
        return None
    if newest is None:
        return f"ckpt_path {name!r}: no run under {runs} has a {'last.ckpt' if name == 'last' else 'best checkpoint'}; pass a checkpoint file or an adapter folder"
    log.info(f"[lit_lora] ckpt_path {name}: {newest}")
    config.ckpt_path = str(newest)
    return None


def _best_beside(last: Path) -> Path | None:
    """The best checkpoint of the run whose ``last.ckpt`` this is, as its checkpoint callback recorded it."""
    try:
        states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {}).values()
    except Exception:  # unreadable: there is no best to name (a file passed as ckpt_path is checked in one line)
        return None
    best = next((state["best_model_path"] for state in states if isinstance(state, dict) and state.get("best_model_path")), None)
    return last.parent / Path(best).name if best and (last.parent / Path(best).name).is_file() else None


def continue_in_run_folder(config: Any, ckpt_path: Path) -> ResumedLogs | None:
    """Resume in the run folder the checkpoint lives in: checkpoints (the best score and the top-k bookkeeping
    carry on) and, for a lit_lora run folder (``<save_dir>/<name>/version_N``), the logs, whose metrics before the
    checkpoint are kept."""
    run = ckpt_path.resolve().parent
    if config.checkpoint.get("dirpath") is None:
        config.checkpoint.dirpath = str(run)
    init_args = _logger_init_args(config.trainer, default_only=True)
    if init_args is None or not re.fullmatch(r"version_\d+", run.name) or not (run / "hparams.yaml").is_file():
        return None
    init_args.save_dir, init_args.name, init_args.version = str(run.parent.parent), run.parent.name, int(run.name.split("_")[1])
    return ResumedLogs.read(run, ckpt_path)


class ShortErrorParser(LightningArgumentParser):
    """Argument errors in a few lines: the message and, for a misspelled option, the closest valid ones (instead
    of the whole usage text)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = ""
        unknown = [word for word in message.replace(",", " ").replace("'", " ").split() if word.startswith("--")]
        if unknown:
            options = [f"--{key}" for key in self.get_defaults().keys()]
            close = [c for word in unknown for c in difflib.get_close_matches(word.split("=")[0], options, n=2, cutoff=0.75)]
            if close:
                hint = f" Did you mean {' or '.join(dict.fromkeys(close))}?"
        if "invalid choice" in message and "export" not in message:
            message = message.replace("'predict')", "'predict', 'export', 'optimize')").replace("predict)", "predict, export, optimize)")
        self.exit(2, f"{self.prog}: error: {message.strip()}{hint}\n(see --help for every option)\n")

    def format_help(self) -> str:
        """jsonargparse's help, led by lit_lora's own options one line each (subcommands), or with every subcommand,
        ``export`` and ``optimize`` included, listed in whole sentences (the top level)."""
        from lit_lora.help import options_summary, top_level_help

        text = super().format_help()
        if self.prog.strip() == TOP_LEVEL_PROG and "subcommands:" in text:
            options = text[text.index("options:") : text.index("subcommands:")].rstrip() + "\n"
            return top_level_help(f"usage: {TOP_LEVEL_PROG} [-h] [-c CONFIG] {{fit,validate,test,predict,export,optimize}} ...\n", DESCRIPTION, options)
        try:
            defaults = self.get_defaults()
        except Exception:  # a parser that cannot resolve its defaults yet: the plain help
            return text
        if "model.model_name_or_path" not in defaults or "data.batch_size" not in defaults:
            return text
        if "output_dir" in defaults:  # optimize: its own options, then the model and data options it reads (no checkpoint, no predictions)
            return options_summary(defaults, {"model": LoRAImageClassifier, "data": Food101DataModule}, "optimize", OPTIMIZE_OPTIONS) + text
        classes = {"model": LoRAImageClassifier, "data": Food101DataModule, "checkpoint": AdapterCheckpoint, "predictions": PredictionWriter}
        return options_summary(defaults, classes) + text


OPTIMIZE_OPTIONS = {
    "output_dir": "folder or URL (s3://bucket/prefix) to write the optimized dataset to; by default data.optimized_dir, where fit reads it",
    "overwrite": "replace an optimized dataset of other images or settings there",
}


class OptimizeCLI(LitLoRACLI):
    """``python -m lit_lora optimize``: the ``fit`` configuration (its ``--data.*`` and ``--model.*`` options, so the
    same ``--config`` works) plus ``--output_dir``; builds only the data module and writes its splits with litdata."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output_dir", type=str | None, default=None, help=OPTIMIZE_OPTIONS["output_dir"])
        parser.add_argument("--overwrite", type=bool, default=False, help=OPTIMIZE_OPTIONS["overwrite"])

    def instantiate_classes(self) -> None:
        data, name = self.config.data, self.config.model.get("model_name_or_path") or ""
        problems = folder_problems(name, data.get("data_dir"))
        if not data.get("data_dir") and not data.get("dataset"):
            problems.append("no data: set data.data_dir (a local folder) or data.dataset (a `datasets` id or path)")
        problems += data_settings_problems(data, optimized=True)
        output_dir = self.config.output_dir or data.get("optimized_dir")  # a config that fit reads optimized data with
        if not output_dir:
            problems.append("nowhere to write: set --output_dir (a folder or s3:// URL), or data.optimized_dir")
        elif not optimized_is_url(output_dir):
            problems += output_folder_problems([("--output_dir", Path(output_dir).expanduser())])
        problems += hub_problems(name, None if data.get("data_dir") else data.get("dataset"))
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in the configuration, found before loading anything:\n" + "\n".join(f"  - {p}" for p in problems))
        self.datamodule = self.datamodule_class(**{k: v for k, v in data.as_dict().items() if k != "optimized_dir"})
        self.manifest = self.datamodule.optimize(output_dir, overwrite=bool(self.config.overwrite))


def optimize_main(argv: list[str]) -> OptimizeCLI:
    """Run ``optimize`` with ``argv`` (everything after the word)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return OptimizeCLI(
            LoRAImageClassifier, Food101DataModule, args=argv, run=False, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=42,
            parser_kwargs={"prog": f"{TOP_LEVEL_PROG} optimize", "description": OPTIMIZE_DESCRIPTION}, parser_class=ShortErrorParser,
        )


def cli_main(args: list[str] | None = None) -> LitLoRACLI | Path:
    """Run the command line; ``args`` replaces ``sys.argv[1:]`` (tests call it with a list).

    ``--verbose`` anywhere keeps the other libraries' start-up messages, which are otherwise left out.
    """
    argv = list(sys.argv[1:] if args is None else args)
    set_up_cli_console(verbose="--verbose" in argv)
    args = argv = [arg for arg in argv if arg != "--verbose"]
    if argv[:1] == ["export"]:
        from jsonargparse import CLI

        return CLI(
            export, args=argv[1:], as_positional=False, prog=f"{TOP_LEVEL_PROG} export", parser_class=ShortErrorParser,
            description="Write a trained model in a format other tools load: a PEFT adapter folder, or (--merge true) a merged transformers model.",
        )
    if argv[:1] == ["optimize"]:
        return optimize_main(argv[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return LitLoRACLI(
            LoRAImageClassifier,
            Food101DataModule,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, "prog": TOP_LEVEL_PROG},
            parser_class=ShortErrorParser,
        )
