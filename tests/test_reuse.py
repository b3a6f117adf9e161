"""lit_lora's modules in other people's Lightning code, with public APIs only: their batches and loaders, stock
PEFT and transformers loading of what lit_lora writes, and no change to the process's state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import bare_env
from PIL import Image

from lit_lora import Food101DataModule, LoRAImageClassifier
from lit_lora.export import export, load_module, save_adapter_folder
from lit_lora.transforms import eval_transform

REPO = Path(__file__).resolve().parents[1]


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_imagefolder_tuple_batches_train_validate_and_predict(class_folders_dir: str, tiny_vit: str) -> None:
    """torchvision's ImageFolder yields (image, label) tuples: lit_lora trains on them (it did nothing before)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    to_uint8 = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.PILToTensor()])
    folder = datasets.ImageFolder(class_folders_dir, transform=to_uint8)
    loader = DataLoader(folder, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = LoRAImageClassifier(tiny_vit, class_names=folder.classes, learning_rate=0.01)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    fit = trainer(max_epochs=2, log_every_n_steps=1)
    fit.fit(model, loader, DataLoader(folder, batch_size=8))
    after = model.trainable_state_dict()
    assert fit.global_step == 6 and all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k or "classifier" in k)
    assert 0.0 <= float(fit.callback_metrics["val/acc"]) <= 1.0
    predictions = fit.predict(model, DataLoader(folder, batch_size=8))
    assert [p["probs"].shape for p in predictions] == [(8, 4), (8, 4), (8, 4)]
    torch.testing.assert_close(predictions[0]["probs"].sum(-1), torch.ones(8))


def test_float_pixels_that_are_not_normalised_stop_or_warn(class_folders_dir: str, tiny_vit: str) -> None:
    """Float batches are taken as the image processor's normalised output: 0-255 floats stop at the first batch, and
    torchvision's ToTensor output ([0, 1], not normalised) is warned about, since stock tools would normalise; the
    processor's own output trains without either."""
    import warnings

    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_vit)

    def loader(last) -> DataLoader:
        return DataLoader(datasets.ImageFolder(class_folders_dir, transform=transforms.Compose([transforms.Resize((32, 32)), last])), batch_size=8)

    model = LoRAImageClassifier(tiny_vit, class_names=datasets.ImageFolder(class_folders_dir).classes)
    with pytest.warns(UserWarning, match=r"LoRAImageClassifier \(fit\): float pixel_values all lie in \[0, 1\], as torchvision's ToTensor"):
        trainer(max_steps=1, limit_val_batches=0).fit(model, loader(transforms.ToTensor()))
    with pytest.raises(ValueError, match=r"LoRAImageClassifier \(predict\): float pixel_values reach (2\d\d|1\d\d)\.\d, beyond the 1\.00"):
        trainer().predict(model, loader(transforms.Lambda(lambda image: transforms.functional.pil_to_tensor(image).float())))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = trainer(max_steps=2, limit_val_batches=1)
        fitted.fit(LoRAImageClassifier(tiny_vit, class_names=model.class_names), loader(transforms.Lambda(lambda image: processor(image, return_tensors="pt")["pixel_values"][0])))
    assert fitted.global_step == 2 and not [w for w in caught if "pixel_values" in str(w.message)]


