"""`ReuseHostMemory`: large host tensors come from malloc's heap while a CPU trainer runs, and from mmap again after."""

from __future__ import annotations

import ctypes

import lightning.pytorch as pl
import pytest
import torch

from lit_lora import host_memory
from lit_lora.host_memory import ReuseHostMemory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="malloc settings exist on glibc only")

BIG = 1 << 30  # far above glibc's largest mmap threshold (32 MB) and any free block of the heap; never touched, so never resident


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_for_big_tensor() -> int:
    """Bytes malloc holds in mmapped blocks while a BIG-byte CPU tensor is alive, minus those before it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(BIG, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del tensor
    return during - before


def test_cpu_trainers_take_big_tensors_from_the_heap_until_teardown() -> None:
    assert mmapped_for_big_tensor() >= BIG  # glibc's default
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    callback = ReuseHostMemory()
    callback.setup(trainer, None, "fit")
    try:
        assert callback._applied
        assert mmapped_for_big_tensor() == 0
    finally:
        callback.teardown(trainer, None, "fit")
    assert mmapped_for_big_tensor() >= BIG  # defaults restored


def test_nothing_changes_when_disabled_or_not_on_cpus() -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    disabled = ReuseHostMemory(enabled=False)
    disabled.setup(trainer, None, "fit")
    assert not disabled._applied and mmapped_for_big_tensor() >= BIG

    class NotCPU:
        accelerator = object()

    elsewhere = ReuseHostMemory()
    elsewhere.setup(NotCPU(), None, "fit")
    assert not elsewhere._applied and mmapped_for_big_tensor() >= BIG
