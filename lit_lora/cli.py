"""``python -m lit_lora``: LightningCLI over `LoRAImageClassifier` and `Food101DataModule`, plus ``export``."""

from __future__ import annotations

import difflib
import importlib.util
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_lora.checkpointing import AdapterCheckpoint
from lit_lora.console import quiet_other_libraries
from lit_lora.monitoring import EvaluationReport, LearningRateLogger, RunSummary, SkippedImagesReport, ThroughputLogger
from lit_lora.datamodule import Food101DataModule, settings_problems
from lit_lora.export import adapter_folder_settings, export, is_adapter_folder, load_adapter_weights
from lit_lora.model import LoRAImageClassifier
from lit_lora.predictions import PredictionWriter
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

DESCRIPTION = """LoRA fine-tuning of image classifiers. Subcommands: fit, validate, test, predict (LightningCLI), and
export (`python -m lit_lora export --help`: write a PEFT adapter folder or a merged transformers model)."""


class LitLoRACLI(LightningCLI):
    """LightningCLI with the links that keep every value in one place.

    - ``data.class_names`` → ``model.class_names`` (the data knows its labels);
    - ``model.model_name_or_path`` → ``data.image_processor`` (the model knows its input size, mean and std);
    - an `AdapterCheckpoint` under ``checkpoint.*`` and a `PredictionWriter` under ``predictions.*``, on by default;
    - Ctrl-C during ``fit`` stops after the current batch and saves ``last.ckpt`` (``checkpoint.stop_on_interrupt``);
    - ``--ckpt_path`` may also be a PEFT adapter folder written by ``fit`` or ``export``.
    """

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
        problems = preflight_problems(subcommand, config)
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
        choose_precision(config.trainer)
        if subcommand != "fit" and ckpt_path:
            write_beside_checkpoint(config, Path(ckpt_path))
        self.adapter_folder = ckpt_path if ckpt_path and is_adapter_folder(ckpt_path) else None
        if self.adapter_folder:
            # Rebuild the model the folder was saved from; its weights are loaded after instantiation.
            settings = adapter_folder_settings(self.adapter_folder)
            class_names = settings.pop("class_names")
            for key, value in settings.items():
                config.model[key] = value
            config.data.image_processor = settings["model_name_or_path"]  # the link ran before this change
            config.ckpt_path = None
        else:
            # LightningCLI has already copied a checkpoint's hyperparameters (its labels too) into config.model.
            class_names = config.model.get("class_names")
            if subcommand == "fit" and ckpt_path and Path(ckpt_path).is_file():
                continue_in_run_folder(config, Path(ckpt_path))
        # predict needs no labelled data: take the labels from the checkpoint. validate/test compare them with the
        # data's (a different label set is refused, naming both) instead of loading weights of the wrong shape.
        if class_names and not config.data.get("class_names") and (subcommand == "predict" or self.adapter_folder):
            config.data.class_names = list(class_names)
        if subcommand == "predict" and not config.data.get("data_dir"):
            config.data.dataset = None

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if getattr(self, "adapter_folder", None):
            load_adapter_weights(self.model, self.adapter_folder)
        add_tensorboard_beside_csv(self.trainer)


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
    problems = []
    data, model = config.data, config.model
    name = model.get("model_name_or_path") or ""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        problems.append(f"model.model_name_or_path {name!r} is not a folder here (give a save_pretrained folder that exists, or a hub id)")
    data_dir = data.get("data_dir")
    if data_dir and not str(data_dir).startswith("demo://") and not Path(data_dir).expanduser().is_dir():
        problems.append(f"data.data_dir {data_dir!r} does not exist or is not a folder")
    if not data_dir and not data.get("dataset") and subcommand != "predict":
        problems.append("no data: set data.data_dir (a local folder) or data.dataset (a `datasets` id or path)")
    batch_size, workers = data.get("batch_size"), data.get("num_workers")
    problems += settings_problems(
        float(data.get("val_size", 0.1)), data.get("val_split"), 1 if batch_size is None else int(batch_size),
        None if workers is None else int(workers), prefix="data.",
    )
    if data.get("eval_batch_size") is not None and int(data.get("eval_batch_size")) < 1:
        problems.append(f"data.eval_batch_size must be at least 1, got {data.get('eval_batch_size')}")
    if subcommand == "predict" and not data.get("predict_dir"):
        problems.append("predict needs images: set data.predict_dir to a folder or a list of image files")
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).exists():
        problems.append(f"ckpt_path {ckpt_path!r} does not exist")
    if float(model.get("learning_rate", 1.0)) < 0 and subcommand == "fit":
        problems.append(f"model.learning_rate must not be negative, got {model.get('learning_rate')}")
    problems += scheduler_problems(model.get("lr_scheduler_type", "linear"), model.get("lr_scheduler_kwargs"), prefix="model.")
    return problems


