"""Optimized datasets (litdata) on a real S3 server and on disk: optimize, stream, resume, scale out, refuse."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import socket
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_checkpoints import assert_same_training_state
from test_cli import common_args, finish_cli, run_cli, start_cli

from lit_lora import Food101DataModule, optimized
from lit_lora.cli import cli_main
from lit_lora.optimized import fingerprint, read_manifest
from lit_lora.runs import RunLock
from lit_lora.streaming import OptimizedImages, _not_litdata_cache_advice

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


def data_args(tiny_vit: str, food101_dir: str) -> list[str]:
    return [a for a in common_args(tiny_vit, food101_dir) if not a.startswith("--trainer")]


@pytest.fixture(scope="module")
def food101_on_s3(s3, tiny_vit: str, food101_dir: str) -> str:
    """The fixture images optimized to the S3 server through the CLI."""
    url = s3.url("food101")
    cli_main(["optimize", *data_args(tiny_vit, food101_dir), "--data.num_workers=2", f"--output_dir={url}"])
    return url


def test_optimize_to_s3_writes_the_splits_fit_uses(
    food101_on_s3: str, tiny_vit: str, food101_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = read_manifest(food101_on_s3)
    assert manifest["state"] == "complete" and manifest["splits"] == {"train": 36, "val": 12, "test": 16}
    assert manifest["class_names"] == ["tomato", "matcha", "blueberry", "banana"] and manifest["unreadable"] == {}
    # The same images and settings again: nothing is rewritten. Another split of them: refused in one line.
    again = cli_main(["optimize", *data_args(tiny_vit, food101_dir), f"--output_dir={food101_on_s3}"])
    assert again.manifest == manifest
    with pytest.raises(ValueError, match=r"holds an optimized dataset built from other images or settings .*--overwrite true"):
        cli_main(["optimize", *data_args(tiny_vit, food101_dir), "--data.val_size=0.5", f"--output_dir={food101_on_s3}"])
    assert read_manifest(food101_on_s3)["fingerprint"] == manifest["fingerprint"]
    # Asked for its labels (the CLI asks more than once) and set up, a data module reads the bucket's manifest once.
    reads = []
    monkeypatch.setattr(optimized, "read_manifest", lambda *args: reads.append(args) or read_manifest(*args))
    data = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, optimized_dir=food101_on_s3,
                             optimized_cache_size="30GB")
    assert data.class_names == data.class_names == manifest["class_names"]
    data.setup("fit")
    assert len(reads) == 1 and len(data.train_table) == 36
    # The node's chunk cache: as configured, else litdata's own budget (a share of the free disk), not a fixed size.
    assert data.train_table.max_cache_size == data.val_table.max_cache_size == "30GB"
    default = Food101DataModule(optimized_dir=food101_on_s3, image_processor=tiny_vit, dataset=None)
    default.setup("fit")
    assert default.train_table.max_cache_size is None
    # A cache that fits lit_lora's 8MB chunks: litdata's advice for its ~64MB ones ("at least 25GB") is not repeated per split.
    small = Food101DataModule(optimized_dir=food101_on_s3, image_processor=tiny_vit, dataset=None, optimized_cache_size="100MB", num_workers=1)
    small.setup("fit")
    assert small.train_table.max_cache_size == "100MB" and "25GB" not in caplog.text
    filters = logging.getLogger("litdata.streaming.dataset").filters
    assert _not_litdata_cache_advice not in filters and len(filters) <= 1  # the CLI's one, however many times it ran here


class _StorageGone(OptimizedImages):
    def __getitem__(self, index: Any) -> dict[str, Any]:
        raise OSError("Generic S3 error: error sending request")


def test_a_stream_that_cannot_be_read_marks_its_error_for_the_checkpoint(food101_on_s3: str) -> None:
    """The streaming loader marks what reading its next batch raised, as the file loader does: `AdapterCheckpoint` then
    saves the fit at its last batch (`test_reliability.py::test_data_that_fails_mid_fit_leaves_a_checkpoint_that_resumes_exactly`)."""
    from lit_lora.streaming import ResumableStreamingDataLoader

    loader = ResumableStreamingDataLoader(_StorageGone(f"{food101_on_s3}/val"), batch_size=4, num_workers=0)
    with pytest.raises(OSError, match="error sending request") as failed:
        next(iter(loader))
    assert failed.value.lit_lora_reading


def test_optimize_writes_where_the_config_reads_optimized_data_by_default(tmp_path: Path, tiny_vit: str, food101_dir: str, run_main) -> None:
    """A config that fits on ``data.optimized_dir`` optimizes into it without ``--output_dir``; with neither, the missing
    destination is reported with the configuration's other problems (before: one at a time, the model's first)."""
    code, _, err = run_main(["optimize", *data_args(tiny_vit, food101_dir), f"--data.optimized_dir={tmp_path / 'optimized'}"])
    assert code == 0, err[-2000:]
    assert read_manifest(str(tmp_path / "optimized"))["state"] == "complete"
    code, _, err = run_main(["optimize", f"--model.model_name_or_path={tmp_path / 'no-model'}", "--data.dataset=null", "--data.val_size=2", "--data.optimized_train_side=0"])
    assert code == 1 and "5 problem(s) in the configuration" in err  # as fit reports them, all at once
    for problem in ("nowhere to write: set --output_dir (a folder or s3:// URL), or data.optimized_dir", "no data: set data.data_dir", "no-model' is not a folder here",
                    "data.val_size must be between 0 and 1", "data.optimized_train_side must be at least 1, got 0"):
        assert problem in err


def test_a_url_whose_endpoint_refuses_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong port in the endpoint: one line naming the URL within seconds (litdata's client alone retried for
    minutes without a word). In a thread, so that a hang fails the test instead of stopping the suite."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    outcome: list[BaseException] = []

    def check() -> None:
        try:
            read_manifest("s3://bucket/food101", {"endpoint_url": f"https://127.0.0.1:{port}"})
        except Exception as err:
            outcome.append(err)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, "reading the manifest was still retrying after 60 s"
    assert isinstance(outcome[0], ValueError) and "cannot read the optimized dataset at s3://bucket/food101 (EndpointConnectionError" in str(outcome[0])


def test_fit_validate_predict_stream_from_s3_on_two_processes(food101_on_s3: str, tiny_vit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes streaming from the S3 server: fit, preempted on one process 2 batches into its second epoch (refused
    on 1 process, resumed on 2: every image of each epoch once), then validate and predict (every image once)."""
    # Only the bucket: no image folder on this "node"; the labels come from the optimized dataset.
    args = [f"--model.model_name_or_path={tiny_vit}", f"--data.optimized_dir={food101_on_s3}", "--data.batch_size=4", "--data.num_workers=0",
            "--trainer.precision=32-true", "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir=checkpoints", "--trainer.logger.init_args.name=run", "--trainer.enable_progress_bar=false"]
    fit_args = ["fit", *args, "--trainer.max_epochs=2", "--trainer.callbacks+=test_streaming.RecordImages"]
    stop = ["--trainer.callbacks+=test_checkpoints.SignalAtBatch", "--trainer.callbacks.init_args.epoch=1", "--trainer.callbacks.init_args.batch=1",
            "--trainer.callbacks.init_args.rank=1"]
    stopped = run_cli([*fit_args, *DDP, *stop], tmp_path, check=False)
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, said[-3000:]
    assert f"{food101_on_s3}: 36 train / 12 validation images" in said  # the dataset's, not one process's share
    assert said.count("litdata trains 32 of the 36 training images each epoch on 2 processes") == 1  # said once, not per process or epoch
    assert "sync_dist=True" not in said  # train/images_per_sec is reduced across processes, no warning
    assert "disabled the `drop_last` option" not in said and "Seed set to" not in said  # litdata on the evaluation split; process 1's seed line
    run = tmp_path / "checkpoints" / "run" / "version_0"
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 4 + 2  # 4 batches per process and epoch, then 2

    # On one process (a smaller allocation), refused in one line before any batch (litdata 0.2.76 stopped with its own
    # "drop_last state doesn't match" error; with that check passed, it repeated 4 of the epoch's 36 images and skipped 4).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"saved 2 batches into an epoch of optimized data on 2 process\(es\), and this run has 1: .*Resume on 2 process\(es\)"):
        cli_main([*fit_args[:-1], "--data.batch_size=8", f"--ckpt_path={run / 'last.ckpt'}"])
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 6  # nothing trained
    run_cli([*fit_args, *DDP, f"--ckpt_path={run / 'last.ckpt'}"], tmp_path)

    seen = [line.split() for rank in (0, 1) for line in (tmp_path / f"seen-rank{rank}.txt").read_text().splitlines()]
    epochs = [[name for e, name in seen if e == epoch] for epoch in ("0", "1")]
    for names in epochs:
        # litdata evens out the processes' shares of the 36 training images to whole batches: 2 x 4 batches of 4,
        # each image at most once (also across the preemption); the few left over differ from epoch to epoch (a new shuffle).
        assert len(names) == len(set(names)) == 32
    assert set(epochs[0]) != set(epochs[1])
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 2 * 4

    # validate and predict at once (they overlap well, mostly in imports)
    out = tmp_path / "predictions.csv"
    validating = start_cli(["validate", *args, *DDP, f"--ckpt_path={run / 'last.ckpt'}"], tmp_path)
    predicted = run_cli(["predict", *args, *DDP, f"--ckpt_path={run / 'adapter-last'}", f"--predictions.output_path={out}"], tmp_path)
    validated = finish_cli(validating)
    assert "Couldn't infer the batch indices" not in predicted.stdout + predicted.stderr  # the writer reads each batch's index
    # litdata's evaluation shares are uneven (4 and 8 images): the throughput line counts every process's own
    assert "[lit_lora] validate: 12 images in" in validated.stdout + validated.stderr
    assert "[lit_lora] predict: 16 images in" in predicted.stdout + predicted.stderr
    support = sum(int(r["support"]) for r in csv.DictReader((run / "validate" / "validate_report" / "per_class.csv").open()) if r["class"] in ("tomato", "matcha", "blueberry", "banana"))
    assert support == 12  # every validation image counted once

    paths = [r["path"] for r in csv.DictReader(out.open())]
    assert len(paths) == len(set(paths)) == 16 and all("/images/" in p for p in paths)  # the test split, each image once


