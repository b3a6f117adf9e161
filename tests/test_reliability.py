"""Unreadable images are skipped and reported (or stop the run), odd image modes become correct RGB."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import bare_env
from PIL import Image
from test_cli import common_args, finish_cli, start_cli

from lit_lora import Food101DataModule
from lit_lora.cli import cli_main
from lit_lora.images import BadImageError

BAD = {"tomato/0001": "truncated", "matcha/0002": "empty", "banana/0003": "text"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the demo (8 classes) through the command line, on an optimized dataset it builds first (in
    ``<folder>/optimized``); returns its run folder."""
    folder = tmp_path_factory.mktemp("demo")
    result = run_cli(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.max_epochs=1", f"--data.optimized_dir={folder / 'optimized'}"], folder)
    assert result.returncode == 0, result.stderr[-2000:]
    (folder / "fit_output.txt").write_text(result.stdout + result.stderr)
    return folder / "checkpoints" / "demo" / "version_0"


def test_the_console_shows_lit_loras_lines_not_library_chatter(tmp_path: Path, trained_demo: Path) -> None:
    # fit optimized the images and streamed them; validate streams them, predict reads image files.
    demo = ["--config", str(REPO / "configs" / "demo.yaml")]
    outputs = {"fit": (trained_demo.parents[2] / "fit_output.txt").read_text()}
    validate = [f"--ckpt_path={trained_demo / 'last.ckpt'}", f"--data.optimized_dir={trained_demo.parents[2] / 'optimized'}"]
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(trained_demo / "training_curves.png", images / name)
    predict = [f"--ckpt_path={trained_demo / 'adapter'}", f"--data.predict_dir={images}"]
    verbose_validate = ["--verbose", "validate", *demo, f"--ckpt_path={trained_demo / 'last.ckpt'}"]
    validated, predicted, verbose = run_clis([["validate", *demo, *validate], ["predict", *demo, *predict], verbose_validate], tmp_path)
    for command, result in (("validate", validated), ("predict", predicted)):
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[command] = result.stdout + result.stderr
    litdata = ("Create an account", "Storing the files", "inferred the following", "Worker 0 is", "Finished data processing", "buffer is not writable")
    lightning = ("GPU available", "dirpath has changed", "has `__len__` defined")
    for command, output in outputs.items():
        for chatter in ("LOAD REPORT", "litlogger", "Found keys", "is_gradient_checkpointing", "Loading weights", *lightning, *litdata):
            assert chatter not in output, (command, chatter)
    assert "[lit_lora] optimizing train: 384 images into" in outputs["fit"] and "[lit_lora] optimized train in " in outputs["fit"]
    assert "Progress" not in outputs["fit"] and "\x1b[" not in outputs["fit"]  # litdata's bar only on a terminal, not in logs
    assert "[lit_lora] trainable params:" in outputs["fit"] and "[lit_lora] fit finished" in outputs["fit"]
    assert "[lit_lora] validate report" in outputs["validate"] and "[lit_lora] wrote 2 predictions" in outputs["predict"]
    assert "GPU available" in verbose.stdout + verbose.stderr  # --verbose brings the libraries' lines back


@pytest.fixture
def dirty_food101(tmp_path: Path, food101_dir: str) -> Path:
    """The Food-101 fixture with a truncated JPEG, a zero-byte file and a text file named .jpg among the training images."""
    root = Path(shutil.copytree(food101_dir, tmp_path / "dirty"))
    truncated = root / "images" / "tomato" / "0001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "images" / "matcha" / "0002.jpg").write_bytes(b"")
    (root / "images" / "banana" / "0003.jpg").write_text("not an image\n")
    return root


def test_unreadable_images_are_skipped_counted_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dirty_food101: Path, tiny_vit: str) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a for a in common_args(tiny_vit, str(dirty_food101))] + ["--data.val_size=0.1"]
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image\(s\) this epoch") as caught:
        cli = cli_main(["fit", *args, "--trainer.max_epochs=2"])
    assert cli.trainer.current_epoch == 2  # the run went on
    listing = Path(cli.trainer.log_dir) / "skipped_images.txt"
    lines = listing.read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).relative_to(dirty_food101 / "images").as_posix()[:-4] for line in lines) == sorted(BAD)
    assert all("\t" in line and line.split("\t")[1] for line in lines)
    # Reported once, not again in the second epoch (nothing new was skipped).
    assert sum("unreadable image" in str(w.message) for w in caught) == 1


