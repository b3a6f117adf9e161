"""The README's Python examples run as written (with a tiny model and generated images for their paths), and its
first screen holds what a newcomer needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_block(code: str, tiny_vit: str, food101_dir: str) -> None:
    assert '"google/vit-base-patch16-224-in21k"' in code and '"/data/food-101"' in code
    code = code.replace('"google/vit-base-patch16-224-in21k"', repr(tiny_vit)).replace('"/data/food-101"', repr(food101_dir))
    code = re.sub(r"Food101DataModule\((.*?)\)", r"Food101DataModule(\1, num_workers=0, train_split='train')", code, count=1)
    code = code.replace("max_epochs=5", "max_epochs=2, accelerator='cpu'")
    exec(compile(code, "README.md", "exec"), {})


def test_first_screen_says_what_it_is_how_to_start_and_what_it_needs() -> None:
    first = "\n".join(README.read_text().splitlines()[:40])
    for needed in ("LoRA fine-tuning of image classifiers", "configs/demo.yaml", "pytest -q", "configs/food101_vit_lora.yaml", "LoRAImageClassifier(", "transformers 5"):
        assert needed in first, needed
    assert len(python_blocks(first)[0].strip().splitlines()) == 5


def test_readme_module_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_vit: str, food101_dir: str) -> None:
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    run_block(python_blocks(text)[0], tiny_vit, food101_dir)  # the first screen's five lines
    assert any(p.is_dir() for p in tmp_path.rglob("adapter-last"))  # AdapterCheckpoint wrote the PEFT folder
    run_block(python_blocks(text.split("## Using the modules", 1)[1])[0], tiny_vit, food101_dir)
    assert "'val/acc':" in capsys.readouterr().out
