"""The notebook's U-Net, its DSB2018 metric, and its model files: atomic saving, safe loading."""
import math
import os
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from scipy import ndimage

import config
from data import InputError

# (filters, dropout) of the contracting blocks c1..c4 and of the bottom block c5.
DOWN = [(16, 0.1), (32, 0.1), (64, 0.2), (128, 0.2)]
BOTTOM = (256, 0.3)
# The expanding blocks u6..u9 mirror c4..c1 with the same dropout rates.
UP = [(128, 0.2), (64, 0.2), (32, 0.1), (16, 0.1)]

# The DSB2018 evaluation's IoU thresholds: 0.50, 0.55, ..., 0.95.
THRESHOLDS = np.arange(0.5, 1.0, 0.05)
# Nuclei touching at a corner are one object, as with skimage's `label` that the kernel used.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def conv_block(x, filters, dropout):
    """conv 3x3 -> dropout -> conv 3x3, ELU and He initialisation, as every notebook block."""
    x = layers.Conv2D(filters, 3, activation="elu", kernel_initializer="he_normal", padding="same")(x)
    x = layers.Dropout(dropout)(x)
    return layers.Conv2D(filters, 3, activation="elu", kernel_initializer="he_normal", padding="same")(x)


def build_unet(input_shape=None):
    """The notebook's U-Net (1,941,105 parameters at 128x128x3), compiled as the notebook does.
    The input shape defaults to config's image size, read at call time."""
    inputs = keras.Input(input_shape or (config.IMG_HEIGHT, config.IMG_WIDTH, config.IMG_CHANNELS))
    # Rescaling instead of the notebook's Lambda: the same x / 255, and it reloads in safe mode.
    x = layers.Rescaling(1 / 255)(inputs)
    skips = []
    for filters, dropout in DOWN:
        x = conv_block(x, filters, dropout)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = conv_block(x, *BOTTOM)
    for (filters, dropout), skip in zip(UP, reversed(skips)):
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = layers.concatenate([x, skip])
        x = conv_block(x, filters, dropout)
    # float32 output keeps the loss stable when --mixed-precision computes the rest in 16 bits.
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    # The metric runs NumPy code, which XLA cannot compile (Keras 3 would use XLA on a GPU).
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=[my_iou_metric],
                  jit_compile=False)
    return model


def _label(mask):
    """Connected components of a (H, W) or (H, W, 1) mask > 0.5, and the number of labels
    including background (skimage's `label` without its per-call overhead)."""
    mask = np.asarray(mask) > 0.5
    if mask.ndim == 3:  # (H, W, 1): 2-D labelling is a third faster than 3-D
        mask = mask[:, :, 0]
    labels, count = ndimage.label(mask, EIGHT_CONNECTED)
    return labels, count + 1


def iou_metric(y_true_in, y_pred_in, print_table=False):
    """The DSB2018 score of one image: mean precision of object matching over IoU thresholds.

    As in the competition's evaluation (kaggle.com/c/data-science-bowl-2018, "Evaluation") and
    the notebook's Kaggle kernel: the connected components of `y_true > 0.5` and `y_pred > 0.5`
    are the objects; at each threshold t in 0.50..0.95 a true and a predicted object match when
    their IoU > t; TP = true objects with exactly one match, FP = predicted objects with none,
    FN = true objects with none; precision(t) = TP / (TP + FP + FN), 0 when that is 0 / 0.

    Bit for bit the kernel's result, including its quirks: an empty truth scores 0 even for an
    empty prediction, and the lowest label present is treated as background (so in an image
    that is all nucleus, that nucleus is ignored). Counting overlaps with `bincount` instead of
    the kernel's `histogram2d`, and counting matches only where objects overlap, makes it
    6.5x faster (bench.py); the two labelling calls are two thirds of what is left.
    """
    true_labels, n_true = _label(y_true_in)
    pred_labels, n_pred = _label(y_pred_in)
    pair_counts = np.bincount((true_labels * n_pred + pred_labels).ravel(),
                              minlength=n_true * n_pred).reshape(n_true, n_pred)
    area_true = pair_counts.sum(axis=1)
    area_pred = pair_counts.sum(axis=0)
    # The kernel's histograms drop the first bin, which is label 0 when it occurs and label 1
    # (a nucleus) when the mask has no background.
    first_true = 1 if area_true[0] else 2
    first_pred = 1 if area_pred[0] else 2
    overlaps = pair_counts[first_true:, first_pred:]
    rows, cols = np.nonzero(overlaps)
    intersection = overlaps[rows, cols].astype(np.float64)
    iou = intersection / (area_true[first_true:][rows] + area_pred[first_pred:][cols] - intersection)
    # Objects are disjoint, so at IoU > 0.5 an object matches at most one other: a match is a
    # true positive, and the unmatched objects on either side are the FN and FP.
    tp = (iou[None, :] > THRESHOLDS[:, None]).sum(axis=1)
    fp = (n_pred - first_pred) - tp
    fn = (n_true - first_true) - tp
    total = tp + fp + fn
    precision = np.divide(tp, total, out=np.zeros(len(THRESHOLDS)), where=total > 0)
    if print_table:
        print("Thresh\tTP\tFP\tFN\tPrec.")
        for row in zip(THRESHOLDS, tp, fp, fn, precision):
            print("{:1.3f}\t{}\t{}\t{}\t{:1.3f}".format(*row))
        print("AP\t-\t-\t-\t{:1.3f}".format(np.mean(precision)))
    return np.mean(precision)


