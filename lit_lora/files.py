"""Writing folders so that an interruption never leaves a half-written one where a finished one is expected."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_folder(target: str | os.PathLike, build: Callable[[Path], None], replace: bool = True) -> Path:
    """Run ``build`` on an empty staging folder next to ``target``, then rename it into place.

    Args:
        target: the folder to produce.
        build: fills the folder it is given.
        replace: swap out an existing ``target``; if False, an existing one is kept (another process may have
            finished first) and ``build`` is not run.

    Returns:
        ``target``.
    """
    target = Path(target)
    if not replace and target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        build(staging)
        for path in staging.iterdir():  # some writers (safetensors) create private files; keep the umask's modes
            if path.is_file():
                path.chmod(0o666 & ~umask)
        if target.exists() and replace:
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                staging.rename(target)
            except OSError:  # another process finished first
                if not target.is_dir():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
