"""Trustworthy training: atomic checkpoints that survive SIGKILL, NaN guard, --resume, safe
model loading, repeatable seeds and one-line command-line errors.

The training runs use a fake DSB tree of a few 64x80 images and a 32x32 network so that a
subprocess run takes seconds. Runs that must be killed, or that must start fresh, run in a
subprocess: `python -c` sets the image size, optionally installs a hook (the process kills itself
at a chosen moment, or records what it saw), then calls `train.main`. Those runs start in the
background as soon as the session's tests are collected (BackgroundRuns); what needs no real
signal runs in this process.
"""
import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import config
import data
import files
import train
from tests.conftest import ROOT, make_dsb_tree
from tests.conftest import SMALL_SIZE as SIZE

PRELUDE = f"""
import os, signal, sys, time
import config
config.IMG_HEIGHT = config.IMG_WIDTH = {SIZE}
"""

# Hooks, installed before `train.main` runs. MODEL, MARKER and RECORD are replaced by paths.

# The process dies while a model file is being written: whatever model.save writes is cut to
# half its size, then SIGKILL. Only an atomic save keeps the previous best intact.
KILL_MID_SAVE = """
import keras
_save = keras.Model.save
def save(self, filepath, *args, **kwargs):
    _save(self, filepath, *args, **kwargs)
    with open(filepath, "r+b") as f:
        f.truncate(os.path.getsize(filepath) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
keras.Model.save = save
"""

# The process dies just after the new best is renamed into place (before the folder's fsync).
KILL_AFTER_RENAME = """
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if os.path.abspath(dst) == os.path.abspath(MODEL):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""

# The process dies while BackupAndRestore writes its second backup (end of epoch 2): the
# latest weights file is left truncated.
KILL_MID_BACKUP = """
import keras
_save_weights = keras.Model.save_weights
backups = []
def save_weights(self, filepath, *args, **kwargs):
    _save_weights(self, filepath, *args, **kwargs)
    if str(filepath).endswith("latest.weights.h5"):
        backups.append(filepath)
        if len(backups) == 2:
            with open(filepath, "r+b") as f:
                f.truncate(os.path.getsize(filepath) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
keras.Model.save_weights = save_weights
"""

# Notes whether the stale partial file is still there when training starts.
RECORD_PARTIAL = """
import keras
_fit = keras.Model.fit
def fit(self, *args, **kwargs):
    with open(RECORD, "w") as f:
        f.write(str(os.path.exists(PARTIAL)))
    return _fit(self, *args, **kwargs)
keras.Model.fit = fit
"""

# The process kills itself as epoch 3 begins: epochs 1 and 2 are finished and backed up.
KILL_BEFORE_EPOCH_3 = """
import keras
def on_epoch_begin(self, epoch, logs=None):
    if epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)
keras.callbacks.TerminateOnNaN.on_epoch_begin = on_epoch_begin
"""

# Writes digests of the images and masks fit trains and validates on.
RECORD_SPLIT = """
import hashlib, json, keras, numpy as np
import train as _train
digest = lambda a: hashlib.sha256(np.asarray(a).tobytes()).hexdigest()
record = {}
_training_dataset = _train.training_dataset
def training_dataset(X, Y, *args):
    record["train"] = [digest(X), digest(Y > 0.5)]
    return _training_dataset(X, Y, *args)
_train.training_dataset = training_dataset
_fit = keras.Model.fit
def fit(self, *args, validation_data=None, **kwargs):
    x_val, y_val = validation_data
    record["val"] = [digest(x_val), digest(y_val > 0.5)]
    with open(RECORD, "w") as f:
        json.dump(record, f)
    return _fit(self, *args, validation_data=validation_data, **kwargs)