def iou_metric_batch(y_true_in, y_pred_in):
    """The mean of `iou_metric` over a batch, as float32."""
    return np.array(np.mean([iou_metric(t, p) for t, p in zip(y_true_in, y_pred_in)]),
                    dtype=np.float32)


def my_iou_metric(label, pred):
    """`iou_metric_batch` as a Keras metric: Keras averages it over the batches of an epoch."""
    value = tf.numpy_function(iou_metric_batch, [label, pred], tf.float32, stateful=False)
    value.set_shape([])  # Keras 3 needs a known rank
    return value


def load_unet(path):
    """A model saved by train.py, loaded in Keras' safe mode; an InputError names what is wrong."""
    path = Path(path)
    if path.suffix != ".keras":
        raise InputError(f"{path}: only .keras model files are loaded (not {path.suffix or 'no suffix'})")
    if not path.is_file():
        raise InputError(f"{path}: no model file; train first with `python train.py --model-path {path}`")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: damaged model file (not a .keras archive); retrain or restore it")
    try:
        model = keras.saving.load_model(path, custom_objects={"my_iou_metric": my_iou_metric},
                                        safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad archive; name the file.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Lambda" in str(error):
            raise InputError(f"{path}: cannot load the model: it holds a Lambda layer "
                             "(arbitrary code), refused in safe mode") from None
        # A readable archive whose config or weights are not (e.g. a member cut short).
        raise InputError(f"{path}: damaged or incompatible model file ({message}); "
                         "retrain or restore it") from None
    expected = (config.IMG_HEIGHT, config.IMG_WIDTH, config.IMG_CHANNELS)
    if tuple(model.input_shape[1:]) != expected:
        raise InputError(f"{path}: the model takes {model.input_shape[1:]} images, "
                         f"config.py's size is {expected}")
    return model


def partial_path(model_path):
    """Where a checkpoint is written before it is renamed over the best model; Keras wants the
    .keras suffix, the leading dot keeps it out of sight."""
    return model_path.with_name(f".{model_path.stem}.partial.keras")


def save_atomic(model, path):
    """Write to a temporary file in the same folder, then rename: a kill at any moment leaves
    either the old file or the new one, never a truncated one (ModelCheckpoint truncates the old
    best file before writing the new one)."""
    tmp = partial_path(path)
    model.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class BestCheckpoint(keras.callbacks.Callback):
    """ModelCheckpoint(monitor='val_loss', save_best_only=True), made safe: the file is replaced
    atomically, a NaN or infinite val_loss is never "best", and the best value so far can come
    from an existing model, so that it is only ever replaced by a better one."""

    def __init__(self, path, best=math.inf):
        super().__init__()
        self.path, self.best = Path(path), best

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get("val_loss")
        if current is None or not math.isfinite(current):
            print(f"\nEpoch {epoch + 1}: val_loss is {current}, not saved")
        elif current < self.best:
            print(f"\nEpoch {epoch + 1}: val_loss improved from {self.best:.5f} to "
                  f"{current:.5f}, saving model to {self.path}")
            save_atomic(self.model, self.path)
            self.best = current
        else:
            print(f"\nEpoch {epoch + 1}: val_loss did not improve from {self.best:.5f}")
