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
import warnings
from pathlib import Path

import torch

from lit_lora.checkpoint_contents import check_readable_checkpoint
from lit_lora.files import TMP_MARK, explain_write_error, new_file_mode, temporary_name, write_folder
from lit_lora.model import LoRAImageClassifier
from lit_lora.transforms import export_processor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LABELS = "labels.json"
# Written last into every adapter folder and merged export: the files that export wrote. A later export into the
# same folder replaces exactly these and never a file it did not write.
MANIFEST = "lit_lora_export.json"
# The files each kind of export writes (PEFT and transformers may add others; the manifest lists what was written).
EXPECTED_FILES = {
    "adapter": {ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS, "preprocessor_config.json", "README.md", MANIFEST},
    "merged": {"config.json", "model.safetensors", "preprocessor_config.json", MANIFEST},
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


def _write_manifest(staging: Path, kind: str) -> None:
    files = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST) + [MANIFEST]
    (staging / MANIFEST).write_text(json.dumps({"written_by": "lit_lora", "kind": kind, "files": files}, indent=2) + "\n")


def _build_adapter(module: LoRAImageClassifier, staging: Path) -> None:
    module.model.save_pretrained(staging)
    (staging / LABELS).write_text(json.dumps(_labels(module), indent=2) + "\n")
    export_processor(module.image_settings).save_pretrained(staging)
    _write_manifest(staging, "adapter")


def _build_merged(module: LoRAImageClassifier, staging: Path) -> None:
    merged = copy.deepcopy(module.model).merge_and_unload()
    merged.config.architectures = [type(merged).__name__]
    merged.save_pretrained(staging)
    export_processor(module.image_settings).save_pretrained(staging)
    _write_manifest(staging, "merged")


def save_adapter_folder_from_checkpoint(module: LoRAImageClassifier, ckpt_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the adapter folder of the weights saved in ``ckpt_path``, using ``module`` (same layout) as the
    vehicle; ``module``'s own weights are put back afterwards."""
    current = {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    with torch.no_grad():
        module.load_state_dict(saved, strict=False)
        try:
            return save_adapter_folder(module, folder)
        finally:
            module.load_state_dict(current, strict=False)


def adapter_folder_settings(folder: str | os.PathLike) -> dict:
    """The `LoRAImageClassifier` arguments that rebuild the model an adapter folder was saved from.

    The LoRA configuration is read by PEFT itself (``PeftConfig.from_pretrained``), and every option that differs
    from ``LoraConfig``'s default (``alpha_pattern``, ``rank_pattern``, ``use_dora``, ...) is carried over, so the
    rebuilt model is the trained one, whatever options it was trained with.
    """
    import dataclasses

    from peft import LoraConfig, PeftConfig

    from lit_lora.lora import MANAGED_LORA_FIELDS

    folder = Path(folder)
    config = PeftConfig.from_pretrained(str(folder))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{folder} holds a {type(config).__name__} adapter; lit_lora loads LoRA adapters.")
    labels_file = folder / LABELS if (folder / LABELS).is_file() else folder / "config.json"  # older folders
    if not labels_file.is_file():
        raise ValueError(f"{folder} has no {LABELS} (id2label); export it again with `python -m lit_lora export`.")
    id2label = json.loads(labels_file.read_text())["id2label"]
    defaults = LoraConfig()
    options = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(LoraConfig)
        if field.init and field.name not in MANAGED_LORA_FIELDS and getattr(config, field.name) != getattr(defaults, field.name)
    }
    targets = config.target_modules
    return {
        "model_name_or_path": config.base_model_name_or_path,
        "class_names": [id2label[str(i)] for i in range(len(id2label))],
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "lora_options": options or None,
    }


def load_adapter_weights(module: LoRAImageClassifier, folder: str | os.PathLike) -> None:
    """Load an adapter folder's weights into ``module`` (built with `adapter_folder_settings`), via PEFT."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        result = set_peft_model_state_dict(module.model, load_peft_weights(str(folder), device="cpu"))
    except RuntimeError as err:  # torch's "size mismatch for ...": another label set or LoRA rank
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise ValueError(
            f"adapter folder {folder} does not fit this model ({detail}). It was trained with other settings: "
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


def previous_export_files(folder: Path) -> set[str]:
    """The files a previous lit_lora export wrote into ``folder`` (its manifest), or none."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    return {name for name in manifest.get("files", []) if isinstance(name, str) and "/" not in name} if isinstance(manifest, dict) else set()


def export_folder_problem(output_dir: str | os.PathLike, overwrite: bool, files: set[str] | None = None) -> str | None:
    """Why exporting ``files`` into ``output_dir`` could lose a file that lit_lora did not write, or None.

    Allowed: a missing or empty folder, a folder holding a previous export (its manifest lists its files; other
    files beside it are left alone), and, with ``overwrite``, any folder; never where a file the export writes would
    replace one that no export wrote.
    """
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        return f"output_dir {str(output_dir)!r} is a file, not a folder"
    if not folder.is_dir():
        return None
    ours = previous_export_files(folder)
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours and TMP_MARK not in p.name)
    clashes = sorted(set(foreign) & (files or set()))
    if clashes:
        return (
            f"output_dir {str(output_dir)!r} holds {', '.join(clashes)}, which the export would replace and lit_lora did "
            "not write; export into an empty or new folder (or move those files away)"
        )
    if foreign and not overwrite and not ours:  # beside a previous export, other files are simply left alone
        return (
            f"output_dir {str(output_dir)!r} is not empty and not a previous export (it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new folder, or pass --overwrite true to add the "
            "export's files beside them (none of them is replaced or deleted)"
        )
    return None


