"""`LoRAImageClassifier`: a transformers image classifier with LoRA adapters, as a LightningModule."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from lit_lora import demo, log
from lit_lora.checkpoint_contents import (
    gradients_to_save,
    layout_problem,
    mid_accumulation,
    restart_validation_on_resume,
    restore_gradients,
    resume_an_ended_epoch_exactly,
    saved_gradients_for_this_process,
    set_torch_rng_states,
    torch_rng_states,
    validate_on_resume_after_a_batch,
)
from lit_lora.lora import apply_lora, trainable_summary
from lit_lora.schedules import ScheduleOfAFit, build_scheduler, scheduler_problems
from lit_lora.transforms import ImageSettings, float_pixels_problem, load_image_settings, normalize


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _expected_load_report_dropped() -> Iterator[None]:
    """Leave out transformers' load report while lit_lora loads a base model: it lists the classifier head that
    lit_lora replaces on purpose (MISSING, or MISMATCH for a base with its own head), which is expected, on every
    construction and every ``load_from_checkpoint``. Only this call's report is dropped (a filter on transformers'
    own logger, removed at once); errors still raise."""
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def load_base_model(model_name_or_path: str, class_names: Sequence[str]) -> torch.nn.Module:
    """Load a transformers image classifier with a fresh head for ``class_names`` (the guide's call).

    Raises:
        ValueError: the model cannot be found, or is not an image classifier.
    """
    from transformers import AutoModelForImageClassification

    label2id = {name: i for i, name in enumerate(class_names)}
    try:
        with _expected_load_report_dropped():
            return AutoModelForImageClassification.from_pretrained(
                demo.resolve(model_name_or_path),
                num_labels=len(class_names),
                label2id=label2id,
                id2label={i: name for name, i in label2id.items()},
                ignore_mismatched_sizes=True,
            )
    except OSError as err:
        raise ValueError(
            f"model {model_name_or_path!r} could not be loaded: {err}. Use a hub id that is in the local cache "
            "(offline) or a folder written by save_pretrained (config.json + model.safetensors)."
        ) from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err) or "AutoModelForImageClassification" in str(err):
            raise ValueError(
                f"model {model_name_or_path!r} is not an image classifier that AutoModelForImageClassification "
                f"can load ({err.args[0].splitlines()[0]}). Use e.g. a ViT, DeiT, Swin or DINOv2 checkpoint."
            ) from err
        raise


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """``(pixel_values, labels, extras)`` of a batch in any form `LoRAImageClassifier` takes.

    Takes a mapping with ``pixel_values`` (and ``labels``, or ``label`` as `datasets` names its class column; ``index``
    and ``path`` are passed through as extras), as `ImageClassificationDataModule` and transformers' collators give, or
    a tuple/list ``(pixel_values, labels)`` as torchvision's ``ImageFolder`` gives.

    Raises:
        TypeError: the batch is neither, saying what it got and what is taken.
    """
    if isinstance(batch, Mapping) and isinstance(batch.get("pixel_values"), torch.Tensor):
        extras = {key: batch[key] for key in ("index", "path") if key in batch}
        labels = batch["labels"] if "labels" in batch else batch.get("label")  # `datasets`' ClassLabel column is "label"
        return batch["pixel_values"], labels, extras
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) == 2 else None), {}
    raise TypeError(
        f"LoRAImageClassifier got {_described(batch)} as a batch; it takes a dict with 'pixel_values' (N, 3, H, W: uint8 0-255, or "
        "floats normalised by the image processor) and 'labels' (N, int), or a tuple (pixel_values, labels)."
    )


def _described(batch: Any) -> str:
    """What a batch is, for an error: its keys, or its length and item types."""
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} ({', '.join(type(item).__name__ for item in batch[:4])})"
    return f"a {type(batch).__name__}"


class LoRAImageClassifier(pl.LightningModule):
    """Fine-tune a transformers image classifier with LoRA: only the adapters and the head are trained.

    Batches (any of these, from any loader):

    - a dict: ``pixel_values`` (N, 3, H, W) as uint8 0-255 (normalised here, on the device, with the image
      processor's mean and std) or as floats already normalised (the image processor's own output); ``labels`` (or
      ``label``, `datasets`' column name) (N,) class ids, or (N, classes) class probabilities as torchvision's
      ``MixUp`` and ``CutMix`` give (the loss takes them, the accuracies count the most likely class); optionally
      ``index`` and ``path``, which ``predict`` hands back with the probabilities;
    - a tuple or list ``(pixel_values, labels)``, as torchvision's ``ImageFolder`` yields (``labels`` may be left
      out for ``predict``).

    Anything else stops at the first batch with a `TypeError` that says what it got. Each stage's first batch is
    checked: float pixels that cannot be normalised (0-255 floats) and class ids outside ``class_names`` stop with a
    `ValueError`; floats all in [0, 1] (torchvision's ``ToTensor``, not normalised) are warned about. H and W are the
    processor's crop size (``image_settings.crop``). ``predict_step`` returns ``{"probs": (N, classes)}`` plus the
    batch's ``index``/``path``.

    Example::

        import lightning as L
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        model = LoRAImageClassifier("google/vit-base-patch16-224-in21k", class_names=["pizza", "sushi"])
        to_uint8 = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.PILToTensor()])
        loader = DataLoader(datasets.ImageFolder("photos/train", transform=to_uint8), batch_size=32, shuffle=True)
        L.Trainer(max_epochs=3).fit(model, loader)
    """

    def __init__(
        self,
        model_name_or_path: str = "google/vit-base-patch16-224-in21k",
        class_names: list[str] | None = None,
        r: int = 16,
        lora_alpha: int = 16,
        target_modules: list[str] | str = ("query", "value"),
        lora_dropout: float = 0.1,
        bias: Literal["none", "all", "lora_only"] = "none",
        modules_to_save: list[str] | None = ("classifier",),
        lora_options: dict[str, Any] | None = None,
        learning_rate: float = 5e-3,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        lr_scheduler_type: str = "linear",
        lr_scheduler_kwargs: dict[str, Any] | None = None,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        compile: bool = False,
    ) -> None:
        """Build the model: load the base classifier, add LoRA, freeze everything else.

        The model takes images as ``pixel_values`` of shape (N, 3, H, W), either uint8 (0-255, resized and cropped,
        as `Food101DataModule` hands them over: normalised here with the image processor's mean and std, on the
        device) or float (already rescaled and normalised, as the image processor's own output is). H and W are
        the processor's crop size (``image_settings.crop``).

        Args:
            model_name_or_path: hub id or local folder of an ``AutoModelForImageClassification`` checkpoint.
            class_names: label names, index = label id. The CLI links them from the data module.
            r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = lora_alpha / r).
            target_modules: layers that get adapters. The guide's ``query``/``value`` are mapped to what the
                architecture calls them (``q_proj``/``v_proj`` in transformers 5); a string is a regex.
            lora_dropout: dropout on the adapter input.
            bias: which biases train: ``none``, ``all`` or ``lora_only``.
            modules_to_save: modules trained in full and saved with the adapter (the new classifier head).
            lora_options: any other ``peft.LoraConfig`` option, e.g. ``{use_dora: true}`` or ``{use_rslora: true}``.
            learning_rate: AdamW peak learning rate.
            weight_decay: AdamW weight decay, applied to weight matrices only (not biases or norms).
            adam_betas: AdamW betas.
            adam_epsilon: AdamW epsilon.
            lr_scheduler_type: a ``transformers.get_scheduler`` name: ``linear`` (the guide's), ``cosine``,
                ``constant``, ``constant_with_warmup``, ``reduce_lr_on_plateau`` (on ``val/loss``, each epoch), ...
                (all but ``greedy``; a wrong name is refused with the list).
            lr_scheduler_kwargs: the schedule's own options, e.g. ``{min_lr_rate: 0.1}`` for ``cosine_with_min_lr``.
            warmup_steps: optimizer steps of linear warmup (takes precedence over ``warmup_ratio``).
            warmup_ratio: warmup as a share of all optimizer steps.
            compile: compile the model with ``torch.compile`` (in place: checkpoints keep their keys). Pays off
                on a GPU for long runs; the first steps are slower while it compiles.
        """
        super().__init__()
        if not class_names or len(class_names) < 2:
            raise ValueError(
                "LoRAImageClassifier needs class_names (at least 2); the CLI links them from the data module, "
                "in Python pass class_names=datamodule.class_names."
            )
        problems = scheduler_problems(lr_scheduler_type, lr_scheduler_kwargs)
        if problems:
            raise ValueError("; ".join(problems) + ".")
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.model = apply_lora(
            load_base_model(model_name_or_path, self.class_names),
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
            lora_dropout=lora_dropout,
            bias=bias,
            modules_to_save=list(modules_to_save) if modules_to_save else None,
            options=lora_options,
        )
        self.model.train()  # from_pretrained returns eval mode; train like the guide's Trainer does
        # What the model expects of its input, from its image processor: the data module resizes and crops to it,
        # the model normalises with it, exports carry it (a processor that reproduces the evaluation transform).
        self.image_settings: ImageSettings = load_image_settings(demo.resolve(model_name_or_path))
        self.register_buffer("pixel_mean", torch.tensor(self.image_settings.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.image_settings.std, dtype=torch.float32), persistent=False)
        if compile:
            self.model.compile()
        self._first_batch_checked: set[str] = set()  # stages whose first batch was checked (`_unpack`)
        # Checkpoints hold the trainable weights only; the frozen base is rebuilt from model_name_or_path.
        self.strict_loading = False
        num_classes = len(self.class_names)
        metrics = MetricCollection(
            {
                # The guide's accuracy (``evaluate.load("accuracy")``): correct images / images. torchmetrics'
                # default is the macro average over classes, which is another number.
                "acc": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
                "acc_top5": MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro"),
                "acc_macro": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="macro"),
            },
            # Not shared: with compute groups, top-1 and top-5 accuracy could end up sharing one state.
            compute_groups=False,
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # For the evaluation report (per-class metrics, confusion matrix); reduced across processes like the rest.
        self.val_confusion = MulticlassConfusionMatrix(num_classes=num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes=num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits for images of shape (N, 3, H, W): uint8 pixels (normalised here) or normalised floats."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values, self.pixel_mean, self.pixel_std)
        return self.model(pixel_values=pixel_values).logits

    def on_fit_start(self) -> None:
        log.info(f"[lit_lora] {trainable_summary(self.model)}")

    def _unpack(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
        """``(pixel_values, labels, class_ids, extras)`` of a batch (`unpack_batch`): ``class_ids`` are the labels' classes
        (`_class_ids`), None for ``predict``, which needs no labels. Each stage's first batch is checked (one device sync
        a stage): float pixels must be normalised (`transforms.float_pixels_problem`: an error for 0-255 floats, a warning
        for ToTensor's [0, 1]), class ids must be this model's (on a GPU an id out of range is a device-side assert with
        no message)."""
        pixel_values, labels, extras = unpack_batch(batch)
        class_ids = None
        if stage != "predict":
            if labels is None:
                raise TypeError(
                    f"LoRAImageClassifier needs labels to {'train' if stage == 'fit' else stage} and got {_described(batch)}: give batches "
                    "as {'pixel_values', 'labels'} or (pixel_values, labels)."
                )
            class_ids = self._class_ids(labels, stage)
        if stage in self._first_batch_checked:
            return pixel_values, labels, class_ids, extras
        self._first_batch_checked.add(stage)
        problem = float_pixels_problem(pixel_values, self.image_settings.mean, self.image_settings.std) if pixel_values.is_floating_point() else None
        if problem and problem[1]:
            raise ValueError(f"LoRAImageClassifier ({stage}): {problem[0]}.")
        if problem:
            rank_zero_warn(f"LoRAImageClassifier ({stage}): {problem[0]}; stock tools given this model's adapter would normalise.")
        if class_ids is not None and class_ids.numel():
            low, high = (int(v) for v in torch.aminmax(class_ids))
            if low < 0 or high >= len(self.class_names):
                raise ValueError(
                    f"LoRAImageClassifier ({stage}): the first batch's labels run from {low} to {high}, and this model has {len(self.class_names)} "
                    f"classes: labels must be class ids 0 to {len(self.class_names) - 1}, in the order of class_names ({self.class_names[:3]}...)."
                )
        return pixel_values, labels, class_ids, extras

    def _class_ids(self, labels: torch.Tensor, stage: str) -> torch.Tensor:
        """The class ids of ``labels``: class ids (N,) as they are, or of class probabilities (N, classes) as torchvision's
        ``MixUp``/``CutMix`` give, the most likely class (for the accuracies; the loss takes the probabilities)."""
        if labels.ndim == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
            return labels
        if labels.ndim == 2 and labels.is_floating_point() and labels.shape[1] == len(self.class_names):
            return labels.argmax(dim=-1)
        raise TypeError(
            f"LoRAImageClassifier ({stage}) got labels of shape {tuple(labels.shape)} and dtype {labels.dtype}; it takes class ids "
            f"(N,) of an integer dtype, or class probabilities (N, {len(self.class_names)}) as MixUp and CutMix give."
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pixel_values, labels, class_ids, _ = self._unpack(batch, "fit")
        logits = self(pixel_values)
        loss = F.cross_entropy(logits, labels)
        self.train_metrics.update(logits, class_ids)
        self.log("train/loss", loss)  # not on the progress bar: that would sync with the device every step
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        self._last_loss = (loss.detach(), batch_idx)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop on a NaN or infinite loss, once per optimizer step (one device sync, not one per batch)."""
        loss, batch_idx = getattr(self, "_last_loss", (None, 0))
        if loss is not None and not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at optimizer step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); training on it would only produce garbage. Likely causes: "
                f"a learning rate too high (learning_rate={self.hparams.learning_rate}: try a smaller one or warmup), "
                f"fp16 overflow (precision={self.trainer.precision}: try --trainer.precision bf16-mixed or 32-true), "
                "or broken input images. Resume from the last good checkpoint with --ckpt_path."
            )

    def _evaluate(self, batch: Any, metrics: MetricCollection, loss_metric: MeanMetric, stage: str) -> None:
        if isinstance(batch, Mapping) and "pixel_values" not in batch and "skipped" in batch:
            return  # the data module's batch whose every image was unreadable (listed in the skipped-images report)
        pixel_values, labels, class_ids, _ = self._unpack(batch, stage)
        logits = self(pixel_values)
        loss = F.cross_entropy(logits, labels)
        getattr(self, f"{stage}_confusion").update(logits.argmax(dim=-1), class_ids)
        loss_metric.update(loss, weight=class_ids.numel())
        metrics.update(logits, class_ids)
        self.log(f"{stage}/loss", loss_metric, prog_bar=True)
        self.log_dict(metrics, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_loss, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_loss, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        """``{"probs": (N, classes)}``, with the batch's ``index`` and ``path`` when it carries them."""
        if isinstance(batch, Mapping) and "pixel_values" not in batch and "skipped" in batch:
            return None  # every image of the data module's batch was unreadable
        pixel_values, _, _, extras = self._unpack(batch, "predict")
        return {"probs": self(pixel_values).float().softmax(dim=-1), **extras}

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters, with a per-step ``transformers`` schedule (linear decay by default),
        whose length is read when training starts (`ScheduleOfAFit`)."""
        hp = self.hparams
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=hp.learning_rate, betas=tuple(hp.adam_betas), eps=hp.adam_epsilon
        )
        schedule = build_scheduler(optimizer, hp.lr_scheduler_type, hp.warmup_steps, hp.warmup_ratio, hp.get("lr_scheduler_kwargs"))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ---- checkpoints: trainable weights only -------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load weights; the frozen base may be absent (checkpoints hold the trainable weights only, the base comes
        from ``model_name_or_path``), so only missing trainable weights count as missing: ``load_from_checkpoint``
        then has nothing to warn about."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        frozen_missing = [key for key in result.missing_keys if key not in trainable]
        for key in frozen_missing:
            result.missing_keys.remove(key)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return result

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (adapters and ``modules_to_save``), keyed as in ``state_dict()``."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in trainable}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._mid_window = mid_accumulation(batch_idx, self.trainer.accumulate_grad_batches, self.trainer.num_training_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trainable weights only (the frozen base is rebuilt from ``model_name_or_path``), with what an
        exact resume needs: the random states (LoRA dropout) and, when the run stops inside an accumulation window,
        the gradients accumulated so far (Lightning saves the loops, and a stateful training loader's state). A fit's
        checkpoint written while validating, before a validation, or after an epoch that stopped early, resumes where the run
        was (whichever callback writes it)."""
        trainable = self.trainable_state_dict().keys()
        # current_model_state: where Lightning's WeightAveraging callbacks (EMA) keep the weights being trained when they
        # put the averaged ones in state_dict; in full it would hold the frozen base too (330 MB for ViT-B/16), as would
        # StochasticWeightAveraging's average_model_state (it loads into a copy of this module, which takes them so).
        copies = [(checkpoint, "state_dict"), (checkpoint, "current_model_state")]
        copies += [(state, "average_model_state") for state in checkpoint.get("callbacks", {}).values() if isinstance(state, dict)]
        for holder, key in copies:
            if isinstance(holder.get(key), Mapping):
                holder[key] = {k: v for k, v in holder[key].items() if k in trainable}
        checkpoint["rng_states"] = torch_rng_states()
        if getattr(self, "_mid_window", False):
            checkpoint["accumulated_gradients"] = gradients_to_save(self, self.trainer.accumulate_grad_batches)  # every process's own
        if self._fitting() and not self.trainer.sanity_checking:
            if self.trainer.validating:
                restart_validation_on_resume(checkpoint)
            else:
                resume_an_ended_epoch_exactly(checkpoint, self.trainer.num_training_batches)
                validate_on_resume_after_a_batch(checkpoint, self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made for another base model, LoRA layout or label set, saying which. When ``fit``
        resumes (and only then), restore the random states and any unfinished accumulation window."""
        problem = layout_problem(checkpoint.get("state_dict", {}), self.trainable_state_dict(), checkpoint.get("hyper_parameters", {}), self.hparams)
        if problem:
            raise ValueError(
                f"this checkpoint was made for a different model ({problem}). Load it with the settings it was trained "
                "with (they are in its hyper_parameters), or start from a matching checkpoint."
            )
        if "current_model_state" in checkpoint:
            # Lightning's WeightAveraging (EMA) loads its averaged and current weights strictly: give both the frozen
            # weights that on_save_checkpoint left out (never trained: this model's own are theirs, and their average).
            trainable = self.trainable_state_dict().keys()
            frozen = {k: v for k, v in self.state_dict().items() if k not in trainable}
            for key in ("state_dict", "current_model_state"):
                checkpoint[key] = {**frozen, **checkpoint[key]}
        if self._fitting():
            if "rng_states" in checkpoint:
                set_torch_rng_states(checkpoint["rng_states"])
            saved = checkpoint.get("accumulated_gradients")
            self._gradients_to_restore = saved_gradients_for_this_process(saved, self.trainer.accumulate_grad_batches) if saved else None
            self._mid_window = bool(saved)  # until the next batch: a checkpoint before it (Lightning may validate first) keeps the window

    def _fitting(self) -> bool:
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer: load_from_checkpoint
            return False
        return trainer is not None and trainer.state.fn == "fit"

    def on_train_start(self) -> None:
        saved = getattr(self, "_gradients_to_restore", None)
        if saved:
            restore_gradients(self, saved)
        self._gradients_to_restore = None
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ScheduleOfAFit):  # the training loader exists now, restored by Lightning
                config.scheduler.start(self.trainer.estimated_stepping_batches)
