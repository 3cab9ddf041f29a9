"""Model files and the training callbacks that write them: the recipe and the training record
inside the archive, atomic saving, safe loading, the best checkpoint and the run's record for
--resume."""
import json
import math
import time
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np

import config
import files
from data import INPUT_CHANNELS
from metrics import my_iou_metric
from unet import bce_dice

# The archive member that holds the recipe a model was trained with.
RECIPE_MEMBER = "recipe.json"
TRAINING_MEMBER = "training.json"


def read_recipe(path):
    """The recipe saved in a model file; a model without one (saved before recipes existed) was
    trained with the notebook's."""
    try:
        with zipfile.ZipFile(path) as archive:
            if RECIPE_MEMBER not in archive.namelist():
                return dict(config.RECIPES["notebook"])
            return {**config.RECIPE_DEFAULTS, **json.loads(archive.read(RECIPE_MEMBER))}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise files.InputError(f"{path}: damaged model file ({error}); retrain or restore "
                               "it") from None


def load_unet(path):
    """A model saved by train.py, loaded in Keras' safe mode and checked: its shapes against the
    recipe saved with it, and compiled (as train.py saves them); an files.InputError names what is
    wrong."""
    path = Path(path)
    if path.is_dir():
        raise files.InputError(f"{path}: is a folder, not a model file")
    if path.suffix != ".keras":
        raise files.InputError(f"{path}: only .keras model files are loaded "
                               f"(not {path.suffix or 'no suffix'})")
    if not path.is_file():
        raise files.InputError(f"{path}: no model file; train first with "
                               f"`python train.py --model-path {path}`")
    if not zipfile.is_zipfile(path):
        raise files.InputError(f"{path}: damaged model file (not a .keras archive); retrain or "
                               "restore it")
    try:
        with warnings.catch_warnings():
            # train.py's files hold no optimizer state (BestCheckpoint's slim model), by design.
            warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
            model = keras.saving.load_model(
                path, custom_objects={"my_iou_metric": my_iou_metric, "bce_dice": bce_dice},
                safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad archive; name the file.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Lambda" in str(error):
            raise files.InputError(f"{path}: cannot load the model: it holds a Lambda layer "
                                   "(arbitrary code), refused in safe mode") from None
        # A readable archive whose config or weights are not (e.g. a member cut short).
        raise files.InputError(f"{path}: damaged or incompatible model file ({message}); "
                               "retrain or restore it") from None
    recipe = read_recipe(path)
    if config.is_notebook(recipe):
        expected = (config.IMG_HEIGHT, config.IMG_WIDTH, config.IMG_CHANNELS)
        if tuple(model.input_shape[1:]) != expected:
            raise files.InputError(f"{path}: the model takes {model.input_shape[1:]} images, "
                                   f"config.py's size is {expected}")
    elif model.input_shape[-1] != INPUT_CHANNELS[recipe["input"]]:
        raise files.InputError(f"{path}: the model takes {model.input_shape[-1]} channels, its "
                               f"recipe ({recipe['input']}) {INPUT_CHANNELS[recipe['input']]}")
    if config.is_notebook(recipe) and model.output_shape[1:3] != model.input_shape[1:3]:
        raise files.InputError(f"{path}: the model's output is {model.output_shape[1:3]}, its "
                               f"input {model.input_shape[1:3]}: not a U-Net of this project")
    if model.output_shape[-1] != recipe["outputs"]:
        raise files.InputError(f"{path}: the model has {model.output_shape[-1]} outputs, its "
                               f"recipe {recipe['outputs']}")
    if not model.compiled:  # train.py saves compiled models only
        raise files.InputError(f"{path}: saved without its loss and optimizer, so not by train.py; "
                               "retrain or restore it")
    return model


def _members(model, members):
    def write(tmp):
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            for name, value in members.items():
                archive.writestr(name, json.dumps(value, indent=1))
    return write


def save_atomic(model, path, recipe=None, training=None):
    """Write to a temporary file in the same folder, then rename: a kill or a full disk at any
    moment leaves either the old file or the new one, never a truncated one (ModelCheckpoint
    truncates the old best file before writing the new one). The recipe, and the record of how
    the model was trained when given, go into the same archive, so that a model never travels
    without them."""
    members = {RECIPE_MEMBER: recipe or config.RECIPES["notebook"]}
    if training is not None:
        members[TRAINING_MEMBER] = training
    files.write_atomic(path, _members(model, members))


def write_recipe(path, recipe, training=None):
    """Replace the recipe (and the training record, when given) in a model file, atomically: a
    copy with the new members, renamed."""
    members = {RECIPE_MEMBER: recipe, **({TRAINING_MEMBER: training} if training else {})}

    def write(tmp):
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w") as target:
            for item in source.infolist():
                if item.filename not in members:
                    target.writestr(item, source.read(item))
            for name, value in members.items():
                target.writestr(name, json.dumps(value, indent=1))
    files.write_atomic(path, write)


def read_training(path):
    """The record of how a model was trained (train.py's run_record), or None for a model saved
    without one."""
    with zipfile.ZipFile(path) as archive:
        if TRAINING_MEMBER not in archive.namelist():
            return None
        return json.loads(archive.read(TRAINING_MEMBER))


class BestCheckpoint(keras.callbacks.Callback):
    """ModelCheckpoint(monitor='val_loss', save_best_only=True), made safe: the file is replaced
    atomically, a NaN or infinite val_loss is never "best", and the best value so far can come
    from an existing model, so that it is only ever replaced by a better one.

    With `slim`, a model of the same recipe whose optimizer was never built, the file gets the
    weights in it: what prediction and a later run need, without Adam's moments (two thirds of
    the file; --resume takes them from BackupAndRestore's folder). `training` (a dict) is
    saved with it as the training record, with the epochs run and the best epoch."""

    def __init__(self, path, best=math.inf, recipe=None, slim=None, training=None):
        super().__init__()
        self.path, self.recipe, self.best = Path(path), recipe, best
        self.slim, self.training = slim, training
        self.saved = False  # whether this run has replaced the model file

    def training_record(self, epoch):
        """The training record after `epoch` (0-based), with the seconds since its "started"
        (this process's, for a resumed run); None without one."""
        if self.training is None:
            return None
        seconds = round(time.time() - self.training["started"]) if "started" in self.training \
            else None
        return {**self.training, "epochs_run": epoch + 1, "seconds": seconds}

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get("val_loss")
        if current is None or not math.isfinite(current):
            print(f"\nEpoch {epoch + 1}: val_loss is {current}, not saved")
        elif current < self.best:
            print(f"\nEpoch {epoch + 1}: val_loss improved from {self.best:.5f} to "
                  f"{current:.5f}, saving model to {self.path}")
            model = self.model
            if self.slim is not None:
                self.slim.set_weights(self.model.get_weights())
                model = self.slim
            if self.training is not None:
                self.training["best_epoch"] = epoch + 1
            save_atomic(model, self.path, self.recipe, self.training_record(epoch))
            self.best, self.saved = current, True
        else:
            print(f"\nEpoch {epoch + 1}: val_loss did not improve from {self.best:.5f}")


class RunRecord(keras.callbacks.Callback):
    """What a resumed run needs besides the weights and optimizer state that BackupAndRestore
    keeps, and the history that belongs to the best model.

    Every epoch, `run.json` in the backup folder gets the run's history rows, whether the run has
    replaced the model, EarlyStopping's count (so that patience runs on across a resume), and
    the dropout layers' random states after the epoch (Keras does not save them; without them a
    resumed run draws the masks of the run's first epoch again). The model's history CSV is
    written only by a run that has replaced the model (a run that never beats it leaves the
    model's history alone), atomically, with all of that run's epochs."""

    def __init__(self, csv_path, backup, checkpoint, early_stopping, initial_epoch=0):
        super().__init__()
        self.csv_path, self.checkpoint = Path(csv_path), checkpoint
        self.early_stopping = early_stopping
        self.run_file = Path(backup) / "run.json"
        self.initial_epoch = initial_epoch
        self.rows, self.owns_model, self.epoch_states = [], False, {}
        if initial_epoch and self.run_file.exists():
            saved = json.loads(self.run_file.read_text())
            # Rows of epochs whose backup was lost are run again.
            self.rows = [row for row in saved["rows"] if row["epoch"] < initial_epoch]
            self.owns_model = saved["owns_model"]
            # "random_states" is what run.json called them before (same contents).
            self.epoch_states = saved.get("epoch_states", saved.get("random_states", {}))

    def _random_state_variables(self):
        return [v for v in self.model.variables if v.path.endswith("seed_generator_state")]

    def on_train_begin(self, logs=None):
        states = self.epoch_states.get(str(self.initial_epoch))
        if states is not None:
            *dropout, stopping = states
            for variable, state in zip(self._random_state_variables(), dropout, strict=True):
                variable.assign(np.array(state, dtype=variable.dtype))
            # Its best weights are not kept: train.py saves the best model itself.
            for name, value in stopping.items():
                setattr(self.early_stopping, name, value)

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})
        self.owns_model = self.owns_model or self.checkpoint.saved
        # Dropout's and EarlyStopping's states at the start of this epoch and of the next: the
        # backup keeps two epochs too.
        self.epoch_states = {key: value for key, value in self.epoch_states.items()
                             if int(key) == epoch}
        self.epoch_states[str(epoch + 1)] = [
            *(np.asarray(v).tolist() for v in self._random_state_variables()),
            {"wait": int(self.early_stopping.wait),
             "best_epoch": int(self.early_stopping.best_epoch),
             "best": None if self.early_stopping.best is None else float(self.early_stopping.best)}]
        record = {"rows": self.rows, "owns_model": self.owns_model,
                  "epoch_states": self.epoch_states}
        self.run_file.parent.mkdir(exist_ok=True)
        files.write_atomic(self.run_file, lambda tmp: tmp.write_text(json.dumps(record)))
        if self.owns_model:
            files.write_atomic(self.csv_path, self._write_csv)

    def _write_csv(self, tmp):
        import csv

        columns = ["epoch", *sorted({key for row in self.rows for key in row} - {"epoch"})]
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(self.rows)
