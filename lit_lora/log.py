"""lit_lora's own logger, ``logging.getLogger("lit_lora")``: library code only writes to it (process 0 of a
distributed run); the command line gives it a handler (`show_messages`). In your own code, configure it like any
other logger, e.g. ``logging.basicConfig(level=logging.INFO)``."""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.utilities import rank_zero_only

logger = logging.getLogger("lit_lora")


def info(message: str) -> None:
    """Log ``message`` at INFO level, once per run (on process 0)."""
    if rank_zero_only.rank == 0:
        logger.info(message)


class _StandardError(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when each message is written, as ``print(file=sys.stderr)`` does, not to the
    stream it was when the handler was made: one replaced since then (``contextlib.redirect_stderr``, pytest's
    ``capsys``) may be closed, and logging would print "--- Logging error ---" with a traceback instead of the message.
    (The standard library's last-resort handler does the same.)"""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it: always the current sys.stderr
        pass


def show_messages() -> None:
    """Print lit_lora's messages on standard error, as they are (the command line does this)."""
    if not any(getattr(h, "lit_lora", False) for h in logger.handlers):
        handler = _StandardError()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.lit_lora = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