def test_mixup_and_cutmix_batches_train_and_labels_the_model_cannot_have_stop(class_folders_dir: str, tiny_vit: str) -> None:
    """Class probabilities from torchvision's CutMix train (the loss takes them; torchmetrics stopped on them with a
    scatter() error); class ids outside the model's classes (1-based ids, more folders than class_names) stop in one
    line at the first batch, as do float labels of class ids."""
    from torch.utils.data import DataLoader, default_collate
    from torchvision import datasets, transforms
    from torchvision.transforms import v2

    folder = datasets.ImageFolder(class_folders_dir, transform=transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()]))
    cutmix = v2.CutMix(num_classes=len(folder.classes))
    mixed = DataLoader(folder, batch_size=8, collate_fn=lambda items: cutmix(*default_collate(items)))
    assert next(iter(mixed))[1].shape == (8, len(folder.classes))
    model = LoRAImageClassifier(tiny_vit, class_names=folder.classes, learning_rate=0.01)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    fitted = trainer(max_epochs=1, limit_train_batches=2)
    fitted.fit(model, mixed, DataLoader(folder, batch_size=8, collate_fn=lambda items: cutmix(*default_collate(items))))
    after = model.trainable_state_dict()
    assert fitted.global_step == 2 and all(not torch.equal(before[k], after[k]) for k in before if "classifier" in k)
    assert 0.0 <= float(fitted.callback_metrics["train/acc"]) <= 1.0 and 0.0 <= float(fitted.callback_metrics["val/acc"]) <= 1.0

    def relabelled(change) -> DataLoader:
        # Last images first: the first batch holds the last class, whose 1-based id is out of range (a shuffled batch of
        # 8 of the 24 lacks it about one time in 17, and the model rightly took that batch).
        last_first = range(len(folder) - 1, -1, -1)
        return DataLoader(folder, batch_size=8, sampler=last_first, collate_fn=lambda items: (lambda x, y: (x, change(y)))(*default_collate(items)))

    classes = len(folder.classes)
    with pytest.raises(ValueError, match=rf"LoRAImageClassifier \(fit\): the first batch's labels run from \d to {classes}, and this model has {classes} classes"):
        trainer(max_steps=1).fit(LoRAImageClassifier(tiny_vit, class_names=folder.classes), relabelled(lambda y: y + 1))
    with pytest.raises(TypeError, match=r"LoRAImageClassifier \(test\) got labels of shape \(8,\) and dtype torch.float32"):
        trainer().test(LoRAImageClassifier(tiny_vit, class_names=folder.classes), relabelled(lambda y: y.float()))


class CountingLoader(torch.utils.data.DataLoader):
    """Somebody else's stateful loader (as torchdata's ``StatefulDataLoader`` is): its state is how many batches of the
    current pass it delivered, and a loaded state makes the next pass start after them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delivered, self.skip, self.loaded = 0, 0, []

    def state_dict(self) -> dict[str, int]:
        return {"delivered": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loaded.append(state)
        self.skip = state["delivered"]

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.delivered = skip
        for number, batch in enumerate(super().__iter__()):
            if number >= skip:
                self.delivered += 1
                yield batch


class SaveAtBatch(pl.Callback):
    def __init__(self, path: Path, batch_idx: int) -> None:
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def test_a_resumed_fit_hands_somebody_elses_stateful_loader_its_state(class_folders_dir: str, tiny_vit: str, tmp_path: Path) -> None:
    """Lightning drops the saved loader state when ``configure_optimizers`` reads ``estimated_stepping_batches`` (its
    issue #20550): the model's schedule reads it when training starts, so Lightning hands the loader its state, once,
    and the resumed epoch goes on where it stopped."""
    from torchvision import datasets, transforms

    images = datasets.ImageFolder(class_folders_dir, transform=transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()]))
    loader = CountingLoader(images, batch_size=4)
    trainer(max_epochs=1, callbacks=[SaveAtBatch(tmp_path / "mid.ckpt", 2)]).fit(LoRAImageClassifier(tiny_vit, class_names=images.classes), loader)
    assert len(loader) > 4 and torch.load(tmp_path / "mid.ckpt", weights_only=True)["global_step"] == 3

    resumed_loader = CountingLoader(images, batch_size=4)
    resumed = trainer(max_epochs=1)
    resumed.fit(LoRAImageClassifier(tiny_vit, class_names=images.classes), resumed_loader, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed_loader.loaded == [{"delivered": 3}]
    assert resumed.global_step == len(loader)  # the rest of the epoch, each batch once


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_lightnings_weight_averaging_callbacks_keep_adapter_sized_checkpoints_and_resume_them_exactly(
    averaging: str, class_folders_dir: str, tiny_vit: str, tmp_path: Path
) -> None:
    """Lightning's EMAWeightAveraging puts the averaged weights in the checkpoint's state_dict and the trained ones in
    current_model_state: that one held the frozen base too (330 MB for ViT-B/16), and a resume stopped on the frozen
    weights the adapter-only state_dict leaves out ("Missing key(s) in state_dict for AveragedModel").
    StochasticWeightAveraging's average_model_state held the frozen base too."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    images = datasets.ImageFolder(class_folders_dir, transform=transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()]))

    def fit(max_epochs: int, folder: str, ckpt_path: Path | None = None) -> LoRAImageClassifier:
        pl.seed_everything(0)
        model = LoRAImageClassifier(tiny_vit, class_names=images.classes, learning_rate=0.01, lr_scheduler_type="constant")
        average = EMAWeightAveraging(decay=0.9) if averaging == "ema" else StochasticWeightAveraging(swa_lrs=0.005, swa_epoch_start=1)
        callbacks = [average, ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)]
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=max_epochs, accumulate_grad_batches=2, callbacks=callbacks).fit(
            model, DataLoader(images, batch_size=4), DataLoader(images, batch_size=8), ckpt_path=ckpt_path
        )
        return model

    straight = fit(4, "straight")
    fit(3, "stopped")
    saved = torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)
    trainable = set(straight.trainable_state_dict())
    if averaging == "ema":
        assert set(saved["current_model_state"]) == set(saved["state_dict"]) == trainable and int(saved["averaging_state"]["n_averaged"]) == 9
    else:
        assert set(saved["callbacks"]["StochasticWeightAveraging"]["average_model_state"]) == set(saved["state_dict"]) == trainable
    resumed = fit(4, "resumed", tmp_path / "stopped" / "last.ckpt")
    for name, weight in straight.trainable_state_dict().items():  # the averaged weights, which fit ends with
        assert torch.equal(weight, resumed.trainable_state_dict()[name]), name


