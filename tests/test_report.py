"""Reports, curves and summaries: files with the right columns and the same numbers as the logged metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import common_args

from lit_lora.cli import cli_main
from lit_lora.report import cluster_order, confused_pairs, per_class_metrics


def test_fit_then_validate_and_test_write_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tiny_vit: str, food101_dir: str) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    args = common_args(tiny_vit, food101_dir)
    fitted = cli_main(["fit", *args, "--trainer.max_epochs=2"])
    run = Path(fitted.trainer.log_dir)
    curves = Image.open(run / "training_curves.png")
    assert curves.format == "PNG" and curves.size[0] >= 1000 and curves.size[1] >= 300
    assert "[lit_lora] fit finished" in caplog.text and "best val/acc" in caplog.text and "adapter-last/" in caplog.text
    with (run / "metrics.csv").open() as f:
        assert any(key.startswith("lr-AdamW") for key in csv.DictReader(f).fieldnames)  # learning rate logged

    validated = cli_main(["validate", *args, f"--ckpt_path={run / 'last.ckpt'}"])
    report = (run / "validate" / "validate_report").resolve()  # in the checkpoint's run, in validate's own subfolder
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert validated.trainer.callback_metrics["val/acc_top5"].item() == 1.0  # 4 classes: the top 5 hold every label
    assert f"validate report (per-class metrics, confused pairs, confusion matrix): {report}" in caplog.text
    rows = list(csv.DictReader((report / "per_class.csv").open()))
    assert [r["class"] for r in rows] == ["tomato", "matcha", "blueberry", "banana"]
    assert list(rows[0]) == ["class", "precision", "recall", "f1", "support"]
    assert sum(int(r["support"]) for r in rows) == 12  # the validation images
    # Accuracy from the report's counts equals the logged metric.
    correct = sum(float(r["recall"]) * int(r["support"]) for r in rows)
    assert correct / 12 == pytest.approx(validated.trainer.callback_metrics["val/acc"].item(), abs=1e-6)
    markdown = (report / "report.md").read_text()
    assert "## Most confused pairs" in markdown and "| val/acc |" in markdown and "| tomato |" in markdown
    matrix = Image.open(report / "confusion_matrix.png")
    assert matrix.format == "PNG" and min(matrix.size) >= 400

    cli_main(["test", *args, f"--ckpt_path={run / 'last.ckpt'}"])
    test_rows = list(csv.DictReader((run / "test" / "test_report" / "per_class.csv").open()))
    assert sum(int(r["support"]) for r in test_rows) == 16
    predicted = cli_main(["predict", *args, f"--ckpt_path={run / 'adapter'}", f"--data.predict_dir={food101_dir}"])
    assert len(list(csv.DictReader((run / "predict" / "predictions.csv").open()))) == 64 and predicted.trainer.logger is None
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_per_class_metrics_and_confused_pairs() -> None:
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 5, 5]])
    rows = per_class_metrics(confusion, ["a", "b", "c"])
    assert rows[0] == {"class": "a", "precision": pytest.approx(8 / 9), "recall": 0.8, "f1": pytest.approx(2 * (8 / 9) * 0.8 / (8 / 9 + 0.8)), "support": 10}
    assert rows[2]["precision"] == 1.0 and rows[2]["recall"] == 0.5
    assert confused_pairs(confusion, ["a", "b", "c"], top=2) == [("c", "b", 5, 0.5), ("a", "b", 2, 0.2)]


def test_cluster_order_puts_confused_classes_together() -> None:
    # Classes 0<->3 and 1<->4 are confused; 2 stands alone. A good order places each pair side by side.
    confusion = np.eye(5) * 50
    confusion[0, 3] = confusion[3, 0] = 20
    confusion[1, 4] = confusion[4, 1] = 20
    order = list(cluster_order(confusion))
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert abs(order.index(0) - order.index(3)) == 1 and abs(order.index(1) - order.index(4)) == 1


def test_tensorboard_logs_beside_the_csv_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=2"])
    run = Path(cli.trainer.log_dir)
    assert [type(logger).__name__ for logger in cli.trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]
    events = list(run.glob("events.out.tfevents.*"))
    assert events and (run / "metrics.csv").is_file()
    scalars = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert {"val/acc", "train/loss", "train/images_per_sec"} <= set(scalars)