class RecordImages(__import__("lightning").pytorch.Callback):
    """Appends (epoch, image name) of every training image this process sees to seen-rank<N>.txt."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(f"seen-rank{trainer.global_rank}.txt", "a") as f:
            f.write("".join(f"{trainer.current_epoch} {name}\n" for name in batch["path"]))


def test_sigterm_mid_window_while_streaming_from_s3_resumes_exactly(food101_on_s3: str, tiny_vit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accumulation 4, stopped by SIGTERM after 2 batches of a window in the second epoch, resumed: the same weights,
    AdamW moments and learning rate as a run straight through, both streaming from the S3 server. The stopped run
    caches the chunks in another folder (as on another node), and only it needs an interpreter of its own."""
    args = ["fit", f"--model.model_name_or_path={tiny_vit}", f"--data.optimized_dir={food101_on_s3}", "--data.batch_size=8", "--data.num_workers=2",
            "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_epochs=3", "--trainer.accumulate_grad_batches=4",
            "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir=checkpoints",
            "--trainer.logger.init_args.name=run", "--trainer.enable_progress_bar=false"]
    for name in ("straight", "stopped"):
        (tmp_path / name).mkdir()
    stopping = start_cli([*args, "--trainer.callbacks+=test_checkpoints.SignalAtBatch", "--trainer.callbacks.init_args.batch=1"], tmp_path / "stopped",
                         LITDATA_CACHE_DIR=str(tmp_path / "another-chunk-cache"))
    monkeypatch.chdir(tmp_path / "straight")
    cli_main(args)  # while the run to stop starts
    stopped = finish_cli(stopping, check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "run" / "version_0" / "last.ckpt"
    interrupted = torch.load(last, weights_only=True)
    assert interrupted["global_step"] == 2 and "accumulated_gradients" in interrupted  # 5 batches per epoch: steps after 4 and 5
    monkeypatch.chdir(tmp_path / "stopped")
    cli_main([*args, f"--ckpt_path={last}"])

    assert_same_training_state(tmp_path / "straight" / "checkpoints" / "run" / "version_0" / "last.ckpt", last, global_step=6)


@pytest.mark.slow  # 35 s; the single-process preemption above, and DDP's on image files (test_ddp.py), run by default
def test_a_ddp_fit_streaming_a_local_dataset_preempted_on_one_process_resumes_exactly(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Two processes streaming an optimized dataset, SIGTERM to rank 1 mid-epoch and mid-window: resumed, the weights
    equal those of the run straight through (each process's litdata loader position comes back)."""
    from test_ddp import assert_same_weights, preempted_fit

    args = [*preempted_fit(tiny_vit, food101_dir), f"--data.optimized_dir={tmp_path / 'optimized'}"]
    for name in ("straight", "stopped"):
        (tmp_path / name).mkdir()
    run_cli(["fit", *args], tmp_path / "straight")
    stop = ["--trainer.callbacks+=test_checkpoints.SignalAtBatch", "--trainer.callbacks.init_args.epoch=1", "--trainer.callbacks.init_args.rank=1"]
    stopped = run_cli(["fit", *args, *stop], tmp_path / "stopped", check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "run" / "version_0" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # 4 batches (2 steps) per process and epoch; then 2 in
    run_cli(["fit", *args, f"--ckpt_path={last}"], tmp_path / "stopped")
    assert_same_weights(last.parent, tmp_path / "straight" / "checkpoints" / "run" / "version_0")


def test_fit_builds_a_local_optimized_dir_once_and_refuses_it_when_the_images_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    import shutil

    images = Path(shutil.copytree(food101_dir, tmp_path / "food"))
    monkeypatch.chdir(tmp_path)
    args = [*common_args(tiny_vit, str(images)), f"--data.optimized_dir={tmp_path / 'optimized'}", "--trainer.max_epochs=1"]
    fingerprinted = []
    monkeypatch.setattr(optimized, "fingerprint", lambda *a: fingerprinted.append(a) or fingerprint(*a))
    cli = cli_main(["fit", *args])
    assert cli.trainer.global_step == 5 and read_manifest(str(tmp_path / "optimized"))["splits"]["train"] == 36
    assert len(fingerprinted) == 1  # built in prepare_data: setup does not select and fingerprint the files again
    monkeypatch.setattr(optimized, "fingerprint", fingerprint)
    built = (tmp_path / "optimized" / "train" / "index.json").stat().st_mtime_ns
    cli_main(["validate", *args[:-1], f"--ckpt_path={cli.trainer.checkpoint_callback.last_model_path}"])
    assert (tmp_path / "optimized" / "train" / "index.json").stat().st_mtime_ns == built  # read, not rebuilt
    assert cli.datamodule.optimize(str(tmp_path / "optimized"))["splits"]["train"] == 36  # after streaming: still the same dataset

    (images / "images" / "tomato" / "0003.jpg").write_bytes((images / "images" / "matcha" / "0003.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"was built from other images or settings than data.data_dir .*--overwrite true"):
        cli_main(["fit", *args])


def test_fits_started_together_on_a_new_optimized_dir_wait_for_the_first_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    """A sweep starts its fits at once on one new local folder: the first builds it, the others wait and then use it
    (unheld, each rebuilt it over the others' files, and the dataset was left marked complete with empty splits).
    A damaged split is reported in one line, not as litdata's assertion."""
    import threading

    folder = tmp_path / "optimized"
    settings = dict(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, num_workers=0, optimized_dir=str(folder))
    other_process = RunLock(folder)  # an flock on another open file, as another process's build holds it
    other_process.acquire()
    waiting = Food101DataModule(**settings)
    thread = threading.Thread(target=waiting.prepare_data)
    thread.start()
    thread.join(2.0)
    assert thread.is_alive() and read_manifest(str(folder)) is None  # waits, writing nothing
    manifest = Food101DataModule(**settings)._optimize(str(folder))  # what the other process writes meanwhile
    built = (folder / "train" / "index.json").stat().st_mtime_ns
    other_process.release()
    thread.join(60)
    assert not thread.is_alive() and (folder / "train" / "index.json").stat().st_mtime_ns == built  # used, not rebuilt
    waiting.setup("fit")
    assert len(waiting.train_table) == manifest["splits"]["train"] == 36
    with monkeypatch.context() as patch:  # a complete dataset is not held: it may be on a read-only disk
        patch.setattr(optimized.RunLock, "acquire", lambda *args, **kwargs: pytest.fail("held a complete dataset"))
        Food101DataModule(**settings).prepare_data()

    (folder / "val" / "index.json").write_text('{"chunks": [], "config": null}')
    with pytest.raises(ValueError, match=r"cannot read the val split of data.optimized_dir at .*/val \(AssertionError: .*check that its storage answers .*damaged, rebuild it .*--overwrite true"):
        Food101DataModule(**settings).setup("fit")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine is not empty and holds no optimized dataset"):
        Food101DataModule(**settings).optimize(str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["precious.txt"]  # not even a lock file


def test_a_dataset_built_for_another_image_processor_or_damaged_is_refused_in_one_line(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Without the source to fingerprint (a bucket alone), the stored pixels' crop, resize and training side are still
    checked against the model's: other ones would fail inside the model, or evaluate other pixels than the exported
    processor gives."""
    folder = str(tmp_path / "optimized")
    Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, num_workers=0).optimize(folder)
    # The model it was built for. Food101DataModule's default hub dataset is not opened (offline here, it would fail):
    # a node needs only the optimized dataset, which gives the labels.
    # Its split settings are not this module's defaults: without the source nothing can be checked, so it says which
    # splits are used.
    built_for = Food101DataModule(optimized_dir=folder, image_processor=tiny_vit)
    with pytest.warns(UserWarning, match=r"was split with train_split='train', val_size=0.25 and this run sets train_split='train\[:5000\]', "
                      r"val_size=0.1: its stored splits are used; to change them, optimize again"):
        assert built_for.class_names == read_manifest(folder)["class_names"]
    built_for.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: nothing to say
        Food101DataModule(optimized_dir=folder, image_processor=tiny_vit, train_split="train", val_size=0.25).setup("fit")
    for other in ({}, {"image_processor": tiny_vit, "optimized_train_side": 64}):  # ViT's 224 px defaults; another training side
        with pytest.raises(ValueError, match=r"holds images cropped and resized for another image processor .*this model needs .*--overwrite true"):
            Food101DataModule(dataset=None, optimized_dir=folder, **other).setup("fit")

    # A chunk cut short (an interrupted copy), then lost: one line before training, not a loader worker's traceback
    # after litdata waited for the chunk to grow.
    chunk = next((tmp_path / "optimized" / "train").glob("*.bin"))
    os.truncate(chunk, 1000)
    for damage in (rf"{chunk.name} has 1000 bytes, its index says \d+: a copy or upload cut short", rf"{chunk.name} is missing"):
        with pytest.raises(ValueError, match=rf"cannot read the train split of data.optimized_dir .*\(OSError: .*{damage}.*--overwrite true"):
            Food101DataModule(optimized_dir=folder, image_processor=tiny_vit, train_split="train", val_size=0.25).setup("fit")
        chunk.unlink(missing_ok=True)


def test_a_chunk_cut_short_or_lost_in_the_bucket_is_refused_in_one_line_before_training(s3, food101_on_s3: str, tiny_vit: str) -> None:
    """A chunk deleted from the bucket or uploaded short: one line at setup naming it (one listing per split), not a page
    of litdata's tracebacks from a loader worker once the fit has started."""
    import boto3

    client, bucket = boto3.client("s3"), food101_on_s3.split("/")[2]
    prefix = food101_on_s3.split("/", 3)[3]
    for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]:  # a copy of the whole dataset, to damage
        client.copy_object(Bucket=bucket, Key=item["Key"].replace(prefix, "damaged", 1), CopySource={"Bucket": bucket, "Key": item["Key"]})
    damaged = s3.url("damaged")
    chunk = next(item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="damaged/train/")["Contents"] if item["Key"].endswith(".bin"))
    settings = {"optimized_dir": damaged, "image_processor": tiny_vit, "dataset": None, "num_workers": 0}
    Food101DataModule(**settings).setup("fit")  # the copy is whole
    client.put_object(Bucket=bucket, Key=chunk, Body=b"cut short")
    for damage in (rf"{chunk} has 9 bytes, its index says \d+: a copy or upload cut short", rf"{chunk} is missing"):
        with pytest.raises(ValueError, match=rf"^cannot read the train split of data.optimized_dir at {damaged}/train \(OSError: s3://{bucket}/{damage}.*--overwrite true`\.$"):
            Food101DataModule(**settings).setup("fit")
        client.delete_object(Bucket=bucket, Key=chunk)
    # Credentials that may read objects but not list them (litdata needs no listing): not checked, not refused.
    import botocore.exceptions

    class ReadOnly:  # litdata's client (`optimized._looking_provider`) with such credentials
        def get_paginator(self, operation: str) -> Any:
            raise botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "ListObjectsV2")

    with pytest.MonkeyPatch.context() as patch:
        real = optimized._looking_provider

        def read_only(*args: Any) -> Any:
            provider = real(*args)
            return SimpleNamespace(exists=provider.exists, download_file=provider.download_file, client=SimpleNamespace(client=ReadOnly()))

        patch.setattr(optimized, "_looking_provider", read_only)
        assert optimized.stored_files(f"{damaged}/train") is None
        Food101DataModule(**settings).setup("fit")  # the chunk is still missing: litdata finds out when it reads it


def test_a_process_that_litdata_let_go_on_without_the_index_tries_again(food101_on_s3: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """litdata 0.2.76 waits 1 s for another process's download of a URL's index.json, then goes on without it and stops
    ("doesn't contain any index.json file": 1 DDP predict in 3 while another run started). That process tries again;
    a local split without an index is refused at once."""
    from litdata import StreamingDataset

    real, calls = StreamingDataset.__init__, []

    def lock_timed_out_once(self: Any, location: str, *args: Any, **kwargs: Any) -> None:
        calls.append(location)
        if len(calls) == 1:
            raise ValueError(f"The provided dataset `{tmp_path}` doesn't contain any index.json file.\n HINT: Did you successfully optimize ...")
        real(self, location, *args, **kwargs)

    monkeypatch.setattr(StreamingDataset, "__init__", lock_timed_out_once)
    assert len(OptimizedImages(f"{food101_on_s3}/val")) == 12 and len(calls) == 2
    calls.clear()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="doesn't contain any index.json"):
        OptimizedImages(str(tmp_path / "val"))
    assert len(calls) == 1


def test_a_training_loader_resumes_on_a_copy_of_the_dataset_in_another_folder(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """A local optimized dataset copied elsewhere (a node's own disk) between the interruption and the resume: the
    loader goes on where it stopped, with the same augmented pixels (litdata alone refuses a state saved elsewhere).
    A position in other data (another split of the images) is refused in one line."""
    import shutil

    def training_loader(folder: Path, val_size: float = 0.25):
        module = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=val_size, image_processor=tiny_vit, optimized_dir=str(folder),
                                   batch_size=4, num_workers=0)
        module.prepare_data()
        module.setup("fit")
        return module.train_dataloader()

    first = training_loader(tmp_path / "here")
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    rest = [(batch["path"], batch["pixel_values"]) for batch in batches]
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    resumed = training_loader(tmp_path / "there")
    resumed.load_state_dict(state)
    again = [(batch["path"], batch["pixel_values"]) for batch in resumed]
    assert len(again) == len(rest) == 9 - 2
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(again, rest))
    with pytest.raises(ValueError, match=r"saved while training on other data than .*other/train .*start a new fit"):
        training_loader(tmp_path / "other", val_size=0.5).load_state_dict(state)
    # A fit resumed on the other split is refused by the data module too, before any batch, at an epoch's end as well.
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn

    def fit_module(folder: Path, val_size: float = 0.25) -> Food101DataModule:
        module = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=val_size, image_processor=tiny_vit, optimized_dir=str(folder), num_workers=0)
        module.setup("fit")
        module.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        module.trainer.state.fn = TrainerFn.FITTING
        return module

    saved = fit_module(tmp_path / "here").state_dict()
    fit_module(tmp_path / "there").load_state_dict(saved)  # the copy: the same images
    with pytest.raises(ValueError, match=r"trained with other training and validation images than this run selects"):
        fit_module(tmp_path / "other", val_size=0.5).load_state_dict(saved)
    files = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, batch_size=4, num_workers=0)
    files.setup("fit")
    with pytest.raises(ValueError, match=r"saved while training on other data than these image files \(an optimized dataset\)"):
        files.train_dataloader().load_state_dict(state)  # it would restart the epoch from its first batch


def test_a_test_split_that_is_also_validated_on_is_written_once(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    settings = dict(data_dir=food101_dir, train_split="train", val_split="test", image_processor=tiny_vit, num_workers=0)
    manifest = Food101DataModule(**settings).optimize(str(tmp_path / "optimized"))
    assert manifest["splits"] == {"train": 48, "val": 16, "test": 16} and manifest["folders"] == {"test": "val"}
    assert sorted(p.name for p in (tmp_path / "optimized").iterdir()) == [".lit_lora.lock", "lit_lora_dataset.json", "train", "val"]
    files = Food101DataModule(**settings)
    tables, _ = files._optimized_splits()
    written = sum(f.stat().st_size for f in (tmp_path / "optimized").rglob("chunk-*.bin"))
    assert 0.9 * written < optimized.estimated_bytes(tables, files.image_settings, 256) < 1.1 * written  # the test split counted once
    module = Food101DataModule(**settings, optimized_dir=str(tmp_path / "optimized"))
    module.setup("test")
    files.setup("test")
    assert [item["path"] for item in module.test_table] == files.test_table.paths  # the test images, in test's order


def test_a_process_that_must_not_fork_writes_through_a_spawned_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, class_folders_dir: str) -> None:
    """A GPU fit's prepare_data runs after Lightning initialised CUDA, and such a process must not fork: a split is
    then written by a spawned process (whose own workers fork)."""
    monkeypatch.setattr(optimized, "_start_method", lambda: "spawn")  # in this process only, as CUDA would be
    module = Food101DataModule(data_dir=class_folders_dir, train_split="train", val_size=0.25, image_processor=tiny_vit)
    tables, description = module._optimized_splits()
    location = str(tmp_path / "spawned")
    manifest = optimized.write_splits(location, {"train": tables["train"]}, description, module.image_settings, 256, 2, {}, replace=False)
    assert manifest["state"] == "complete" and manifest["splits"] == {"train": 18}
    assert sorted(item["path"] for item in OptimizedImages(f"{location}/train")) == sorted(tables["train"].paths)


class FirstBatches(__import__("lightning").pytorch.Callback):
    """Records each epoch's first training batch: its rows and its mean pixel (the augmentation)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[int], float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.seen.append((batch["index"].tolist(), batch["pixel_values"].float().mean().item()))


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_loaders_made_anew_every_epoch_give_the_batches_of_kept_ones(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """``reload_dataloaders_every_n_epochs``: litdata counts epochs in its loader, so a new one every epoch shuffled and
    cropped as in the first epoch, every epoch. Lightning drops the loaders it replaces without stopping their workers:
    none is left running (litdata's kept workers outlived their loaders until the garbage collector, 5 s each)."""
    import gc
    import multiprocessing

    import lightning.pytorch as pl

    from lit_lora import LoRAImageClassifier

    settings = dict(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, batch_size=8, num_workers=1)
    if source == "optimized":
        Food101DataModule(**settings).optimize(str(tmp_path / "optimized"))
        settings.update(data_dir=None, dataset=None, optimized_dir=str(tmp_path / "optimized"))
    runs = []
    for reload in (0, 1):
        record, data = FirstBatches(), Food101DataModule(**settings)
        gc.disable()  # what the collector would find later stays for the check below
        running = set(multiprocessing.active_children())
        try:
            pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, max_epochs=3,
                       reload_dataloaders_every_n_epochs=reload, callbacks=[record]).fit(LoRAImageClassifier(tiny_vit, class_names=data.class_names), data)
            assert set(multiprocessing.active_children()) <= running
        finally:
            gc.enable()
        runs.append(record.seen)
    assert len(runs[0]) == 3 and runs[0][0] != runs[0][1]  # a new order and new crops every epoch
    assert runs[1] == runs[0]


class ImagesPerEpoch(__import__("lightning").pytorch.Callback):
    """Records the index of every training image, per epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())


def fit_settings(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str, **options: Any) -> dict[str, Any]:
    """Data-module settings of the tests' images: the image files, or (``source`` "optimized") an optimized copy."""
    settings = dict(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, **options)
    if source == "optimized":
        Food101DataModule(**settings).optimize(str(tmp_path / "optimized"))
        settings.update(data_dir=None, dataset=None, optimized_dir=str(tmp_path / "optimized"))
    return settings


def fit_recording_images(
    settings: dict[str, Any], folder: Path, ckpt_path: Path | None = None, *callbacks: Any, stock_checkpoint: bool = False, **trainer_options: Any
) -> dict[int, list[int]]:
    """Fit the tiny ViT of ``settings`` without validation, checkpoints in ``folder`` (by `AdapterCheckpoint`, or
    Lightning's own ``ModelCheckpoint``); return each epoch's training images. A SIGTERM (`SignalAtBatch`) ends it as it
    ends a preempted run, with last.ckpt written."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_lora import AdapterCheckpoint, LoRAImageClassifier

    record, data = ImagesPerEpoch(), Food101DataModule(**settings)
    checkpoint = ModelCheckpoint(dirpath=str(folder), save_last=True) if stock_checkpoint else AdapterCheckpoint(dirpath=str(folder), monitor=None)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[record, checkpoint, *callbacks], **trainer_options)
    with contextlib.suppress(SIGTERMException):
        trainer.fit(LoRAImageClassifier(settings["image_processor"], class_names=data.class_names), data, ckpt_path=ckpt_path)
    return record.seen


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_an_epoch_ended_early_by_limit_train_batches_resumes_with_the_next_epoch(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """``limit_train_batches``: Lightning ends each epoch before the loader runs out. Every epoch is a new draw (litdata's
    persistent workers served the first epoch's images and crops every epoch), and resumed from an epoch's end, the next
    epoch trains what an uninterrupted run's does (litdata went on with the ended epoch's later images)."""
    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=1)
    whole = fit_recording_images(settings, tmp_path / "whole", max_epochs=2, limit_train_batches=2)
    assert len(whole[0]) == len(whole[1]) == 8 and whole[0] != whole[1]
    fit_recording_images(settings, tmp_path / "stopped", max_epochs=1, limit_train_batches=2)
    resumed = fit_recording_images(settings, tmp_path / "resumed", tmp_path / "stopped" / "last.ckpt", max_epochs=2, limit_train_batches=2)
    assert list(resumed) == [1] and len(resumed[1]) == 8 and resumed[1] == whole[1]


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_overfit_batches_trains_the_same_first_batches_every_epoch(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Lightning's ``overfit_batches`` debugging mode: the same batches, in order, every epoch. Image files stopped with
    an AttributeError (Lightning swaps the sampler for a sequential one); optimized data kept shuffling."""
    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=1)
    seen = fit_recording_images(settings, tmp_path / "run", max_epochs=3, overfit_batches=2)
    assert list(seen) == [0, 1, 2] and len(seen[0]) == 8 and seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize(("source", "stock_checkpoint"), [("optimized", False), ("files", False), ("files", True)])
def test_a_fit_continued_with_a_larger_max_steps_trains_what_one_fit_would(source: str, stock_checkpoint: bool, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """``max_steps`` 3 ends the first epoch after 3 of its batches; continued to 10 steps from its last.ckpt, the fit
    trains the rest of that epoch, then the next, image for image as one fit to 10 steps (Lightning resumed it as the
    next epoch from batch 3: image files skipped the ended epoch's other images and the next one's first 12). Also with
    Lightning's own ModelCheckpoint writing the checkpoints: the model corrects them."""
    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=0)
    whole = fit_recording_images(settings, tmp_path / "whole", max_steps=10)
    first = fit_recording_images(settings, tmp_path / "first", max_steps=3, stock_checkpoint=stock_checkpoint)
    rest = fit_recording_images(settings, tmp_path / "continued", tmp_path / "first" / "last.ckpt", max_steps=10, stock_checkpoint=stock_checkpoint)
    assert list(whole) == [0, 1] and list(first) == [0] and list(rest) == [0, 1]
    assert first[0] + rest[0] == whole[0] and rest[1] == whole[1]


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_a_fit_with_max_steps_resumed_from_an_epochs_end_trains_the_later_epochs_in_order(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """A fit to ``max_steps`` 20 (9 batches an epoch) resumed from its last.ckpt of the end of epoch 0, as written then (a
    run killed in epoch 1) and as written at the end of a fit stopped after epoch 0 (``max_epochs`` 1): epochs 1 and 2
    train the images of the run straight through, in its order. Lightning resumed a fit with max_steps inside the ended
    epoch (its issue #19617): it trained a batch of the next epoch's images under the ended one's number, or ran an epoch of
    no batches, and counted the later epochs one ahead (image files: in the next epoch's order)."""
    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=0)
    whole = fit_recording_images(settings, tmp_path / "whole", None, CopyLastCheckpoint(tmp_path / "whole", {(1, 0): tmp_path / "killed.ckpt"}), max_steps=20)
    fit_recording_images(settings, tmp_path / "first", max_steps=20, max_epochs=1)
    assert [len(whole[epoch]) for epoch in whole] == [36, 36, 8]
    for ckpt in (tmp_path / "killed.ckpt", tmp_path / "first" / "last.ckpt"):
        assert fit_recording_images(settings, tmp_path / f"from-{ckpt.stem}", ckpt, max_steps=20) == {1: whole[1], 2: whole[2]}


@pytest.mark.parametrize("workers", [0, 1])
def test_a_streamed_fit_preempted_in_two_epochs_trains_what_one_fit_would(workers: int, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """SIGTERM 3 batches into epoch 0, resumed, SIGTERM 3 batches into epoch 1, resumed: every epoch trains the images of
    the run straight through, in its order. litdata keeps a loaded state on until a pass runs out, which Lightning does
    not make it do: without loader workers the epoch after a resumed one trained nothing; with workers, the second
    resume went on in the first epoch's order."""
    from test_checkpoints import SignalAtBatch

    settings = fit_settings("optimized", tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=workers)
    whole = fit_recording_images(settings, tmp_path / "whole", max_epochs=3)
    runs = [fit_recording_images(settings, tmp_path / "stopped", None, SignalAtBatch(batch=2, epoch=0), max_epochs=3)]
    runs.append(fit_recording_images(settings, tmp_path / "stopped-again", tmp_path / "stopped" / "last.ckpt", SignalAtBatch(batch=2, epoch=1), max_epochs=3))
    runs.append(fit_recording_images(settings, tmp_path / "resumed", tmp_path / "stopped-again" / "last.ckpt", max_epochs=3))
    assert [len(whole[epoch]) for epoch in whole] == [36, 36, 36] and whole[0] != whole[1] != whole[2]
    assert {epoch: sum((run.get(epoch, []) for run in runs), []) for epoch in whole} == whole


class CopyLastCheckpoint(__import__("lightning").pytorch.Callback):
    """Copies ``folder/last.ckpt`` to ``copies[(epoch, batch)]`` as that training batch starts: the checkpoint a run killed
    there (SIGKILL, no checkpoint of its own) resumes from."""

    def __init__(self, folder: Path, copies: dict[tuple[int, int], Path]) -> None:
        self.folder, self.copies = folder, copies

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) in self.copies:
            __import__("shutil").copy(self.folder / "last.ckpt", self.copies[trainer.current_epoch, batch_idx])


def fit_validating_every_3_batches(settings: dict[str, Any], folder: Path, ckpt_path: Path | None, *callbacks: Any) -> None:
    """Fit the tiny ViT of ``settings`` for 2 epochs, validating every 3 batches, accumulating 2, checkpoints in ``folder``
    (by `AdapterCheckpoint`), from the same initial LoRA weights every time. A SIGTERM ends it as it ends a preempted run,
    with last.ckpt written."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_lora import AdapterCheckpoint, LoRAImageClassifier

    data = Food101DataModule(**settings)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=2,
                         val_check_interval=3, accumulate_grad_batches=2, callbacks=[AdapterCheckpoint(dirpath=str(folder)), *callbacks])
    torch.manual_seed(0)
    with contextlib.suppress(SIGTERMException):
        trainer.fit(LoRAImageClassifier(settings["image_processor"], class_names=data.class_names), data, ckpt_path=ckpt_path)


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_runs_killed_after_a_validation_inside_an_epoch_resume_exactly(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Validation every 3 batches (after batches 3, 6 and 9 of 9), accumulation 2, one loader worker. Killed after epoch
    1's first validation (inside an accumulation window), and resumed from its last.ckpt; that run killed after its first
    validation (Lightning validates the epoch again before training), and after the epoch's second; each resumed: the
    same weights, moments and learning rate as the run straight through. Before: the loaders reported the position
    they were made with, not the one loaded, until they had started (image files: the epoch's start; litdata's dataset
    changed the loaded epoch to the one before), litdata's with workers saved the epoch before theirs, and the first
    validation's checkpoint left out the window's gradients."""
    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=1)

    def fit(name: str, ckpt_path: Path | None = None, copies: dict[tuple[int, int], str] | None = None) -> Path:
        folder = tmp_path / name
        fit_validating_every_3_batches(settings, folder, ckpt_path, CopyLastCheckpoint(folder, {at: tmp_path / copy for at, copy in (copies or {}).items()}))
        return folder / "last.ckpt"

    straight = fit("straight", copies={(1, 4): "killed.ckpt"})
    resumed = fit("resumed", tmp_path / "killed.ckpt", copies={(1, 3): "killed-again.ckpt", (1, 7): "killed-later.ckpt"})
    steps = [torch.load(tmp_path / name, weights_only=True)["global_step"] for name in ("killed.ckpt", "killed-again.ckpt", "killed-later.ckpt")]
    assert steps == [5 + 1, 5 + 1, 5 + 3]  # 5 optimizer steps an epoch
    for last in (resumed, fit("again", tmp_path / "killed-again.ckpt"), fit("later", tmp_path / "killed-later.ckpt")):
        assert_same_training_state(straight, last, global_step=10)


