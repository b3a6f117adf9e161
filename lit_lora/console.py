"""What the command line prints: lit_lora's own lines, the progress bar and actionable warnings, not the
start-up chatter of the libraries underneath (``python -m lit_lora --verbose ...`` shows everything); and how its
processes end a distributed run (`release_process_group`).

Only the CLI calls `set_up_cli_console` (and the processes Lightning's ddp_spawn starts from it, through
`monitoring.RunSummary`); importing lit_lora or using its modules changes no logging setting.
"""

from __future__ import annotations

import logging
import re
import warnings

# Messages from Lightning's loggers that tell a lit_lora user nothing they can act on.
LIGHTNING_CHATTER = (
    "GPU available",
    "TPU available",
    "HPU available",
    "LOCAL_RANK",
    "💡 Tip",
    "Seed set to",
    "`Trainer.fit` stopped",
    "Restored all states from the checkpoint",
    "Restoring states from the checkpoint",
    "Loaded model weights from the checkpoint",
    "`weights_only` was not set",
)
# torch, as litdata reads a read-only chunk (lit_lora never writes into it); loader workers filter it too.
READ_ONLY_CHUNK_WARNING = r"The given buffer is not writable.*"
# Warnings raised inside libraries about their own internals, or about what lit_lora does on purpose.
LIBRARY_WARNINGS = (
    r".*is_gradient_checkpointing.*",  # transformers deprecating a name another library still calls
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning on torch's pytree
    r"No seed found.*",  # LightningCLI's seed_everything: the resolved seed is in config.yaml
    r"Found keys that are in the model state dict but not in the checkpoint.*",  # the frozen base, by design
    r"Your `IterableDataset` has `__len__` defined.*",  # Lightning on litdata's datasets, which shard per worker themselves
    r"Couldn't infer the batch indices fetched from your dataloader.*",  # litdata's loader: PredictionWriter reads each batch's index
    READ_ONLY_CHUNK_WARNING,
)


# litdata, on lit_lora's evaluation splits under DDP: they keep every image (drop_last off) on purpose, and no
# collective runs per evaluation batch.
LITDATA_CHATTER = ("You're operating within a distributed environment and have disabled the `drop_last` option",)


class _DropChatter(logging.Filter):
    def __init__(self, chatter: tuple[str, ...]) -> None:
        super().__init__()
        self.chatter = chatter

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.getMessage()).lstrip())  # Lightning's other processes prefix theirs
        return not message.startswith(self.chatter)


def quiet_other_libraries() -> None:
    """Silence transformers' load reports and progress bars and Lightning's start-up lines for this process."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    loggers = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning.pytorch")
    for names, chatter in ((loggers, LIGHTNING_CHATTER), (("litdata.streaming.dataset",), LITDATA_CHATTER)):
        for logger in map(logging.getLogger, names):
            if not any(isinstance(f, _DropChatter) for f in logger.filters):  # once, however many times the CLI runs here
                logger.addFilter(_DropChatter(chatter))
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


_CLI_CONSOLE: dict[str, bool] = {}  # how the command line set up this process's console; empty: it did not


def set_up_cli_console(verbose: bool) -> None:
    """The command line's console for this process: lit_lora's messages on standard error, and unless ``verbose`` the
    other libraries' start-up chatter left out. Remembered for the processes Lightning's ddp_spawn starts
    (`cli_console`)."""
    from lit_lora import log

    log.show_messages()
    if not verbose:
        quiet_other_libraries()
    _CLI_CONSOLE["verbose"] = verbose


def cli_console() -> dict[str, bool] | None:
    """`set_up_cli_console`'s arguments in this process, None outside the command line."""
    return dict(_CLI_CONSOLE) or None


def release_process_group() -> None:
    """Destroy a finished DDP run's process group while the interpreter is whole, as PyTorch asks; left to interpreter
    exit, gloo's threads can abort the process after its work is done ("terminate called without an active
    exception", exit -6: PyTorch issue #190489, seen here after a 2-process predict, and after a ddp_spawn fit, whose
    launcher then reports the finished run as failed). Only where every process finished or stopped at the same point:
    never after an error, when the others may be inside a collective."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
