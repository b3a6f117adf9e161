"""Nothing lost, nothing silently wrong: files written in place and never clobbered, one run per folder,
evaluation that leaves a training run alone, honest metrics and labels, interruptions that keep "best" honest."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_cli import common_args

from lit_lora.cli import cli_main
from lit_lora.datamodule import Food101DataModule
from lit_lora.files import TMP_MARK, OutputError

TESTS = Path(__file__).parent


def run_fit(cwd: Path, *extra: str, tiny_vit: str, food101_dir: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lit_lora fit`` with the tests' tiny setup, in a fresh process (signals, kills, exit codes)."""
    environment = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1", **(env or {})}
    args = [sys.executable, "-m", "lit_lora", "fit", *common_args(tiny_vit, food101_dir), *extra]
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small RAM filesystem at ``path`` (another filesystem than the tests' temporary folder); skips without root."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (a second filesystem, a full disk or a read-only one)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- callbacks the subprocess fits use (PYTHONPATH=tests) ------------------------------------------------------


class KillWhileWriting(pl.Callback):
    """SIGKILLs the process in the middle of writing ``what`` (``last.ckpt`` at epoch 1, or the first adapter
    folder), after part of it is on disk: what a preempted or OOM-killed machine does."""

    def __init__(self, what: str = "last.ckpt") -> None:
        self.what = what

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import lit_lora.export as export

        if self.what == "adapter":
            def dies(module, staging):
                (staging / "adapter_model.safetensors").write_bytes(b"x" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)

            export._build_adapter = dies
            return
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if trainer.current_epoch >= 1 and "last.ckpt" in str(getattr(f, "name", f)):
                real_save(obj, f, *args, **kwargs)
                f.flush()
                f.truncate(f.tell() // 2)  # half of it on disk
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save


class FillTheDisk(pl.Callback):
    """At the start of epoch 1, fills the run folder's filesystem up to ``leave`` free bytes."""

    def __init__(self, leave: int = 20_000) -> None:
        self.leave = leave

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import shutil

        if trainer.current_epoch == 1:
            folder = Path(trainer.log_dir)
            free = shutil.disk_usage(folder).free
            with open(folder / "filler", "wb") as f:
                f.write(b"\0" * max(free - self.leave, 0))


class SignalInValidation(pl.Callback):
    """Sends a real signal after validation batch ``batch`` of ``epoch`` (not the last batch)."""

    def __init__(self, epoch: int = 0, batch: int = 0, signal_name: str = "SIGTERM") -> None:
        self.epoch, self.batch, self.signal_name = epoch, batch, signal_name

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class TwoCtrlCs(pl.Callback):
    """Presses Ctrl-C twice at the start of training batch 2 of epoch 1: the second lands mid-batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


# ---- numbers ---------------------------------------------------------------------------------------------------


def test_accuracy_is_correct_images_over_images_as_the_guide_counts(tiny_vit: str) -> None:
    """``acc`` is micro accuracy (the guide's ``evaluate.load("accuracy")``), not torchmetrics' default macro
    average; ``acc_macro`` is the class average."""
    from lit_lora import LoRAImageClassifier

    model = LoRAImageClassifier(tiny_vit, class_names=["a", "b", "c"])
    labels = torch.tensor([0] * 10 + [1, 2])
    predicted = torch.tensor([0] * 10 + [0, 0])  # 10 of 12 right; classes b and c always wrong
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    model.val_metrics.update(logits, labels)
    result = {key: float(value) for key, value in model.val_metrics.compute().items()}
    assert result["val/acc"] == pytest.approx(10 / 12)
    assert result["val/acc_macro"] == pytest.approx(1 / 3)


# ---- files: written in place, never clobbered ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_vit: str, food101_dir: str) -> Path:
    """A 2-epoch fit through the CLI; returns its run folder."""
    folder = tmp_path_factory.mktemp("trust")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=2"])
    finally:
        os.chdir(cwd)
    return folder / "checkpoints" / "run" / "version_0"


def test_export_never_replaces_or_deletes_a_file_it_did_not_write(trained: Path, tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model_dir = tmp_path / "a-transformers-model"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16)).save_pretrained(model_dir)
    ViTImageProcessor().save_pretrained(model_dir)
    before = files_of(model_dir)
    for extra in ([], ["--overwrite=true"], ["--merge=true", "--overwrite=true"]):
        with pytest.raises(ValueError, match="output_dir"):
            cli_main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output_dir={model_dir}", *extra])
        assert files_of(model_dir) == before

    readme_only = tmp_path / "readme-only"
    readme_only.mkdir()
    (readme_only / "README.md").write_text("my notes\n")
    for extra in ([], ["--overwrite=true"]):
        with pytest.raises(ValueError, match="README.md"):
            cli_main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output_dir={readme_only}", *extra])
    assert (readme_only / "README.md").read_text() == "my notes\n" and len(list(readme_only.iterdir())) == 1

    # A previous export (its manifest) is replaced without --overwrite; the user's file beside it stays.
    out = tmp_path / "export"
    cli_main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output_dir={out}"])
    (out / "notes.txt").write_text("mine\n")
    cli_main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output_dir={out}", "--merge=true"])
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # the previous export's, listed in its manifest
    # Exported files get the same modes as fit's.
    fit_mode = (trained / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777
    assert (out / "model.safetensors").stat().st_mode & 0o777 == fit_mode == (trained / "last.ckpt").stat().st_mode & 0o777


def test_export_of_a_truncated_checkpoint_is_one_line(trained: Path, tmp_path: Path, run_main) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((trained / "last.ckpt").read_bytes()[:5000])
    code, _, err = run_main(["export", f"--ckpt_path={broken}", f"--output_dir={tmp_path / 'out'}"])
    assert code == 1
    assert err.startswith("lit_lora: error: ckpt_path") and "not a readable checkpoint" in err
    assert len(err.strip().splitlines()) == 2  # the message and the LIT_LORA_TRACEBACK hint


def test_fit_writes_nothing_through_a_tiny_tmpdir(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Lightning's own writer stages checkpoints in TMPDIR; on a 64 KB TMPDIR it could not write a 230 KB one."""
    with tmpfs(tmp_path / "tmp", "64k") as tmpdir:
        result = run_fit(tmp_path, "--trainer.max_epochs=2", tiny_vit=tiny_vit, food101_dir=food101_dir, env={"TMPDIR": str(tmpdir)})
        assert result.returncode == 0, result.stderr[-3000:]
        assert list(tmpdir.iterdir()) == []
    run = tmp_path / "checkpoints" / "run" / "version_0"
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 1
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "adapter-last" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("staging", ["TMPDIR", "DATA_OPTIMIZER_CACHE_FOLDER"])
def test_optimize_leaves_the_users_temporary_files_alone(tmp_path: Path, tiny_vit: str, food101_dir: str, monkeypatch: pytest.MonkeyPatch, staging: str) -> None:
    """litdata's optimize stages its chunks in $TMPDIR/chunks and $TMPDIR/data, shared by every process of the machine,
    and empties both when it starts: a user's /tmp/data went with the first build. Now they are untouched, and the
    build leaves nothing behind. A staging folder the user chose for litdata (a disk with room) is the one used."""
    from lit_lora import optimized

    tmp = tmp_path / "tmp"
    for name in ("chunks", "data"):
        (tmp / name).mkdir(parents=True)
        (tmp / name / "mine.txt").write_text("a user's file")
    if staging == "TMPDIR":
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the temporary folder of this process and of optimize's children
    else:
        monkeypatch.setenv(staging, str(tmp))
    used = []
    write_split = optimized._optimize_split
    monkeypatch.setattr(optimized, "_optimize_split", lambda split, output_dir, work_dir, **options: used.append(Path(work_dir).parent) or write_split(split, output_dir, work_dir, **options))
    settings = dict(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, num_workers=2)
    assert Food101DataModule(**settings).optimize(str(tmp_path / "optimized"))["state"] == "complete"
    assert used == [tmp] * 3  # the train, validation and test splits' staging
    assert sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")) == ["chunks", "chunks/mine.txt", "data", "data/mine.txt"]


def test_kill_while_writing_keeps_the_previous_checkpoint_and_the_next_run_cleans_up(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    with tmpfs(tmp_path / "tmp", "16m") as tmpdir:  # TMPDIR on another filesystem than the run folder
        env = {"TMPDIR": str(tmpdir)}
        killed = run_fit(tmp_path, "--trainer.max_epochs=2", "--trainer.callbacks+=test_trust.KillWhileWriting", tiny_vit=tiny_vit, food101_dir=food101_dir, env=env)
        assert killed.returncode == -signal.SIGKILL
        run = tmp_path / "checkpoints" / "run" / "version_0"
        assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 0  # the previous one, whole
        assert [p for p in run.iterdir() if TMP_MARK in p.name]  # the killed write's temporary, beside it
        assert list(tmpdir.iterdir()) == []  # and nothing in TMPDIR
        resumed = run_fit(tmp_path, "--trainer.max_epochs=2", f"--ckpt_path={run / 'last.ckpt'}", tiny_vit=tiny_vit, food101_dir=food101_dir, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in run.iterdir() if TMP_MARK in p.name]
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 10  # both epochs: 5 batches each


@pytest.mark.slow  # 20 s; the default run keeps test_kill_while_writing_keeps_the_previous_checkpoint_and_the_next_run_cleans_up
def test_a_kill_during_the_first_adapter_write_is_repaired_even_with_nothing_left_to_train(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    killed = run_fit(tmp_path, "--trainer.max_epochs=1", "--trainer.callbacks+=test_trust.KillWhileWriting", "--trainer.callbacks.init_args.what=adapter", tiny_vit=tiny_vit, food101_dir=food101_dir)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "checkpoints" / "run" / "version_0"
    assert (run / "last.ckpt").is_file() and not (run / "adapter").exists()
    assert [p for p in run.iterdir() if TMP_MARK in p.name]
    resumed = run_fit(tmp_path, "--trainer.max_epochs=1", f"--ckpt_path={run / 'last.ckpt'}", tiny_vit=tiny_vit, food101_dir=food101_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in run.iterdir() if TMP_MARK in p.name]
    from lit_lora.export import load_module

    best = load_module(next(run.glob("epoch=*.ckpt"))).trainable_state_dict()
    folder = load_module(run / "adapter").trainable_state_dict()
    assert all(torch.equal(best[key], folder[key]) for key in best)
    assert (run / "adapter-last" / "adapter_model.safetensors").is_file()


def test_a_full_disk_stops_in_one_line_and_every_checkpoint_still_loads(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    with tmpfs(tmp_path / "disk", "3m") as disk:
        result = run_fit(disk, "--trainer.max_epochs=3", "--trainer.callbacks+=test_trust.FillTheDisk", tiny_vit=tiny_vit, food101_dir=food101_dir)
        assert result.returncode == 1, result.stderr[-3000:]
        error = [line for line in result.stderr.splitlines() if line.startswith("lit_lora: error:")]
        assert len(error) == 1 and "No space left on device" in error[0] and "Traceback" not in result.stderr
        run = disk / "checkpoints" / "run" / "version_0"
        for ckpt in run.glob("*.ckpt"):
            torch.load(ckpt, weights_only=True)  # no partial file under a checkpoint's name
        assert not [p for p in run.iterdir() if TMP_MARK in p.name]


def test_output_problems_are_found_before_loading_anything(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError) as caught:
        cli_main(["fit", *common_args(tiny_vit, food101_dir), f"--checkpoint.dirpath={tmp_path / 'a-file'}", f"--trainer.default_root_dir={tmp_path / 'a-file' / 'x'}", "--model.r=0", "--trainer.accelerator=gpu" if not torch.cuda.is_available() else "--model.lora_dropout=1.5",
                  f"--data.optimized_dir={tmp_path / 'a-file'}"])
    message = str(caught.value)
    assert "checkpoint.dirpath" in message and "trainer.default_root_dir" in message and "is a file" in message
    assert f"data.optimized_dir '{tmp_path / 'a-file'}' cannot be a folder" in message  # fit would build it there
    assert "model.r must be a positive LoRA rank" in message
    assert ("trainer.accelerator 'gpu' asks for a GPU" in message) or ("model.lora_dropout" in message)
    with tmpfs(tmp_path / "read-only", "1m", read_only=True) as read_only:
        with pytest.raises(ValueError, match=r"checkpoint.dirpath .* is not writable"):
            cli_main(["fit", *common_args(tiny_vit, food101_dir), f"--checkpoint.dirpath={read_only / 'run'}"])
        with pytest.raises(ValueError, match=r"data.optimized_dir .* is not writable"):
            cli_main(["fit", *common_args(tiny_vit, food101_dir), f"--data.optimized_dir={read_only / 'optimized'}"])
        subprocess.run(["mount", "-o", "remount,rw", str(read_only)], check=True)
        (read_only / "run").mkdir()
        (read_only / "run" / "last.ckpt").write_bytes(b"")  # a run folder to resume in, then made read-only
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
        with pytest.raises(ValueError, match=r"the run folder of ckpt_path .* is not writable"):
            cli_main(["fit", *common_args(tiny_vit, food101_dir), f"--ckpt_path={read_only / 'run' / 'last.ckpt'}"])
        for command in ("validate", "predict"):  # their outputs would go into the read-only run folder
            with pytest.raises(ValueError, match=rf"the {command} output folder .*--trainer.default_root_dir.* is not writable"):
                cli_main([command, *common_args(tiny_vit, food101_dir), f"--ckpt_path={read_only / 'run' / 'last.ckpt'}", f"--data.predict_dir={food101_dir}"])


def test_an_unreachable_hub_is_reported_within_a_second_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from lit_lora.cli import hub_problems

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: as without network
    started = time.perf_counter()
    model, dataset = hub_problems("google/vit-base-patch16-224-in21k", "ethz/food101")
    assert time.perf_counter() - started < 1.5  # one probe for both
    assert "'google/vit-base-patch16-224-in21k'" in model and "--model.model_name_or_path DIR" in model and "save_pretrained" in model
    assert "data.dataset 'ethz/food101'" in dataset and "--data.data_dir DIR" in dataset and "HF_DATASETS_OFFLINE=1" in dataset
    assert hub_problems("./some/folder", None) == []


# ---- one run per folder; evaluation leaves a run alone; resume continues it --------------------------------------


def test_two_fits_never_share_a_folder(tmp_path: Path, tiny_vit: str, food101_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from lit_lora.runs import RunLock, claim_version

    with ProcessPoolExecutor(6) as pool:
        versions = list(pool.map(claim_version, [tmp_path / "logs"] * 12, ["run"] * 12))
    assert sorted(versions) == list(range(12))

    # The CLI takes its version folder that way (before Lightning's logger would list the folder and guess).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "run" / "version_0").mkdir(parents=True)  # another run's
    cli = cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=1"])
    assert cli.config["fit"]["trainer"]["logger"]["init_args"]["version"] == 1 and cli.trainer.logger.version == 1

    held = RunLock(tmp_path / "busy")
    held.acquire()  # as a fit in another process holds its folder
    with pytest.raises(OutputError, match=r"busy is in use by another fit \(pid \d+"):
        cli_main(["fit", *common_args(tiny_vit, food101_dir), f"--checkpoint.dirpath={tmp_path / 'busy'}", "--trainer.max_epochs=1"])
    held.release()
    assert not list((tmp_path / "busy").glob("*.ckpt"))


def test_a_run_folder_resumed_where_it_was_copied_keeps_its_best_and_its_last(trained: Path, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """A run folder copied elsewhere (from a bucket, to a node that mounts it at another path) and resumed there goes
    on as it would have in place: one best checkpoint, the best score of all epochs, ``last.ckpt`` rewritten. Lightning
    reset both when the folder's path changed: the first resumed epoch became "best" (``adapter/`` replaced by it
    however it scored), and ``last-v1.ckpt`` was written, so a later resume from ``last.ckpt`` went back an epoch."""
    copy = tmp_path / "elsewhere" / "run" / "version_0"
    shutil.copytree(trained, copy)
    original = files_of(trained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=3", f"--ckpt_path={copy / 'last.ckpt'}"])
    assert cli.trainer.current_epoch == 3
    kept = sorted(p.name for p in copy.glob("*.ckpt"))
    assert len(kept) == 2 and kept[-1] == "last.ckpt" and kept[0].startswith("epoch="), kept
    scores = [float(row["val/acc"]) for row in csv.DictReader((copy / "metrics.csv").open()) if row.get("val/acc")]
    assert len(scores) == 3 and float(cli.trainer.checkpoint_callback.best_model_score) == max(scores)
    assert Path(cli.trainer.checkpoint_callback.best_model_path) == copy / kept[0]
    assert torch.load(copy / "last.ckpt", weights_only=False)["global_step"] == cli.trainer.global_step  # the resumed run's end
    assert not [w for w in caught if "will be deleted" in str(w.message) or "dirpath has changed" in str(w.message)]  # rows kept
    assert files_of(trained) == original


def test_validate_test_and_predict_leave_the_training_run_untouched(trained: Path, tiny_vit: str, food101_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained.parents[2])
    def training_files() -> dict[str, str]:  # an evaluation's own folders aside (other tests of this module write there too)
        return {k: v for k, v in files_of(trained).items() if k.split("/")[0] not in ("validate", "test", "predict")}

    before = training_files()
    args = common_args(tiny_vit, food101_dir)
    for source in ("last.ckpt", "adapter"):
        cli_main(["validate", *args, f"--ckpt_path={trained / source}", "--data.batch_size=4"])
        cli_main(["test", *args, f"--ckpt_path={trained / source}"])
        cli_main(["predict", *args, f"--ckpt_path={trained / source}", f"--data.predict_dir={food101_dir}/images/tomato"])
    assert training_files() == before
    assert (trained / "validate" / "config.yaml").is_file() and (trained / "validate" / "validate_report" / "metrics.json").is_file()
    assert (trained / "test" / "test_report" / "per_class.csv").is_file() and (trained / "predict" / "predictions.csv").is_file()
    assert sorted(p.name for p in trained.parent.iterdir()) == ["version_0"]  # no new version folder


def test_evaluating_a_checkpoint_on_images_it_trained_on_says_how_many(
    trained: Path, tiny_vit: str, food101_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``validate`` with another seed or ``val_size`` than the fit's draws a validation share that holds images the
    checkpoint trained on, and ``test_split`` can name training images: the score is then no held-out score, and a
    warning says how many such images there are and where the fit's settings are. (Before: silent.)"""
    monkeypatch.chdir(trained.parents[2])
    args = [*common_args(tiny_vit, food101_dir), f"--ckpt_path={trained / 'last.ckpt'}"]

    def warned(*extra: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli_main([*extra[:1], *args, *extra[1:]])
        return [str(w.message) for w in caught if "held-out" in str(w.message)]

    def files(seed: int, val_size: float = 0.25) -> tuple[set[str], set[str]]:
        data = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=val_size, seed=seed, num_workers=0, image_processor=tiny_vit)
        data.setup("fit")
        return set(data.train_table.paths), set(data.val_table.paths)

    trained_on = files(42)[0]  # the fit's split (common_args: the data module's default seed)
    assert warned("validate") == [] and warned("test") == []  # the fit's own validation share; the official test split
    for extra, evaluated, kind in (
        (["--data.seed=7"], files(7)[1], "validation"),
        (["--data.val_size=0.5"], files(42, 0.5)[1], "validation"),
        (["--data.test_split=train"], trained_on | files(42)[1], "test"),
    ):
        said = warned("test" if kind == "test" else "validate", *extra)
        overlap = len(evaluated & trained_on)
        assert overlap > 0 and said == [said[0]], (extra, said)
        assert f"trained on {overlap} of these {len(evaluated)} {kind} images (its fit: train_split='train', val_size=0.25, seed=42)" in said[0]
        assert f"--config {trained / 'config.yaml'}" in said[0]

    # A checkpoint that does not say how its fit split the images (lit_lora 0.x): that they may overlap.
    checkpoint = torch.load(trained / "last.ckpt", weights_only=False)
    checkpoint["Food101DataModule"].pop("split")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    args[-1] = f"--ckpt_path={tmp_path / 'old.ckpt'}"
    said = warned("validate", "--data.seed=7")
    assert len(said) == 1 and "some of them may be images it trained on" in said[0]


@pytest.mark.slow  # 31 s; the default run resumes after SIGTERM in test_checkpoints.py and test_streaming.py
def test_interrupted_validation_is_run_again_and_resume_continues_the_same_folder(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """SIGTERM in the middle of epoch 0's validation, then resume: the best checkpoint, adapter/ and the metrics
    equal an uninterrupted run's, all in the one version folder. (Learning rate 0: every epoch scores the same,
    so the best is epoch 0, which only a re-run validation of epoch 0 can find.)"""
    args = ("--trainer.max_epochs=2", "--model.learning_rate=0", "--data.batch_size=4")
    (tmp_path / "straight").mkdir()
    (tmp_path / "stopped").mkdir()
    straight = run_fit(tmp_path / "straight", *args, tiny_vit=tiny_vit, food101_dir=food101_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_fit(tmp_path / "stopped", *args, "--trainer.callbacks+=test_trust.SignalInValidation", tiny_vit=tiny_vit, food101_dir=food101_dir)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run = tmp_path / "stopped" / "checkpoints" / "run" / "version_0"
    resumed = run_fit(tmp_path / "stopped", *args, f"--ckpt_path={run / 'last.ckpt'}", tiny_vit=tiny_vit, food101_dir=food101_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = tmp_path / "straight" / "checkpoints" / "run" / "version_0"
    assert [p.name for p in run.glob("epoch=*.ckpt")] == [p.name for p in reference.glob("epoch=*.ckpt")]
    assert next(run.glob("epoch=*.ckpt")).name.startswith("epoch=0-")
    for name in ("adapter/adapter_model.safetensors", "adapter-last/adapter_model.safetensors"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]

    def validation_rows(folder: Path) -> list[tuple[str, str, str]]:
        with (folder / "metrics.csv").open() as f:
            return [(r["epoch"], r["step"], r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]

    assert validation_rows(run) == validation_rows(reference) and len(validation_rows(run)) == 2


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    result = run_fit(tmp_path, "--trainer.max_epochs=3", "--trainer.callbacks+=test_trust.TwoCtrlCs", tiny_vit=tiny_vit, food101_dir=food101_dir)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Resume with" not in result.stderr and "stopped at once (second Ctrl-C): nothing saved" in result.stderr
    last = tmp_path / "checkpoints" / "run" / "version_0" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # written at the end of epoch 0, not mid-batch


def test_labels_of_an_adapter_folder_cannot_be_renamed(trained: Path, tiny_vit: str, food101_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.chdir(trained.parents[2])
    names = list(json.loads((trained / "adapter" / "labels.json").read_text())["label2id"])
    shuffled = names[1:] + names[:1]
    with pytest.raises(ValueError, match=r"labels.json is authoritative"):
        cli_main(["predict", *common_args(tiny_vit, food101_dir), f"--ckpt_path={trained / 'adapter'}", f"--data.class_names={json.dumps(shuffled)}", f"--data.predict_dir={food101_dir}"])


# ---- bad images: only unreadable files count; training batches never empty ---------------------------------------


def test_a_transform_error_is_an_error_not_a_bad_image(food101_dir: str) -> None:
    from lit_lora.images import FileTable, ImageDataset

    paths = sorted(str(p) for p in Path(food101_dir).rglob("*.jpg"))[:3]

    def buggy(image):
        raise ValueError("a bug in my transform")

    with pytest.raises(ValueError, match="a bug in my transform"):
        ImageDataset(FileTable(paths, [0, 1, 2]), buggy)[0]


def test_unreadable_training_images_are_replaced_so_no_batch_is_empty(tmp_path: Path, food101_dir: str) -> None:
    from lit_lora.images import FileTable, ImageDataset, collate_skipping_bad_images
    from lit_lora.transforms import ImageSettings, train_transform

    good = sorted(str(p) for p in Path(food101_dir).rglob("*.jpg"))[:2]
    bad = []
    for i in range(4):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not a jpeg")
        bad.append(str(tmp_path / f"bad{i}.jpg"))
    table = FileTable(bad + good, [0, 0, 0, 0, 1, 1])
    dataset = ImageDataset(table, train_transform(ImageSettings((32, 32), 32)), replace_unreadable=True)
    batch = collate_skipping_bad_images([dataset[(i, 7)] for i in range(4)])  # a batch of only unreadable files
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["index"].tolist() == [4, 4, 4, 4]
    assert sorted({where for where, _ in batch["skipped"]}) == bad
    evaluation = collate_skipping_bad_images([ImageDataset(table, train_transform(ImageSettings((32, 32), 32)))[i] for i in range(4)])
    assert "pixel_values" not in evaluation and len(evaluation["skipped"]) == 4  # evaluation counts only real images


# ---- DDP: every process's unfinished accumulation window ---------------------------------------------------------
# Saved and restored per process: tests/test_ddp.py resumes a 2-process fit stopped mid-window, bit-exact.


def test_a_checkpoint_saved_mid_window_by_two_processes_is_refused_by_one() -> None:
    from lit_lora.checkpoint_contents import saved_gradients_for_this_process

    saved = {"per_rank": [{"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)}], "accumulate_grad_batches": 4}  # as two processes save it
    with pytest.raises(ValueError, match=r"by 2 process\(es\) accumulating 4 batches per optimizer step, and this run has 1 accumulating 4"):
        saved_gradients_for_this_process(saved, 4)  # this test process is one process: refused, not mixed up
    assert torch.equal(saved_gradients_for_this_process({"per_rank": [{"w": torch.ones(2)}]}, 4)["w"], torch.ones(2))


class FailAtBatch(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        raise RuntimeError("a bug in the user's code")


def test_a_failed_fit_lets_go_of_its_folder(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """In a notebook, a fit that failed must not keep its run folder from the next fit in the same process."""
    from lit_lora import AdapterCheckpoint, Food101DataModule, LoRAImageClassifier

    data = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, image_processor=tiny_vit, batch_size=8)

    def fit(*callbacks: pl.Callback) -> pl.Trainer:
        run = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[AdapterCheckpoint(dirpath=str(tmp_path / "run")), *callbacks])
        run.fit(LoRAImageClassifier(tiny_vit, class_names=data.class_names), datamodule=data)
        return run

    with pytest.raises(RuntimeError, match="a bug in the user's code"):
        fit(FailAtBatch())
    assert fit().global_step == 6 and (tmp_path / "run" / "last.ckpt").is_file()  # 43 training images / 8
