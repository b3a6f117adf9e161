"""What every loader worker process does first (`WorkerStart`): leave stopping to the main process, and yield the
cores to the model's threads when it computes on the CPU.

Light on purpose: a worker started with spawn or forkserver imports this module, and the data it reads, but not
Lightning, Transformers or litdata (which creates a semaphore when imported that a worker killed by SIGTERM leaves
behind, and Python then warns about at exit).
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import threading
import warnings
from multiprocessing.reduction import ForkingPickler
from typing import Any

from lit_lora.console import READ_ONLY_CHUNK_WARNING

_main_exit_reader: Any = None  # ready to read once this process's interpreter exits (`_main_exit`)


class WorkerStart:
    """A loader's ``worker_init_fn``: leave stopping to the main process and, with ``lower_priority``, run at a lower
    CPU priority (nice 10).

    A scheduler's SIGTERM (SLURM signals every process of a job step) and a terminal's Ctrl-C reach the loader workers
    too. torch's workers die of them, and the main process then fails with "DataLoader worker ... is killed by
    signal" (exit 1), perhaps before it saved ``last.ckpt``. Workers ignore Ctrl-C, and a scheduler's SIGTERM: the
    main process stops after the batch and shuts them down (a worker also exits when its main process is gone, and
    SIGKILL still ends it). Yet they end when the main process's interpreter exits: Python's exit sends a SIGTERM to
    each worker still running (a script or notebook that keeps a loader with persistent workers), then waits for it.

    How: a forked worker (Linux's default before Python 3.14) runs one thread, in which it blocks SIGTERM before
    starting a thread that waits for it and reads who sent it: the main process's is obeyed. A worker started with
    spawn or forkserver (macOS's default, Linux's from 3.14) already runs threads (numpy's BLAS pool), any of which
    could take the signal first: its handler obeys a SIGTERM only once a pipe reads as ready, which the main process
    closes as its interpreter exits, before multiprocessing terminates the workers. Forked workers without
    ``signal.sigwaitinfo`` (macOS, Windows) keep SIGTERM's default action, as in torch.

    When the model computes on the same cores, its threads wait for each other after every operation, so a worker
    that preempts one of them stalls all of them; at lower priority the workers fill the cores' idle moments
    instead (measured on 2 cores with pre-resized images: about 9% more training images/s).
    """

    def __init__(self, lower_priority: bool = False, main_exiting: Any = None) -> None:
        self.lower_priority = lower_priority
        self.main_exiting = main_exiting  # a pipe, in the copy a spawned worker receives (`_reduce_for_a_spawned_worker`)

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # litdata hands out its chunks' read-only memory as tensors, and torch warns once per worker that they could
        # be written to: lit_lora only reads them (crops and batches are copies). Filtered here, in the worker: the
        # caller's process keeps its own filters.
        warnings.filterwarnings("ignore", message=READ_ONLY_CHUNK_WARNING, category=UserWarning)
        if self.main_exiting is not None:
            signal.signal(signal.SIGTERM, functools.partial(_exit_if_main_exiting, self.main_exiting))
        elif hasattr(signal, "sigwaitinfo"):
            # Blocked in this thread, and so in every thread started from now on: the thread below takes them all.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="lit_lora: SIGTERM", daemon=True).start()
        if self.lower_priority:
            os.nice(10)


def _main_exit() -> Any:
    """The reading end of a pipe whose only writing end this process closes when its interpreter exits: from then on
    it reads as ready. Made at the first spawned worker (a forkserver's takes it too); closed by an `atexit` function
    registered after multiprocessing's (imported by then), so it runs first: before multiprocessing terminates the
    workers."""
    global _main_exit_reader
    if _main_exit_reader is None:
        _main_exit_reader, writer = multiprocessing.Pipe(duplex=False)
        atexit.register(writer.close)
    return _main_exit_reader


def _reduce_for_a_spawned_worker(start: WorkerStart) -> tuple[Any, tuple[bool, Any]]:
    """How multiprocessing pickles a `WorkerStart` for a worker it spawns (a forked one shares the object): with the
    pipe. Other pickling (``copy``, ``pickle``) leaves it out, as a pipe can only go to a process being started."""
    return WorkerStart, (start.lower_priority, _main_exit())


ForkingPickler.register(WorkerStart, _reduce_for_a_spawned_worker)


def _exit_if_main_exiting(main_exiting: Any, signum: int, frame: Any) -> None:
    """A spawned worker's SIGTERM handler: end the worker if the main process is exiting, else ignore the signal.

    The pipe is polled, without a lock: a handler that waited for one could wait forever (a second SIGTERM, handled
    while the first one held it). Not a multiprocessing ``Event`` waited on by a thread either: with that, a CLI fit
    under spawn hung at exit (seemingly because a worker that ended while waiting stays counted as a sleeper, and
    the main process's ``set`` waits for every sleeper to wake).
    """
    if main_exiting.poll():
        os._exit(0)  # status 0: torch's check in the main process takes any other end for a crash


def _exit_on_sigterm_from(parent: int) -> None:
    """Wait for SIGTERMs (blocked in this worker); end the worker at the first one its parent, the main process, sent."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)  # status 0: torch's check in the main process takes any other end for a crash