class Validations(__import__("lightning").pytorch.Callback):
    """Records ``(epoch, step)`` of each validation run to its end, and sends SIGTERM after validation batch ``batch``
    of the validation at optimizer step ``step``, when given (the run stops there, with last.ckpt written)."""

    def __init__(self, step: int | None = None, batch: int = 0) -> None:
        self.step, self.batch, self.done = step, batch, []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and (trainer.global_step, batch_idx) == (self.step, self.batch):
            os.kill(os.getpid(), __import__("signal").SIGTERM)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.done.append((trainer.current_epoch, trainer.global_step))


def test_a_validation_interrupted_again_as_the_resumed_run_repeats_it_is_run_again(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """SIGTERM inside a validation (every 3 batches, 6 validation batches), resumed: the run validates again before
    training; SIGTERM inside that validation too, resumed: it validates again, and every validation of the run straight
    through runs to its end once, with the same weights at the end. The second checkpoint counted the first attempt's
    batch as started, and Lightning's next resume skipped that validation."""
    settings = fit_settings("files", tmp_path, tiny_vit, food101_dir, batch_size=4, eval_batch_size=2, num_workers=0)

    def fit(name: str, ckpt_path: Path | None = None, stop_at: int | None = None, batch: int = 0) -> list[tuple[int, int]]:
        validations = Validations(stop_at, batch)
        fit_validating_every_3_batches(settings, tmp_path / name, ckpt_path, validations)
        return validations.done

    straight = fit("straight")
    runs = [fit("stopped", None, 8, batch=1), fit("stopped-again", tmp_path / "stopped" / "last.ckpt", 8), fit("resumed", tmp_path / "stopped-again" / "last.ckpt")]
    assert straight == [(0, 1), (0, 3), (0, 5), (1, 6), (1, 8), (1, 10)]
    assert runs[0] == straight[:4] and runs[1] == [] and runs[2] == straight[4:]
    assert_same_training_state(tmp_path / "straight" / "last.ckpt", tmp_path / "resumed" / "last.ckpt", global_step=10)


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_a_checkpoint_of_a_batch_that_validation_follows_resumes_with_that_validation(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Lightning's ModelCheckpoint writing every optimizer step (``every_n_train_steps``, as it ends a training batch) beside
    validation every 3 batches: resumed from the checkpoint of step 3 (batch 6, validated after) and of step 5 (the
    epoch's last batch), as a run killed in that validation would be, each validation of the run straight through from
    that one on runs once, and the weights end the same. Lightning counted the batch done and went on past the
    validation: its val/acc was never computed, and "best" was chosen without it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, batch_size=4, num_workers=1)

    def fit(name: str, ckpt_path: Path | None = None) -> list[tuple[int, int]]:
        validations, steps = Validations(), ModelCheckpoint(dirpath=str(tmp_path / "steps"), filename="{step}", every_n_train_steps=1, save_top_k=-1)
        fit_validating_every_3_batches(settings, tmp_path / name, ckpt_path, validations, *([steps] if ckpt_path is None else []))
        return validations.done

    straight = fit("straight")
    assert straight == [(0, 1), (0, 3), (0, 5), (1, 6), (1, 8), (1, 10)]
    for step, left in ((3, straight[1:]), (5, straight[2:])):
        assert fit(f"from-step-{step}", tmp_path / "steps" / f"step={step}.ckpt") == left
        assert_same_training_state(tmp_path / "straight" / "last.ckpt", tmp_path / f"from-step-{step}" / "last.ckpt", global_step=10)


def test_a_resume_with_another_worker_count_says_what_it_changes(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """litdata resumes the interrupted epoch exactly with any worker count (checked here), but orders the later ones by
    the count, which defaults to the machine's cores: a resume on another kind of node says so, and how to keep the
    order."""
    import multiprocessing

    running = set(multiprocessing.active_children())
    settings = dict(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, batch_size=4)
    Food101DataModule(**settings, num_workers=0).optimize(str(tmp_path / "optimized"))
    settings.update(data_dir=None, dataset=None, optimized_dir=str(tmp_path / "optimized"))

    def loader(workers: int) -> Any:
        # Not persistent: litdata 0.2.76's loader and its kept worker iterator refer to each other, and when the garbage
        # collector takes them, their queues close before the workers are told to stop (5 s per worker, in the next test).
        data = Food101DataModule(**settings, num_workers=workers, persistent_workers=False)
        data.setup("fit")
        return data.train_dataloader()

    whole = [batch["index"].tolist() for batch in loader(2)]
    interrupted = loader(2)
    batches = iter(interrupted)
    first = [next(batches)["index"].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    del batches
    assert set(multiprocessing.active_children()) <= running  # the advice for loaders iterated by hand (data.persistent_workers): their workers are gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader(2).load_state_dict(state)  # the same count: nothing to say
    resumed = loader(0)
    with pytest.warns(UserWarning, match=r"saved with 2 loader worker\(s\) per process and this run has 1: .* set data.num_workers to 2"):
        resumed.load_state_dict(state)
    assert first + [batch["index"].tolist() for batch in resumed] == whole


@pytest.mark.parametrize("source", ["optimized", "files"])
def test_a_resume_with_another_batch_size_trains_each_image_of_the_epoch_once_or_is_refused(source: str, tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """Preempted with batches of 4, resumed with 2 (a smaller GPU), preempted and resumed again: the rest of the epoch is
    every image not yet trained, once (image files skipped 3 x 2 images instead of 3 x 4). Resumed with 8: refused, as Lightning
    counts the resumed epoch in batches and would end it 8 images early (litdata also repeated some). Resumed from the
    end of an epoch with 8: the next epoch is every image once (litdata trained none)."""
    from test_checkpoints import SignalAtBatch

    settings = fit_settings(source, tmp_path, tiny_vit, food101_dir, num_workers=0)

    def fit(batch_size: int, epochs: int, folder: str, ckpt_path: Path | None = None, *callbacks: Any) -> dict[int, list[int]]:
        return fit_recording_images({**settings, "batch_size": batch_size}, tmp_path / folder, ckpt_path, *callbacks, max_epochs=epochs)

    images = len(fit(4, 1, "whole")[0])
    first = fit(4, 1, "stopped", None, SignalAtBatch(batch=2, epoch=0))[0]
    assert len(first) == 12
    second = fit(2, 1, "stopped-again", tmp_path / "stopped" / "last.ckpt", SignalAtBatch(batch=4, epoch=0))[0]
    assert len(second) == 4
    rest = fit(2, 1, "resumed", tmp_path / "stopped-again" / "last.ckpt")[0]  # image files skipped 5 x 2 images: 6 twice
    assert sorted(first + second + rest) == sorted(set(first + second + rest)) and len(first + second + rest) == images
    with pytest.raises(ValueError, match=r"saved 3 batches into an epoch, with 4 images per batch on 1 process\(es\), and this run has 8 on 1: .*"
                       r"8 images early\. Resume with data.batch_size 4 on 1 process\(es\)"):
        fit(8, 1, "refused", tmp_path / "stopped" / "last.ckpt")
    next_epoch = fit(8, 2, "next", tmp_path / "whole" / "last.ckpt")
    assert list(next_epoch) == [1] and len(next_epoch[1]) == len(set(next_epoch[1])) == images


@pytest.mark.parametrize(("saved", "resumed"), [((2, 2), (1, 4)), ((2, 2), (4, 1)), ((1, 4), (2, 1)), ((2, 3), (2, 3))])
def test_image_files_resume_an_epoch_on_another_number_of_processes_with_each_image_once(saved: tuple[int, int], resumed: tuple[int, int]) -> None:
    """(processes, batch size) before and after: the resumed processes together take every image the stopped ones had
    not, once. With another global batch (1 x 4 to 2 x 1), each resumed process skipped its batches times its new batch
    size of its new share: 8 images trained twice."""
    from torch.utils.data import Dataset

    from lit_lora.sampling import ResumableDataLoader, SeededShuffleSampler

    class Rows(Dataset):
        def __getitem__(self, item: tuple[int, int]) -> int:
            return item[0]

    def loaders(processes: int, batch_size: int) -> list[ResumableDataLoader]:
        return [ResumableDataLoader(Rows(), sampler=SeededShuffleSampler(48, seed=3, num_replicas=processes, rank=r), batch_size=batch_size) for r in range(processes)]

    stopped = loaders(*saved)
    passes = [iter(loader) for loader in stopped]
    trained = [row for rows in zip(*[[next(p).tolist() for _ in range(3)] for p in passes]) for batch in rows for row in batch]
    states = [loader.state_dict() for loader in stopped]
    assert all(state == states[0] for state in states)  # every process stopped after the same batch
    rest = []
    for loader in loaders(*resumed):
        loader.load_state_dict(states[0])
        rest += [row for batch in loader for row in batch.tolist()]
    assert sorted(trained + rest) == list(range(48))


def test_runs_on_one_node_that_would_evict_each_others_cached_chunks_are_refused(s3, tiny_vit: str, tmp_path: Path) -> None:
    """Two runs streaming one URL through one chunk cache, one of them limiting it below the size of the splits it reads
    (a sweep's fits): litdata 0.2.76 deletes chunks the other is about to read (measured: a 120 s wait, then a failure).
    The second is refused in one line; runs whose cache holds the data share it, and a run in the same process (a
    notebook's next one) takes over its hold."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(48):  # stored as 480 x 640 uint8, the 36 training images take 33 MB: more than a 24MB cache
        (tmp_path / "large" / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "large" / f"class{i % 4}" / f"{i}.jpg")
    url = s3.url("large")
    options = dict(optimized_dir=url, image_processor=tiny_vit, num_workers=0, optimized_train_side=480)
    Food101DataModule(**options, data_dir=str(tmp_path / "large"), train_split="train", val_size=0.25).optimize(url)
    refused = r"another run streams s3://\S+ through litdata's chunk cache .*, and {} cache is smaller than the data .*a cache folder of its own on a local disk \(LITDATA_CACHE_DIR=<folder>"
    hold = (
        "import sys, time\nfrom lit_lora import Food101DataModule\n"
        f"data = Food101DataModule(**{options!r}, optimized_cache_size=sys.argv[1] or None)\n"
        "data.setup('fit')\nprint('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n"
    )

    def other_run(cache_size: str, seconds: float = 60) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", hold, cache_size, str(seconds)], stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert process.stdout.readline().strip() == "held"
        return process

    sharing = other_run("")
    try:
        Food101DataModule(**options, optimized_cache_size="1GB").setup("validate")  # holds the data: no eviction
        two_nodes = Food101DataModule(**options, optimized_cache_size="24MB")  # each node caches half the data: no eviction
        two_nodes.trainer = __import__("lightning").pytorch.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
        two_nodes.setup("fit")
        with pytest.raises(ValueError, match=refused.format("this run's")):
            Food101DataModule(**options, optimized_cache_size="24MB").setup("fit")
    finally:
        sharing.kill()
        sharing.wait()
    evicting = other_run("24MB")
    try:
        with pytest.raises(ValueError, match=refused.format(r"that run's \(pid \d+ on \S+\)")):
            Food101DataModule(**options).setup("fit")
    finally:
        evicting.kill()
        evicting.wait()
    first, then = Food101DataModule(**options), Food101DataModule(**options, optimized_cache_size="24MB")
    first.setup("fit")  # then fails, say, and is never torn down
    then.setup("fit")
    then.teardown("fit")  # other runs may use the cache again: the lock is free
    import fcntl

    free = os.open(then._cache_use.path, os.O_RDWR)
    try:
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(free)


def test_a_chunk_cache_on_a_disk_without_locks_is_used_unguarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some network mounts have no locks (flock fails with ENOLCK): the run streams as it did before the guard, not stopped."""
    import errno

    from lit_lora import streaming

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(streaming, "get_default_cache_dir", lambda: str(tmp_path / "cache"))
    monkeypatch.setattr(streaming.fcntl, "flock", no_locks)
    use = streaming.ChunkCacheUse("s3://bucket/food101")
    use.acquire(evicts=True)
    use.release()
    assert use.path not in streaming.ChunkCacheUse._held
