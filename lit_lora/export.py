"""Artifacts other tools load: PEFT adapter folders, merged transformers models, and loading them back.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format: LoRA matrices
and the classifier head), ``config.json`` (the classifier's config, with ``id2label``/``label2id``) and
``preprocessor_config.json`` (the image processor). The PEFT guide's inference code loads it unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch

from lit_lora import demo
from lit_lora.files import write_folder
from lit_lora.model import LoRAImageClassifier

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in PEFT's adapter format."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _save_processor(module: LoRAImageClassifier, folder: Path) -> None:
    from transformers import AutoImageProcessor

    AutoImageProcessor.from_pretrained(demo.resolve(module.hparams.model_name_or_path)).save_pretrained(folder)


def save_adapter_folder(module: LoRAImageClassifier, folder: str | os.PathLike) -> Path:
    """Write ``module``'s adapter (and head) in PEFT's format, with the labels and the image processor beside it.

    ``adapter_config.json`` records the base model, so the folder describes itself.

    Returns:
        The folder.
    """

    def build(staging: Path) -> None:
        module.model.save_pretrained(staging)
        module.model.get_base_model().config.save_pretrained(staging)
        _save_processor(module, staging)

    return write_folder(folder, build)


def save_merged_model(module: LoRAImageClassifier, folder: str | os.PathLike) -> Path:
    """Write a standalone transformers model with the adapters merged in (no peft needed to load it).

    Returns:
        The folder.
    """

    def build(staging: Path) -> None:
        merged = copy.deepcopy(module.model).merge_and_unload()
        merged.save_pretrained(staging)
        _save_processor(module, staging)

    return write_folder(folder, build)


def adapter_folder_settings(folder: str | os.PathLike) -> dict:
    """The `LoRAImageClassifier` arguments that rebuild the model an adapter folder was saved from."""
    folder = Path(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    labels_file = folder / "config.json"
    if not labels_file.is_file():
        raise ValueError(f"{folder} has no config.json with id2label; export it again with `lit_lora export`.")
    id2label = json.loads(labels_file.read_text())["id2label"]
    options = {key: adapter[key] for key in ("use_dora", "use_rslora") if adapter.get(key)}
    targets = adapter["target_modules"]
    return {
        "model_name_or_path": adapter["base_model_name_or_path"],
        "class_names": [id2label[str(i)] for i in range(len(id2label))],
        "r": adapter["r"],
        "lora_alpha": adapter["lora_alpha"],
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "lora_dropout": adapter["lora_dropout"],
        "bias": adapter["bias"],
        "modules_to_save": adapter.get("modules_to_save"),
        "lora_options": options or None,
    }


def load_adapter_weights(module: LoRAImageClassifier, folder: str | os.PathLike) -> None:
    """Load an adapter folder's weights into ``module`` (built with `adapter_folder_settings`), via PEFT."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(module.model, load_file(Path(folder) / ADAPTER_WEIGHTS))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder} holds weights this model has no place for: {unexpected[:3]}")


def load_module(ckpt_path: str | os.PathLike) -> LoRAImageClassifier:
    """Rebuild a trained `LoRAImageClassifier` from a ``.ckpt`` file or an adapter folder, on the CPU, in eval mode."""
    path = Path(ckpt_path)
    if is_adapter_folder(path):
        module = LoRAImageClassifier(**adapter_folder_settings(path))
        load_adapter_weights(module, path)
    elif path.is_file():
        with warnings.catch_warnings():
            # The checkpoint holds only trainable weights by design; Lightning would list every frozen one.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            module = LoRAImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    else:
        raise FileNotFoundError(f"{ckpt_path} is neither a checkpoint file nor an adapter folder ({ADAPTER_CONFIG}).")
    return module.eval()


def export(ckpt_path: str, output_dir: str, merge: bool = False, push_to_hub: str | None = None) -> Path:
    """Write a trained model in a format other tools load.

    Args:
        ckpt_path: a ``.ckpt`` written by ``fit``, or an adapter folder.
        output_dir: folder to write (replaced if it exists).
        merge: write a standalone transformers model with the adapters merged into the weights, which
            ``AutoModelForImageClassification.from_pretrained`` and ``pipeline("image-classification")`` load
            without peft. Otherwise write a PEFT adapter folder.
        push_to_hub: also upload the folder to this Hugging Face Hub repository (needs network and a login).

    Returns:
        The folder written.
    """
    module = load_module(ckpt_path)
    with torch.no_grad():
        folder = (save_merged_model if merge else save_adapter_folder)(module, output_dir)
    if push_to_hub:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=push_to_hub, folder_path=str(folder), repo_type="model")
    print(f"[lit_lora] wrote {'merged model' if merge else 'adapter'} to {folder}")
    return folder