def test_on_bad_image_error_stops_naming_the_file(dirty_food101: Path, tiny_vit: str) -> None:
    module = Food101DataModule(data_dir=str(dirty_food101), train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit, on_bad_image="error")
    module.setup("fit")
    with pytest.raises(BadImageError, match=r"cannot read image .*(0001|0002|0003)\.jpg .*on_bad_image skip"):
        for _ in module.train_dataloader():
            pass


def test_decompression_bombs_are_skipped(monkeypatch: pytest.MonkeyPatch, food101_dir: str, tiny_vit: str) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 48x48 images are now "too large" (over twice the limit)
    module = Food101DataModule(data_dir=food101_dir, train_split="train[:4]", val_size=0.5, num_workers=0, image_processor=tiny_vit)
    module.setup("fit")
    batch = module.on_after_batch_transfer(next(iter(module.val_dataloader())), 0)
    assert "pixel_values" not in batch
    assert all("DecompressionBomb" in reason for reason in module.skipped_images.values())
    assert len(module.skipped_images) == 2


def test_optimize_reports_bad_images_as_fit_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dirty_food101: Path, tiny_vit: str) -> None:
    monkeypatch.chdir(tmp_path)
    args = [*common_args(tiny_vit, str(dirty_food101)), f"--data.optimized_dir={tmp_path / 'optimized'}"]
    module = cli_main(["optimize", *[a for a in args if not a.startswith("--trainer")], f"--output_dir={tmp_path / 'optimized'}"]).datamodule
    assert sorted(Path(p).relative_to(dirty_food101 / "images").as_posix()[:-4] for p in module.skipped_images) == sorted(BAD)
    manifest = json.loads((tmp_path / "optimized" / "lit_lora_dataset.json").read_text())
    assert sorted(manifest["unreadable"]) == sorted(module.skipped_images) and all(manifest["unreadable"].values())
    assert sum(manifest["splits"].values()) == 64 - 3  # left out of the splits they were in
    # fit on it lists them in its run folder as a fit on the files does.
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image\(s\)"):
        cli = cli_main(["fit", *args, "--trainer.max_epochs=1"])
    lines = (Path(cli.trainer.log_dir) / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(module.skipped_images)
    # With on_bad_image error, a fit on it stops as a fit on the files would, before training.
    with pytest.raises(BadImageError, match=r"cannot read image .*(0001|0002|0003)\.jpg .*on_bad_image skip"):
        cli_main(["fit", *args, "--data.on_bad_image=error", "--trainer.max_epochs=1"])


def test_optimize_checks_the_free_space_first_and_a_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, food101_dir: str, tiny_vit: str) -> None:
    from lit_lora import optimized

    settings = dict(data_dir=food101_dir, train_split="train", val_size=0.25, image_processor=tiny_vit, num_workers=2)
    module = Food101DataModule(**settings)
    tables, _ = module._optimized_splits()
    need = optimized.estimated_bytes(tables, module.image_settings, 256)
    written = module.optimize(str(tmp_path / "roomy"))
    actual = sum(f.stat().st_size for f in (tmp_path / "roomy").rglob("chunk-*.bin"))
    assert written["state"] == "complete" and 0.9 * actual < need < 1.5 * actual  # the estimate, against what was written
    with monkeypatch.context() as patch:
        patch.setattr(optimized, "free_bytes", lambda path: need - 1)
        with pytest.raises(ValueError, match=r"the optimized dataset needs about .* GB and its disk has .* GB free; free some space"):
            Food101DataModule(**settings).optimize(str(tmp_path / "cramped"))
    assert optimized.read_manifest(str(tmp_path / "cramped")) is None  # refused before decoding or writing anything

    groups = tmp_path / "writer-groups"

    def broken(self: object, image: object) -> None:
        with groups.open("a") as f:
            f.write(f"{os.getpgid(0)}\n")
        raise RuntimeError("a bug in a transform")

    monkeypatch.setattr(optimized.WriteImage, "_resized", broken)  # in optimize's (forked) workers too
    before = forks_of_this_process()
    with pytest.raises(ValueError, match=r"optimize stopped while writing train into .*/train \(RuntimeError: a bug in a transform\); .*incomplete"):
        Food101DataModule(**settings).optimize(str(tmp_path / "failing"))
    assert optimized.read_manifest(str(tmp_path / "failing"))["state"] == "incomplete"
    writer_groups = {int(line) for line in groups.read_text().split()}
    assert writer_groups and os.getpgid(0) not in writer_groups  # the writer leads a group of its own

    def left() -> set[int]:
        return (forks_of_this_process() - before) | processes_in_groups(writer_groups)

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left()  # litdata's helper processes too (killed with the writer's process group)


