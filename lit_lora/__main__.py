import os
import signal
import sys
from typing import NoReturn

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_lora.cli import cli_main
from lit_lora.console import release_process_group
from lit_lora.optimized import error_line, first_error

TRACEBACK_HINT = "(set LIT_LORA_TRACEBACK=1 to see where it was raised)"


def one_message(err: BaseException) -> str:
    """The error's own message; for one re-raised from a loader worker, without the worker's traceback text."""
    message = str(err)
    if "Original Traceback" in message:  # torch's ExceptionWrapper: the worker's traceback, our message last
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith(type(err).__module__) or ": " in last.split(" ", 1)[0] else last
    return message


def main() -> NoReturn:
    """``python -m lit_lora``: run the CLI; our own errors end in one ``lit_lora: error: ...`` line."""
    try:
        cli_main()
    except SIGTERMException as err:
        # Stopped by SIGTERM or a first Ctrl-C (after saving last.ckpt during fit): the exit code shells report.
        release_process_group()
        sys.exit(128 + (signal.SIGINT if getattr(err, "lit_lora_signal", None) == "SIGINT" else signal.SIGTERM))
    except SystemExit as err:
        if isinstance(err.__context__, KeyboardInterrupt):  # Lightning's exit after a second Ctrl-C
            sys.exit(128 + signal.SIGINT)
        raise
    except KeyboardInterrupt as err:  # outside Lightning's loops: optimize, export
        print(f"lit_lora: {err or 'interrupted'}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (ValueError, FileNotFoundError, FloatingPointError, PermissionError) as err:
        # Our errors say what was wrong, where, and what to do; a traceback would bury that.
        if os.environ.get("LIT_LORA_TRACEBACK"):
            raise
        print(f"lit_lora: error: {one_message(err)}\n{TRACEBACK_HINT}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if not getattr(err, "lit_lora_reading", False) or os.environ.get("LIT_LORA_TRACEBACK"):
            raise
        # The data could not be read (`AdapterCheckpoint` saved the fit and said how to resume): the root cause, not
        # the loader worker's and the storage client's tracebacks (300 lines for an S3 endpoint that went away).
        cause = first_error(str(err)) if "Original Traceback" in str(err) else error_line(err)  # from a loader worker, or not
        print(f"lit_lora: error: reading the data failed: {cause}\n{TRACEBACK_HINT}", file=sys.stderr)
        sys.exit(1)
    release_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
