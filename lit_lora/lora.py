"""Glue between transformers image classifiers and PEFT's LoRA: target names, the config, the guide's summary."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

# Older names (the PEFT guide, transformers 4) → what current architectures call the same layer.
# transformers 5 renamed ViT/DeiT/Swin/DINOv2 attention projections from query/key/value to q_proj/k_proj/v_proj.
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("q_proj", "q", "query_proj"),
    "key": ("k_proj", "k", "key_proj"),
    "value": ("v_proj", "v", "value_proj"),
    "q_proj": ("query",),
    "k_proj": ("key",),
    "v_proj": ("value",),
    "o_proj": ("output.dense", "out_proj"),
    "qkv": ("qkv_proj",),
}

# LoraConfig fields that LoRAImageClassifier sets itself or that make no sense for an image classifier.
MANAGED_LORA_FIELDS = {
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "modules_to_save",
    "task_type",
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
}


def linear_layer_names(model: nn.Module) -> Counter[str]:
    """Last name component of every `nn.Linear` in ``model`` with how often it occurs (``{"q_proj": 12, ...}``)."""
    return Counter(name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear))


def _matches(module_names: list[str], target: str) -> bool:
    # PEFT's rule for a list entry: the full name equals it or ends with "." + it.
    return any(name == target or name.endswith("." + target) for name in module_names)


def resolve_target_modules(model: nn.Module, targets: list[str] | str) -> list[str] | str:
    """Map LoRA target names onto the layers ``model`` really has.

    A name that matches is kept; one that does not is replaced by the first alias that does (``query`` →
    ``q_proj`` on transformers 5). A string is a regular expression (PEFT's rule) and must match a linear layer.

    Raises:
        ValueError: some target matches no linear layer; the message lists the layers the model has.
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    available = ", ".join(f"{name} (x{count})" for name, count in sorted(linear_layer_names(model).items()))
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in linear):
            raise ValueError(f"target_modules regex {targets!r} matches no linear layer. The model's linear layers: {available}.")
        return targets
    resolved, unknown = [], []
    for target in targets:
        candidates = (target, *TARGET_ALIASES.get(target, ()))
        match = next((c for c in candidates if _matches(linear, c)), None)
        if match is None:
            unknown.append(target)
        elif match not in resolved:
            resolved.append(match)
    if unknown:
        raise ValueError(
            f"target_modules {unknown} match no linear layer of {type(model).__name__}. "
            f"Its linear layers are: {available}. Set --model.target_modules to some of these names."
        )
    return resolved


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Fail with the model's top-level children when a ``modules_to_save`` entry names no module."""
    module_names = [name for name, _ in model.named_modules()]
    missing = [name for name in names if not _matches(module_names, name)]
    if missing:
        children = ", ".join(name for name, _ in model.named_children())
        raise ValueError(f"modules_to_save {missing} name no module of {type(model).__name__}; its top-level modules are: {children}.")


def check_lora_options(options: dict[str, Any]) -> None:
    """Fail, listing the valid names, when ``options`` holds something that is not a settable LoraConfig field."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(options) - fields)
    managed = sorted(set(options) & MANAGED_LORA_FIELDS)
    problems = []
    if unknown:
        problems.append(f"{unknown} are not peft.LoraConfig options; valid ones: {sorted(fields - MANAGED_LORA_FIELDS)}")
    if managed:
        problems.append(f"{managed} have their own arguments (e.g. --model.r); set them there")
    if problems:
        raise ValueError("lora_options: " + "; ".join(problems) + ".")


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    lora_alpha: int,
    target_modules: list[str] | str,
    lora_dropout: float,
    bias: str,
    modules_to_save: list[str] | None,
    options: dict[str, Any] | None = None,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; only the adapters and ``modules_to_save`` stay trainable.

    Returns:
        The `peft.PeftModel`.
    """
    options = dict(options or {})
    check_lora_options(options)
    if modules_to_save:
        check_modules_to_save(model, modules_to_save)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=resolve_target_modules(model, target_modules),
        lora_dropout=lora_dropout,
        bias=bias,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        **options,
    )
    with warnings.catch_warnings():  # PEFT 0.21 calls a name transformers 5 deprecated: nothing a user can change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_summary(model: PeftModel) -> str:
    """The PEFT guide's line: ``trainable params: 667493 || all params: 86466149 || trainable%: 0.77``."""
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable} || all params: {total} || trainable%: {100 * trainable / total:.2f}"
