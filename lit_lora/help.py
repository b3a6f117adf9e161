"""``--help`` that starts with lit_lora's own options: one line each for the model, data, checkpoint and
prediction options (type, default, the first sentence of their documentation), before jsonargparse's full listing,
where the Trainer's many options follow; and a top-level help that lists every subcommand, ``export`` and ``optimize`` included."""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any

SUBCOMMANDS = {
    "fit": "Train LoRA adapters and the head; checkpoints, adapter folders and metrics land in the run folder.",
    "validate": "Evaluate a checkpoint or adapter folder on the validation images; writes a report.",
    "test": "Evaluate a checkpoint or adapter folder on the test split; writes a report.",
    "predict": "Predict the labels of image files (--data.predict_dir); writes predictions.csv.",
    "export": "Write a PEFT adapter folder or a merged transformers model from a checkpoint (export --help).",
    "optimize": "Write the splits fit uses as litdata datasets to a folder or s3:// URL, for --data.optimized_dir (optimize --help).",
}


def first_sentence(text: str) -> str:
    """The first sentence of a docstring paragraph, whole, on one line."""
    flat = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(?=\s+[A-Z]|$)", flat)  # not at "e.g. ``x``"
    return match.group(1) if match else flat


def _documented(cls: type) -> dict[str, tuple[str, str]]:
    """``name -> (type, first sentence)`` of ``cls``'s constructor arguments, through its base classes too."""
    import docstring_parser

    found: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not init.__doc__:
            continue
        signature = inspect.signature(init)
        for param in docstring_parser.parse(init.__doc__).params:
            annotation = signature.parameters.get(param.arg_name)
            kind = str(annotation.annotation) if annotation is not None and annotation.annotation is not inspect.Parameter.empty else ""
            found[param.arg_name] = (kind.replace("typing.", ""), first_sentence(param.description or ""))
    return found


def options_summary(defaults: Any, classes: dict[str, type], command: str | None = None, own: dict[str, str] | None = None) -> str:
    """One line per option of ``classes`` (group -> class), with the parser's current defaults, after ``command``'s
    ``own`` options (name -> help)."""
    lines = ["lit_lora's options (one line each; every option in full, the Trainer's too, further below):"]
    if own:
        lines.append(f"  {command}:")
        lines += [f"    --{name}{'' if defaults.get(name) is None else f' = {defaults[name]}'}  {text}." for name, text in own.items()]
    for group, cls in classes.items():
        docs = _documented(cls)
        lines.append(f"  {group}:")
        for name, (_, sentence) in docs.items():
            key = f"{group}.{name}"
            if key not in defaults:
                continue
            value = defaults[key]
            shown = "" if value is None else f" = {value}"
            lines.append(f"    --{key}{shown}  {sentence}")
    return "\n".join(lines) + "\n\n"


def top_level_help(usage: str, description: str, options_text: str) -> str:
    """The top-level ``--help``: usage, what it is, every subcommand with one whole sentence, the options."""
    subcommands = "\n".join(f"  {name:<10} {text}" for name, text in SUBCOMMANDS.items())
    wrapped = textwrap.fill(" ".join(description.split()), 100)
    return f"{usage}\n{wrapped}\n\nsubcommands (python -m lit_lora SUBCOMMAND --help for its options):\n{subcommands}\n\n{options_text}"
