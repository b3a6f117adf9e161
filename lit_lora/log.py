"""lit_lora's own logger, ``logging.getLogger("lit_lora")``: library code only writes to it (process 0 of a
distributed run); the command line gives it a handler (`show_messages`). In your own code, configure it like any
other logger, e.g. ``logging.basicConfig(level=logging.INFO)``."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only

logger = logging.getLogger("lit_lora")


def info(message: str) -> None:
    """Log ``message`` at INFO level, once per run (on process 0)."""
    if rank_zero_only.rank == 0:
        logger.info(message)


def show_messages() -> None:
    """Print lit_lora's messages on standard error, as they are (the command line does this)."""
    if not any(getattr(h, "lit_lora", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.lit_lora = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
