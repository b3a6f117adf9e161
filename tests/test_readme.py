"""The README's Python example runs as written (with a tiny model and generated images for its two paths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_module_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_vit: str, food101_dir: str) -> None:
    section = README.read_text().split("## Use the modules in your own Lightning project", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"google/vit-base-patch16-224-in21k"' in code and '"/data/food-101"' in code
    code = code.replace('"google/vit-base-patch16-224-in21k"', repr(tiny_vit)).replace('"/data/food-101"', repr(food101_dir))
    code = code.replace("batch_size=128", "batch_size=8, num_workers=0, train_split='train'")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'val/acc':" in printed
