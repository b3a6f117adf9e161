"""Artifacts other tools load: PEFT adapter folders, merged transformers models, and loading them back.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format: LoRA matrices
and the classifier head), ``labels.json`` (``id2label`` and ``label2id``) and ``preprocessor_config.json``. It has
no ``config.json``, so transformers' own PEFT integration loads it:
``AutoModelForImageClassification.from_pretrained(folder, id2label=..., label2id=...)``; the PEFT guide's
inference code loads it too. A merged export is a plain transformers model folder.

Both carry a ``BitImageProcessor`` that resizes the shorter side and centre-crops exactly as lit_lora evaluates
(`transforms.export_processor`), so ``pipeline("image-classification")`` predicts what lit_lora validated.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from lit_lora.files import write_folder
from lit_lora.model import LoRAImageClassifier
from lit_lora.transforms import export_processor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LABELS = "labels.json"
# Every file an export may write: a folder holding only these is a previous export, which may be replaced.
EXPORT_FILES = {
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LABELS,
    "README.md",
    "preprocessor_config.json",
    "config.json",
    "model.safetensors",
    "generation_config.json",
}


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in PEFT's adapter format."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _labels(module: LoRAImageClassifier) -> dict[str, dict]:
    names = module.class_names
    return {"id2label": {str(i): name for i, name in enumerate(names)}, "label2id": {name: i for i, name in enumerate(names)}}


def save_adapter_folder(module: LoRAImageClassifier, folder: str | os.PathLike) -> Path:
    """Write ``module``'s adapter (and head) in PEFT's format, with ``labels.json`` and the image processor.

    ``adapter_config.json`` records the base model, so the folder describes itself.

    Returns:
        The folder.
    """

    return write_folder(folder, lambda staging: _build_adapter(module, staging))


def _build_adapter(module: LoRAImageClassifier, staging: Path) -> None:
    module.model.save_pretrained(staging)
    (staging / LABELS).write_text(json.dumps(_labels(module), indent=2) + "\n")
    export_processor(module.image_settings).save_pretrained(staging)


def _build_merged(module: LoRAImageClassifier, staging: Path) -> None:
    merged = copy.deepcopy(module.model).merge_and_unload()
    merged.config.architectures = [type(merged).__name__]
    merged.save_pretrained(staging)
    export_processor(module.image_settings).save_pretrained(staging)


def adapter_folder_settings(folder: str | os.PathLike) -> dict:
    """The `LoRAImageClassifier` arguments that rebuild the model an adapter folder was saved from."""
    folder = Path(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    labels_file = folder / LABELS if (folder / LABELS).is_file() else folder / "config.json"  # older folders
    if not labels_file.is_file():
        raise ValueError(f"{folder} has no {LABELS} (id2label); export it again with `python -m lit_lora export`.")
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

    try:
        result = set_peft_model_state_dict(module.model, load_file(Path(folder) / ADAPTER_WEIGHTS))
    except RuntimeError as err:  # torch's "size mismatch for ...": another label set or LoRA rank
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise ValueError(
            f"adapter folder {folder} does not fit this model ({detail[:300]}). It was trained with other settings: "
            "load it with the labels and LoRA settings it was saved with."
        ) from err
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


def export_folder_problem(output_dir: str | os.PathLike, overwrite: bool) -> str | None:
    """Why ``output_dir`` must not be exported into (it holds files an export does not write), or None."""
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        return f"output_dir {str(output_dir)!r} is a file, not a folder"
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES) if folder.is_dir() else []
    if foreign and not overwrite:
        return (
            f"output_dir {str(output_dir)!r} is not empty and not a previous export (it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new folder, or pass --overwrite true to write the "
            "export's files into it (other files are left alone)"
        )
    return None


def _write_into(folder: Path, build) -> Path:
    """Build the export in a staging folder beside ``folder``, then move each file in (one atomic rename each),
    removing earlier export files the new one does not have. Files that no export writes are never touched."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lit_lora-export-", dir=folder))
    try:
        build(staging)
        written = {p.name for p in staging.iterdir()}
        for name in sorted(written):
            os.replace(staging / name, folder / name)
        for stale in EXPORT_FILES - written:
            if (folder / stale).is_file():
                (folder / stale).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def export(ckpt_path: str, output_dir: str, merge: bool = False, overwrite: bool = False, push_to_hub: str | None = None) -> Path:
    """Write a trained model in a format other tools load.

    Args:
        ckpt_path: a ``.ckpt`` written by ``fit``, or an adapter folder.
        output_dir: folder to write into; created if missing. A folder that holds anything but a previous export
            is refused unless ``overwrite`` is set.
        merge: write a standalone transformers model with the adapters merged into the weights, which
            ``AutoModelForImageClassification.from_pretrained`` and ``pipeline("image-classification")`` load
            without peft. Otherwise write a PEFT adapter folder.
        overwrite: write into a folder that holds other files too (they are kept; earlier export files are replaced).
        push_to_hub: also upload the folder to this Hugging Face Hub repository (needs network and a login).

    Returns:
        The folder written.
    """
    problem = export_folder_problem(output_dir, overwrite)
    if problem:
        raise ValueError(problem)
    module = load_module(ckpt_path)

    with torch.no_grad():
        folder = _write_into(Path(output_dir).expanduser(), lambda staging: (_build_merged if merge else _build_adapter)(module, staging))
    if push_to_hub:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=push_to_hub, folder_path=str(folder), repo_type="model")
    print(f"[lit_lora] wrote {'merged model' if merge else 'adapter'} to {folder}")
    return folder
