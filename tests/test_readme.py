"""The README runs as written: its first screen holds what a newcomer needs, and every command and Python example
in it runs (with a tiny model and generated images in place of the hub model and Food-101, on the CPU)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_lora.cli import cli_main

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
HUB_ID = "google/vit-base-patch16-224-in21k"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def commands(text: str) -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        found += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return found


def test_first_screen_says_what_it_is_how_to_start_and_what_it_needs() -> None:
    text = README.read_text()
    first = "\n".join(text.splitlines()[:40])
    for needed in ("LoRA fine-tuning of image classifiers", "configs/demo.yaml", "pytest -q", "configs/food101_vit_lora.yaml", "LoRAImageClassifier(", "transformers 5"):
        assert needed in first, needed
    assert len(python_blocks(first)[0].strip().splitlines()) == 5
    assert len(text.encode()) < 10_000  # read top to bottom in minutes
    assert "../shared" not in text and "this 2-core machine" not in text


def run_python(code: str, tiny_vit: str, food101_dir: str) -> None:
    code = code.replace(f'"{HUB_ID}"', repr(tiny_vit)).replace('"/data/food-101"', repr(food101_dir))
    code = re.sub(r"Food101DataModule\((.*?)\)", r"Food101DataModule(\1, num_workers=0, train_split='train')", code, count=1)
    code = code.replace("max_epochs=5", "max_epochs=2, accelerator='cpu'")
    exec(compile(code, "README.md", "exec"), {})


def test_every_readme_command_and_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_vit: str, food101_dir: str, s3) -> None:
    """In one folder, in the README's order: the demo, the recipe (fit, validate, predict, resume, export), the
    offline save_pretrained snippet and the fit on its folder, and the Python examples. The fresh-machine install
    and test commands are what CI runs (.ci/run)."""
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "my_photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    (tmp_path / "my_images").symlink_to(Path(food101_dir) / "images")  # class folders
    tiny = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--data.num_workers=0", "--data.batch_size=8"]
    recipe = [f"--model.model_name_or_path={tiny_vit}", f"--data.data_dir={food101_dir}", "--data.train_split=train"]
    ran = []
    for command in commands(README.read_text()):
        if "pip install" in command:
            assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
            if "pytest" in command:
                continue  # the test command itself: .ci/run runs it
            command = command.split("&& .venv/bin/", 2)[-1].replace("python -m", "python -m", 1)
        words = shlex.split(command.replace("s3://my-bucket/", s3.url("readme-")))  # the test's S3 server
        assert words[:3] == ["python", "-m", "lit_lora"], command
        args = words[3:]
        if args[0] == "export":
            cli_main(args)
        else:
            args += tiny
            if "configs/food101_vit_lora.yaml" in args:
                if "--model.model_name_or_path" in args:  # the offline example: its folder comes from the snippet below
                    run_python(python_blocks(README.read_text())[1], tiny_vit, food101_dir)
                    args += ["--data.train_split=train"]
                else:
                    args += recipe
                if args[0] == "fit" and "--ckpt_path" in args:
                    args += ["--trainer.max_epochs=2"]
            cli_main([a if a != "configs/demo.yaml" and a != "configs/food101_vit_lora.yaml" else str(REPO / a) for a in args])
        ran.append(args[0])
    assert ran == ["fit", "fit", "validate", "predict", "fit", "fit", "export", "export", "optimize", "fit"]
    run = tmp_path / "checkpoints" / "food101_vit_lora" / "version_0"
    assert (run / "predict" / "predictions.csv").is_file() and (run / "validate" / "validate_report").is_dir()
    assert (tmp_path / "food101-lora" / "adapter_model.safetensors").is_file() and (tmp_path / "food101-vit" / "model.safetensors").is_file()
    assert (tmp_path / "models" / "vit-base" / "config.json").is_file()
    from lit_lora.optimized import read_manifest

    assert read_manifest(s3.url("readme-food101"))["state"] == "complete"

    text = README.read_text()
    run_python(python_blocks(text)[0], tiny_vit, food101_dir)  # the first screen's five lines
    run_python(python_blocks(text.split("## In your own Lightning code", 1)[1])[0], tiny_vit, food101_dir)
    assert "'val/acc':" in capsys.readouterr().out
