"""Adapter-only checkpoints: contents, size, exact resume, and refusing checkpoints of another model."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_cli import common_args, run_cli

from lit_lora.cli import cli_main
from lit_lora.files import TMP_MARK


class StopAfterFirstEpoch(pl.Callback):
    """Ends fit after one epoch while max_epochs (and so the LR schedule) stays that of the full run."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def fit(tmp: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], *extra: str):
    monkeypatch.chdir(tmp)
    return cli_main(["fit", *args, *extra])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, workers: int) -> None:
    args = common_args(tiny_vit, food101_dir) + [f"--data.num_workers={workers}", "--trainer.accumulate_grad_batches=2"]
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight = fit(tmp_path / "straight", monkeypatch, args, "--trainer.max_epochs=2")
    first = fit(tmp_path / "resumed", monkeypatch, args, "--trainer.max_epochs=2", "--trainer.callbacks+=test_checkpoints.StopAfterFirstEpoch")
    assert first.trainer.current_epoch == 1 and first.trainer.global_step == 3
    last = Path(first.trainer.checkpoint_callback.last_model_path).resolve()
    if workers == 0:
        # Another split of the images: refused before anything trains (its epochs and best checkpoint would mix two).
        with pytest.raises(ValueError, match=r"trained with other training and validation images than this run selects .* new fit from its weights with --ckpt_path .*version_0/adapter-last\."):
            fit(tmp_path / "resumed", monkeypatch, args, "--trainer.max_epochs=2", "--data.seed=7", f"--ckpt_path={last}")
        # The same images in another folder (a preempted job restarted on another node): resumed, exactly.
        shutil.copytree(food101_dir, tmp_path / "moved")
        args += [f"--data.data_dir={tmp_path / 'moved'}"]
    resumed = fit(tmp_path / "resumed", monkeypatch, args, "--trainer.max_epochs=2", f"--ckpt_path={last}")

    assert resumed.trainer.global_step == straight.trainer.global_step == 6  # 36 images / 8 = 5 batches -> 3 steps
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = straight.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for index, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_b["state"][index]["exp_avg_sq"])
    assert straight.trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == resumed.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    assert straight.trainer.checkpoint_callback.best_model_score == resumed.trainer.checkpoint_callback.best_model_score
    assert Path(resumed.trainer.checkpoint_callback.dirpath) == last.parent  # the run folder carries on
    # adapter/ still holds the best checkpoint's weights, whichever run wrote that checkpoint.
    from lit_lora.export import load_module

    best = load_module(resumed.trainer.checkpoint_callback.best_model_path).trainable_state_dict()
    folder = load_module(last.parent / "adapter").trainable_state_dict()
    assert all(torch.equal(best[key], folder[key]) for key in best)


def test_checkpoint_holds_trainable_weights_only_and_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    cli = fit(tmp_path, monkeypatch, common_args(tiny_vit, food101_dir), "--trainer.max_epochs=1")
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    state = torch.load(last, weights_only=True)["state_dict"]
    frozen = {n for n, p in cli.model.named_parameters() if not p.requires_grad}
    assert state and not frozen & set(state)
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    # fp32 weights plus AdamW's two moments, and a little bookkeeping: nothing that scales with the frozen base.
    assert last.stat().st_size < trainable * 4 * 3 + 64_000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 8}, "r: checkpoint has 16, this model 8"),
        ({"target_modules": ["query"]}, "target_modules: checkpoint has"),
        ({"class_names": ["a", "b", "c", "d"]}, "class_names: checkpoint has"),
        ({"model_name_or_path": "OTHER"}, "model_name_or_path: checkpoint has"),
    ],
)
def test_checkpoint_of_another_model_is_refused_saying_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, change: dict, message: str) -> None:
    import shutil

    from lit_lora import Food101DataModule, LoRAImageClassifier

    cli = fit(tmp_path, monkeypatch, common_args(tiny_vit, food101_dir), "--trainer.max_epochs=1")
    last = Path(cli.trainer.checkpoint_callback.last_model_path).resolve()
    settings = {"model_name_or_path": tiny_vit, "class_names": cli.model.class_names} | change
    if settings["model_name_or_path"] == "OTHER":
        settings["model_name_or_path"] = shutil.copytree(tiny_vit, tmp_path / "other-vit")
        settings["model_name_or_path"] = str(settings["model_name_or_path"])
    data = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, image_processor=tiny_vit)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=f"different model .*{message}"):
        trainer.validate(LoRAImageClassifier(**settings), datamodule=data, ckpt_path=str(last))


