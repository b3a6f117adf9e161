"""The real command line, end to end: fit -> validate -> test on a tiny ViT and generated images."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lit_lora.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


def common_args(tiny_vit: str, food101_dir: str) -> list[str]:
    return [
        f"--model.model_name_or_path={tiny_vit}",
        f"--data.data_dir={food101_dir}",
        "--data.train_split=train",
        "--data.val_size=0.25",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir=checkpoints",
        "--trainer.logger.init_args.name=run",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        "--seed_everything=0",
    ]


def start_cli(args: list[str], cwd: Path, base_env: dict[str, str] | None = None, **env: str) -> subprocess.Popen:
    """Start ``python -m lit_lora ARGS`` in an interpreter of its own (one that DDP launches or a signal stops), offline
    and finding this folder's callbacks, in ``base_env`` (this process's environment by default) with ``env`` added;
    `finish_cli` waits for it. Its output goes to unnamed files, not pipes: runs started together never block on a full
    pipe, and none is left in the run folder."""
    base = dict(os.environ if base_env is None else base_env)
    env = {**base, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), base.get("PYTHONPATH")])), **env}
    outputs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "lit_lora", *args], cwd=cwd, env=env, stdout=outputs[0], stderr=outputs[1], text=True, start_new_session=True)
    process.outputs = outputs  # type: ignore[attr-defined]
    return process


def finish_cli(process: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a `start_cli` run; assert it succeeded unless ``check`` is False. A run still going after 300 s (a hung
    DDP process) is killed with all its processes and fails the test."""
    hung = False
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # DDP's second process too
        process.wait()
        hung = True
    stdout, stderr = (_read_and_close(f) for f in process.outputs)  # type: ignore[attr-defined]
    if hung:
        pytest.fail(f"python -m lit_lora {process.args[3]} still ran after 300 s: {stderr[-3000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _read_and_close(file: Any) -> str:
    file.seek(0)
    with file:
        return file.read()


def run_cli(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`start_cli`, then `finish_cli`."""
    return finish_cli(start_cli(args, cwd, **env), check)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fit_validate_test_through_the_cli(in_tmp: Path, tiny_vit: str, food101_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    args = common_args(tiny_vit, food101_dir)
    cli = cli_main(["fit", *args, "--trainer.max_epochs=6", "--model.learning_rate=0.01"])

    run = in_tmp / "checkpoints" / "run" / "version_0"
    assert sorted(p.name for p in run.glob("*.ckpt"))[-1] == "last.ckpt"
    best = Path(cli.trainer.checkpoint_callback.best_model_path).resolve()
    assert best.parent == run and best.name.startswith("epoch=")
    assert (run / "config.yaml").exists() and (run / "hparams.yaml").exists()

    # The guide's trainable-parameter line is logged at the start of fit.
    assert "[lit_lora] trainable params: 16644 || all params: 164424 || trainable%: 10.12" in caplog.text

    # Labels were linked from the data into the model and saved with it.
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["class_names"] == ["tomato", "matcha", "blueberry", "banana"]
    assert cli.model.model.config.id2label[2] == "blueberry"

    # Validation accuracy rises well above chance (0.25 for 4 classes) and every metric is logged.
    rows = read_metrics(run / "metrics.csv")
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_acc) == 6
    assert max(val_acc) >= 0.75
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5"} <= set(rows[0])

    # Checkpoints hold the trainable weights only: LoRA matrices and the classifier head.
    checkpoint = torch.load(run / "last.ckpt", weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys)
    assert sum(t.numel() for t in checkpoint["state_dict"].values()) == sum(
        p.numel() for p in cli.model.parameters() if p.requires_grad
    )
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]

    # validate on the best checkpoint reproduces the accuracy it was saved for.
    best_acc = float(cli.trainer.checkpoint_callback.best_model_score)
    validated = cli_main(["validate", *args, f"--ckpt_path={best}"])
    assert validated.trainer.callback_metrics["val/acc"].item() == pytest.approx(best_acc, abs=1e-6)

    tested = cli_main(["test", *args, f"--ckpt_path={best}"])
    metrics = tested.trainer.callback_metrics
    assert {"test/acc", "test/acc_top5", "test/loss"} <= set(metrics)
    assert metrics["test/acc"].item() > 0.5  # 16 official test images of 4 learnable classes


def test_a_fast_dev_run_writes_nothing(in_tmp: Path, tiny_vit: str, food101_dir: str) -> None:
    """Lightning's ``fast_dev_run`` "suppresses logging and checkpointing": a smoke test of a config leaves no run
    folder, checkpoint or adapter behind (Lightning 2.6's ModelCheckpoint wrote ``checkpoints/checkpoints/last.ckpt`` at
    the end of training anyway, and an ``adapter-last/`` followed; the CLI took an empty ``version_0``)."""
    cli = cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.fast_dev_run=2"])
    assert cli.trainer.global_step == 2
    assert sorted(str(p.relative_to(in_tmp)) for p in in_tmp.rglob("*")) == []


def test_a_fit_that_fails_before_training_leaves_its_version_number_free(in_tmp: Path, tiny_vit: str, food101_dir: str) -> None:
    """The CLI takes ``version_N`` before anything is built; a fit stopped by its data before the first batch gave it
    back (it left an empty folder, or one with only its start-up files, and the next fit became ``version_1``, where
    the README's commands say ``version_0``). A fit that failed while training keeps its folder and logs."""
    args = common_args(tiny_vit, food101_dir)
    with pytest.raises(ValueError, match="leaves an empty train or validation set"):
        cli_main(["fit", *args, "--data.val_size=0.01"])
    runs = in_tmp / "checkpoints" / "run"
    assert list(runs.iterdir()) == []
    with pytest.raises(RuntimeError, match="a bug in the user's code"):
        cli_main(["fit", *args, "--trainer.callbacks+=test_library.FailAfterBatch"])
    assert [p.name for p in runs.iterdir()] == ["version_0"] and (runs / "version_0" / "config.yaml").is_file()


def test_ckpt_path_last_and_best_name_the_newest_runs_checkpoints(in_tmp: Path, tiny_vit: str, food101_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's ``ckpt_path="last"`` looks in the new run's folder, which lit_lora makes for every fit: a job requeued
    with ``fit --ckpt_path last`` trained from scratch in a new version_N each time. It names the newest run's
    ``last.ckpt`` (its best checkpoint for ``best``); with no run yet, fit starts one."""
    caplog.set_level("INFO")
    args = common_args(tiny_vit, food101_dir)
    with pytest.raises(ValueError, match=r"ckpt_path 'last': no run under checkpoints/run has a last.ckpt"):
        cli_main(["test", *args, "--ckpt_path=last"])
    cli_main(["fit", *args, "--trainer.max_epochs=1", "--ckpt_path=last"])  # the first submission of the job
    runs = in_tmp / "checkpoints" / "run"
    assert [p.name for p in runs.iterdir()] == ["version_0"] and "starting one" in caplog.text
    resumed = cli_main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last"])  # requeued after its first epoch
    assert [p.name for p in runs.iterdir()] == ["version_0"] and resumed.trainer.current_epoch == 2
    assert len([r for r in read_metrics(runs / "version_0" / "metrics.csv") if r.get("val/acc")]) == 2  # epoch 0 kept, 1 added
    best = Path(resumed.trainer.checkpoint_callback.best_model_path)
    validated = cli_main(["validate", *args, "--ckpt_path=best"])
    assert f"[lit_lora] ckpt_path best: {Path('checkpoints/run/version_0') / best.name}" in caplog.text
    assert validated.trainer.callback_metrics["val/acc"].item() == pytest.approx(float(resumed.trainer.checkpoint_callback.best_model_score), abs=1e-6)


def test_checkpoint_for_other_labels_is_refused_with_the_reason(in_tmp: Path, tiny_vit: str, food101_dir: str, class_folders_dir: str) -> None:
    args = common_args(tiny_vit, food101_dir)
    cli = cli_main(["fit", *args, "--trainer.max_epochs=1"])
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    other = [a for a in args if not a.startswith("--data.data_dir")] + [f"--data.data_dir={class_folders_dir}"]
    with pytest.raises(ValueError, match=r"different model \(class_names: checkpoint has \['tomato'"):
        cli_main(["validate", *other, f"--ckpt_path={last}"])


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["target_modules"] == ["query", "value"]
    # Linked, not configured twice: the image processor follows the model, the labels follow the data.
    assert "image_processor" not in printed["data"] and "class_names" not in printed["model"]


RECIPE_MODEL = {
    "model_name_or_path": "google/vit-base-patch16-224-in21k",
    "r": 16,
    "lora_alpha": 16,
    "target_modules": ["query", "value"],
    "lora_dropout": 0.1,
    "bias": "none",
    "modules_to_save": ["classifier"],
    "learning_rate": 0.005,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
}


def test_recipe_config_is_the_guides() -> None:
    recipe = yaml.safe_load((REPO / "configs" / "food101_vit_lora.yaml").read_text())
    assert {k: recipe["model"][k] for k in RECIPE_MODEL} == RECIPE_MODEL
    assert recipe["data"]["train_split"] == "train[:5000]" and recipe["data"]["val_size"] == 0.1
    assert recipe["data"]["batch_size"] == 128
    assert recipe["trainer"]["accumulate_grad_batches"] == 4
    assert recipe["trainer"]["gradient_clip_val"] == 1.0  # the Trainer's max_grad_norm default
    assert recipe["trainer"]["precision"] == "16-mixed" and recipe["trainer"]["max_epochs"] == 5
    assert recipe["checkpoint"]["monitor"] == "val/acc" and recipe["checkpoint"]["mode"] == "max"


def test_help_describes_the_projects_options(run_main) -> None:
    code, out, _ = run_main(["fit", "--help"])
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    assert "--model.r R LoRA rank." in text
    assert "in `datasets` slicing syntax" in text
    assert "--checkpoint.monitor MONITOR metric that ranks checkpoints." in text
    # lit_lora's own options come first, one line each: every --data.* and --model.* option in the first 60 lines.
    head = out.splitlines()[:60]
    import inspect

    from lit_lora import Food101DataModule, LoRAImageClassifier

    for group, cls in (("model", LoRAImageClassifier), ("data", Food101DataModule)):
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        if cls is Food101DataModule:
            names |= set(inspect.signature(cls.__mro__[1].__init__).parameters) - {"self"}
        names -= {"class_names"} if group == "model" else {"image_processor"}  # linked, not set on their own
        for name in names:
            assert any(line.strip().startswith(f"--{group}.{name}") for line in head), f"--{group}.{name}"
    assert not any(line.rstrip().endswith(("e.g.", "your", "Useful to")) for line in head)  # whole sentences


def test_top_level_help_and_errors_name_every_subcommand(run_main) -> None:
    code, top, _ = run_main(["--help"])
    assert code == 0 and top.startswith("usage: python -m lit_lora [-h] [-c CONFIG] {fit,validate,test,predict,export,optimize}")
    for name in ("fit", "validate", "test", "predict", "export", "optimize"):
        assert f"\n  {name} " in top
    code, _, wrong = run_main(["fitt"])
    assert code == 2 and "export" in wrong and "optimize" in wrong
    code, export, _ = run_main(["export", "--help"])
    assert code == 0 and "Lightning Trainer command line tool" not in export and "PEFT adapter folder" in export
    code, optimize, _ = run_main(["optimize", "--help"])
    assert code == 0 and "--output_dir" in optimize and "--data.data_dir" in optimize and "litdata" in optimize
    # optimize's summary leads with its own options, and lists none that it ignores (checkpoint, predictions)
    summary = optimize[: optimize.index("usage:")].splitlines()
    assert [line.split()[0] for line in summary[1:4]] == ["optimize:", "--output_dir", "--overwrite"]
    assert any(line.strip().startswith("--data.optimized_train_side") for line in summary)
    assert not any(line.strip().startswith(("--checkpoint.", "--predictions.")) for line in summary)
