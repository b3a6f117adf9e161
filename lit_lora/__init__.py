"""LoRA fine-tuning of image classifiers with PyTorch Lightning, PEFT and Transformers.

The public classes are imported on first use (PEP 562): a loader worker started with spawn or forkserver, which
imports the modules of the data it reads, does not import Lightning, Transformers and litdata with them (about 2 s
of each worker's start on 2 cores, `benchmarks/worker_start.py`, and litdata's semaphore).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lit_lora.checkpointing import AdapterCheckpoint
    from lit_lora.datamodule import Food101DataModule, ImageClassificationDataModule
    from lit_lora.model import LoRAImageClassifier

_MODULE_OF = {
    "AdapterCheckpoint": "lit_lora.checkpointing",
    "Food101DataModule": "lit_lora.datamodule",
    "ImageClassificationDataModule": "lit_lora.datamodule",
    "LoRAImageClassifier": "lit_lora.model",
}
__all__ = ["AdapterCheckpoint", "Food101DataModule", "ImageClassificationDataModule", "LoRAImageClassifier"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'lit_lora' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