class SignalAtBatch(pl.Callback):
    """Sends this process a real signal after a given training batch, as a preempting scheduler or Ctrl-C would
    (under DDP: only the process of global rank ``rank``, when set); with ``group``, from another process to its whole
    process group, loader workers included, as a terminal's Ctrl-C or SLURM's SIGTERM does."""

    def __init__(self, batch: int = 2, signal_name: str = "SIGTERM", epoch: int = 1, rank: int | None = None, group: bool = False) -> None:
        self.batch = batch
        self.signal_name = signal_name
        self.epoch = epoch
        self.rank = rank
        self.group = group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.current_epoch == self.epoch and batch_idx == self.batch and self.rank in (None, trainer.global_rank):
            if self.group:  # run_cli starts each run in a process group of its own
                import subprocess

                subprocess.run(["kill", f"-{self.signal_name[3:]}", "--", f"-{os.getpgid(0)}"])  # kill signals itself too
            else:
                os.kill(os.getpid(), getattr(signal, self.signal_name))


class RecordImages(pl.Callback):
    """Writes the index of every training image seen, per epoch, to images_seen.txt in the working directory."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open("images_seen.txt", "a") as f:
            f.write("".join(f"{trainer.current_epoch} {int(i)}\n" for i in batch["index"]))


@pytest.mark.parametrize("signal_name", ["SIGINT"])  # SIGTERM: the accumulation-window and validation tests
def test_interrupted_fit_saves_a_checkpoint_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, signal_name: str) -> None:
    from collections import Counter

    args = [*common_args(tiny_vit, food101_dir), "--trainer.max_epochs=3", "--trainer.callbacks+=test_checkpoints.RecordImages"]
    # Ctrl-C reaches the loader worker too: it must not die (nor say "stopping" a second time) and fail the fit.
    signal = ["--trainer.callbacks+=test_checkpoints.SignalAtBatch", f"--trainer.callbacks.init_args.signal_name={signal_name}", "--trainer.callbacks.init_args.group=true"]
    interrupted = run_cli(["fit", *args, *signal, "--data.num_workers=1"], tmp_path, check=False)
    assert interrupted.returncode == {"SIGTERM": 143, "SIGINT": 130}[signal_name], interrupted.stderr[-3000:]  # as shells report either stop
    assert interrupted.stderr.count("stopping after this batch") == 1 and "Error" not in interrupted.stderr, interrupted.stderr[-3000:]
    last = tmp_path / "checkpoints" / "run" / "version_0" / "last.ckpt"
    assert f"saved {last.relative_to(tmp_path)}" in interrupted.stderr or f"saved {last}" in interrupted.stderr
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 5 + 3  # 5 batches in epoch 0, batches 0-2 of epoch 1

    fit(tmp_path, monkeypatch, args, f"--ckpt_path={last}")  # resumed in this process: no second interpreter start-up
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 15
    seen = Counter(tuple(map(int, line.split())) for line in (tmp_path / "images_seen.txt").read_text().splitlines())
    # Every training image exactly once per epoch, the interrupted epoch included: nothing replayed or missed.
    assert all(count == 1 for count in seen.values())
    assert Counter(epoch for epoch, _ in seen) == {0: 36, 1: 36, 2: 36}


def accumulating_fit(tiny_vit: str, food101_dir: str) -> list[str]:
    return [*common_args(tiny_vit, food101_dir), "--trainer.max_epochs=3", "--trainer.accumulate_grad_batches=4"]


@pytest.fixture(scope="module")
def straight_accumulating_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit: str, food101_dir: str) -> Path:
    """The recipe's accumulation, 3 epochs straight through (the reference the interrupted runs must equal)."""
    folder = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        fit(folder, patch, accumulating_fit(tiny_vit, food101_dir))
    return folder


class StartWorkersWith(pl.Callback):
    """Makes the run's loader workers start with ``method`` (set when the CLI builds its callbacks, before any loader)."""

    def __init__(self, method: str = "spawn") -> None:
        import multiprocessing

        multiprocessing.set_start_method(method, force=True)


