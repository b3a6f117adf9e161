"""Learning-rate schedules: every ``transformers.get_scheduler`` schedule that Lightning can step, checked up front."""

from __future__ import annotations

import math
from typing import Any

import torch

# Schedules that need options beyond warmup and length: at least one name of each group in lr_scheduler_kwargs.
REQUIRED_OPTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "cosine_with_min_lr": (("min_lr", "min_lr_rate"),),
    "cosine_warmup_with_min_lr": (("min_lr", "min_lr_rate"),),
    "warmup_stable_decay": (("num_decay_steps",),),
}
# transformers schedules that Lightning cannot step: their step() wants a metric and they are not a
# `ReduceLROnPlateau`, the one metric-driven scheduler Lightning feeds.
UNSUPPORTED = {"greedy": "it needs a metric at every step and Lightning steps only ReduceLROnPlateau with one"}
# What `reduce_lr_on_plateau` watches, once per epoch, after validation.
PLATEAU_MONITOR = "val/loss"


def scheduler_names() -> list[str]:
    """The ``transformers.SchedulerType`` names lit_lora accepts."""
    from transformers import SchedulerType

    return [t.value for t in SchedulerType if t.value not in UNSUPPORTED]


def scheduler_problems(name: str, options: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """What is wrong with a schedule name and its options (empty when it will build), each naming its setting."""
    if name in UNSUPPORTED:
        return [f"{prefix}lr_scheduler_type {name!r} is not supported: {UNSUPPORTED[name]}. Use one of {scheduler_names()}"]
    if name not in scheduler_names():
        return [f"{prefix}lr_scheduler_type {name!r} is not a transformers schedule; use one of {scheduler_names()}"]
    given = set(options or {})
    return [
        f"{prefix}lr_scheduler_type {name!r} needs {' or '.join(group)} in {prefix}lr_scheduler_kwargs"
        for group in REQUIRED_OPTIONS.get(name, ())
        if not given & set(group)
    ]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config for ``transformers.get_scheduler(name)``: stepped every optimizer step,
    or, for ``reduce_lr_on_plateau``, every epoch on ``val/loss``.

    Args:
        optimizer: the optimizer to schedule.
        name: a ``transformers.SchedulerType`` name.
        total_steps: optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        warmup_steps: steps of linear warmup; takes precedence over ``warmup_ratio``.
        warmup_ratio: warmup as a share of ``total_steps``.
        options: the schedule's own options (``scheduler_specific_kwargs``), e.g. ``{min_lr_rate: 0.1}``.

    Raises:
        ValueError: see `scheduler_problems`.
    """
    from transformers import get_scheduler

    problems = scheduler_problems(name, options)
    if problems:
        raise ValueError("; ".join(problems) + ".")
    warmup = warmup_steps or math.ceil(warmup_ratio * total_steps)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=dict(options or {})
    )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return {"scheduler": scheduler, "interval": "epoch", "monitor": PLATEAU_MONITOR}
    return {"scheduler": scheduler, "interval": "step"}
