"""The notebook's U-Net, its DSB2018 metric, and its model files: atomic saving, safe loading."""
import functools
import json
import math
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from scipy import ndimage

import config
import device
import files
from data import INPUT_CHANNELS

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
    """conv 3x3 -> dropout -> conv 3x3, ELU and He initialisation, as every notebook block;
    no dropout layer when `dropout` is 0."""
    x = layers.Conv2D(filters, 3, activation="elu", kernel_initializer="he_normal", padding="same")(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return layers.Conv2D(filters, 3, activation="elu", kernel_initializer="he_normal", padding="same")(x)


def build_unet(input_shape=None, recipe=None, steps=None, jit=None):
    """The notebook's U-Net (1,941,105 parameters at 128x128x3), compiled as the notebook does.
    The input shape defaults to config's image size, read at call time. Another recipe keeps the
    blocks and changes what is recipe data: the input (any size, its channels, already scaled
    by data.native_input), the number of outputs, whether the blocks keep their dropout, the loss,
    and the learning rate's schedule over `steps` training steps. `jit` is Keras' jit_compile;
    by default device.py's choice for this machine."""
    recipe = recipe or config.RECIPES["notebook"]
    notebook = config.is_notebook(recipe)
    if input_shape is None:
        input_shape = ((config.IMG_HEIGHT, config.IMG_WIDTH, config.IMG_CHANNELS) if notebook
                       else (None, None, INPUT_CHANNELS[recipe["input"]]))
    inputs = keras.Input(input_shape)
    # Rescaling instead of the notebook's Lambda: the same x / 255, and it reloads in safe mode.
    x = layers.Rescaling(1 / 255)(inputs) if notebook else inputs
    keep = recipe["dropout"]  # the notebook's dropout rates, or none
    skips = []
    for filters, dropout in DOWN:
        x = conv_block(x, filters, dropout if keep else 0)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = conv_block(x, BOTTOM[0], BOTTOM[1] if keep else 0)
    for (filters, dropout), skip in zip(UP, reversed(skips)):
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = layers.concatenate([x, skip])
        x = conv_block(x, filters, dropout if keep else 0)
    # float32 output keeps the loss stable when --mixed-precision computes the rest in 16 bits.
    outputs = layers.Conv2D(recipe["outputs"], 1, activation="sigmoid", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    if jit is None:
        jit = device.training_compute("auto", False, notebook).jit
    if notebook:
        # The metric is compiled by XLA whatever `jit` is.
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=[my_iou_metric],
                      jit_compile=jit)
    else:
        learning_rate = 1e-3  # Adam's default, as the notebook's
        if recipe["lr_schedule"] == "cosine" and steps:
            learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        loss = bce_dice if recipe["loss"] == "bce_dice" else "binary_crossentropy"
        if recipe.get("gap_weight", 1.0) != 1:
            loss = GapWeightedBceDice(recipe["gap_weight"])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      jit_compile=jit)
    return model


@keras.saving.register_keras_serializable(package="dsb2018")
def bce_dice(y_true, y_pred, gap_weight=1.0):
    """Binary cross-entropy plus (1 - soft Dice) of each output channel over the batch: the
    Dice term weighs small nuclei and thin contours as much as the big background. With
    `gap_weight`, every channel's cross-entropy counts that many times on the pixels of the
    gaps between touching nuclei (the third target), as the U-Net paper's border weights."""
    y_true = tf.cast(y_true, y_pred.dtype)
    bce = keras.losses.binary_crossentropy(y_true[..., None], y_pred[..., None])
    if gap_weight != 1:
        bce = bce * (1 + (gap_weight - 1) * y_true[..., 2])[..., None]
    bce = tf.reduce_mean(bce)
    intersection = tf.reduce_sum(y_true * y_pred, axis=(0, 1, 2))
    total = tf.reduce_sum(y_true + y_pred, axis=(0, 1, 2))
    dice = (2 * intersection + 1) / (total + 1)
    return bce + tf.reduce_mean(1 - dice)


