"""LoRA fine-tuning of image classifiers with PyTorch Lightning, PEFT and Transformers."""

from lit_lora.checkpointing import AdapterCheckpoint
from lit_lora.datamodule import Food101DataModule, ImageClassificationDataModule
from lit_lora.model import LoRAImageClassifier

__all__ = ["AdapterCheckpoint", "Food101DataModule", "ImageClassificationDataModule", "LoRAImageClassifier"]
__version__ = "0.1.0"