def _write_into(folder: Path, build, overwrite: bool) -> Path:
    """Build the export in a staging folder inside ``folder``, check again with the exact file names, then move
    each file in (one atomic rename each, the manifest last) and remove files of the previous export that the new
    one does not have. A file that no export wrote is never replaced or deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(f".export{TMP_MARK}*"):  # a killed export's staging folder
        shutil.rmtree(leftover, ignore_errors=True)
    staging = temporary_name(folder / "export")
    staging.mkdir()
    try:
        build(staging)
        mode = new_file_mode(staging)
        written = {p.name for p in staging.iterdir()}
        problem = export_folder_problem(folder, overwrite, written)
        if problem:
            raise ValueError(problem)
        previous = previous_export_files(folder)
        for name in sorted(written - {MANIFEST}) + [MANIFEST]:
            (staging / name).chmod(mode)  # safetensors writes private files; exports get the modes fit's files get
            os.replace(staging / name, folder / name)
        for stale in previous - written:
            if (folder / stale).is_file():
                (folder / stale).unlink()
    except OSError as err:
        raise explain_write_error(err, folder, "export folder") from err
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
        overwrite: write into a folder that holds other files too. They are kept: an export never replaces or
            deletes a file that no lit_lora export wrote (the folder's ``lit_lora_export.json`` lists those).
        push_to_hub: also upload the folder to this Hugging Face Hub repository (needs network and a login).

    Returns:
        The folder written.
    """
    problem = export_folder_problem(output_dir, overwrite, EXPECTED_FILES["merged" if merge else "adapter"])
    if problem:
        raise ValueError(problem)
    if Path(ckpt_path).is_file():
        check_readable_checkpoint(ckpt_path)
    module = load_module(ckpt_path)

    with torch.no_grad():
        build = _build_merged if merge else _build_adapter
        folder = _write_into(Path(output_dir).expanduser(), lambda staging: build(module, staging), overwrite)
    if push_to_hub:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=push_to_hub, folder_path=str(folder), repo_type="model")
    print(f"[lit_lora] wrote {'merged model' if merge else 'adapter'} to {folder}")
    return folder