@keras.saving.register_keras_serializable(package="dsb2018")
class GapWeightedBceDice(keras.losses.Loss):
    """bce_dice with the recipe's gap_weight, kept in the model file for --resume."""

    def __init__(self, gap_weight, name="gap_weighted_bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gap_weight = gap_weight

    def call(self, y_true, y_pred):
        return bce_dice(y_true, y_pred, self.gap_weight)

    def get_config(self):
        return {**super().get_config(), "gap_weight": self.gap_weight}


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
    tp, fp, fn, precision = _match(pair_counts[first_true:, first_pred:],
                                   area_true[first_true:], area_pred[first_pred:])
    if print_table:
        print_match_table(tp, fp, fn, precision)
    return np.mean(precision)


def _match(overlaps, area_true, area_pred):
    """TP, FP, FN and precision at each threshold, from the overlap counts of the true objects
    (rows) with the predicted ones (columns) and their areas."""
    rows, cols = np.nonzero(overlaps)
    intersection = overlaps[rows, cols].astype(np.float64)
    iou = intersection / (area_true[rows] + area_pred[cols] - intersection)
    # Objects are disjoint, so at IoU > 0.5 an object matches at most one other: a match is a
    # true positive, and the unmatched objects on either side are the FN and FP.
    tp = (iou[None, :] > THRESHOLDS[:, None]).sum(axis=1)
    fp = len(area_pred) - tp
    fn = len(area_true) - tp
    total = tp + fp + fn
    precision = np.divide(tp, total, out=np.zeros(len(THRESHOLDS)), where=total > 0)
    return tp, fp, fn, precision


def print_match_table(tp, fp, fn, precision):
    print("Thresh\tTP\tFP\tFN\tPrec.")
    for row in zip(THRESHOLDS, tp, fp, fn, precision):
        print("{:1.3f}\t{}\t{}\t{}\t{:1.3f}".format(*row))
    print("AP\t-\t-\t-\t{:1.3f}".format(np.mean(precision)))


def competition_score(true_labels, pred_labels, print_table=False):
    """The DSB2018 competition's score of one image, from two label images of the same size
    (0 background, each other value one object; the truth's objects are its mask files): the
    mean over IoU thresholds 0.50..0.95 of TP / (TP + FP + FN), a match being IoU > t. An image
    with no true and no predicted object scores 1 (nothing to find, nothing invented)."""
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"truth is {true_labels.shape}, prediction {pred_labels.shape}")
    # Compact label values, so that sparse or large labels cost nothing.
    true_values, true_index = np.unique(true_labels, return_inverse=True)
    pred_values, pred_index = np.unique(pred_labels, return_inverse=True)
    n_true, n_pred = len(true_values), len(pred_values)
    pair_counts = np.bincount(true_index.ravel() * n_pred + pred_index.ravel(),
                              minlength=n_true * n_pred).reshape(n_true, n_pred)
    # Drop background's row and column (it is the first value when present).
    first_true, first_pred = int(true_values[0] == 0), int(pred_values[0] == 0)
    tp, fp, fn, precision = _match(pair_counts[first_true:, first_pred:],
                                   pair_counts[first_true:].sum(axis=1),
                                   pair_counts[:, first_pred:].sum(axis=0))
    if len(true_values) == first_true and len(pred_values) == first_pred:
        precision = np.ones(len(THRESHOLDS))
    if print_table:
        print_match_table(tp, fp, fn, precision)
    return float(np.mean(precision))


def iou_metric_batch(y_true_in, y_pred_in):
    """The mean of `iou_metric` over a batch, as float32."""
    return np.array(np.mean([iou_metric(t, p) for t, p in zip(y_true_in, y_pred_in)]),
                    dtype=np.float32)


# `my_iou_metric`: `iou_metric_batch` in TensorFlow operations, which XLA compiles.
#
# A 2x2 block's pixels are pairwise 8-connected, so its foreground lies in one component:
# labelling blocks instead of pixels is a quarter of the work. A block's pixels as bits:
BLOCK_BITS = ((1, 2), (4, 8))  # top left, top right / bottom left, bottom right
# The 8 neighbouring blocks (rows, columns down and right), and which pixels of the block and
# of the neighbour touch across their shared side (any two do) or corner.
NEIGHBOURS = ((0, 1, 2 | 8, 1 | 4), (0, -1, 1 | 4, 2 | 8), (1, 0, 4 | 8, 1 | 2),
              (-1, 0, 1 | 2, 4 | 8), (1, 1, 8, 1), (-1, -1, 1, 8), (1, -1, 4, 2), (-1, 1, 2, 4))
# NumPy sums up to this many float64 values with 8 accumulators, longer arrays by halves.
PAIRWISE_BLOCK = 128


