"""Train the notebook's U-Net on a DSB2018 folder and keep the best model by val_loss.

python train.py                    # data/stage1_train (python download.py), else the sample
python train.py --recipe instance
python train.py --train-dir ../shared/data/dsb2018/stage1_train
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import config
import crops
import data
import device
import files


def seed_value(text):
    value = int(text)
    if not 0 <= value < 2 ** 32:  # NumPy's seeds
        raise argparse.ArgumentTypeError(f"{text} is not a whole number from 0 to 2**32 - 1")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=files.HelpFormatter)
    parser.add_argument("--train-dir", type=Path, default=config.TRAIN_PATH,
                        help="DSB2018 folder of <id>/images and <id>/masks")
    parser.add_argument("--extra-train-dir", type=Path, action="append", default=[],
                        metavar="FOLDER",
                        help="a DSB2018-layout folder whose images all train (none validate), "
                             "e.g. another acquisition; instance recipe; repeatable")
    parser.add_argument("--recipe", choices=sorted(config.RECIPES), default="notebook",
                        help="notebook: the notebook, bit for bit; instance: native resolution, "
                             "contour outputs and watershed (see config.RECIPES)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one recipe setting (a JSON value or a word), "
                             "e.g. --set augment=false")
    parser.add_argument("--epochs", type=files.positive_int, help="default: the recipe's")
    parser.add_argument("--batch-size", type=files.positive_int,
                        help="global batch size (split across devices with --distribute); "
                             "default: the recipe's")
    parser.add_argument("--model-path", type=Path, default=config.MODEL_PATH,
                        help="best model (.keras); its history goes next to it")
    parser.add_argument("--seed", type=seed_value, default=config.SEED,
                        help="seeds Python, NumPy and TensorFlow: same seed, same run")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last finished epoch")
    parser.add_argument("--no-cache", action="store_true",
                        help=f"always decode the PNGs instead of using {config.CACHE_DIR}")
    parser.add_argument("--distribute", action="store_true",
                        help="train on all GPUs with MirroredStrategy")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="compute in float16 (GPU) or bfloat16 (CPU), keep weights in float32")
    parser.add_argument("--jit", choices=device.JIT_CHOICES, default="auto",
                        help="compile the training step with XLA (on) or as TensorFlow's plain "
                             "graph (off); auto: the faster where it runs (see device.py)")
    return parser.parse_args(argv)


def history_paths(model_path):
    return model_path.with_suffix(".history.csv"), model_path.with_suffix(".history.png")


def backup_dir(model_path):
    return model_path.with_suffix(".backup")


def repair_backup(backup):
    """The epoch an interrupted run resumes at. A kill while Keras writes the backup leaves a
    cut weights file or invalid JSON in its small metadata file; then the previous epoch's
    copies are used (Keras does so itself for the weights, but only once training has begun,
    too late to know where the input stream resumes)."""
    import h5py

    metadata = backup / "training_metadata.json"
    if not metadata.exists():
        return 0
    try:
        epoch = json.loads(metadata.read_text())["epoch"]
        h5py.File(backup / "latest.weights.h5", "r").close()
        return epoch
    except (ValueError, KeyError, OSError):
        pass
    previous = [backup / "latest.weights.h5.bkp", backup / "training_metadata.json.bkp"]
    if not all(path.exists() for path in previous):
        raise files.InputError(f"{metadata}: damaged and no previous copy; delete {backup} "
                               "to start over")
    print(f"{backup}'s last epoch is damaged: resuming from the previous epoch's backup")
    os.replace(previous[0], backup / "latest.weights.h5")
    os.replace(previous[1], metadata)
    return json.loads(metadata.read_text())["epoch"]


def training_dataset(X, Y, batch_size, seed):
    """The training images, reshuffled every epoch, as one endless stream of batches (pass
    steps_per_epoch to fit). Keras then keeps one iterator for the whole run; with arrays it
    builds a new one every epoch, which here left some epochs idle for ~9 s before their first
    batch."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((X, Y))
            .shuffle(len(X), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size).repeat().prefetch(tf.data.AUTOTUNE))


