"""What `LoRAImageClassifier` puts into a checkpoint beside its trainable weights, and how it reads it back:
the layout check, the random states, the gradients of an unfinished accumulation window, and the loop state of a
checkpoint that Lightning would resume at the wrong place."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

# Hyperparameters that fix the shape of the trainable weights: a checkpoint only loads where they agree.
LAYOUT_HPARAMS = ("model_name_or_path", "class_names", "r", "target_modules", "modules_to_save", "lora_options")


def _plain(value: Any) -> Any:
    """Compare lists and tuples alike (YAML gives lists, defaults are tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def layout_problem(
    saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], theirs: Mapping[str, Any], ours: Mapping[str, Any]
) -> str | None:
    """Why the saved trainable weights do not fit this model (the differing settings first), or None if they do."""
    mismatched = sorted(set(saved) ^ set(expected) | {k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape})
    differences = [
        f"{key}: checkpoint has {theirs.get(key)!r}, this model {ours.get(key)!r}"
        for key in LAYOUT_HPARAMS
        if key in theirs and _plain(theirs.get(key)) != _plain(ours.get(key))
    ]
    if not mismatched and not differences:
        return None
    return "; ".join(differences) if differences else f"{len(mismatched)} weights differ, e.g. {mismatched[:3]}"


def torch_rng_states() -> dict[str, Any]:
    """torch's CPU and CUDA random states (what dropout draws from), as tensors that ``weights_only`` loads."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_torch_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what `torch_rng_states` saved (CUDA states only where the device count matches)."""
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def mid_accumulation(batch_idx: int, accumulate_grad_batches: int, batches_per_epoch: int | float) -> bool:
    """Whether training batch ``batch_idx`` left gradients waiting for more batches before the optimizer steps
    (Lightning steps after every ``accumulate_grad_batches``-th batch and after an epoch's last)."""
    return (batch_idx + 1) % accumulate_grad_batches != 0 and batch_idx + 1 != batches_per_epoch


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients held by ``module``'s trainable parameters, by parameter name."""
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.requires_grad and p.grad is not None}


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gradients_to_save(module: torch.nn.Module, accumulate_grad_batches: int) -> dict[str, Any]:
    """The accumulated gradients of every process, for a checkpoint (a collective: every process calls it), and the
    window they belong to (``accumulate_grad_batches``).

    Under DDP the processes accumulate different gradients between optimizer steps (no all-reduce until the step),
    so each process's own are saved, in rank order."""
    own = {name: grad.cpu() for name, grad in gradients(module).items()}
    rank, world = _distributed()
    gathered: list[Any] = [own]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, own)
    return {"per_rank": gathered, "accumulate_grad_batches": accumulate_grad_batches}


def saved_gradients_for_this_process(saved: Mapping[str, Any], accumulate_grad_batches: int) -> dict[str, torch.Tensor]:
    """This process's share of what `gradients_to_save` wrote (or an older single-process checkpoint's gradients).

    Args:
        saved: the checkpoint's ``accumulated_gradients``.
        accumulate_grad_batches: this run's batches per optimizer step.

    Raises:
        ValueError: the checkpoint was saved inside an accumulation window by another number of processes, or with
            another number of batches per window (each batch's loss is divided by it: the window's step would weigh
            the saved and the new batches differently).
    """
    if "per_rank" not in saved:
        return dict(saved)
    rank, world = _distributed()
    per_rank = saved["per_rank"]
    window = int(saved.get("accumulate_grad_batches", accumulate_grad_batches))  # older checkpoints: unknown, taken as this run's
    if (len(per_rank), window) != (world, accumulate_grad_batches):
        raise ValueError(
            f"this checkpoint was saved inside a gradient-accumulation window, by {len(per_rank)} process(es) accumulating "
            f"{window} batches per optimizer step, and this run has {world} accumulating {accumulate_grad_batches}: the "
            f"partial gradients cannot be carried into another window. Resume with {len(per_rank)} process(es) and "
            f"trainer.accumulate_grad_batches {window}, or from a checkpoint written at the end of an epoch (epoch=*.ckpt)."
        )
    return dict(per_rank[rank])