def processes_running(command: bytes) -> set[int]:
    """Processes other than this one whose command line is ``command`` (``/proc/<pid>/cmdline``): a process's forks
    share its command line."""
    found = set()
    for pid in _other_pids():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == command:
                found.add(pid)
        except OSError:  # ended meanwhile
            pass
    return found


def forks_of_this_process() -> set[int]:
    """This process's descendants that run its command line: its forks and theirs (not those of another pytest-xdist
    worker, which runs the same command line)."""
    parents = {pid: int(fields[1]) for pid in processes_running(Path("/proc/self/cmdline").read_bytes()) if (fields := _stat_fields(pid))}
    own, found = os.getpid(), set()
    for pid, ancestor in parents.items():
        while ancestor != own and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == own:
            found.add(pid)
    return found


def processes_in_groups(groups: set[int]) -> set[int]:
    """Live processes in any of these process groups (forks orphaned when their parent was killed keep their group;
    killed ones that nobody reaped yet are left out)."""
    return {pid for pid in _other_pids() if (fields := _stat_fields(pid)) and fields[0] != "Z" and int(fields[2]) in groups}


def _other_pids() -> list[int]:
    """Every process's pid but this one's (``/proc``)."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit() and int(entry.name) != os.getpid()]


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: state, parent pid, process group, ... (empty once it ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


# optimize with each image taking 1 s more: a write that is still going on a second after it started.
SLOW_OPTIMIZE = """
import signal, sys, time
# Ctrl-C raises KeyboardInterrupt, as in a terminal's foreground job. Python keeps SIGINT ignored when it starts with it
# ignored, as everything started in the background by a non-interactive shell does (a test run started with "&").
signal.signal(signal.SIGINT, signal.default_int_handler)
import lit_lora.optimized as optimized
write = optimized.WriteImage.__call__
optimized.WriteImage.__call__ = lambda self, row: (time.sleep(1), write(self, row))[1]  # the train split: 20 s
from lit_lora.__main__ import main
sys.argv = ["lit_lora", *sys.argv[1:]]
main()
"""


def test_ctrl_c_during_optimize_stops_every_process_and_says_so(tmp_path: Path, food101_dir: str, tiny_vit: str) -> None:
    """Ctrl-C in a terminal (SIGINT to the whole process group) and ``kill -INT`` of the process alone, while optimize
    writes (runs at once): exit status 130 at once and one line, the dataset marked incomplete, no process and no
    temporary folder left. (litdata's own SIGINT handler exits with status 0, and, signalled alone, leaves its workers
    writing.) ``kill -TERM`` (SIGTERM's default action: no Python cleanup) leaves no process and no folder either."""
    (tmp_path / "tmp").mkdir()
    runs = {}
    for who in ("terminal", "process", "sigterm"):
        output, log = tmp_path / who / "optimized", tmp_path / f"{who}.txt"
        command = [sys.executable, "-c", SLOW_OPTIMIZE, "optimize", f"--data.data_dir={food101_dir}", "--data.train_split=train",
                   f"--model.model_name_or_path={tiny_vit}", "--data.num_workers=2", f"--output_dir={output}"]
        with log.open("w") as stderr:  # a file: processes left behind would keep a pipe open
            process = subprocess.Popen(command, stderr=stderr, start_new_session=True, env=bare_env(TMPDIR=str(tmp_path / "tmp"), HF_HUB_OFFLINE="1"))
        runs[who] = process, output, log, ("\0".join(command) + "\0").encode()
    # Each run is signalled a second after it starts writing its train split, on its own clock: the three start
    # together but may reach that point seconds apart on a busy machine (waiting for the slowest let the others finish).
    due: dict[str, float] = {}
    deadline = time.monotonic() + 90
    while len(due) < len(runs) or any(when != 0 for when in due.values()):
        assert time.monotonic() < deadline, {who: run[2].read_text() for who, run in runs.items()}
        for who, (process, _, log, _) in runs.items():
            if who not in due and "optimizing train" in log.read_text():
                due[who] = time.monotonic() + 1
            if due.get(who, 0) and time.monotonic() >= due[who]:
                assert process.poll() is None, f"{who} ended before it was signalled: {log.read_text()}"
                if who == "terminal":
                    os.killpg(process.pid, signal.SIGINT)
                else:
                    os.kill(process.pid, signal.SIGTERM if who == "sigterm" else signal.SIGINT)
                due[who] = 0
        time.sleep(0.05)
    for who, (process, output, log, command) in runs.items():
        if who == "sigterm":
            assert process.wait(15) == -signal.SIGTERM
        else:
            assert process.wait(15) == 130, log.read_text()  # at once (under a second): a stuck handler would take 15 s or more
            last = log.read_text().split("optimizing train")[1].strip().splitlines()[1:]
            assert last == [f"lit_lora: interrupted while writing train into {output}/train; the dataset there is marked incomplete: run the same command to rebuild it"]
        assert json.loads((output / "lit_lora_dataset.json").read_text())["state"] == "incomplete"
        deadline = time.monotonic() + 10
        while processes_running(command) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes_running(command), f"{who}: processes of the interrupted optimize are still running"
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("lit_lora-") or p.name in ("chunks", "data")]