def load_notebook_data(args):
    """The notebook's arrays; training as a shuffled stream, validation as arrays."""
    X, Y, _ = data.load_train(args.train_dir, cache_dir=None if args.no_cache else config.CACHE_DIR)
    print(f"X_train {X.shape} {X.dtype}, Y_train {Y.shape} {Y.dtype}, "
          f"nucleus pixels {Y.mean():.1%}")
    # The notebook's validation_split: Keras takes the validation images from the end.
    split = data.split_index(len(X), args.train_dir)
    # Float labels: the loss casts them anyway, and MirroredStrategy cannot sum bool tensors.
    Y = Y.astype("float32")
    print(f"{split} training and {len(X) - split} validation images")
    return (lambda batch_size: training_dataset(X[:split], Y[:split], batch_size, args.seed),
            split, X[split:], Y[split:])


def load_instance_data(args, recipe):
    """Full-size images and their nuclei: random crops for training, each validation image's
    centre crop for val_loss (the same split as the notebook's). With the recipe's holdout,
    the held-out acquisitions' training images are left out."""
    ids = data.list_ids(args.train_dir)
    split = data.split_index(len(ids), args.train_dir)
    extra_ids = [data.list_ids(folder) for folder in args.extra_train_dir]
    images, labels = data.load_native(args.train_dir, ids)
    val_images, val_labels = images[split:], labels[split:]
    train = [n for n in range(split) if not data.held_out(images[n], recipe)]
    images, labels = [images[n] for n in train], [labels[n] for n in train]
    for folder, folder_ids in zip(args.extra_train_dir, extra_ids):
        more_images, more_labels = data.load_native(folder, folder_ids)
        images, labels = images + more_images, labels + more_labels
    inputs = [data.native_input(image, recipe) for image in images]
    kinds = [data.image_kind(image) for image in images]
    pairs = [crops.centre_crop(data.native_input(image, recipe), y, recipe)
             for image, y in zip(val_images, val_labels)]
    X_val, Y_val = np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])
    held = f", {split - len(train)} held out (--set holdout)" if len(train) < split else ""
    extra = "".join(f", {len(folder_ids)} from {folder}"
                    for folder, folder_ids in zip(args.extra_train_dir, extra_ids))
    print(f"{len(images)} training images (random {recipe['crop']}x{recipe['crop']} crops)"
          f"{held}{extra} and {len(ids) - split} validation images (centre crops), "
          f"{sum(int(y.max()) for y in labels):,} training nuclei; kinds of training "
          f"image: " + ", ".join(f"{kinds.count(kind)} {kind}" for kind in data.KINDS))
    return (lambda batch_size: crops.crop_dataset(
                crops.crop_store(inputs, labels), kinds, recipe, batch_size, args.seed),
            len(images), X_val, Y_val)