class OneCycleModule(pl.LightningModule):
    """Somebody else's module in Lightning's documented pattern: ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches`` for its schedule (which makes Lightning drop the loader state it restores,
    its issue #20550). It records the images of each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return torch.nn.functional.cross_entropy(self.layer(batch["pixel_values"].float().mean((2, 3))), batch["labels"])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=total), "interval": "step"}}


@pytest.mark.parametrize("optimized", [False, True], ids=["files", "optimized"])
def test_the_data_module_resumes_mid_epoch_under_a_module_that_reads_the_schedule_length_early(
    optimized: bool, food101_dir: str, tiny_vit: str, tmp_path: Path
) -> None:
    """The data module keeps its training loader's position too: a resumed epoch goes on with the batches an
    uninterrupted one would have trained on, whoever's module it is (here one that makes Lightning drop its copy)."""

    def data() -> Food101DataModule:
        extra = {"optimized_dir": str(tmp_path / "optimized")} if optimized else {}
        return Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, image_processor=tiny_vit, batch_size=4, **extra)

    straight = OneCycleModule()
    trainer(max_epochs=1, limit_val_batches=0).fit(straight, datamodule=data())
    stopped = OneCycleModule()
    trainer(max_epochs=1, limit_val_batches=0, callbacks=[SaveAtBatch(tmp_path / "mid.ckpt", 2)]).fit(stopped, datamodule=data())
    resumed = OneCycleModule()
    trainer(max_epochs=1, limit_val_batches=0).fit(resumed, datamodule=data(), ckpt_path=tmp_path / "mid.ckpt")
    assert len(straight.seen) > 4 and stopped.seen == straight.seen
    assert resumed.seen == straight.seen[3:]


def test_a_batch_of_another_kind_is_a_one_line_type_error(tiny_vit: str) -> None:
    model = LoRAImageClassifier(tiny_vit, class_names=["a", "b"])
    for batch, said in ((["no", "tensors"], "a list of 2 (str, str)"), ({"image": torch.zeros(2, 3, 32, 32)}, "a dict with keys ['image']")):
        with pytest.raises(TypeError, match=rf"got {re.escape(said)} as a batch; it takes a dict with .pixel_values.") as caught:
            model.training_step(batch, 0)
        assert "\n" not in str(caught.value)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"needs labels to train and got a dict with keys \['pixel_values'\]: give batches as"):
        model.training_step({"pixel_values": pixels}, 0)
    # `datasets` names its class column "label": such batches train as they are.
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer here
        assert torch.isfinite(model.training_step({"pixel_values": pixels, "label": torch.tensor([0, 1])}, 0))


def test_predict_takes_plain_dict_batches_without_index(tiny_vit: str, food101_dir: str) -> None:
    from torch.utils.data import DataLoader

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    model = LoRAImageClassifier(tiny_vit, class_names=["a", "b", "c"])
    out = trainer().predict(model, DataLoader([{"pixel_values": x} for x in images], batch_size=2))
    assert [o["probs"].shape[0] for o in out] == [2, 2, 1] and set(out[0]) == {"probs"}
    # lit_lora's data module names each prediction's file, in its batches and publicly.
    data = Food101DataModule(data_dir=food101_dir, predict_dir=f"{food101_dir}/images/tomato", num_workers=0, image_processor=tiny_vit, batch_size=4)
    paths = data.predict_paths
    batches = trainer().predict(LoRAImageClassifier(tiny_vit, class_names=data.class_names), datamodule=data)
    assert [p for b in batches for p in b["path"]] == paths == sorted(str(p) for p in Path(food101_dir, "images", "tomato").glob("*.jpg"))