@pytest.mark.parametrize("kind", ["cmyk", "palette_alpha", "sixteen_bit", "exif_rotated", "grayscale"])
def test_odd_image_modes_train_as_rgb(tmp_path: Path, tiny_vit: str, kind: str) -> None:
    root = tmp_path / "folders"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
            path = root / label / f"{i}"
            if kind == "cmyk":
                rgb.convert("CMYK").save(f"{path}.jpg")
            elif kind == "palette_alpha":
                image = rgb.convert("P")
                image.info["transparency"] = 0
                image.save(f"{path}.png", transparency=0)
            elif kind == "sixteen_bit":
                Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(f"{path}.png")
            elif kind == "exif_rotated":
                exif = rgb.getexif()
                exif[0x0112] = 6
                rgb.save(f"{path}.jpg", exif=exif)
            else:
                rgb.convert("L").save(f"{path}.jpg")
    module = Food101DataModule(data_dir=str(root), train_split="train", val_size=0.5, num_workers=0, image_processor=tiny_vit)
    module.setup("fit")
    for loader in (module.train_dataloader(), module.val_dataloader()):
        batch = next(iter(loader))
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and not batch["skipped"]
    image = module.train_table.load(0)
    assert image.mode == "RGB" and (image.size == (40, 60) if kind == "exif_rotated" else image.size == (60, 40))


def test_nan_loss_stops_with_the_step_and_likely_causes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, food101_dir: str, tiny_vit: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FloatingPointError, match=r"loss became nan at optimizer step 1 \(epoch 0, batch 1\).*learning_rate=1e\+30.*precision"):
        cli_main(["fit", *common_args(tiny_vit, food101_dir), "--trainer.max_epochs=1", "--model.learning_rate=1e30", "--model.warmup_steps=0", "--trainer.accumulate_grad_batches=1", "--trainer.limit_train_batches=3"])


