"""``python -m lit_lora``: LightningCLI over `LoRAImageClassifier` and `Food101DataModule`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_lora.callbacks import AdapterCheckpoint
from lit_lora.datamodule import Food101DataModule
from lit_lora.model import LoRAImageClassifier

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "precision": "16-mixed",  # on CPU Lightning switches to bf16-mixed and says so once
    "default_root_dir": "checkpoints",
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "checkpoints", "name": "lit_lora"},
    },
}


class LitLoRACLI(LightningCLI):
    """LightningCLI with the links that keep every value in one place.

    - ``data.class_names`` → ``model.class_names`` (the data knows its labels);
    - ``model.model_name_or_path`` → ``data.image_processor`` (the model knows its input size, mean and std);
    - an `AdapterCheckpoint` under ``checkpoint.*``, on by default.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AdapterCheckpoint, "checkpoint")
        parser.link_arguments("model.model_name_or_path", "data.image_processor")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")


def cli_main(args: list[str] | None = None) -> LitLoRACLI:
    """Run the command line; ``args`` replaces ``sys.argv[1:]`` (tests call it with a list)."""
    return LitLoRACLI(
        LoRAImageClassifier,
        Food101DataModule,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
    )