def test_the_data_module_feeds_a_plain_torchvision_model(food101_dir: str, tiny_vit: str) -> None:
    """Its batches are a documented dict (uint8 pixel_values, labels): any LightningModule can use them."""
    from torchvision.models import mobilenet_v3_small

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mobilenet_v3_small(num_classes=4)

        def training_step(self, batch, batch_idx):
            x = batch["pixel_values"].float().div(255)
            return torch.nn.functional.cross_entropy(self.net(x), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, image_processor=tiny_vit, batch_size=8)
    model = Plain()
    before = model.net.classifier[-1].weight.clone()
    run = trainer(max_steps=3, limit_val_batches=0)
    run.fit(model, datamodule=data)
    assert run.global_step == 3 and not torch.equal(before, model.net.classifier[-1].weight)


# ---- what lit_lora writes, loaded by stock tools ------------------------------------------------------------


def base_model(kind: str, folder: Path) -> str:
    """A tiny ViT without a head (like google/vit-base-patch16-224-in21k) or a DeiT with its own 10-class head."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8)
    if kind == "vit":
        tf.ViTModel(tf.ViTConfig(**small)).save_pretrained(folder)
        tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        tf.DeiTForImageClassification(tf.DeiTConfig(num_labels=10, **small)).save_pretrained(folder)
        tf.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def trained_like(model: LoRAImageClassifier, seed: int = 1) -> LoRAImageClassifier:
    """Random trainable weights, as after training (fresh LoRA B matrices are zero: they would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(40, 60), (64, 48), (50, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
        paths.append(str(folder / f"{i}.jpg"))
    return paths


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_the_stock_loading_forms_predict_what_lit_lora_predicts(kind: str, tmp_path: Path, pictures: list[str]) -> None:
    from peft import AutoPeftModel, PeftConfig, PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
    from transformers.image_utils import load_image

    base = base_model(kind, tmp_path / "base")
    module = trained_like(LoRAImageClassifier(base, class_names=["tomato", "matcha", "blueberry", "banana"]))
    adapter = save_adapter_folder(module, tmp_path / "adapter")
    merged = export(str(adapter), str(tmp_path / "merged"), merge=True)
    ours = load_module(adapter)
    with torch.no_grad():
        expected = ours(torch.stack([eval_transform(ours.image_settings)(Image.open(p)) for p in pictures])).softmax(-1)

    labels = json.loads((adapter / "labels.json").read_text())
    id2label, label2id = {int(i): n for i, n in labels["id2label"].items()}, labels["label2id"]
    head = dict(id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)  # a base with its own head needs the last
    inputs = AutoImageProcessor.from_pretrained(str(adapter))([load_image(p) for p in pictures], return_tensors="pt")

    def probs(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**inputs).logits.softmax(-1)

    def piped(classify) -> torch.Tensor:
        rows = [{r["label"]: r["score"] for r in classify(p, top_k=4)} for p in pictures]
        return torch.tensor([[row[id2label[i]] for i in range(4)] for row in rows])

    base_again = AutoModelForImageClassification.from_pretrained(PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path, **head)
    forms = {
        "PeftModel.from_pretrained": probs(PeftModel.from_pretrained(base_again, str(adapter))),
        "AutoModelForImageClassification.from_pretrained(adapter)": probs(AutoModelForImageClassification.from_pretrained(str(adapter), **head)),
        "AutoPeftModel.from_pretrained": probs(AutoPeftModel.from_pretrained(str(adapter), **head)),
        "pipeline(adapter)": piped(pipeline("image-classification", model=str(adapter), image_processor=str(adapter), model_kwargs=head)),
        "pipeline(merged)": piped(pipeline("image-classification", model=str(merged))),
    }
    for name, theirs in forms.items():
        assert torch.equal(theirs.argmax(-1), expected.argmax(-1)), name
        torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=0, msg=name)


def test_every_lora_option_survives_the_adapter_folder(tmp_path: Path, tiny_vit: str) -> None:
    """Reloading goes through PEFT's own config: alpha_pattern and rank_pattern come back (logits were 0.085 off)."""
    options = {"alpha_pattern": {"q_proj": 64}, "rank_pattern": {"v_proj": 4}, "use_rslora": True}
    module = trained_like(LoRAImageClassifier(tiny_vit, class_names=["a", "b", "c"], lora_options=options))
    folder = save_adapter_folder(module, tmp_path / "adapter")
    again = load_module(folder)
    assert again.hparams.lora_options == options
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels), module(pixels), atol=1e-6, rtol=0)


