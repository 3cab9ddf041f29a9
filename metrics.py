"""The DSB2018 metrics: the notebook's IoU metric (in NumPy, and in TensorFlow operations that XLA
compiles for training), and the competition's score of one image at original resolution."""
import functools

import numpy as np
import tensorflow as tf
from scipy import ndimage

# The DSB2018 evaluation's IoU thresholds: 0.50, 0.55, ..., 0.95.
THRESHOLDS = np.arange(0.5, 1.0, 0.05)
# Nuclei touching at a corner are one object, as with skimage's `label` that the kernel used.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


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
    print(f"AP\t-\t-\t-\t{np.mean(precision):1.3f}")


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