keras.Model.fit = fit
"""

# TensorFlow's C++ start-up lines, printed before its logging is set up (TF_CPP_MIN_LOG_LEVEL=2
# does not silence them), and tqdm's progress bars: stderr noise, not messages.
NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog"
                   r"|[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]"
                   r"|To enable the following instructions"
                   r"|\s*\d+%\|)")


def messages(stderr):
    """The lines of stderr that are meant for the user."""
    lines = (line.strip() for line in re.split(r"[\r\n]+", stderr))
    return [line for line in lines if line and not NOISE.match(line)]


def assert_one_error_line(result, path, *words):
    """A non-zero exit, no traceback, and one line on stderr: `error: <path>: <words>`."""
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    message = lines[0][len(f"error: {path}: "):]
    for word in words:
        assert word in message, lines[0]
    return message


def load_error(path):
    """What checkpoints.load_unet says about `path`, after the path: one line."""
    import checkpoints

    with pytest.raises(files.InputError) as error:
        checkpoints.load_unet(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    return text[len(f"{path}: "):]


def train_code(hook="", **paths):
    for name, path in paths.items():
        hook = hook.replace(name.upper(), repr(str(path)))
    return PRELUDE + hook + "\nimport train\ntrain.main(sys.argv[1:])\n"


def train_args(train_dir, model_path, epochs, *extra, batch_size=4):
    return ["--train-dir", str(train_dir), "--model-path", str(model_path), "--epochs",
            str(epochs), "--batch-size", str(batch_size), "--no-cache", *extra]


# Unbuffered, so that what a killed run printed is not lost with it.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_train(args, hook="", timeout=120, **paths):
    return subprocess.run([sys.executable, "-c", train_code(hook, **paths), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def run_here(args):
    """train.main(args) in this process (the test's small_images fixture sets the image size),
    with what it prints and its exit status, as run_train gives them: for runs that need no
    real signal, without a second TensorFlow start-up."""
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            train.main(args)
        except SystemExit as stop:
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            returncode = 1 if isinstance(stop.code, str) else stop.code or 0
    return types.SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue())


def killed(result):
    return result.returncode == -signal.SIGKILL


def history(model_path):
    return pd.read_csv(model_path.with_suffix(".history.csv"))


def weights(model_path):
    import checkpoints

    return checkpoints.load_unet(model_path).get_weights()


def same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def tree(tmp_path):
    """Five images: four to train on (one batch of 4) and one to validate on."""
    root = tmp_path / "stage1_train"
    make_dsb_tree(root, n_images=5)
    return root


def save_bad_model(path):
    """A U-Net that calls every pixel nucleus (val_loss about 8), saved atomically: a previous
    best that the first trained epoch always beats."""
    import checkpoints
    import unet

    model = unet.build_unet()
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, bias + 10])
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.save_atomic(model, path)
    return model.get_weights()


# The module's training subprocesses, {test: the runs it inspects} (BackgroundRuns).
RUNS_OF_TEST = {
    "test_kill_during_save_keeps_previous_best_and_next_start_removes_partial": ["mid_save"],
    "test_resume_continues_after_a_kill_and_refuses_to_start_over": ["epoch_3"],
    "test_a_resumed_run_continues_the_same_run": ["epoch_3", "whole", "whole_instance",
                                                  "killed_instance"],
    "test_resume_after_a_kill_during_the_backup_uses_the_previous_backup": ["mid_backup"],
    "test_resume_after_a_kill_while_writing_the_backup_metadata": ["mid_backup"],
    "test_same_seed_same_split_and_weights_in_fresh_processes": ["seed_a", "seed_b"],
    "test_a_second_run_refuses_and_a_stopped_run_says_how_to_resume": ["sigint", "sigterm"],
}
INSTANCE = ["--recipe", "instance", "--set", "crop=32"]
BACKGROUND_TIMEOUT = 300  # seconds a background run may take, sharing the cores with others

# As epoch 3 begins (epochs 1 and 2 finished and backed up, the lock held), the run starts a
# second run on its model path and records what it said, then sends itself the signal SIG.
SECOND_RUN_THEN_SIGNAL = """
import json, keras, subprocess
def on_epoch_begin(self, epoch, logs=None):
    if epoch == 2:
        second = subprocess.run([sys.executable, "-c", SECOND, *json.loads(ARGS)], text=True,
                                capture_output=True, timeout=120)
        with open(RECORD, "w") as f:
            json.dump({"returncode": second.returncode, "stderr": second.stderr}, f)
        os.kill(os.getpid(), int(SIG))
keras.callbacks.TerminateOnNaN.on_epoch_begin = on_epoch_begin
"""


def kill_mid_save_then_restart(root, tree):
    """A previous best; a run killed while writing its first better model over it, its folder
    then copied (after_kill); and the next start, killed just after renaming a better model in."""
    model_path = root / "model" / "unet.keras"
    # The previous best, made in a process of its own (in this one the tests build models).
    subprocess.run([sys.executable, "-c", PRELUDE + "from pathlib import Path\n"
                    "from tests.test_recovery import save_bad_model\n"
                    f"save_bad_model(Path({str(model_path)!r}))\n"],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=BACKGROUND_TIMEOUT)
    shutil.copy(model_path, root / "previous.keras")
    first = run_train(train_args(tree, model_path, 2), KILL_MID_SAVE, timeout=BACKGROUND_TIMEOUT)
    shutil.copytree(root / "model", root / "after_kill")
    record = root / "partial-at-fit"
    second = run_train(train_args(tree, model_path, 2), RECORD_PARTIAL + KILL_AFTER_RENAME,
                       timeout=BACKGROUND_TIMEOUT, model=model_path,
                       partial=files.partial_path(model_path), record=record)
    return types.SimpleNamespace(first=first, second=second, model_path=model_path,
                                 after_kill=root / "after_kill" / "unet.keras", record=record)


def second_run_then_signal(folder, sig):
    """A run that, as epoch 3 begins, has a second run on its model refused, then gets `sig`."""
    tree, model_path = folder / "stage1_train", folder / "unet.keras"
    record = folder / "second.json"
    hook = SECOND_RUN_THEN_SIGNAL.replace("SECOND", repr(train_code())).replace(
        "ARGS", repr(json.dumps(train_args(tree, model_path, 4, "--resume"))))
    result = run_train(train_args(tree, model_path, 4, batch_size=3), hook,
                       timeout=BACKGROUND_TIMEOUT, record=record, sig=int(sig))
    return types.SimpleNamespace(result=result, tree=tree, model_path=model_path, record=record)


def background_runs(root):
    """{name: a function that makes the run and returns what the tests inspect}; the folders and
    trees are made here (no TensorFlow: this runs as the tests are collected)."""
    shared = root / "five" / "stage1_train"  # the killed runs' and the uninterrupted runs'
    make_dsb_tree(shared, n_images=5)
    seeds = root / "six" / "stage1_train"  # 5 training images: batches of 2, 2 and 1, shuffled
    make_dsb_tree(seeds, n_images=6)
    make_dsb_tree(root / "mid_save" / "stage1_train", n_images=5)
    for sig in ("sigint", "sigterm"):  # lower case: the hook's SIG is replaced in paths too
        make_dsb_tree(root / sig / "stage1_train", n_images=5)

    def train_run(name, epochs, *extra, hook="", tree=shared, batch_size=3, **paths):
        args = train_args(tree, root / name / "unet.keras", epochs, *extra, batch_size=batch_size)
        return functools.partial(run_train, args, hook, timeout=BACKGROUND_TIMEOUT, **paths)
    seed_args = ("--seed", "7")
    return {
        "mid_save": functools.partial(kill_mid_save_then_restart, root / "mid_save",
                                      root / "mid_save" / "stage1_train"),
        "epoch_3": train_run("epoch_3", 4, hook=KILL_BEFORE_EPOCH_3),
        "mid_backup": train_run("mid_backup", 4, hook=KILL_MID_BACKUP, batch_size=4),
        "whole": train_run("whole", 4),
        "whole_instance": train_run("whole_instance", 4, *INSTANCE),
        "killed_instance": train_run("killed_instance", 4, *INSTANCE, hook=KILL_BEFORE_EPOCH_3),
        "seed_a": train_run("seed_a", 1, *seed_args, hook=RECORD_SPLIT, tree=seeds,
                            batch_size=2, record=root / "seed_a.json"),
        "seed_b": train_run("seed_b", 1, *seed_args, hook=RECORD_SPLIT, tree=seeds,
                            batch_size=2, record=root / "seed_b.json"),
        "sigint": functools.partial(second_run_then_signal, root / "sigint", signal.SIGINT),
        "sigterm": functools.partial(second_run_then_signal, root / "sigterm", signal.SIGTERM),
    }


class BackgroundRuns:
    """The training subprocesses the selected tests of this module inspect, started by
    conftest.py once the session's tests are collected, one at a time in a background thread:
    they run while the earlier modules' tests run in the main process, which mostly leave one of
    the two cores idle. runs(name) is the outcome of the run `name` (waiting for it), made in
    the folder runs.root / name."""

    def __init__(self, tests):
        wanted = list(dict.fromkeys(name for test, names in RUNS_OF_TEST.items()
                                    if test in tests for name in names))
        self.root = Path(tempfile.mkdtemp(prefix="recovery-runs-"))
        made = background_runs(self.root) if wanted else {}
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures = {name: self.pool.submit(made[name]) for name in wanted}

    def __call__(self, name):
        return self.futures[name].result(timeout=len(self.futures) * BACKGROUND_TIMEOUT)

    def close(self):
        self.pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)


STARTED = []  # the session's BackgroundRuns, once started


def start_runs(tests):
    """The session's BackgroundRuns for the selected `tests` (names), started on the first
    call."""
    if not STARTED:
        STARTED.append(BackgroundRuns(tests))
    return STARTED[0]


@pytest.fixture(scope="module", autouse=True)
def runs(request):
    """The BackgroundRuns of this module's selected tests (started by conftest.py's collection
    hook, or here)."""
    background = start_runs({item.originalname for item in request.session.items
                             if item.module is request.module})
    yield background
    background.close()


def killed_run(runs, name):
    """(train_dir, folder) of the background run `name`, killed as it should have been."""
    result = runs(name)
    assert killed(result), result.stdout[-2000:] + result.stderr[-2000:]
    return runs.root / "five" / "stage1_train", runs.root / name


def killed_copy(runs, tmp_path, name):
    """(train_dir, model path) of a copy of the killed background run `name`."""
    tree, folder = killed_run(runs, name)
    shutil.copytree(folder, tmp_path / "model")
    return tree, tmp_path / "model" / "unet.keras"


# 1. Atomic checkpoints ---------------------------------------------------------------------

def test_save_atomic_writes_beside_and_renames(tmp_path, small_images):
    path = tmp_path / "models" / "best.keras"
    partial = files.partial_path(path)
    assert partial.parent == path.parent and partial.name.startswith(".")
    assert partial.suffix == ".keras" and partial != path
    first = save_bad_model(path)
    assert path.is_file() and not partial.exists()
    assert same_weights(weights(path), first)
    assert os.listdir(path.parent) == ["best.keras"]


def test_failed_save_leaves_the_previous_best_untouched(tmp_path, small_images, monkeypatch):
    """A save that dies half-way (disk full, exception) must not touch the best model file."""
    import keras

    import checkpoints
    import unet

    path = tmp_path / "best.keras"
    save_bad_model(path)
    before = path.read_bytes()

    def broken_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", broken_save)
    with pytest.raises(files.InputError, match=f"^{path}: could not be written \\(No space left "
                                              "on device\\); the earlier file, if any, is kept$"):
        checkpoints.save_atomic(unet.build_unet(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]  # the partial file is gone


def test_kill_during_save_keeps_previous_best_and_next_start_removes_partial(runs, small_images):
    run = runs("mid_save")
    previous = weights(runs.root / "mid_save" / "previous.keras")

    # Killed while writing the first better model (its folder as the kill left it).
    result, after_kill = run.first, run.after_kill
    assert killed(result), result.stdout[-2000:] + result.stderr[-2000:]
    assert "val_loss improved" in result.stdout
    assert same_weights(weights(after_kill), previous)
    partial = files.partial_path(after_kill)
    assert partial.exists()  # the half-written file is where a killed save leaves it ...
    assert "damaged" in load_error(partial)  # ... and it is no model
    assert not train.backup_dir(after_kill).exists()  # killed before the epoch's backup

    # The next start removes it before training, trains, and is killed just after renaming a
    # better model in: the new model is complete.
    result, partial = run.second, files.partial_path(run.model_path)
    assert killed(result), result.stdout[-2000:] + result.stderr[-2000:]
    assert f"Removing {partial}" in result.stdout
    assert run.record.read_text() == "False"
    assert not partial.exists()
    assert not same_weights(weights(run.model_path), previous)


# 2. NaN and infinite losses ----------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_best_checkpoint_never_saves_a_non_finite_val_loss(tmp_path, small_images, value,
                                                           capsys):
    import checkpoints
    import unet

    path = tmp_path / "best.keras"
    checkpoint = checkpoints.BestCheckpoint(path, best=0.5)
    checkpoint.set_model(unet.build_unet())
    logs = {} if value is None else {"val_loss": value}
    checkpoint.on_epoch_end(0, logs)
    assert not path.exists() and checkpoint.best == 0.5
    assert "not saved" in capsys.readouterr().out
    # A finite improvement is still saved, and only an improvement.
    checkpoint.on_epoch_end(1, {"val_loss": 0.7})
    assert not path.exists()
    checkpoint.on_epoch_end(2, {"val_loss": 0.25})
    assert path.exists() and checkpoint.best == 0.25


def test_nan_loss_stops_training_and_keeps_the_best(tmp_path, tree, small_images, monkeypatch,
                                                    capsys):
    import unet

    model_path = tmp_path / "unet.keras"
    previous = save_bad_model(model_path)
    build = unet.build_unet

    def nan_unet(*args, **kwargs):
        model = build(*args, **kwargs)
        kernel, bias = model.layers[-1].get_weights()
        model.layers[-1].set_weights([kernel, bias * np.nan])
        return model

    monkeypatch.setattr(unet, "build_unet", nan_unet)
    with pytest.raises(SystemExit, match="the loss became nan and training stopped"):
        train.main(train_args(tree, model_path, 3, batch_size=2))  # two batches an epoch
    out = capsys.readouterr().out
    assert "Invalid loss, terminating training" in out
    assert "Epoch 2/3" not in out  # stopped in epoch 1
    assert "did not improve on" in out
    assert not model_path.with_suffix(".history.csv").exists()  # the model's, and it had none
    assert "val_loss is nan, not saved" in out
    assert same_weights(weights(model_path), previous)
    assert not train.backup_dir(model_path).exists()


# 3. --resume and the best so far ------------------------------------------------------------

def test_existing_best_is_only_replaced_by_a_better_model(tmp_path, tree, small_images,
                                                         monkeypatch, capsys):
    """A fresh run whose models are all worse than the existing file must not replace it."""
    import checkpoints
    import unet

    model_path = tmp_path / "unet.keras"
    checkpoints.save_atomic(unet.build_unet(), model_path)  # untrained: val_loss about 0.7
    previous = weights(model_path)
    build = unet.build_unet

    def bad_unet(*args, **kwargs):  # val_loss about 8, and one epoch cannot fix that
        model = build(*args, **kwargs)
        kernel, bias = model.layers[-1].get_weights()
        model.layers[-1].set_weights([kernel, bias + 10])
        return model

    csv_path, png_path = train.history_paths(model_path)
    csv_path.write_text("epoch,loss,val_loss\n0,0.5,0.7\n")  # the existing model's
    png_path.write_bytes(b"its curves")
    monkeypatch.setattr(unet, "build_unet", bad_unet)
    train.main(train_args(tree, model_path, 1))
    out = capsys.readouterr().out
    assert f"{model_path} exists with val_loss" in out
    assert "did not improve from" in out
    assert f"This run did not improve on {model_path}" in out
    assert same_weights(weights(model_path), previous)
    # The history belongs to the model it describes: the discarded run's never replaces it.
    assert csv_path.read_text() == "epoch,loss,val_loss\n0,0.5,0.7\n"
    assert png_path.read_bytes() == b"its curves"


def test_resume_continues_after_a_kill_and_refuses_to_start_over(tmp_path, runs,
                                                                 small_images):
    import checkpoints

    # Epochs 1 and 2 of 4, then SIGKILL as epoch 3 begins.
    tree, model_path = killed_copy(runs, tmp_path, "epoch_3")
    csv_path = model_path.with_suffix(".history.csv")
    backup = train.backup_dir(model_path)
    assert list(history(model_path)["epoch"]) == [0, 1]
    assert backup.is_dir()
    best_before = weights(model_path)  # the killed run's best model loads
    csv_before = csv_path.read_bytes()

    # Without --resume: one clear line, nothing touched.
    result = run_here(train_args(tree, model_path, 4, batch_size=3))
    assert_one_error_line(result, backup, "--resume")
    assert csv_path.read_bytes() == csv_before and backup.is_dir()
    assert same_weights(weights(model_path), best_before)

    # With --resume: epochs 3 and 4 only, the CSV continued, the best so far remembered.
    result = run_here(train_args(tree, model_path, 4, "--resume", batch_size=3))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = history(model_path)
    assert list(rows["epoch"]) == [0, 1, 2, 3]
    assert "Epoch 3/4" in result.stdout and "Epoch 1/4" not in result.stdout
    best_so_far = rows["val_loss"][:2].min()
    match = re.search(r"exists with val_loss ([\d.]+)", result.stdout)
    assert match and float(match.group(1)) == pytest.approx(best_so_far, rel=1e-4, abs=1e-5)
    assert not backup.exists()  # a finished run removes its backup
    X, Y, _ = data.load_train(tree)
    split = data.split_index(len(X), tree)
    best_loss = checkpoints.load_unet(model_path).evaluate(X[split:], Y[split:], verbose=0)[0]
    assert best_loss == pytest.approx(rows["val_loss"].min(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("recipe", [[], INSTANCE], ids=["notebook", "instance"])
def test_a_resumed_run_continues_the_same_run(tmp_path, runs, small_images, recipe):
    """Killed after epoch 2 and resumed, a run gives the epochs of an uninterrupted run: the
    same batches in the same order (the input stream resumes where it was) and the same dropout
    masks (their random state is saved with the backup). Two batches an epoch, so that the order
    matters. Tolerance: 1e-6 relative (the same arithmetic in the same order; equal here)."""
    killed_name, whole_name = ("killed_instance", "whole_instance") if recipe else ("epoch_3",
                                                                                   "whole")
    tree, resumed = killed_copy(runs, tmp_path, killed_name)
    result = run_here(train_args(tree, resumed, 4, *recipe, "--resume", batch_size=3))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    uninterrupted = runs(whole_name)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    whole = runs.root / whole_name / "unet.keras"
    assert "Epoch 3/4" in result.stdout and "Epoch 2/4" not in result.stdout
    a, b = history(whole), history(resumed)
    assert list(a["epoch"]) == list(b["epoch"]) == [0, 1, 2, 3]
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-6, atol=0)
    assert all(np.allclose(x, y, rtol=1e-6, atol=1e-7)
               for x, y in zip(weights(whole), weights(resumed)))


def test_resume_after_a_kill_during_the_backup_uses_the_previous_backup(tmp_path, runs,
                                                                        small_images):
    tree, model_path = killed_copy(runs, tmp_path, "mid_backup")
    # Epoch 2's row is written before its (killed) backup.
    assert list(history(model_path)["epoch"]) == [0, 1]
    weights(model_path)  # loadable
    result = run_here(train_args(tree, model_path, 4, "--resume"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The damaged backup of epoch 2 is replaced by epoch 1's, so epoch 2 is run again; the
    # history keeps one row for each epoch.
    assert "last epoch is damaged: resuming from the previous epoch's backup" in result.stdout
    assert list(history(model_path)["epoch"]) == [0, 1, 2, 3]
    assert not train.backup_dir(model_path).exists()


def test_resume_after_a_kill_while_writing_the_backup_metadata(tmp_path, runs,
                                                               small_images):
    """A kill in the middle of the backup's metadata file leaves invalid JSON (here on top of a
    cut weights file): --resume falls back to the previous epoch's copies."""
    tree, model_path = killed_copy(runs, tmp_path, "mid_backup")
    metadata = train.backup_dir(model_path) / "training_metadata.json"
    metadata.write_text(metadata.read_text()[:5])
    result = run_here(train_args(tree, model_path, 4, "--resume"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "is damaged: resuming from the previous epoch's backup" in result.stdout
    assert list(history(model_path)["epoch"]) == [0, 1, 2, 3]


# 4. Safe loading -----------------------------------------------------------------------------

def save_lambda_model(path):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Lambda(lambda x: x[..., :1] / 255)(inputs)
    keras.Model(inputs, outputs).save(path)


def test_load_unet_refuses_other_formats_and_missing_files(tmp_path):

    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    assert "only .keras" in load_error(h5)
    assert "train first" in load_error(tmp_path / "missing.keras")


def test_load_unet_calls_a_damaged_file_damaged(tmp_path, small_images):
    import checkpoints
    import unet

    good = tmp_path / "good.keras"
    checkpoints.save_atomic(unet.build_unet(), good)
    content = good.read_bytes()
    damaged = {"empty": b"", "garbage": b"this is not a model" * 10,
               "truncated": content[:len(content) // 2]}
    with zipfile.ZipFile(good) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    for broken in ("model.weights.h5", "config.json"):
        path = tmp_path / f"bad-{broken}.keras"
        with zipfile.ZipFile(path, "w") as archive:
            for name, member in members.items():
                archive.writestr(name, b"garbage" * 10 if name == broken else member)
        damaged[broken] = None
    for name, content in damaged.items():
        path = tmp_path / f"bad-{name}.keras"
        if content is not None:
            path.write_bytes(content)
        assert "damaged" in load_error(path), name


def test_load_unet_refuses_a_lambda_layer(tmp_path):

    path = tmp_path / "lambda.keras"
    save_lambda_model(path)
    assert "Lambda" in load_error(path)


def test_predict_refuses_a_lambda_model_in_one_line(tmp_path, tree):
    path = tmp_path / "lambda.keras"
    save_lambda_model(path)
    test_dir = tmp_path / "stage1_test"
    make_dsb_tree(test_dir, n_images=1, masks=False)
    result = subprocess.run(
        [sys.executable, "predict.py", "--model-path", str(path), "--train-dir", str(tree),
         "--test-dir", str(test_dir), "--out-dir", str(tmp_path / "out"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error_line(result, path, "Lambda")
    assert not (tmp_path / "out").exists()


# 5. Repeatability ----------------------------------------------------------------------------


def test_same_seed_same_split_and_weights_in_fresh_processes(tmp_path, runs, small_images):
    """Two fresh processes with seed 7 on 6 images (5 training images: batches of 2, 2 and 1,
    shuffled) train on the same split to the same weights."""
    train_dir = runs.root / "six" / "stage1_train"
    # Another seed in this process: the seed must matter, or equality proves nothing.
    other = tmp_path / "other" / "unet.keras"
    train.main(train_args(train_dir, other, 1, "--seed", "8", batch_size=2))
    for name in ("seed_a", "seed_b"):
        result = runs(name)
        assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((runs.root / f"{name}.json").read_text())
               for name in ("seed_a", "seed_b")]
    X, Y, _ = data.load_train(train_dir)
    split = data.split_index(len(X), train_dir)

    def digest(a):
        return hashlib.sha256(a.tobytes()).hexdigest()
    assert records[0] == records[1] == {"train": [digest(X[:split]), digest(Y[:split])],
                                        "val": [digest(X[split:]), digest(Y[split:])]}
    a, b = (runs.root / name / "unet.keras" for name in ("seed_a", "seed_b"))
    assert same_weights(weights(a), weights(b))
    assert history(a).equals(history(b))
    assert not same_weights(weights(a), weights(other))


# 6. Command-line errors ------------------------------------------------------------------------

def test_train_missing_dir_is_one_error_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [sys.executable, "train.py", "--train-dir", str(missing),
         "--model-path", str(tmp_path / "unet.keras"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert assert_one_error_line(result, missing) == "no such data folder"


def test_train_refuses_a_model_path_that_is_not_keras(tmp_path, tree):
    result = subprocess.run(
        [sys.executable, "train.py", "--train-dir", str(tree),
         "--model-path", str(tmp_path / "unet.h5"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_one_error_line(result, tmp_path / "unet.h5", ".keras")


def test_predict_without_a_model_says_train_first(tmp_path, tree):
    missing = tmp_path / "unet.keras"
    result = subprocess.run(
        [sys.executable, "predict.py", "--model-path", str(missing), "--train-dir", str(tree),
         "--test-dir", str(tree), "--out-dir", str(tmp_path / "out"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error_line(result, missing, "train first")


def test_resume_without_a_backup_starts_a_new_history(tmp_path, tree, small_images, capsys):
    model_path = tmp_path / "unet.keras"
    csv_path = model_path.with_suffix(".history.csv")
    csv_path.write_text("epoch,loss,my_iou_metric,val_loss,val_my_iou_metric\n0,1,0,1,0\n")
    train.main(train_args(tree, model_path, 1) + ["--resume"])
    assert "Nothing to resume" in capsys.readouterr().out
    assert list(pd.read_csv(csv_path)["epoch"]) == [0]


def test_load_unet_refuses_a_model_of_another_input_size(tmp_path, small_images, monkeypatch):
    import checkpoints
    import unet

    path = tmp_path / "unet.keras"
    unet.build_unet().save(path)
    monkeypatch.setattr(config, "IMG_HEIGHT", 64)
    with pytest.raises(files.InputError, match=r"the model takes \(32, 32, 3\) images"):
        checkpoints.load_unet(path)


# 7. Checked before any work (issue 8) ---------------------------------------------------------

def exit_message(main, args):
    """What main() stops with: sys.exit's one line, or argparse's exit status 2."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), "1.5"])
def test_train_refuses_a_seed_numpy_cannot_take(tmp_path, tree, seed, capsys):
    args = train_args(tree, tmp_path / "unet.keras", 1, "--seed", seed)
    assert exit_message(train.main, args) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "unet.keras").exists()


def test_train_checks_its_paths_before_loading_anything(tmp_path, tree, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {
        (tree, a_file / "sub" / "unet.keras"): f"error: {a_file}: is a file, not a folder "
                                               "(--model-path)",
        (a_file, tmp_path / "new" / "deeper" / "unet.keras"): f"error: {a_file}: is a file, "
                                                              "not a folder",
        (tree, tmp_path / "folder.keras"): f"error: {tmp_path / 'folder.keras'}: is a folder, "
                                           "not a model file",
    }
    (tmp_path / "folder.keras").mkdir()
    for (train_dir, model_path), message in cases.items():
        assert exit_message(train.main, train_args(train_dir, model_path, 1)) == message
    assert not (tmp_path / "new").exists()  # the model's folders wait until the data is read
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and
                        Path(path) != read_only)  # as chmod 555 does for a non-root user
    assert exit_message(train.main, train_args(tree, read_only / "unet.keras", 1)) == \
        f"error: {read_only}: not writable (--model-path)"
    assert "Getting and resizing" not in capsys.readouterr().out


def save_foreign_models(folder):
    """Models train.py did not write: uncompiled, and with two output channels."""
    import keras

    import checkpoints
    import unet

    uncompiled = folder / "uncompiled.keras"
    compiled = unet.build_unet()
    checkpoints.save_atomic(keras.Model(compiled.inputs, compiled.outputs), uncompiled)
    inputs = keras.Input((SIZE, SIZE, 3))
    two = folder / "two-outputs.keras"
    keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs)).save(two)
    return uncompiled, two


def test_train_refuses_a_model_that_is_not_ours_before_loading_data(tmp_path, tree,
                                                                    small_images, capsys):
    uncompiled, two = save_foreign_models(tmp_path)
    for path, words in ((uncompiled, "saved without its loss and optimizer"),
                        (two, "the model has 2 outputs, its recipe 1")):
        before = path.read_bytes()
        message = exit_message(train.main, train_args(tree, path, 1))
        assert message.startswith(f"error: {path}: ") and words in message, message
        assert path.read_bytes() == before
    assert "Getting and resizing" not in capsys.readouterr().out


def test_predict_checks_model_and_out_dir_before_writing(tmp_path, tree, small_images):
    import predict

    uncompiled, two = save_foreign_models(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "val_sample.png").write_bytes(b"an earlier triptych")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    base = ["--train-dir", str(tree), "--test-dir", str(tree), "--no-cache"]
    cases = {(two, out): f"error: {two}: the model has 2 outputs, its recipe 1",
             (uncompiled, out): f"error: {uncompiled}: saved without its loss and optimizer, so "
                                "not by train.py; retrain or restore it",
             (tmp_path, out): f"error: {tmp_path}: is a folder, not a model file",
             (two, a_file / "out"): f"error: {a_file}: is a file, not a folder (--out-dir)"}
    for (model_path, out_dir), message in cases.items():
        args = base + ["--model-path", str(model_path), "--out-dir", str(out_dir)]
        assert exit_message(predict.main, args) == message
    assert [p.name for p in out.iterdir()] == ["val_sample.png"]
    assert (out / "val_sample.png").read_bytes() == b"an earlier triptych"



# 8. Locks, signals and full disks (issue 8) ------------------------------------------------------


def test_a_second_run_refuses_and_a_stopped_run_says_how_to_resume(runs, small_images):
    """Two runs, one stopped by SIGINT and one by SIGTERM, each after a second run on its model
    was refused."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        run = runs(sig.name.lower())
        result, model_path = run.result, run.model_path
        second = types.SimpleNamespace(**json.loads(run.record.read_text()))
        assert_one_error_line(second, model_path, "in use by another run",
                              f"locked: {model_path.parent / '.unet.keras.lock'}")
        assert result.returncode == 128 + sig
        assert "Traceback" not in result.stderr
        backup = train.backup_dir(model_path)
        assert messages(result.stderr) == [f"stopped by {sig.name}: the best model so far is "
                                           f"safe in {model_path}; `--resume` continues from the "
                                           f"last finished epoch ({backup})"]
        weights(model_path)  # loadable
        # The lock file stays, unlocked: the next run goes on.
        resumed = run_here(train_args(run.tree, model_path, 4, "--resume", batch_size=3))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert list(history(model_path)["epoch"]) == [0, 1, 2, 3]


def test_a_full_disk_while_saving_the_model_is_one_line_and_loses_nothing(tmp_path, tree,
                                                                          small_images,
                                                                          monkeypatch):
    """The disk fills up during the second save of a model (epoch 2's better model): half of
    it is written, then ENOSPC (in this process: no signal is needed)."""
    import keras

    model_path = tmp_path / "unet.keras"
    save, saves = keras.Model.save, []

    def full_disk(self, filepath, *args, **kwargs):
        saves.append(filepath)
        if len(saves) == 2:
            with open(filepath, "wb") as f:
                f.write(b"PK" + bytes(100000))
            raise OSError(errno.ENOSPC, "No space left on device")
        save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", full_disk)
    result = run_here(train_args(tree, model_path, 3))
    monkeypatch.setattr(keras.Model, "save", save)
    assert_one_error_line(result, model_path, "could not be written (No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".unet.keras.lock", "stage1_train", "unet.backup", "unet.history.csv", "unet.keras"]
    rows = history(model_path)
    assert list(rows["epoch"]) == [0]  # the history of the model that is there: epoch 1's
    X, Y, _ = data.load_train(tree)
    split = data.split_index(len(X), tree)
    import checkpoints
    loss = checkpoints.load_unet(model_path).evaluate(X[split:], Y[split:], verbose=0)[0]
    assert loss == pytest.approx(rows["val_loss"][0], rel=1e-4)
    resumed = run_here(train_args(tree, model_path, 3, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_a_full_disk_while_writing_predictions_keeps_the_earlier_ones(tmp_path, tree,
                                                                      small_images, monkeypatch):
    import pandas as pd

    import checkpoints
    import predict
    import unet

    model_path = tmp_path / "unet.keras"
    checkpoints.save_atomic(unet.build_unet(), model_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "submission.csv").write_text("the earlier submission")

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_text("ImageId,EncodedPixels\nid00,1 ")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    args = ["--model-path", str(model_path), "--train-dir", str(tree), "--test-dir", str(tree),
            "--out-dir", str(out), "--no-cache"]
    assert exit_message(predict.main, args) == (
        f"error: {out / 'submission.csv'}: could not be written (No space left on device); "
        "the earlier file, if any, is kept")
    assert (out / "submission.csv").read_text() == "the earlier submission"
    assert sorted(p.name for p in out.iterdir()) == ["submission.csv", "train_sample.png",
                                                     "val_sample.png"]


def test_run_record_carries_early_stopping_and_dropout_state_across_a_resume(tmp_path,
                                                                             small_images):
    import keras

    import checkpoints
    import unet

    def callbacks(model, initial_epoch):
        stopping = keras.callbacks.EarlyStopping(patience=3)
        checkpoint = checkpoints.BestCheckpoint(tmp_path / "m.keras")
        record = checkpoints.RunRecord(tmp_path / "m.history.csv", tmp_path / "m.backup",
                                       checkpoint, stopping, initial_epoch)
        for callback in (stopping, checkpoint, record):
            callback.set_model(model)
            callback.on_train_begin()
        return stopping, record

    model = unet.build_unet()
    stopping, record = callbacks(model, 0)
    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    assert len(states) == 9  # the nine Dropout layers
    for variable in states:
        variable.assign(variable + 7)  # as after some epochs of dropout
    stopping.wait, stopping.best, stopping.best_epoch = 2, 0.25, 1
    record.on_epoch_end(2, {"loss": 0.5, "val_loss": 0.375})

    fresh = unet.build_unet()  # the resumed process
    stopping, record = callbacks(fresh, 3)
    assert (stopping.wait, stopping.best, stopping.best_epoch) == (2, 0.25, 1)
    assert record.rows == [{"epoch": 2, "loss": 0.5, "val_loss": 0.375}]
    restored = [v for v in fresh.variables if v.path.endswith("seed_generator_state")]
    assert all(np.array_equal(a, b) for a, b in zip(restored, states))
    # The run never replaced the model: the model's history is not its to write.
    assert not (tmp_path / "m.history.csv").exists()
    # A backup written before run.json's states were renamed resumes the same way.
    run_file = tmp_path / "m.backup" / "run.json"
    saved = json.loads(run_file.read_text())
    saved["random_states"] = saved.pop("epoch_states")
    run_file.write_text(json.dumps(saved))
    stopping, record = callbacks(unet.build_unet(), 3)
    assert (stopping.wait, stopping.best, stopping.best_epoch) == (2, 0.25, 1)