def restore_gradients(module: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put saved gradients back, so the interrupted accumulation window continues where it stopped."""
    parameters = dict(module.named_parameters())
    for name, grad in saved.items():
        parameter = parameters[name]
        parameter.grad = grad.to(device=parameter.device, dtype=parameter.dtype)


def restart_validation_on_resume(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written while validation was interrupted resume by validating that epoch again from its
    first batch. As saved, its validation progress says "some batches done, none in flight", which Lightning
    reads as "validation finished" and skips, so "best" and ``adapter/`` would come from a different epoch than an
    uninterrupted run's. Rewound to "first batch started, not processed", Lightning runs the whole validation again
    (its own restart-mid-evaluation path). ``loops`` is the checkpoint's documented loop state. The epoch's totals
    count the batches of its earlier validations, those it completed: a validation interrupted again as a resumed run
    re-ran it left its first attempt's batch counted as started, and Lightning skipped it on the next resume."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
    if progress:
        _validation_begun(progress, done=progress["total"]["completed"] - progress["current"]["completed"])


def _validation_begun(progress: dict[str, Any], done: int) -> None:
    """Validation ``progress`` as Lightning leaves it when a validation has started its first batch, after ``done``
    batches of the epoch's earlier validations: what it resumes as "restarted mid-evaluation" (it validates again)."""
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["total"] = {"ready": done + 1, "started": done + 1, "processed": done, "completed": done}
    progress["is_last_batch"] = False


def resume_an_ended_epoch_exactly(checkpoint: dict[str, Any], batches_per_epoch: float) -> None:
    """Make a checkpoint written after Lightning ended an epoch (at its end, at the fit's end, or before its last batch:
    ``max_steps`` or ``max_time`` reached, a callback's ``should_stop``) resume where an uninterrupted run would go on,
    in any fit. ``loops`` is the checkpoint's documented loop state.

    - Ended before its last batch: as saved, Lightning resumes it as the next epoch but counts that epoch's batches on
      from the saved count (a fit continued with a larger ``max_steps`` trained the rest of the ended epoch's images
      under the next epoch's number, or skipped them). Rewound to "epoch started, not finished", Lightning continues the
      epoch (its own restart-mid-epoch path), as from a checkpoint written on SIGTERM.
    - Ended after its last batch: as saved, Lightning resumes a fit with ``max_steps`` (which it always treats as
      restarting) inside the ended epoch (its issue #19617): it runs that epoch's end again, or an epoch of no batches,
      and counts the later epochs one ahead (their logged numbers, ``check_val_every_n_epoch``'s choice, samplers'
      epochs). Moved on to "epoch completed, the next not begun", Lightning starts the next epoch.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or epochs["current"]["processed"] != epochs["current"]["started"]:
        return  # saved inside the epoch: Lightning resumes there itself (`validate_on_resume_after_a_batch`: where not)
    if not batches.get("is_last_batch") and batches["current"]["ready"] < batches_per_epoch:
        for part in ("current", "total"):
            epochs[part]["processed"] = epochs[part]["completed"] = epochs[part]["started"] - 1
        checkpoint["epoch"] = epochs["current"]["processed"]
        return
    for part in ("current", "total"):
        epochs[part]["completed"] = epochs[part]["processed"]
    batches["is_last_batch"] = False
    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress", "epoch_loop.automatic_optimization.optim_progress"):
        _zero_counts(loop.get(key), "current")  # as Lightning's epoch loop starts an epoch (its reset_on_run)
    _zero_counts(loop.get("epoch_loop.val_loop.batch_progress"), "total")  # validation batches count per epoch


def validate_on_resume_after_a_batch(checkpoint: dict[str, Any], trainer: Any) -> None:
    """Make a checkpoint written as a training batch ended (``on_train_batch_end``: ModelCheckpoint's
    ``every_n_train_steps``), of a batch that ``trainer`` validates after (the epoch's last, or one of
    ``val_check_interval``'s), resume with that validation. As saved, Lightning resumes it past that validation (it counts
    the batch done and goes on): its ``val/acc`` is never computed, and "best" is chosen without it. Written as "batch
    done, validation begun", as a checkpoint from the validation's first batch is, Lightning validates, then goes on.
    ``loops`` is the checkpoint's documented loop state."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or epochs["current"]["processed"] == epochs["current"]["started"]:
        return  # no batch of an epoch in progress
    if batches["total"]["processed"] != batches["total"]["completed"] + 1 or not _validates_after(trainer, batches):
        return  # not at a batch's end (Lightning counts the batch completed after on_train_batch_end), or no validation next
    for part in ("current", "total"):
        batches[part]["completed"] = batches[part]["processed"]
    validation = loop.get("epoch_loop.val_loop.batch_progress")
    if validation:
        _validation_begun(validation, done=validation["total"]["completed"])


def _validates_after(trainer: Any, batches: dict[str, Any]) -> bool:
    """Whether Lightning validates after the batch that ``batches`` (training batch progress) counts last, by its
    public settings: validation on, this epoch one of ``check_val_every_n_epoch``'s, and the batch one of
    ``val_check_interval``'s (in the epoch, or in the fit when no epoch is checked). A time-based interval: never known."""
    if not trainer.enable_validation or trainer.val_check_batch is None:  # None: validation by time
        return False
    every = trainer.check_val_every_n_epoch
    if every is not None and (trainer.current_epoch + 1) % every:
        return False
    if trainer.val_check_batch == float("inf"):  # a loader without a length: at the epoch's end
        return bool(batches.get("is_last_batch"))
    return batches["total" if every is None else "current"]["processed"] % trainer.val_check_batch == 0


def _zero_counts(progress: Any, part: str) -> None:
    """Set every counter of ``progress``'s ``part`` (``current``, ``total``) to 0, in nested progress too."""
    if isinstance(progress, dict):
        for key, value in progress.items():
            if key == part and isinstance(value, dict):
                progress[key] = {name: 0 for name in value}
            else:
                _zero_counts(value, part)


def check_readable_checkpoint(ckpt_path: str) -> None:
    """Fail in one line when ``ckpt_path`` is not a readable Lightning checkpoint (truncated, foreign)."""
    try:
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, AttributeError) as err:
        raise ValueError(
            f"ckpt_path {ckpt_path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "It may be truncated (a copy still in progress?) or not a Lightning .ckpt; use last.ckpt or the "
            "best epoch=*.ckpt of a run, or an adapter folder."
        ) from err