# ---- no side effects ----------------------------------------------------------------------------------------


def test_a_fit_with_the_public_classes_changes_no_process_state(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """In a fresh interpreter (a notebook's, say) that has imported Lightning and transformers: the matplotlib
    backend, umask, logging handlers, warnings filters and signal handlers are the same after importing lit_lora and
    a fit with AdapterCheckpoint and lit_lora's reports as before, and no figure is left open in pyplot; building an
    optimized dataset (in a child process) leaves the global random generators (``random``, NumPy, torch) and the
    multiprocessing start method as they were."""
    script = f"""
import logging, multiprocessing, os, signal, sys, warnings
import matplotlib
matplotlib.use("svg")
def umask():
    return [l for l in open("/proc/self/status") if l.startswith("Umask")]
def state():
    loggers = {{n: list(logging.getLogger(n).handlers) for n in ("", "lit_lora", "lightning.pytorch", "transformers")}}
    return (matplotlib.get_backend(), umask(), loggers, list(warnings.filters), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
import lightning.pytorch as pl, transformers, peft, torchvision  # their own import-time setup is theirs
before = state()
from lit_lora import AdapterCheckpoint, Food101DataModule, LoRAImageClassifier
from lit_lora.report import plot_training_curves, write_report
import random, numpy as np, torch
data = Food101DataModule(data_dir={food101_dir!r}, train_split="train", num_workers=0, image_processor={tiny_vit!r}, batch_size=8)
def generators():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()
seeded = generators()
Food101DataModule(data_dir={food101_dir!r}, train_split="train", num_workers=1, image_processor={tiny_vit!r}, optimized_dir="optimized").prepare_data()
assert generators() == seeded, "optimize changed the global random generators"
# Not yet chosen (a fit chooses it: Lightning's worker check asks for it): a script can still choose spawn.
assert multiprocessing.get_start_method(allow_none=True) is None and "litdata" not in sys.modules
model = LoRAImageClassifier({tiny_vit!r}, class_names=data.class_names)
trainer = pl.Trainer(accelerator="cpu", max_epochs=1, default_root_dir={str(tmp_path)!r}, enable_progress_bar=False, callbacks=[AdapterCheckpoint()])
trainer.fit(model, datamodule=data)
run = trainer.log_dir
write_report(np.eye(4, dtype=int) * 3, data.class_names, __import__("pathlib").Path(run) / "report", "validate", {{"val/acc": 1.0}})
plot_training_curves(__import__("pathlib").Path(run) / "metrics.csv", __import__("pathlib").Path(run) / "curves.png")
after = state()
assert os.path.isfile(os.path.join(run, "report", "confusion_matrix.png")), os.listdir(run)
for name, a, b in zip(("backend", "umask", "logging handlers", "warnings filters", "SIGINT", "SIGTERM"), before, after):
    assert a == b, (name, a, b)
import matplotlib.pyplot as plt
assert plt.get_fignums() == []  # no figure left in pyplot's list
print("unchanged")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=bare_env(HF_HUB_OFFLINE="1", PATH="/usr/bin:/bin"))
    assert result.returncode == 0 and result.stdout.strip().endswith("unchanged"), result.stderr[-3000:]


def test_load_from_checkpoint_says_nothing_about_the_frozen_weights(tmp_path: Path, tiny_vit: str, food101_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    data = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, image_processor=tiny_vit, batch_size=8)
    model = LoRAImageClassifier(tiny_vit, class_names=data.class_names)
    run = trainer(max_steps=1, limit_val_batches=0)
    run.fit(model, datamodule=data)
    run.save_checkpoint(tmp_path / "model.ckpt")
    caplog.set_level("INFO")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = LoRAImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=False)
    said = caplog.text + "".join(str(w.message) for w in caught)
    for noise in ("Found keys", "LOAD REPORT", "MISSING", "frozen"):
        assert noise not in said, noise
    assert all(torch.equal(v, again.trainable_state_dict()[k]) for k, v in model.trainable_state_dict().items())
