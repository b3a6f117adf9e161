"""Learning-rate schedules: every ``transformers.get_scheduler`` schedule that Lightning can step, checked up front."""

from __future__ import annotations

import math
from collections.abc import Callable
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
# Schedules that follow no fit length (transformers asks them for no num_training_steps): the ones an endless fit
# (trainer.max_epochs=-1 with no max_steps) can use, with warmup_steps rather than warmup_ratio.
WITHOUT_LENGTH = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")


def scheduler_names() -> list[str]:
    """The ``transformers.SchedulerType`` names lit_lora accepts."""
    from transformers import SchedulerType

    return [t.value for t in SchedulerType if t.value not in UNSUPPORTED]


def scheduler_problems(
    name: str, options: dict[str, Any] | None, prefix: str = "", endless: bool = False, warmup_steps: int = 0, warmup_ratio: float = 0.0
) -> list[str]:
    """What is wrong with a schedule name and its options (empty when it will build), each naming its setting;
    ``endless``: for a fit without a length, with these warmup settings (see `needs_length`)."""
    if name in UNSUPPORTED:
        return [f"{prefix}lr_scheduler_type {name!r} is not supported: {UNSUPPORTED[name]}. Use one of {scheduler_names()}"]
    if name not in scheduler_names():
        return [f"{prefix}lr_scheduler_type {name!r} is not a transformers schedule; use one of {scheduler_names()}"]
    given = set(options or {})
    problems = [
        f"{prefix}lr_scheduler_type {name!r} needs {' or '.join(group)} in {prefix}lr_scheduler_kwargs"
        for group in REQUIRED_OPTIONS.get(name, ())
        if not given & set(group)
    ]
    return problems + ([length_problem(name, prefix)] if endless and needs_length(name, warmup_steps, warmup_ratio) else [])


def needs_length(name: str, warmup_steps: int, warmup_ratio: float) -> bool:
    """Whether schedule ``name`` with this warmup follows the fit's length (a warmup_ratio is a share of it)."""
    return name not in WITHOUT_LENGTH or bool(warmup_ratio and not warmup_steps)


def length_problem(name: str, prefix: str = "") -> str:
    """Why schedule ``name`` (or a warmup_ratio) cannot run in a fit without a length."""
    return (
        f"{prefix}lr_scheduler_type {name!r} (or a {prefix}warmup_ratio) needs the fit's length in optimizer steps, and a fit with "
        f"trainer.max_epochs=-1 and no trainer.max_steps has none: set either, or use one of {list(WITHOUT_LENGTH)} with {prefix}warmup_steps"
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config for ``transformers.get_scheduler(name)``: stepped every optimizer step (a
    `ScheduleOfAFit`, whose length is set when training starts), or, for ``reduce_lr_on_plateau``, every epoch on
    ``val/loss``.

    Args:
        optimizer: the optimizer to schedule.
        name: a ``transformers.SchedulerType`` name.
        warmup_steps: steps of linear warmup; takes precedence over ``warmup_ratio``.
        warmup_ratio: warmup as a share of the fit's optimizer steps.
        options: the schedule's own options (``scheduler_specific_kwargs``), e.g. ``{min_lr_rate: 0.1}``.

    Raises:
        ValueError: see `scheduler_problems`.
    """
    from transformers import get_scheduler

    problems = scheduler_problems(name, options)
    if problems:
        raise ValueError("; ".join(problems) + ".")
    if name == "reduce_lr_on_plateau":
        scheduler = get_scheduler(name, optimizer, scheduler_specific_kwargs=dict(options or {}))
        return {"scheduler": scheduler, "interval": "epoch", "monitor": PLATEAU_MONITOR}
    return {"scheduler": ScheduleOfAFit(optimizer, name, warmup_steps, warmup_ratio, options), "interval": "step"}


class ScheduleOfAFit(torch.optim.lr_scheduler.LambdaLR):
    """``transformers.get_scheduler(name)``'s schedule over a fit whose length, its optimizer steps, is set by `start`.

    The length is ``trainer.estimated_stepping_batches``. Read in ``configure_optimizers``, it makes Lightning build
    the training loader before it restores a checkpoint, and Lightning then drops the loader's saved position (its
    issue #20550): a resumed epoch would start again from its first batch. Read in ``on_train_start``, the loader
    exists, restored by Lightning. Until `start` the factor is 1 (no optimizer step comes before it; a step raises).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, name: str, warmup_steps: int = 0, warmup_ratio: float = 0.0, options: dict[str, Any] | None = None
    ) -> None:
        self.total_steps: float | None = None
        # A plain function holds the settings: LambdaLR leaves functions out of its state_dict, so a checkpoint carries
        # none, and a resumed fit's schedule is built from its own configuration, as the optimizer is.
        factor = _transformers_factor(lambda: self.total_steps, optimizer.defaults["lr"], name, warmup_steps, warmup_ratio, options)
        super().__init__(optimizer, factor)

    def start(self, total_steps: float) -> None:
        """Set the length (``inf`` for an endless fit), and the learning rate of the step the schedule is at (0, or a
        resumed fit's).

        Raises:
            ValueError: the schedule needs a length and the fit has none (`length_problem`).
        """
        self.total_steps = total_steps
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.lr_lambdas[0](self.last_epoch)


def _transformers_factor(
    total_steps: Callable[[], float | None], lr: float, name: str, warmup_steps: int, warmup_ratio: float, options: dict[str, Any] | None
) -> Callable[[int], float]:
    """The learning-rate factor at a step: transformers' function for these settings and ``total_steps()``."""
    built: dict[float, Callable[[int], float]] = {}

    def factor(step: int) -> float:
        total = total_steps()
        if total is None:
            if step > 0:
                raise RuntimeError("the learning-rate schedule was stepped before its start(): an on_train_start that overrides LoRAImageClassifier's must call super().on_train_start().")
            return 1.0
        if total not in built:
            from transformers import get_scheduler

            endless = not math.isfinite(total) or total < 1  # max_epochs=-1 (inf), or a loader without a length (-1)
            if endless and needs_length(name, warmup_steps, warmup_ratio):
                raise ValueError(length_problem(name) + ".")
            warmup = warmup_steps or (0 if endless else math.ceil(warmup_ratio * total))
            # get_scheduler sets its optimizer's rates: not the real one's. Same lr: the polynomial schedule's depends on it.
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
            steps = None if endless else int(total)
            built[total] = get_scheduler(name, probe, warmup, steps, scheduler_specific_kwargs=dict(options or {})).lr_lambdas[0]
        return built[total](step)

    return factor