@pytest.mark.parametrize(
    ("batches_done", "start_method"),
    [(2, "fork"), (2, "spawn"), pytest.param(4, "fork", marks=pytest.mark.slow)],  # 4: a whole window (slow run only)
)
def test_sigterm_inside_an_accumulation_window_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, batches_done: int, start_method: str, straight_accumulating_run: Path
) -> None:
    """The recipe accumulates 4 batches per optimizer step: stopping after 2 batches of a window (or after a whole
    one) and resuming ends in the same weights, AdamW moments, learning rate and step as a run straight through.
    Also with workers started by spawn (macOS's default), which cannot tell who sent a SIGTERM."""
    args = accumulating_fit(tiny_vit, food101_dir)
    (tmp_path / "stopped").mkdir()
    # SIGTERM to every process of the run, a loader worker included, as SLURM sends it; no worker dies of it.
    stop = ["--trainer.callbacks+=test_checkpoints.SignalAtBatch", f"--trainer.callbacks.init_args.batch={batches_done - 1}", "--trainer.callbacks.init_args.group=true"]
    stop += [] if start_method == "fork" else ["--trainer.callbacks+=test_checkpoints.StartWorkersWith", f"--trainer.callbacks.init_args.method={start_method}"]
    stopped = run_cli(["fit", *args, *stop, "--data.num_workers=1"], tmp_path / "stopped", check=False)
    assert stopped.returncode == 143 and "Error" not in stopped.stderr, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "run" / "version_0" / "last.ckpt"
    interrupted = torch.load(last, weights_only=True)
    # 5 batches per epoch: steps after batches 4 and 5; then 2 (mid-window) or 4 (a whole window) of epoch 1.
    assert interrupted["global_step"] == 2 + batches_done // 4
    assert ("accumulated_gradients" in interrupted) == (batches_done % 4 != 0)
    if batches_done % 4 and start_method == "fork":  # its 2 batches' gradients belong to a window of 4, each loss divided by 4
        with pytest.raises(ValueError, match=r"inside a gradient-accumulation window, by 1 process\(es\) accumulating 4 .* this run has 1 accumulating 2"):
            fit(tmp_path / "stopped", monkeypatch, [*args, "--trainer.accumulate_grad_batches=2"], f"--ckpt_path={last}")
        assert torch.load(last, weights_only=True)["global_step"] == interrupted["global_step"]  # refused before any step
    fit(tmp_path / "stopped", monkeypatch, args, f"--ckpt_path={last}")  # with 0 workers: the state is any count's

    assert_same_training_state(straight_accumulating_run / "checkpoints" / "run" / "version_0" / "last.ckpt", last, global_step=6)


def assert_same_training_state(straight: Path, resumed: Path, global_step: int) -> None:
    """The two checkpoints hold the same step, weights, AdamW moments and learning rate, to the bit."""
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["global_step"] == b["global_step"] == global_step
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for index, state in a["optimizer_states"][0]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[moment], b["optimizer_states"][0]["state"][index][moment]), (index, moment)
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]


def test_last_checkpoint_follows_every_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    # learning_rate 0: val/acc never improves after epoch 0, so Lightning alone would not rewrite last.ckpt.
    cli = fit(tmp_path, monkeypatch, common_args(tiny_vit, food101_dir), "--trainer.max_epochs=3", "--model.learning_rate=0")
    run = Path(cli.trainer.checkpoint_callback.dirpath)
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 2
    assert [p.name for p in run.glob("epoch=*.ckpt")] == ["epoch=0-val_acc=" + f"{float(cli.trainer.checkpoint_callback.best_model_score):.4f}.ckpt"]
    assert (run / "adapter").is_dir() and (run / "adapter-last").is_dir()


def test_a_checkpoint_write_that_dies_leaves_the_previous_one_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    cli = fit(tmp_path, monkeypatch, common_args(tiny_vit, food101_dir), "--trainer.max_epochs=1")
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    before = last.read_bytes()

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"garbage")  # as if the process were killed while writing
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        cli.trainer.save_checkpoint(last)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == cli.trainer.global_step
    assert not [p for p in last.parent.iterdir() if TMP_MARK in p.name or p.suffix == ".tmp"]
