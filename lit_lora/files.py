"""Writing files and folders so that nothing a user trusts is ever half-written, lost or mistaken.

Every file lit_lora writes goes to a temporary name *in its destination folder* and is renamed into place (one
atomic ``os.replace`` on the same filesystem: no copy through ``TMPDIR``, no orphan elsewhere). Temporaries are
named ``.<name>.lit_lora-tmp-*`` so that the next run can recognise a killed write's leftovers and remove them
(`remove_stale_temporaries`). Files get the modes any other new file of the process gets (the umask's), found
without changing the umask (a process-wide setting).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".lit_lora-tmp-"


class OutputError(ValueError):
    """A file or folder lit_lora must write cannot be written (read-only, a file in the way, disk full)."""


def temporary_name(target: Path) -> Path:
    """A fresh, recognisable temporary name beside ``target``: ``.<name>.lit_lora-tmp-<random>``."""
    return target.with_name(f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def new_file_mode(folder: Path) -> int:
    """The mode a new file created by this process in ``folder`` gets (0o666 less the umask), found by creating
    one: reading the umask with ``os.umask`` would set it for every thread of the process for a moment."""
    probe = temporary_name(folder / "probe")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def explain_write_error(err: OSError, target: str | os.PathLike, what: str = "file") -> OutputError:
    """One line for a failed write: what could not be written, why, and what to do."""
    target = Path(target)
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(target.parent)
        advice = f"{free / 1e6:.1f} MB free there; free some space or write elsewhere"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "make the folder writable or write elsewhere"
    else:
        advice = "check the folder or write elsewhere"
    return OutputError(f"could not write {what} {target} ({reason}); {advice}. Files written before are intact.")


def atomic_write(target: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False, what: str = "file") -> Path:
    """Write ``target`` through ``write(file)`` on a temporary beside it, then rename it into place.

    An interruption (Ctrl-C, SIGKILL, a full disk) leaves either the previous ``target`` or the new one, never a
    partial file under its name; a failed write removes its temporary and raises `OutputError`.

    Returns:
        ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise explain_write_error(err, target, what) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def write_text(target: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file."""
    return atomic_write(target, lambda f: f.write(text))


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
    staging = temporary_name(target)
    try:
        staging.mkdir()  # the umask's mode, like any other folder
        build(staging)
        mode = new_file_mode(staging)
        for path in staging.iterdir():  # some writers (safetensors) create private files; give them the usual mode
            if path.is_file():
                path.chmod(mode)
        if target.exists() and replace:
            old = temporary_name(target)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                staging.rename(target)
            except OSError:  # another process finished first
                if not target.is_dir():
                    raise
    except OSError as err:
        raise explain_write_error(err, target, "folder") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_folder(target.parent)
    return target


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writes left in ``folder`` (lit_lora's temporaries); returns what was removed.

    Call it only where no other process is writing (a run folder this process holds, see `runs.RunLock`).
    """
    folder = Path(folder)
    removed = []
    for path in folder.glob(f".*{TMP_MARK}*") if folder.is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (what a ``mkdir -p`` would write into)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds (or would hold) ``path``."""
    return shutil.disk_usage(existing_ancestor(path)).free


def output_folder_problems(folders: Iterable[tuple[str, str | os.PathLike | None]], need_bytes: int = 0) -> list[str]:
    """What stops lit_lora from writing into these folders, each named by its option: a file in the way, a folder
    that cannot be written, or (with ``need_bytes``) too little free space. Nothing is created.

    Args:
        folders: ``(option, folder)`` pairs, e.g. ``("checkpoint.dirpath", "runs/x")``; None folders are skipped.
        need_bytes: free space each folder's filesystem must have.
    """
    problems = []
    for option, folder in folders:
        if folder is None or "://" in str(folder):
            continue
        path = Path(folder).expanduser()
        ancestor = existing_ancestor(path)
        if ancestor.is_file() or (path.exists() and not path.is_dir()):
            blocker = path if path.exists() else ancestor
            problems.append(f"{option} {str(folder)!r} cannot be a folder: {blocker} is a file. Choose another folder")
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            problems.append(f"{option} {str(folder)!r} is not writable ({ancestor} is read-only for this user). Choose a writable folder")
        elif need_bytes and free_bytes(ancestor) < need_bytes:
            problems.append(
                f"{option} {str(folder)!r} is on a disk with {free_bytes(ancestor) / 1e6:.1f} MB free; one checkpoint and "
                f"its adapter need about {need_bytes / 1e6:.1f} MB. Free some space or choose another folder"
            )
    return problems
