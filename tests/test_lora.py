"""LoRA glue: the recipe's parameter count, target-name translation across architectures, and clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig

from lit_lora.lora import apply_lora, resolve_target_modules, trainable_summary

RECIPE = dict(r=16, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1, bias="none", modules_to_save=["classifier"])

TINY = {
    "vit": ("ViTForImageClassification", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8)),
    "deit": ("DeiTForImageClassification", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8)),
    "swin": ("SwinForImageClassification", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4)),
    "dinov2": ("Dinov2ForImageClassification", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)),
}


def tiny_model(model_type: str, num_labels: int = 3) -> torch.nn.Module:
    architecture, kwargs = TINY[model_type]
    config = AutoConfig.for_model(model_type, num_labels=num_labels, architectures=[architecture], **kwargs)
    return AutoModelForImageClassification.from_config(config)


def lora_layer_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def test_recipe_on_vit_b16_with_101_labels_trains_exactly_667493_parameters() -> None:
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(ViTConfig(num_labels=101))  # ViT-B/16, random init
    peft_model = apply_lora(model, **RECIPE)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 667_493
    line = trainable_summary(peft_model)
    assert line.startswith("trainable params: 667493 || all params: ")
    assert line.endswith("|| trainable%: 0.77")


def test_guide_names_query_value_map_to_q_proj_v_proj() -> None:
    model = tiny_model("vit")
    assert resolve_target_modules(model, ["query", "value"]) == ["q_proj", "v_proj"]
    assert resolve_target_modules(model, ["q_proj", "value"]) == ["q_proj", "v_proj"]
    names = lora_layer_names(apply_lora(model, **RECIPE))
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["q_proj", "q_proj", "v_proj", "v_proj"]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_recipe_targets_attention_query_value_on_each_architecture(model_type: str) -> None:
    model = tiny_model(model_type)
    peft_model = apply_lora(model, **RECIPE)
    names = lora_layer_names(peft_model)
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert sum(n.endswith("q_proj") for n in names) == sum(n.endswith("v_proj") for n in names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    logits = peft_model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 3)


def test_applying_lora_says_nothing_a_user_cannot_act_on() -> None:
    """PEFT 0.21 reads a property that transformers 5 deprecated: every model built warned about it in the user's
    script (the command line hides it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(tiny_model("vit"), **RECIPE)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_unknown_target_fails_listing_the_models_linear_layers() -> None:
    with pytest.raises(ValueError) as info:
        apply_lora(tiny_model("vit"), **{**RECIPE, "target_modules": ["query", "qkv_projection"]})
    message = str(info.value)
    assert "['qkv_projection']" in message
    for layer in ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"):
        assert layer in message


def test_regex_target_must_match_something() -> None:
    model = tiny_model("vit")
    assert resolve_target_modules(model, r".*\.(q_proj|v_proj)") == r".*\.(q_proj|v_proj)"
    with pytest.raises(ValueError, match="matches no linear layer"):
        resolve_target_modules(model, r".*\.nothing")


def test_other_lora_config_options_are_passed_through() -> None:
    peft_model = apply_lora(tiny_model("vit"), **RECIPE, options={"use_dora": True, "use_rslora": True})
    config = peft_model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    assert any("lora_magnitude_vector" in n for n, _ in peft_model.named_parameters())


def test_unknown_lora_option_and_missing_head_are_reported() -> None:
    with pytest.raises(ValueError, match=r"\['use_dorra'\] are not peft.LoraConfig options"):
        apply_lora(tiny_model("vit"), **RECIPE, options={"use_dorra": True})
    with pytest.raises(ValueError, match="have their own arguments"):
        apply_lora(tiny_model("vit"), **RECIPE, options={"r": 8})
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\].*classifier"):
        apply_lora(tiny_model("vit"), **{**RECIPE, "modules_to_save": ["head"]})