def check_readable_checkpoint(ckpt_path: str) -> None:
    """Fail in one line when ``ckpt_path`` is not a readable Lightning checkpoint (truncated, foreign)."""
    try:
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, AttributeError) as err:
        raise ValueError(
            f"ckpt_path {ckpt_path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "It may be truncated (a copy still in progress?) or not a Lightning .ckpt; use last.ckpt or the "
            "best epoch=*.ckpt of a run, or an adapter folder."
        ) from err


def choose_precision(trainer: Any) -> None:
    """Without a GPU, ``16-mixed`` (the recipe's) would become bf16-mixed, slower than fp32 on most CPUs: use 32-true."""
    wants_gpu = trainer.get("accelerator") in ("gpu", "cuda")
    if str(trainer.get("precision")) in ("16-mixed", "16") and not torch.cuda.is_available() and not wants_gpu:
        trainer.precision = "32-true"
        rank_zero_info("[lit_lora] no GPU: training in 32-true precision (the config's 16-mixed needs a GPU)")


def write_beside_checkpoint(config: Any, ckpt_path: Path) -> None:
    """validate, test and predict of a checkpoint in a run folder write their report or predictions into that run
    folder, not into a new logger version (unless another logger or place was configured)."""
    run = ckpt_path.resolve().parent if ckpt_path.is_file() or ckpt_path.name.startswith("adapter") else None
    if run is None or not ((run / "hparams.yaml").is_file() or any(run.glob("*.ckpt"))):
        return
    logger = config.trainer.get("logger")
    configured = logger.get("class_path") if hasattr(logger, "get") else None
    if configured == TRAINER_DEFAULTS["logger"]["class_path"] or logger is None or logger is True:
        config.trainer.logger = False
        config.trainer.default_root_dir = str(run)  # the trainer's log_dir without a logger


def continue_in_run_folder(config: Any, ckpt_path: Path) -> None:
    """Resume writing checkpoints into the folder the checkpoint lives in, so the best score and the top-k
    bookkeeping carry on. (Logs of the continuation go to a new logger version: Lightning's CSVLogger would
    delete the earlier metrics.csv if it reopened the old one.)"""
    if config.checkpoint.get("dirpath") is None:
        config.checkpoint.dirpath = str(ckpt_path.resolve().parent)


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
        self.exit(2, f"{self.prog}: error: {message.strip()}{hint}\n(see --help for every option)\n")


def cli_main(args: list[str] | None = None) -> LitLoRACLI | Path:
    """Run the command line; ``args`` replaces ``sys.argv[1:]`` (tests call it with a list).

    ``--verbose`` anywhere keeps the other libraries' start-up messages, which are otherwise left out.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if "--verbose" in argv:
        argv.remove("--verbose")
    else:
        quiet_other_libraries()
    args = argv
    if argv[:1] == ["export"]:
        from jsonargparse import CLI

        return CLI(export, args=argv[1:], as_positional=False, prog="python -m lit_lora export", parser_class=ShortErrorParser)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return LitLoRACLI(
            LoRAImageClassifier,
            Food101DataModule,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, "prog": "python -m lit_lora"},
            parser_class=ShortErrorParser,
        )
