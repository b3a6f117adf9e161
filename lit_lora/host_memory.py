"""`ReuseHostMemory`: keep freed host memory for reuse while a model computes on CPUs (glibc malloc settings).

A training step on CPUs allocates and frees tensors of tens of MB every time: a batch of 128 images at 224 px is
77 MB as float32, ViT attention weights are 40 MB per layer. glibc's malloc serves every allocation above its
mmap threshold (at most 32 MB) with fresh pages from the kernel and unmaps them on free, so each step pays for
zero-filling those pages again (a page fault per 4 KB). Turning off mmap for allocations and the trimming of
the heap keeps freed blocks in the process. Measured on 2 cores with the small ViT of ``benchmarks/compare.py``
(fp32, batch 128): a bare training step 250 -> 218 ms; a whole epoch of ``fit`` from the image cache 1-3% less
wall time (page faults 0.70 -> 0.27 million), as loading and validation take their share. PyTorch's CPU
performance guides reach the same by preloading jemalloc or tcmalloc; this needs no library and no restart.
"""

from __future__ import annotations

import ctypes
import platform

import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator

# mallopt parameters (malloc.h) and glibc's defaults for them.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep what is freed there for reuse.

    Returns:
        whether the settings were applied (False where the C library is not glibc: nothing changes).
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def release_freed_memory() -> bool:
    """Undo `keep_freed_memory`: glibc's default limits again, and the free memory kept so far handed back.

    (Setting any of these limits stops glibc from moving its mmap threshold by itself; it stays where it was.)
    """
    libc = _glibc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD))
    libc.malloc_trim(0)
    return applied


class ReuseHostMemory(pl.Callback):
    """While the trainer computes on CPUs, keep freed host memory in the process instead of returning it to the
    kernel after every large tensor (see the module's docstring for why and how much). Nothing changes on GPUs,
    or where the C library is not glibc; the defaults come back when the trainer is done (``teardown``)."""

    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: apply the setting when the model runs on CPUs (set false to keep glibc's defaults).
        """
        self.enabled = enabled
        self._applied = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled and isinstance(trainer.accelerator, CPUAccelerator):
            self._applied = keep_freed_memory()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._applied:
            release_freed_memory()
            self._applied = False