def test_command_line_errors_are_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lit_lora", "fit", "--config", "configs/demo.yaml", f"--data.data_dir={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 1
    assert "lit_lora: error: 1 problem(s) in the configuration" in result.stderr and "data.data_dir" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def run_cli(args: list[str], cwd: Path, offline: bool = True) -> subprocess.CompletedProcess:
    env = bare_env(PATH="", **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    return subprocess.run([sys.executable, "-m", "lit_lora", *args], capture_output=True, text=True, cwd=cwd, env=env)


def run_clis(runs: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """`run_cli` (offline) for several command lines at once, each in a folder of its own under ``cwd`` (run folders
    are numbered per folder): mostly imports, they overlap well."""
    for number in range(len(runs)):
        (cwd / str(number)).mkdir()
    started = [start_cli(args, cwd / str(number), base_env=bare_env(PATH="")) for number, args in enumerate(runs)]
    return [finish_cli(process, check=False) for process in started]


def test_misspelled_option_says_what_it_may_have_meant(tmp_path: Path, run_main) -> None:
    code, _, err = run_main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.batchsize", "64"], tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("python -m lit_lora") and "unrecognized arguments: --data.batchsize" in lines[0]
    assert "Did you mean --data.batch_size" in lines[0] and len(lines) <= 2  # no page of usage text
    code, _, err = run_main(["export", "--ckpt_path", "x", "--outputdir", "y"], tmp_path)
    assert code == 2 and "Did you mean --output_dir?" in err and len(err.strip().splitlines()) <= 2


def test_missing_relative_model_folder_fails_at_once_even_online(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    # Online (no HF_HUB_OFFLINE), timed from after the imports: the CLI's main() alone.
    timed_main = (
        "import sys, time; from lit_lora.__main__ import main; started = time.perf_counter()\n"
        "try:\n    main()\nfinally:\n    print(f'main took {time.perf_counter() - started:.1f} s', file=sys.stderr)"
    )
    args = ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--model.model_name_or_path", "models/vit-micro"]
    result = subprocess.run([sys.executable, "-c", timed_main, *args], capture_output=True, text=True, cwd=tmp_path, env={"PATH": ""})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "lit_lora: error: 1 problem(s)" in result.stderr and "'models/vit-micro' is not a folder here" in result.stderr
    seconds = float(result.stderr.rsplit("main took ", 1)[1].split()[0])
    assert seconds < 5  # no attempt to reach the hub (before: 97 s of retries)


def test_on_bad_image_error_in_a_loader_worker_is_one_line(tmp_path: Path, dirty_food101: Path, tiny_vit: str, run_main) -> None:
    args = [a for a in common_args(tiny_vit, str(dirty_food101)) if "num_workers" not in a]
    code, _, err = run_main(["fit", *args, "--data.num_workers=1", "--data.on_bad_image=error", "--trainer.max_epochs=1"], tmp_path)
    assert code == 1 and "Traceback" not in err and "Original" not in err
    error = [line for line in err.splitlines() if line.startswith("lit_lora: error:")]
    assert len(error) == 1 and error[0].startswith("lit_lora: error: cannot read image ") and "--data.on_bad_image skip" in error[0]


def test_adapter_folder_for_other_labels_is_one_line(tmp_path: Path, trained_demo: Path, food101_dir: str, run_main) -> None:
    code, _, err = run_main(["validate", "--config", str(REPO / "configs" / "demo.yaml"), f"--data.data_dir={food101_dir}", f"--ckpt_path={trained_demo / 'adapter'}"], tmp_path)
    assert code == 1 and "Traceback" not in err and "size mismatch" not in err
    error = [line for line in err.splitlines() if line.startswith("lit_lora: error:")]
    assert len(error) == 1 and "class_names ['tomato', 'matcha', 'blueberry', 'banana', 'eggplant']" in error[0] and "differ from those of" in error[0]


def test_model_that_does_not_exist_or_is_not_an_image_classifier(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from lit_lora import LoRAImageClassifier

    with pytest.raises(ValueError, match=r"model '.*nowhere' could not be loaded.*save_pretrained"):
        LoRAImageClassifier(str(tmp_path / "nowhere"), class_names=["a", "b"])
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="is not an image classifier"):
        LoRAImageClassifier(str(tmp_path / "bert"), class_names=["a", "b"])


def test_data_problems_are_named(tmp_path: Path, class_folders_dir: str, food101_dir: str) -> None:
    one_class = tmp_path / "one"
    shutil.copytree(Path(class_folders_dir) / "tomato", one_class / "tomato")
    with pytest.raises(ValueError, match="1 class"):
        Food101DataModule(data_dir=str(one_class))
    empty_class = Path(shutil.copytree(class_folders_dir, tmp_path / "empty-class"))
    (empty_class / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no image.*nothing"):
        Food101DataModule(data_dir=str(empty_class))
    module = Food101DataModule(data_dir=food101_dir, train_split="train[:0]")
    with pytest.raises(ValueError, match=r"train_split 'train\[:0\]' selects no image"):
        module.setup("fit")


def test_unreadable_checkpoint_and_unknown_key_are_named(tmp_path: Path, tiny_vit: str, food101_dir: str, run_main) -> None:
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    code, _, err = run_main(["validate", *common_args(tiny_vit, food101_dir), f"--ckpt_path={broken}"], REPO)
    assert code == 1 and "is not a readable checkpoint" in err and "Traceback" not in err
    code, _, err = run_main(["fit", "--config", "configs/demo.yaml", "--model.rank=8"], REPO)
    assert code == 2 and "rank" in err


def test_configuration_problems_are_reported_together(tmp_path: Path, run_main) -> None:
    code, _, err = run_main(
        ["fit", "--config", "configs/demo.yaml", f"--model.model_name_or_path={tmp_path / 'no-model'}", f"--data.data_dir={tmp_path / 'no-data'}",
         "--data.val_size=1.5", "--data.num_workers=-1", f"--ckpt_path={tmp_path / 'no.ckpt'}", "--trainer.max_epochs=-1", "--data.optimized_cache_size=200XB"], REPO,
    )
    assert code == 1
    assert "7 problem(s) in the configuration" in err
    for fragment in ("no-model' is not a folder", "no-data' does not exist", "val_size must be between 0 and 1", "num_workers must be 0 or more", "no.ckpt' does not exist",
                     "lr_scheduler_type 'linear' (or a model.warmup_ratio) needs the fit's length",
                     "data.optimized_cache_size must be a size such as 200GB or a share of the free disk such as 0.5, got '200XB'"):
        assert fragment in err
    # In a user's own code, at construction: before a fit's compute, not in its setup as a damaged dataset
    with pytest.raises(ValueError, match=r"optimized_cache_size must be a size such as 200GB .*, got 'banana'"):
        Food101DataModule(dataset=None, optimized_dir=str(tmp_path), optimized_cache_size="banana")


def test_a_chunk_cache_too_small_for_the_loaders_is_refused_before_it_hangs(tmp_path: Path, run_main) -> None:
    """litdata's loaders share a node's chunk cache, each holding about 3 chunks: with less room (a 20MB cache, 2 workers
    on S3) the fit waited for a chunk that never came, then stopped after 120 s on a ChunkWaitTimeoutError traceback."""
    streamed = ["fit", "--config", "configs/demo.yaml", "--data.data_dir=null", "--data.optimized_dir=s3://lit-lora/food"]
    code, _, err = run_main([*streamed, "--data.optimized_cache_size=20MB", "--data.num_workers=2"], REPO)
    assert code == 1 and "1 problem(s) in the configuration" in err
    assert "data.optimized_cache_size '20MB' is too small for 2 loader(s) reading one split" in err and "give at least 48MB" in err
    with pytest.raises(ValueError, match=r"optimized_cache_size '30MB' is too small for 2 loader\(s\)"):
        Food101DataModule(dataset=None, optimized_dir="s3://lit-lora/food", optimized_cache_size="30MB", num_workers=2)
    # Enough for one process, not for the node's two, which share its cache: refused as the fit sets up, before any read.
    data = Food101DataModule(dataset=None, optimized_dir="s3://lit-lora/food", optimized_cache_size="60MB", num_workers=2)
    data.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match=r"'60MB' is too small for 4 loader\(s\) .* at least 96MB.* \(2 processes on this node, 2 loader workers each\)"):
        data.setup("fit")
    # A local dataset is read in place, not through the cache; a share of the free disk is litdata's to size.
    Food101DataModule(dataset=None, optimized_dir=str(tmp_path), optimized_cache_size="20MB", num_workers=2)
    Food101DataModule(dataset=None, optimized_dir="s3://lit-lora/food", optimized_cache_size=0.01, num_workers=2)



def test_max_cache_size_in_the_environment_is_checked_as_litdata_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """litdata 0.2.76 takes the environment's MAX_CACHE_SIZE before the size lit_lora gives it: a data.optimized_cache_size
    that differs was silently ignored, and a MAX_CACHE_SIZE too small for the loaders hung as a small size did."""
    from lit_lora.optimized import cache_bytes

    streamed = dict(dataset=None, optimized_dir="s3://lit-lora/food", num_workers=2)
    monkeypatch.setenv("MAX_CACHE_SIZE", "10GB")
    with pytest.raises(ValueError, match=r"optimized_cache_size '200GB' differs from the environment's MAX_CACHE_SIZE '10GB', which litdata uses instead"):
        Food101DataModule(**streamed, optimized_cache_size="200GB")
    Food101DataModule(**streamed, optimized_cache_size="10gb")  # the same size
    Food101DataModule(**streamed)
    Food101DataModule(dataset=None, optimized_dir=str(tmp_path), optimized_cache_size="200GB")  # read in place, no cache
    assert cache_bytes("200GB", str(tmp_path)) == cache_bytes(None, str(tmp_path)) == 10e9  # what decides whether a run evicts
    monkeypatch.setenv("MAX_CACHE_SIZE", "20MB")
    with pytest.raises(ValueError, match=r"MAX_CACHE_SIZE \(environment\) '20MB' is too small for 2 loader\(s\)"):
        Food101DataModule(**streamed)
    monkeypatch.delenv("MAX_CACHE_SIZE")
    assert cache_bytes("200GB", str(tmp_path)) == 200e9 and 0 < cache_bytes(None, str(tmp_path)) < cache_bytes(1.0, str(tmp_path))


def test_optimized_training_images_smaller_than_the_crop_are_refused_before_decoding(tmp_path: Path, tiny_vit: str, food101_dir: str) -> None:
    """0 made every training image 'unreadable' and wrote a dataset without them; below the crop (the tiny ViT's 32 px),
    every training crop would be enlarged."""
    refused = r"optimized_train_side must be at least 32 \(the model's crop size: .*\), got {}"
    for side in (0, 16):
        with pytest.raises(ValueError, match=refused.format(side)):
            Food101DataModule(data_dir=food101_dir, train_split="train", image_processor=tiny_vit, optimized_train_side=side).optimize(str(tmp_path / "out"))
        with pytest.raises(ValueError, match=refused.format(side)):
            Food101DataModule(data_dir=food101_dir, train_split="train", image_processor=tiny_vit, optimized_train_side=side, optimized_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    Food101DataModule(data_dir=food101_dir, train_split="train", image_processor=tiny_vit, optimized_train_side=16)  # not optimizing: not used


def test_the_cli_messages_go_to_standard_error_as_it_is_when_they_are_written() -> None:
    """A command run in a process whose standard error was replaced since an earlier command (contextlib's
    redirect_stderr, pytest's capsys, a closed stream): its lines reach the current one, not a traceback per line."""
    import contextlib
    import io

    from lit_lora import log

    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(first):
        log.show_messages()  # as the first command run here sets up the console
        log.info("first command")
    first.close()
    with contextlib.redirect_stderr(second):
        log.show_messages()
        log.info("second command")
    assert second.getvalue() == "second command\n"


def test_the_end_of_fit_summary_stays_intact_in_a_real_terminal(tmp_path: Path) -> None:
    """In a 120-column terminal (tmux), the progress bar's last frame is drawn before the summary, not over it."""
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux for a real terminal")
    session = f"lit_lora_{os.getpid()}"
    command = f"cd {tmp_path} && HF_HUB_OFFLINE=1 {sys.executable} -m lit_lora fit --config {REPO / 'configs' / 'demo.yaml'} --trainer.max_epochs=2; echo FINISHED-$?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "50", command], check=True, env={**os.environ, "TERM": "xterm-256color"})
    try:
        screen = ""
        for _ in range(240):
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-100"], capture_output=True, text=True).stdout
            if "FINISHED-" in screen:
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "FINISHED-0" in screen, screen
    lines = screen.splitlines()
    summary = next(i for i, line in enumerate(lines) if "[lit_lora] fit finished" in line)
    for needed in ("best val/acc", "adapter-last/", "wall time", "training curves: "):
        assert any(needed in line for line in lines[summary:]), (needed, screen)
    assert not any("Epoch 1/1" in line for line in lines[summary:]), screen  # no progress frame after the summary


def test_decoder_warnings_are_counted_once_not_printed_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, food101_dir: str, tiny_vit: str, caplog: pytest.LogCaptureFixture) -> None:
    """A file PIL reads with a warning (here: above MAX_IMAGE_PIXELS, below the error limit) is listed in
    image_warnings.txt with one line in the log, instead of a warning per image."""
    import warnings

    import lightning.pytorch as pl

    from lit_lora import LoRAImageClassifier
    from lit_lora.monitoring import SkippedImagesReport

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 48x48 images: over the limit, under twice it
    caplog.set_level("INFO")
    data = Food101DataModule(data_dir=food101_dir, train_split="train", val_size=0.25, num_workers=0, image_processor=tiny_vit)
    model = LoRAImageClassifier(tiny_vit, class_names=data.class_names)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False, callbacks=[SkippedImagesReport()])
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        trainer.validate(model, datamodule=data)
    assert not [w for w in escaped if issubclass(w.category, Image.DecompressionBombWarning)]
    listing = (tmp_path / "image_warnings.txt").read_text().splitlines()
    assert len(listing) == 12 and all("DecompressionBombWarning" in line for line in listing)
    assert caplog.text.count("image(s) read with a warning from the decoder") == 1


class ImagesCutShortAtBatch(pl.Callback):
    """After training batch ``batch`` of epoch ``epoch``, every JPEG under ``folder`` is cut to its first 100 bytes (a
    data set overwritten, or a network disk failing, mid-run); the test puts them back."""

    def __init__(self, folder: str, epoch: int = 1, batch: int = 1) -> None:
        self.folder, self.epoch, self.batch = folder, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            for path in Path(self.folder).rglob("*.jpg"):
                path.write_bytes(path.read_bytes()[:100])


def test_data_that_fails_mid_fit_leaves_a_checkpoint_that_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: str, food101_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """A training batch that cannot be read (here: every image cut short after batch 2 of the second epoch, with
    on_bad_image error; on a stream, storage that stopped answering) stops the fit with last.ckpt saved at its last
    trained batch, inside the accumulation window, and says how to resume (before: nothing saved since the last epoch's
    end). With the images back, the resumed fit ends with the weights, AdamW moments and learning rate of a fit that
    never stopped."""
    from test_checkpoints import assert_same_training_state

    data = tmp_path / "data"
    shutil.copytree(food101_dir, data)
    images = {path: path.read_bytes() for path in data.rglob("*.jpg")}
    args = [*common_args(tiny_vit, str(data)), "--data.on_bad_image=error", "--trainer.max_epochs=2", "--trainer.accumulate_grad_batches=4",
            "--trainer.enable_progress_bar=false"]
    for name in ("straight", "stopped"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    cli_main(["fit", *args])
    monkeypatch.chdir(tmp_path / "stopped")
    with pytest.raises(BadImageError) as failed:
        cli_main(["fit", *args, "--trainer.callbacks+=test_reliability.ImagesCutShortAtBatch", f"--trainer.callbacks.init_args.folder={data}"])
    assert failed.value.lit_lora_reading  # a failure of the data, which python -m lit_lora reports in one line
    last = tmp_path / "stopped" / "checkpoints" / "run" / "version_0" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1 and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 2
    assert saved["global_step"] == 2 and "accumulated_gradients" in saved  # 5 batches an epoch: steps after batches 4 and 5
    assert f"saved {last}. When the data can be read again, resume with: python -m lit_lora fit <same arguments> --ckpt_path {last}" in caplog.text

    for path, content in images.items():
        path.write_bytes(content)
    cli_main(["fit", *args, f"--ckpt_path={last}"])
    assert_same_training_state(tmp_path / "straight" / "checkpoints" / "run" / "version_0" / "last.ckpt", last, global_step=4)


def test_a_loader_worker_that_cannot_reach_the_data_is_one_line(run_main, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a loader worker re-raises the S3 client's error after its retries (its traceback and the client's debug
    output in the message: some 300 lines before), python -m lit_lora prints its root cause in one line."""
    import lit_lora.__main__

    worker = (
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "obstore.exceptions.GenericError: Generic S3 error: Error performing GET https://127.0.0.1:1/b/train/chunk-0-3.bin in 2.9s, "
        "after 10 retries - HTTP error: error sending request\n\nDebug source:\nGeneric {\n}\n\nThe above exception was the direct cause of the "
        "following exception:\n\nRuntimeError: Chunk prefetch thread crashed while waiting for /cache/chunk-0-3.bin.\nDebug source:\nGeneric {\n}\n"
    )

    def fails(*args, **kwargs):
        error = RuntimeError(worker)
        error.lit_lora_reading = True
        raise error

    monkeypatch.setattr(lit_lora.__main__, "cli_main", fails)
    code, _, err = run_main(["fit"])
    assert code == 1 and "Debug source" not in err and "Original" not in err
    assert err.splitlines()[0] == (
        "lit_lora: error: reading the data failed: obstore.exceptions.GenericError: Generic S3 error: Error performing GET "
        "https://127.0.0.1:1/b/train/chunk-0-3.bin in 2.9s, after 10 retries - HTTP error: error sending request"
    )
    # Any other exception keeps its traceback: it is a bug to report, not bad data.
    monkeypatch.setattr(lit_lora.__main__, "cli_main", lambda: (_ for _ in ()).throw(RuntimeError(worker)))
    with pytest.raises(RuntimeError):
        run_main(["fit"])
