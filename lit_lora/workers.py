"""What every loader worker process does first (`WorkerStart`): leave stopping to the main process, let what it is still
sending go out before it ends, and yield the cores to the model's threads when it computes on the CPU.

Light on purpose: a worker started with spawn or forkserver imports this module, and the data it reads, but not
Lightning, Transformers or litdata (which creates a semaphore when imported that a worker killed by SIGTERM leaves
behind, and Python then warns about at exit).
"""

from __future__ import annotations

import atexit
import functools
import mmap
import multiprocessing
import os
import signal
import threading
import time
import warnings
from multiprocessing.reduction import ForkingPickler
from typing import Any

from lit_lora.console import READ_ONLY_CHUNK_WARNING


class WorkerStart:
    """A loader's ``worker_init_fn``: leave stopping to the main process and, with ``lower_priority``, run at a lower
    CPU priority (nice 10).

    A scheduler's SIGTERM (SLURM signals every process of a job step) and a terminal's Ctrl-C reach the loader workers
    too. torch's workers die of them, and the main process then fails with "DataLoader worker ... is killed by
    signal" (exit 1), perhaps before it saved ``last.ckpt``. Workers ignore Ctrl-C, and a scheduler's SIGTERM: the
    main process stops after the batch and shuts them down (a worker also exits when its main process is gone, and
    SIGKILL still ends it). Yet they end when the main process's interpreter exits: Python's exit sends a SIGTERM to
    each worker still running (a script or notebook that keeps a loader with persistent workers), then waits for it.

    How: a worker's SIGTERM handler ends it only once the main process is exiting, which the main process announces
    as its interpreter exits, before multiprocessing terminates the workers: in a byte of memory it shares with the
    workers it forks (Linux's default before Python 3.14), and by closing a pipe whose reading end goes to each worker
    it spawns (macOS's default, Linux's from 3.14, and forkserver). Not a thread that waits for the signal and reads
    who sent it, as before: a thread that a forked worker starts before its ``worker_init_fn`` runs (one finishing
    a loader that the collector found in the copy of the main process's memory) takes the SIGTERM instead and drops
    it, and the main process waits for that worker forever.

    A spawned worker (macOS's default start method) ends with Python's full exit, which ends its daemon threads where
    they stand, and torch's worker does not wait for its queue's sending thread. Stopped while batches were still
    being sent (a fit stopped mid-epoch: SIGTERM, Ctrl-C, ``max_steps``), that thread was ended mid-call, the
    worker died of SIGABRT ("terminate called without an active exception") and the main process failed
    with "DataLoader worker ... is killed by signal: Aborted" (exit 1). So a worker lets that thread finish first
    (`_finish_sending`, at exit; forked workers end without it).

    When the model computes on the same cores, its threads wait for each other after every operation, so a worker
    that preempts one of them stalls all of them; at lower priority the workers fill the cores' idle moments
    instead (measured on 2 cores with pre-resized images: about 9% more training images/s).
    """

    def __init__(self, lower_priority: bool = False, main_exiting: Any = None) -> None:
        self.lower_priority = lower_priority
        # Anything with poll(): this process's `MainExiting` for forked workers, a pipe in the copy a spawned worker
        # receives (`_reduce_for_a_spawned_worker`).
        self.main_exiting = main_exiting if main_exiting is not None else MainExiting.of_this_process()

    def __getstate__(self) -> dict[str, Any]:
        return {"lower_priority": self.lower_priority, "main_exiting": None}  # copied or pickled: no process to signal

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # litdata hands out its chunks' read-only memory as tensors, and torch warns once per worker that they could
        # be written to: lit_lora only reads them (crops and batches are copies). Filtered here, in the worker: the
        # caller's process keeps its own filters.
        warnings.filterwarnings("ignore", message=READ_ONLY_CHUNK_WARNING, category=UserWarning)
        if self.main_exiting is not None:
            signal.signal(signal.SIGTERM, functools.partial(_exit_if_main_exiting, self.main_exiting))
        atexit.register(_finish_sending)
        if self.lower_priority:
            os.nice(10)


class MainExiting:
    """This process's word to its loader workers that its interpreter is exiting, given by an `atexit` function
    registered after multiprocessing's, so that it runs first: before multiprocessing terminates the workers. Forked
    workers read a byte of memory this process shares with them; spawned ones (and a forkserver's) a pipe whose only
    writing end this process then closes, so that it reads as ready."""

    _of_this_process: MainExiting | None = None

    def __init__(self) -> None:
        import multiprocessing.util  # noqa: F401  # registers the exit function that terminates workers, if not yet: before ours

        self.pid = os.getpid()
        self._byte = mmap.mmap(-1, 1)  # anonymous and shared: a forked worker reads what this process writes
        self._pipe: tuple[Any, Any] | None = None  # (reader, writer), made at the first spawned worker
        atexit.register(self._set)

    @classmethod
    def of_this_process(cls) -> MainExiting:
        """This process's (made at the first call in each process)."""
        if cls._of_this_process is None or cls._of_this_process.pid != os.getpid():
            cls._of_this_process = cls()
        return cls._of_this_process

    def reader(self) -> Any:
        """What a spawned worker polls instead: the reading end of the pipe."""
        if self._pipe is None:
            self._pipe = multiprocessing.Pipe(duplex=False)
        return self._pipe[0]

    def _set(self) -> None:
        if os.getpid() == self.pid:  # not in a forked copy of this process that exits through atexit
            self._byte[0] = 1
            if self._pipe is not None:
                self._pipe[1].close()

    def poll(self) -> bool:
        """Whether the process that made this is exiting."""
        return self._byte[0] == 1


def _reduce_for_a_spawned_worker(start: WorkerStart) -> tuple[Any, tuple[bool, Any]]:
    """How multiprocessing pickles a `WorkerStart` for a worker it spawns (a forked one shares the object): with the
    pipe. Other pickling (``copy``, ``pickle``) leaves it out, as a pipe can only go to a process being started."""
    return WorkerStart, (start.lower_priority, MainExiting.of_this_process().reader())


ForkingPickler.register(WorkerStart, _reduce_for_a_spawned_worker)


SENDING_WAIT_S = 4.0  # under the 5 s that torch's main process waits for each worker it shuts down before terminating it


def _finish_sending() -> None:
    """At a worker's exit: wait (at most `SENDING_WAIT_S`) for its queue's sending thread to finish, so that Python's
    exit does not end that thread mid-call (SIGABRT, see `WorkerStart`).

    Measured on 2 cores (``benchmarks/worker_shutdown.py --rounds 30``: 4 spawned workers shut down mid-epoch, 16
    images of 512 px per batch): a worker ended abnormally in 7 of 15 shutdowns with torch's plain workers, in none of
    15 with `WorkerStart` (alternating, one run). The thread is found by the name multiprocessing gives it: torch's
    worker does not hand its queue to ``worker_init_fn``.
    """
    deadline = time.monotonic() + SENDING_WAIT_S
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _exit_if_main_exiting(main_exiting: Any, signum: int, frame: Any) -> None:
    """A worker's SIGTERM handler: end the worker if the main process is exiting, else ignore the signal.

    Polled, without a lock: a handler that waited for one could wait forever (a second SIGTERM, handled while the
    first one held it). Not a multiprocessing ``Event`` waited on by a thread either: with that, a CLI fit under spawn
    hung at exit (seemingly because a worker that ended while waiting stays counted as a sleeper, and the main
    process's ``set`` waits for every sleeper to wake).
    """
    if main_exiting.poll():
        os._exit(0)  # status 0: torch's check in the main process takes any other end for a crash