def code_version():
    """The commit of the code that runs, with "-dirty" when files differ from it (the shipped
    model under models/ is not code: it is moved away to be trained again); None outside a git
    checkout."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.ROOT, text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                  ".", ":!models"],
                                 cwd=config.ROOT, text=True, capture_output=True, timeout=10,
                                 check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if changed else "")


def run_record(args, compute, epochs, batch_size, n_train, n_val):
    """What the model file records of its training, beside its recipe (checkpoints.TRAINING_MEMBER):
    how it ran and on what; BestCheckpoint adds the epochs run and the best epoch."""
    import platform

    return {"command": " ".join(["python", "train.py", *sys.argv[1:]]),
            "epochs": epochs, "seed": args.seed, "batch_size": batch_size,
            "policy": compute.policy, "jit": compute.jit, "train_dir": str(args.train_dir),
            "extra_train_dirs": [str(folder) for folder in args.extra_train_dir],
            "training_images": n_train, "validation_images": n_val,
            "resumed_at_epoch": None, "code": code_version(), "cpu": device.cpu_name(),
            "machine": platform.machine(), "started": round(time.time())}


def plot_history(csv_path, png_path):
    """Learning curves from the history CSV (all epochs, resumed runs included)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    history = pd.read_csv(csv_path)
    epochs = history["epoch"] + 1
    names = [name for name in ("loss", "my_iou_metric") if name in history]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(epochs, history[name], "o-", label="train")
        ax.plot(epochs, history[f"val_{name}"], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    files.write_atomic(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        with files.stop_on_signals(), files.one_line_warnings():
            train(args)
    except files.InputError as error:
        sys.exit(f"error: {error}")
    except files.Stopped as stopped:
        backup = backup_dir(args.model_path)
        model = (f"the best model so far is safe in {args.model_path}" if args.model_path.exists()
                 else "no model was saved")
        then = (f"`--resume` continues from the last finished epoch ({backup})" if backup.exists()
                else "no epoch had finished, so there is nothing to resume")
        files.exit_stopped(stopped, f"{model}; {then}")


def check_existing_model(model_path, recipe):
    """The model already at --model-path, loaded, when train.py may continue to improve it:
    one of ours (checkpoints.load_unet's checks) and of this run's recipe."""
    import checkpoints

    saved = {**config.RETIRED_SETTINGS, **checkpoints.read_recipe(model_path)}
    differ = [f"{key}={json.dumps(saved.get(key))} there, {json.dumps(value)} here"
              for key, value in {**config.RETIRED_SETTINGS, **recipe}.items()
              if key not in config.POST_SETTINGS and saved.get(key) != value]
    if differ:
        raise files.InputError(f"{model_path}: trained with other settings ({'; '.join(differ)}); "
                               "choose another --model-path or move it")
    return checkpoints.load_unet(model_path)


def train(args):
    recipe = config.recipe_with(config.RECIPES[args.recipe], args.set)
    model_path = args.model_path
    if args.extra_train_dir and config.is_notebook(recipe):
        raise files.InputError("--extra-train-dir: the notebook recipe trains on its one "
                               "folder's arrays; use --recipe instance")
    if model_path.suffix != ".keras":
        raise files.InputError(f"{model_path}: the model path must end in .keras")
    if model_path.is_dir():
        raise files.InputError(f"{model_path}: is a folder, not a model file")
    files.check_output_folder(model_path.parent, "--model-path")
    lock = files.FileLock(model_path)
    if model_path.parent.is_dir():  # else it is made, and locked, once the data is read
        lock.acquire()
    try:
        fit(args, recipe, lock)
    finally:
        lock.release()


def load_data(args, recipe, lock):
    """The run's checks that need no TensorFlow, then its data: (stream, training images,
    X_val, Y_val, the existing model or None). The lock is taken once the model's folder is
    made."""
    model_path, backup = args.model_path, backup_dir(args.model_path)
    if backup.exists() and not args.resume:
        raise files.InputError(f"{backup}: an interrupted run's backup; continue it with --resume, "
                               "or delete the folder to start over")
    existing = check_existing_model(model_path, recipe) if model_path.exists() else None
    if config.is_notebook(recipe):
        stream, n_train, X_val, Y_val = load_notebook_data(args)
    else:
        stream, n_train, X_val, Y_val = load_instance_data(args, recipe)
    if lock.handle is None:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    return stream, n_train, X_val, Y_val, existing


def set_up(args, recipe):
    """Seeds, precision and compilation (said in a line) and the distribution strategy."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    compute = device.training_compute(args.jit, args.mixed_precision or recipe["mixed_precision"],
                                      config.is_notebook(recipe))
    print(f"Compute: {compute.describe()}")
    keras.mixed_precision.set_global_policy(compute.policy)
    if not args.distribute:
        return compute, tf.distribute.get_strategy()
    # All GPUs; on a machine without them, all (logical) CPU devices.
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    print(f"Training on {strategy.num_replicas_in_sync} devices")
    return compute, strategy


def make_callbacks(model_path, recipe, best, slim, training, initial_epoch):
    """The run's callbacks: the NaN guard, early stopping (of constant-rate runs), the best
    checkpoint, the run's record and the backup for --resume."""
    import keras

    import checkpoints

    checkpoint = checkpoints.BestCheckpoint(model_path, best, recipe, slim, training)
    # A cosine schedule settles in its last epochs, at its lowest learning rates: it runs to its
    # end (the best checkpoint keeps the best epoch); patience stops constant-rate runs.
    patience = (training["epochs"] if recipe.get("lr_schedule") == "cosine"
                else recipe["patience"])
    early_stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                   verbose=1, restore_best_weights=True)
    record = checkpoints.RunRecord(history_paths(model_path)[0], backup_dir(model_path),
                                   checkpoint, early_stopping, initial_epoch)
    return checkpoint, record, [
        keras.callbacks.TerminateOnNaN(),
        early_stopping,
        checkpoint,
        record,
        # Saved every epoch and deleted when training ends normally; keeps two copies so that a
        # kill while saving the backup leaves the previous one.
        keras.callbacks.BackupAndRestore(backup_dir(model_path), double_checkpoint=True),
    ]


def fit(args, recipe, lock):
    model_path = args.model_path
    epochs = recipe["epochs"] if args.epochs is None else args.epochs
    batch_size = recipe["batch_size"] if args.batch_size is None else args.batch_size
    stream, n_train, X_val, Y_val, existing = load_data(args, recipe, lock)
    # Keras and TensorFlow are imported here so that --help and bad-data errors are instant.
    import checkpoints
    import unet

    partial = files.partial_path(model_path)
    if partial.exists():
        print(f"Removing {partial}, left by a run killed while saving")
        partial.unlink()
    compute, strategy = set_up(args, recipe)
    best = math.inf
    if existing is not None:
        # The best model so far is only replaced by a better one, in this run or a resumed one.
        best = float(existing.evaluate(X_val, Y_val, verbose=0, return_dict=True)["loss"])
        print(f"{model_path} exists with val_loss {best:.5f}: it is replaced only by a better "
              "model")
    steps = math.ceil(n_train / batch_size)
    with strategy.scope():
        model = unet.build_unet(recipe=recipe, steps=epochs * steps, jit=compute.jit)
        # The saved file's model: the weights, no optimizer state.
        slim = unet.build_unet(recipe=recipe, steps=epochs * steps, jit=compute.jit)
    model.summary()
    initial_epoch = repair_backup(backup_dir(model_path)) if args.resume else 0
    if args.resume and not backup_dir(model_path).exists():
        print(f"Nothing to resume (no {backup_dir(model_path)}): starting a new run")
    training = run_record(args, compute, epochs, batch_size, n_train, len(X_val))
    training["resumed_at_epoch"] = initial_epoch or None
    checkpoint, record, callbacks = make_callbacks(model_path, recipe, best, slim, training,
                                                   initial_epoch)
    # A resumed run takes the batches an uninterrupted run would: the stream from its start,
    # less the finished epochs' batches.
    history = model.fit(stream(batch_size).skip(initial_epoch * steps), steps_per_epoch=steps,
                        validation_data=(X_val, Y_val), batch_size=batch_size,
                        epochs=epochs, callbacks=callbacks,
                        shuffle=False)  # the dataset reshuffles itself every epoch
    losses = history.history.get("loss", [])
    if record.owns_model and checkpoint.saved:
        # The whole run in the record: its epochs and time, not only up to the best epoch.
        checkpoints.write_recipe(model_path, recipe,
                                 checkpoint.training_record(initial_epoch + len(losses) - 1))
    finish(args, record, best, losses)


def finish(args, record, best, losses):
    """What a finished run says: its history, or that it did not improve; a NaN loss; the
    sample's note."""
    csv_path, png_path = history_paths(args.model_path)
    if record.owns_model:
        plot_history(csv_path, png_path)
        print(f"History: {csv_path}, {png_path}")
    elif args.model_path.exists():
        print(f"This run did not improve on {args.model_path} (val_loss {best:.5f}): the model "
              "and its history are unchanged")
    if losses and not math.isfinite(losses[-1]):
        sys.exit(f"error: the loss became {losses[-1]} and training stopped; the best model so "
                 f"far is kept in {args.model_path}")
    if note := data.sample_note(args.train_dir):
        print(note)


if __name__ == "__main__":
    main()