def _foreground(y):
    """`y > 0.5` as `_label` reads it: (B, H, W) bool from (B, H, W, 1)."""
    y = y[..., 0]
    if y.dtype == tf.bool:
        return y
    if not y.dtype.is_floating:
        y = tf.cast(y, tf.float32)
    return y > tf.constant(0.5, y.dtype)


def _block_codes(mask):
    """The BLOCK_BITS of each 2x2 block of a (N, H, W) bool mask, (N, ceil(H/2), ceil(W/2))
    int32 (an odd last row or column is padded with background)."""
    height, width = mask.shape[1], mask.shape[2]
    mask = tf.pad(tf.cast(mask, tf.int32), [[0, 0], [0, height % 2], [0, width % 2]])
    quads = tf.reshape(mask, [-1, (height + 1) // 2, 2, (width + 1) // 2, 2])
    return tf.reduce_sum(quads * tf.reshape(BLOCK_BITS, [1, 1, 2, 1, 2]), axis=(2, 4))


def _label_blocks(codes):
    """Connected components of the foreground blocks of (N, h, w) codes, flat (N * h * w,)
    int32: each block labelled with the largest id (1 + its index in its image) in its
    component, background 0.

    Union-find in parallel steps (Shiloach-Vishkin): every block points to a block of its
    component with an index as large or larger, at first itself. A step hooks the block each
    block points to onto the largest pointer among its connected neighbours (a scatter-max,
    so whole trees merge at once), then moves every pointer two links further up its tree. A
    step that changes nothing leaves the blocks of a component pointing to its largest block:
    4 or 5 steps for a batch of 16 DSB2018 masks and their predictions."""
    images, height, width = tf.shape(codes)[0], codes.shape[1], codes.shape[2]
    codes = tf.reshape(codes, [-1])
    block = tf.range(images * height * width)
    row, col = block // width % height, block % width
    # A roll of the flat blocks wraps across rows and images: `inside` excludes those.
    offsets, links = [], []
    for rows, cols, own, theirs in NEIGHBOURS:
        offsets.append(rows * width + cols)
        inside = ((row + rows >= 0) & (row + rows < height)
                  & (col + cols >= 0) & (col + cols < width))
        links.append(inside & (codes & own != 0)
                     & (tf.roll(codes, -offsets[-1], 0) & theirs != 0))

    def step(parent, done):
        largest = functools.reduce(tf.maximum, [parent] + [
            tf.where(link, tf.roll(parent, -offset, 0), -1)
            for offset, link in zip(offsets, links)])
        new = tf.tensor_scatter_nd_max(parent, parent[:, None], largest)
        new = tf.gather(new, tf.gather(new, new))
        return new, tf.reduce_all(new == parent)

    root = tf.while_loop(lambda parent, done: ~done, step, (block, tf.constant(False)))[0]
    return tf.where(codes > 0, root % (height * width) + 1, 0)


def _per_object_sums(fields, segments, count, width):
    """`unsorted_segment_sum` of each of `fields` (int32, sums below 2**width), several packed
    into one int64: XLA's scatter costs per element, whatever its width."""
    per_word = 63 // width
    sums = []
    for first in range(0, len(fields), per_word):
        group = fields[first:first + per_word]
        word = sum(tf.bitwise.left_shift(tf.cast(field, tf.int64), width * i)
                   for i, field in enumerate(group))
        packed = tf.math.unsorted_segment_sum(word, segments, count)
        sums += [tf.cast(tf.bitwise.right_shift(packed, width * i) % (1 << width), tf.int32)
                 for i in range(len(group))]
    return sums


def _numpy_short_sum(values, length):
    """NumPy's float64 sum of values[..., :length] for length <= 128, in NumPy's order, from
    (..., 128) values: under 8 values one by one; else 8 accumulators over blocks of 8, added
    pairwise, then the rest one by one. Adding 0.0 leaves a sum as it is, so masked values
    stand in for the ones NumPy skips."""
    flat = tf.reshape(values, [-1, PAIRWISE_BLOCK])
    lanes = tf.reshape(flat, [-1, PAIRWISE_BLOCK // 8, 8])
    blocks = length // 8
    sums = lanes[:, 0]
    for k in range(1, PAIRWISE_BLOCK // 8):
        sums += tf.where(k < blocks, lanes[:, k], tf.zeros_like(sums))
    total = (((sums[:, 0] + sums[:, 1]) + (sums[:, 2] + sums[:, 3]))
             + ((sums[:, 4] + sums[:, 5]) + (sums[:, 6] + sums[:, 7])))
    short = tf.zeros_like(total)
    for j in range(8):
        rest = tf.gather(flat, tf.minimum(blocks * 8 + j, PAIRWISE_BLOCK - 1), axis=1)
        total += tf.where(j < length % 8, rest, tf.zeros_like(rest))
        short += tf.where(j < length, flat[:, j], tf.zeros_like(short))
    return tf.reshape(tf.where(length < 8, short, total), tf.shape(values)[:-1])


def _numpy_sum(values):
    """NumPy's float64 sum of a 1-D tensor of any length, in NumPy's order (pairwise
    summation): up to 128 values as `_numpy_short_sum`; a longer run split where its half,
    rounded down to a multiple of 8, ends, and the two parts' sums added. The recursion runs on
    a stack of frames: start, length, and the left part's sum once known."""
    padded = tf.concat([values, tf.zeros([PAIRWISE_BLOCK], values.dtype)], 0)
    depth = 64  # frames: more than log2 of any length

    def split(length):
        return length // 2 - length // 2 % 8

    def step(top, starts, lengths, lefts, has_left, value, returning):
        start, length = starts[top], lengths[top]
        at_top = tf.one_hot(top, depth, on_value=True, off_value=False)
        above = tf.one_hot(top + 1, depth, on_value=True, off_value=False)
        # A returning left part's sum is kept, and the right part pushed; a returning right
        # part's sum completes the frame, which returns in turn. A new frame is summed at once
        # (a leaf) or pushes its left part.
        summed = tf.where(returning, lefts[top] + value,
                          _numpy_short_sum(tf.slice(padded, [start], [PAIRWISE_BLOCK]), length))
        finished = tf.where(returning, has_left[top], length <= PAIRWISE_BLOCK)
        push_right = returning & ~has_left[top]
        push = above & ~finished
        starts = tf.where(push, tf.where(push_right, start + split(length), start), starts)
        lengths = tf.where(push, tf.where(push_right, length - split(length), split(length)),
                           lengths)
        lefts = tf.where(at_top & push_right, value, lefts)
        has_left = (has_left | at_top & push_right) & ~push
        return (tf.where(finished, top - 1, top + 1), starts, lengths, lefts, has_left,
                tf.where(finished, summed, value), finished)

    frames = tf.zeros([depth], tf.int32)
    state = (tf.constant(0), frames, tf.tensor_scatter_nd_update(frames, [[0]], tf.shape(values)),
             tf.zeros([depth], values.dtype), tf.zeros([depth], tf.bool),
             tf.constant(0.0, values.dtype), tf.constant(False))
    return tf.while_loop(lambda top, *_: top >= 0, step, state)[5]


@tf.function(jit_compile=True)
def _iou_metric_xla(y_true, y_pred):
    """`my_iou_metric`'s computation."""
    truth, pred = _foreground(y_true), _foreground(y_pred)
    # `iou_metric` drops the lowest label present as background: in an image that is all
    # nucleus, the nucleus.
    truth &= ~tf.reduce_all(truth, axis=(1, 2), keepdims=True)
    pred &= ~tf.reduce_all(pred, axis=(1, 2), keepdims=True)
    images = tf.shape(truth)[0]
    codes = _block_codes(tf.concat([truth, pred], 0))
    blocks = codes.shape[1] * codes.shape[2]
    labels = tf.reshape(_label_blocks(codes), [2, -1])
    true_label, pred_label = labels[0], labels[1]
    area = tf.cast(tf.raw_ops.PopulationCount(x=tf.reshape(codes, [2, -1])), tf.int32)
    overlap = tf.cast(tf.raw_ops.PopulationCount(x=tf.reshape(codes[:images] & codes[images:],
                                                                [-1])), tf.int32)
    # Objects per image: each component has one block labelled with its own id.
    own_id = tf.range(images * blocks) % blocks + 1
    objects = tf.reduce_sum(tf.reshape(tf.cast(labels == own_id, tf.int32), [2, images, blocks]),
                            axis=2)
    # The labels 0..blocks of image n are the segments n * (blocks + 1) + label.
    segments = images * (blocks + 1)
    image_start = tf.range(images * blocks) // blocks * (blocks + 1)
    true_segment, pred_segment = true_label + image_start, pred_label + image_start

    # At IoU > 0.5 a true object matches one predicted object, which covers more than half of
    # the true object's pixels: so their majority predicted label, which wins the vote of each
    # of its bits. A true object without a majority gets a candidate of IoU 0.5 or less.
    width = (truth.shape[1] * truth.shape[2]).bit_length()  # an area fits in `width` bits
    bits = [tf.bitwise.right_shift(pred_label, k) % 2 * overlap for k in range(blocks.bit_length())]
    true_area, *votes = _per_object_sums([area[0]] + bits, true_segment, segments, width)
    candidate = sum(tf.where(2 * vote > true_area, 1 << k, 0) for k, vote in enumerate(votes))
    candidate = tf.where(candidate <= blocks, candidate, 0)  # bits past the labels: no label
    hits = tf.where(pred_label == tf.gather(candidate, true_segment), overlap, 0)
    intersection = tf.math.unsorted_segment_sum(hits, true_segment, segments)
    pred_area = tf.math.unsorted_segment_sum(area[1], pred_segment, segments)
    segment = tf.range(segments)
    candidate_area = tf.gather(pred_area, segment - segment % (blocks + 1) + candidate)
    union = true_area + candidate_area - intersection
    matched = (candidate > 0) & (intersection > 0)
    # As `_match`: float64 intersection / union, compared with the float64 thresholds.
    iou = tf.where(matched, tf.cast(intersection, tf.float64)
                   / tf.cast(tf.where(matched, union, 1), tf.float64), 0.0)
    tp = tf.reduce_sum(tf.cast(tf.reshape(iou, [images, blocks + 1, 1]) > THRESHOLDS, tf.int32),
                       axis=1)
    total = tp + (objects[1][:, None] - tp) + (objects[0][:, None] - tp)  # TP + FP + FN
    precision = tf.where(total > 0, tf.cast(tp, tf.float64)
                         / tf.cast(tf.maximum(total, 1), tf.float64), 0.0)
    per_image = _numpy_short_sum(
        tf.pad(precision, [[0, 0], [0, PAIRWISE_BLOCK - len(THRESHOLDS)]]),
        len(THRESHOLDS)) / len(THRESHOLDS)
    return tf.cast(_numpy_sum(per_image) / tf.cast(images, tf.float64), tf.float32)


def my_iou_metric(y_true, y_pred):
    """`iou_metric_batch` as a Keras metric (Keras averages it over the batches of an epoch),
    equal to it bit for bit, in TensorFlow operations: the float32 of a float64 mean, every
    float sum in NumPy's order. y_true and y_pred are (B, H, W, 1), H and W known. Always
    compiled by XLA, even when the training step is not (Keras' default on a CPU): in a plain
    TensorFlow graph, Grappler would regroup the float64 sums."""
    return _iou_metric_xla(y_true, y_pred)


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
        raise files.InputError(f"{path}: damaged model file ({error}); retrain or restore it") from None


def load_unet(path):
    """A model saved by train.py, loaded in Keras' safe mode and checked: its shapes against the
    recipe saved with it, and compiled (as train.py saves them); an files.InputError names what is
    wrong."""
    path = Path(path)
    if path.is_dir():
        raise files.InputError(f"{path}: is a folder, not a model file")
    if path.suffix != ".keras":
        raise files.InputError(f"{path}: only .keras model files are loaded (not {path.suffix or 'no suffix'})")
    if not path.is_file():
        raise files.InputError(f"{path}: no model file; train first with `python train.py --model-path {path}`")
    if not zipfile.is_zipfile(path):
        raise files.InputError(f"{path}: damaged model file (not a .keras archive); retrain or restore it")
    try:
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
        raise files.InputError(f"{path}: the model takes {model.input_shape[-1]} channels, its recipe "
                               f"({recipe['input']}) {INPUT_CHANNELS[recipe['input']]}")
    if config.is_notebook(recipe) and model.output_shape[1:3] != model.input_shape[1:3]:
        raise files.InputError(f"{path}: the model's output is {model.output_shape[1:3]}, its input "
                               f"{model.input_shape[1:3]}: not a U-Net of this project")
    if model.output_shape[-1] != recipe["outputs"]:
        raise files.InputError(f"{path}: the model has {model.output_shape[-1]} outputs, its recipe "
                               f"{recipe['outputs']}")
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
