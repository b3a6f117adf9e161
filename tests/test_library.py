"""Using lit_lora as a library: importing it or adding its callback changes no process-wide state, a script holding a
loader with workers exits, loading a checkpoint does not reseed the caller, and every learning-rate schedule either
works or is refused up front."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_lora import AdapterCheckpoint, Food101DataModule, LoRAImageClassifier


def test_import_changes_no_signal_handler_or_random_state() -> None:
    """Nor the multiprocessing start method: litdata, which fixes it as it is imported, is imported only where optimized
    data is read, so a script that imports lit_lora can still choose spawn."""
    script = """
import multiprocessing, signal, sys, torch
torch.manual_seed(5)
before = (torch.get_rng_state(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
import lit_lora, lit_lora.cli, lit_lora.optimized
from lit_lora import AdapterCheckpoint, Food101DataModule, LoRAImageClassifier
after = (torch.get_rng_state(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
assert torch.equal(before[0], after[0]) and before[1:] == after[1:], "import changed global state"
assert "litdata" not in sys.modules
multiprocessing.set_start_method("spawn")  # "context has already been set" once litdata is imported
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("start_method", ["fork", pytest.param("forkserver", marks=pytest.mark.slow), "spawn"])  # forkserver: 20 s, as spawn
def test_a_script_that_keeps_loaders_with_workers_exits(tiny_vit: str, food101_dir: str, tmp_path: Path, start_method: str) -> None:
    """Loader workers ignore a SIGTERM from another process (a scheduler's, sent to every process of a job), yet end
    when Python's exit terminates them: a script or notebook that still holds loaders with persistent workers exits
    (it waited for them forever when they ignored every SIGTERM, and again with forkserver and spawn, whose workers
    could not tell who sent it). Reading image files or an optimized dataset says nothing, except for the semaphore
    that importing litdata creates in a spawned worker, which Python reports when that worker ends at exit."""
    script = f"""
import multiprocessing, subprocess, time
multiprocessing.set_start_method({start_method!r})
from lit_lora import Food101DataModule
options = dict(data_dir={food101_dir!r}, train_split="train", val_size=0.25, batch_size=4, num_workers=1, image_processor={tiny_vit!r})
files, optimized = Food101DataModule(**options), Food101DataModule(**options, optimized_dir={str(tmp_path / "optimized")!r})
optimized.prepare_data()
loaders = []
for data in (files, optimized):
    data.setup("fit")
    loaders.append(data.train_dataloader())
batches = [iter(loader) for loader in loaders]
[next(b) for b in batches]
subprocess.run(["kill", "-TERM", *(str(p.pid) for p in multiprocessing.active_children())], check=True)
time.sleep(0.5)
[next(b) for b in batches]  # the workers are still there
print("ok", flush=True)
"""
    # TMPDIR: each worker ended at exit leaves its multiprocessing folder (pymp-*) there, as a torch worker killed by
    # that SIGTERM would.
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    said = [line for line in result.stderr.splitlines() if "Warning" in line]
    litdata_semaphore = "resource_tracker: There appear to be 1 leaked semaphore objects"  # the optimized loader's one worker
    assert said == [] or (start_method != "fork" and len(said) == 1 and litdata_semaphore in said[0]), result.stderr[-2000:]


def test_a_worker_with_a_thread_started_before_its_init_still_ends_at_exit(tiny_vit: str, food101_dir: str) -> None:
    """A forked worker can run a thread before its ``worker_init_fn``: its copy of the main process's memory holds an
    earlier loader that the collector finishes there, starting that loader's queue thread. Such a thread took the
    SIGTERM of Python's exit and dropped it, and the main process waited for the worker forever (the test run hung at
    exit after the streaming tests, 1 run in 3). The thread is started here by an at-fork hook."""
    script = f"""
import multiprocessing, os, threading, time
multiprocessing.set_start_method("fork")
from lit_lora import Food101DataModule
os.register_at_fork(after_in_child=lambda: threading.Thread(target=time.sleep, args=(3600,), daemon=True).start())
data = Food101DataModule(data_dir={food101_dir!r}, train_split="train", val_size=0.25, batch_size=4, num_workers=2, image_processor={tiny_vit!r})
data.setup("fit")
loader = data.train_dataloader()
next(iter(loader))
print("ok", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_spawned_worker_ends_after_what_it_was_still_sending(tmp_path: Path) -> None:
    """A spawned worker ends with Python's full exit, which ends daemon threads where they stand: the queue thread that
    was still sending a batch (torch's worker exits without waiting for it) was ended mid-call, and the worker died of
    SIGABRT, failing a fit stopped mid-epoch with "DataLoader worker ... is killed by signal: Aborted"
    (seen in a CI run of the SIGTERM test with spawned workers). Here the sending outlasts the worker's own work, as it
    does under load: what it sends arrives, and the worker ends well."""
    script = tmp_path / "spawned_worker.py"
    script.write_text("""
import multiprocessing, time
from lit_lora.workers import WorkerStart

class SlowToSend:  # pickled by the queue's sending thread, after the worker's own work is done
    def __reduce__(self):
        time.sleep(1)
        return (str, ("sent",))

def worker(queue):
    WorkerStart()(0)
    queue.put(SlowToSend())
    queue.cancel_join_thread()  # as torch's worker does: its exit does not wait for the queue

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=worker, args=(queue,))
    process.start()
    process.join(30)
    print(queue.get(timeout=5), process.exitcode)
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.split() == ["sent", "0"], result.stderr[-2000:]


class WatchSigint(pl.Callback):
    """Records the SIGINT handler in force while training runs."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.during = signal.getsignal(signal.SIGINT)


def small_fit(tmp_path: Path, tiny_vit: str, food101_dir: str, callbacks: list[pl.Callback]) -> tuple[LoRAImageClassifier, pl.Trainer]:
    torch.manual_seed(0)
    data = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, batch_size=8, num_workers=0, image_processor=tiny_vit)
    model = LoRAImageClassifier(tiny_vit, class_names=data.class_names)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=callbacks, enable_checkpointing=bool(callbacks),
    )
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_a_fit_into_another_runs_checkpoint_folder_says_so_and_a_resume_there_does_not(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    data = Food101DataModule(data_dir=food101_dir, train_split="train", num_workers=0, image_processor=tiny_vit, batch_size=8)
    model = LoRAImageClassifier(tiny_vit, class_names=data.class_names)
    folder = tmp_path / "run"

    def fit(epochs: int, ckpt_path: str | None = None) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=epochs, limit_train_batches=1,
                       limit_val_batches=1, callbacks=[AdapterCheckpoint(dirpath=str(folder))]).fit(model, data, ckpt_path=ckpt_path)
        return [str(w.message) for w in caught if "checkpoints" in str(w.message) or "not empty" in str(w.message)]

    assert fit(1) == []  # a new folder
    assert fit(2, ckpt_path=str(folder / "last.ckpt")) == []  # its own run, resumed (Lightning warned: "exists and is not empty")
    again = fit(1)  # a new run in that folder: its adapter folders are replaced
    assert len(again) == 1 and re.search(r"already holds another run's checkpoints \(.*last.ckpt.*\): .*replaces that run's adapter folders", again[0])


class FailAfterBatch(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        raise RuntimeError("a bug in the user's code")


def test_a_failed_fit_puts_ctrl_c_and_sigterm_back(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """With ``stop_on_interrupt`` (the CLI's), Ctrl-C stops after the batch while training; once a fit has failed, it
    raises KeyboardInterrupt again. (Lightning puts back every handler it found when it registered its own, after the
    callbacks' ``on_exception``: one installed before that outlived the fit, and a later Ctrl-C in that notebook or
    in-process CLI raised SIGTERM, which killed the process.)"""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    watch = WatchSigint()
    with pytest.raises(RuntimeError, match="a bug in the user's code"):
        small_fit(tmp_path, tiny_vit, food101_dir, [AdapterCheckpoint(dirpath=str(tmp_path / "ckpt"), stop_on_interrupt=True), watch, FailAfterBatch()])
    assert getattr(watch.during, "__name__", None) == "_stop_after_this_batch"  # Ctrl-C stops after the batch while training
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_adapter_checkpoint_leaves_signals_and_random_state_alone(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    handler = signal.getsignal(signal.SIGINT)
    watch = WatchSigint()
    small_fit(tmp_path / "plain", tiny_vit, food101_dir, [])
    without = torch.get_rng_state()
    _, trainer = small_fit(tmp_path / "with", tiny_vit, food101_dir, [AdapterCheckpoint(dirpath=str(tmp_path / "ckpt")), watch])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file() and (tmp_path / "ckpt" / "adapter-last").is_dir()
    assert watch.during is handler and signal.getsignal(signal.SIGINT) is handler  # Ctrl-C still interrupts
    assert torch.equal(torch.get_rng_state(), without)  # the callback drew nothing and reseeded nothing

    # Loading a checkpoint builds the model (which draws the new head's initial weights) and nothing more.
    torch.manual_seed(123)
    LoRAImageClassifier(tiny_vit, class_names=trainer.lightning_module.class_names)
    expected = torch.get_rng_state()
    torch.manual_seed(123)
    LoRAImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert torch.equal(torch.get_rng_state(), expected)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "reduce_lr_on_plateau"])
def test_learning_rate_schedules(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str) -> None:
    from test_cli import common_args

    from lit_lora.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", *common_args(tiny_vit, food101_dir), f"--model.lr_scheduler_type={name}", "--model.warmup_steps=2", "--trainer.max_epochs=2"])
    config = cli.trainer.lr_scheduler_configs[0]
    rates = [float(r["lr-AdamW/pg1"]) for r in __import__("csv").DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open()) if r.get("lr-AdamW/pg1")]
    peak = cli.model.hparams.learning_rate
    if name == "reduce_lr_on_plateau":
        assert isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        assert config.interval == "epoch" and config.monitor == "val/loss"
    else:
        assert config.interval == "step" and rates[0] == 0.0  # warmup starts at 0
        assert max(rates) == pytest.approx(peak)
        assert (rates[-1] == pytest.approx(peak)) == (name == "constant_with_warmup")


@pytest.mark.parametrize(
    "name, options",
    [("linear", {}), ("cosine", {}), ("polynomial", {}), ("warmup_stable_decay", {"num_decay_steps": 5}), ("cosine_with_min_lr", {"min_lr_rate": 0.1})],
)
def test_a_schedule_started_with_its_length_gives_transformers_rates_also_after_a_resume(name: str, options: dict, tmp_path: Path) -> None:
    """The model sets the schedule's length in on_train_start (so that Lightning keeps the loader state it restores):
    every step's rate is transformers' own, warmup_ratio (a share of that length) included, and a schedule rebuilt from
    its saved state (as a resumed fit's, loaded with weights_only) goes on with the same rates."""
    import math

    from transformers import get_scheduler

    from lit_lora.schedules import ScheduleOfAFit

    total = 12

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))], lr=0.01)

    reference_optimizer = optimizer()
    reference = get_scheduler(name, reference_optimizer, math.ceil(0.25 * total), total, scheduler_specific_kwargs=options)
    ours_optimizer = optimizer()
    ours = ScheduleOfAFit(ours_optimizer, name, warmup_ratio=0.25, options=options)
    ours.start(total)
    expected, rates = [], []
    for step in range(total):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        rates.append(ours_optimizer.param_groups[0]["lr"])
        for opt, schedule in ((reference_optimizer, reference), (ours_optimizer, ours)):
            opt.step()
            schedule.step()
        if step == 4:
            torch.save({"schedule": ours.state_dict(), "optimizer": ours_optimizer.state_dict()}, tmp_path / "state.pt")
            saved = torch.load(tmp_path / "state.pt", weights_only=True)
            ours_optimizer = optimizer()
            ours = ScheduleOfAFit(ours_optimizer, name, warmup_ratio=0.25, options=options)
            ours_optimizer.load_state_dict(saved["optimizer"])
            ours.load_state_dict(saved["schedule"])
            ours.start(total)
    assert rates == expected and expected[0] == 0.0 and max(expected) == pytest.approx(0.01)
    unstarted = ScheduleOfAFit(optimizer(), name, warmup_ratio=0.25, options=options)
    with pytest.raises(RuntimeError, match="stepped before its start"):
        unstarted.step()


def test_an_endless_fit_takes_the_schedules_without_a_length_and_refuses_the_others_in_one_line() -> None:
    """trainer.max_epochs=-1 without max_steps: Lightning estimates an infinite number of steps."""
    from lit_lora.schedules import ScheduleOfAFit

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    warming = ScheduleOfAFit(optimizer, "constant_with_warmup", warmup_steps=2)
    warming.start(float("inf"))
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warming.step()
    assert rates == [0.0, 0.005, 0.01, 0.01]
    for name, ratio in (("linear", 0.0), ("cosine", 0.0), ("constant_with_warmup", 0.1)):
        schedule = ScheduleOfAFit(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.01), name, warmup_ratio=ratio)
        with pytest.raises(ValueError, match=rf"lr_scheduler_type '{name}' \(or a warmup_ratio\) needs the fit's length") as caught:
            schedule.start(float("inf"))
        assert "\n" not in str(caught.value)


def test_unknown_or_unsteppable_schedules_are_refused_before_anything_is_built(tmp_path: Path) -> None:
    from lit_lora.schedules import scheduler_names

    assert {"linear", "cosine", "reduce_lr_on_plateau", "warmup_stable_decay"} <= set(scheduler_names())
    for name, message in (
        ("cosine_decay", "is not a transformers schedule; use one of .*'linear'"),
        ("greedy", "'greedy' is not supported"),
        ("cosine_with_min_lr", "needs min_lr or min_lr_rate in lr_scheduler_kwargs"),
    ):
        with pytest.raises(ValueError, match=message):
            LoRAImageClassifier(str(tmp_path / "never-loaded"), class_names=["a", "b"], lr_scheduler_type=name)
