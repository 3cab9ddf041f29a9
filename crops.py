"""The instance recipe's training stream: random augmented crops of the training images and
their targets (nucleus, contour, gap), drawn in TensorFlow and compiled by XLA in a parallel
tf.data map, and the fixed centre crops of validation.

TensorFlow is imported inside the functions, so that importing this module stays cheap."""
import functools

import numpy as np

from data import pad_to


def instance_targets(labels):
    """The instance recipe's three targets, uint8 (H, W, 3) of 0/1, from a label image:
    - nucleus: any nucleus pixel;
    - contour: nucleus pixels within 2 pixels (5x5 window) of another label or background;
    - gap: pixels with two different nuclei within 1 pixel (3x3 window): where nuclei touch,
      or nearly do, the line the network must learn to leave open."""
    from scipy import ndimage

    nucleus = labels > 0
    window_max = ndimage.maximum_filter(labels, size=5, mode="nearest")
    window_min = ndimage.minimum_filter(labels, size=5, mode="nearest")
    contour = nucleus & ((window_max != labels) | (window_min != labels))
    # Background counts as the largest label for the lowest, so that it never hides a nucleus.
    highest = ndimage.maximum_filter(labels, size=3, mode="nearest")
    lowest = ndimage.minimum_filter(np.where(nucleus, labels, np.iinfo(labels.dtype).max),
                                    size=3, mode="nearest")
    gap = (highest > 0) & (lowest < highest)
    return np.stack([nucleus, contour, gap], axis=-1).astype(np.uint8)


def instance_targets_tf(labels):
    """instance_targets in TensorFlow, pixel for pixel: uint8 (H, W, 3) or (B, H, W, 3) targets
    of an int32 (H, W) or (B, H, W) label tensor, for the tf.data training stream (XLA compiles
    it too)."""
    import tensorflow as tf

    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank not in (2, 3):
        raise ValueError(f"labels are (H, W) or (B, H, W), not of shape {labels.shape}")
    x = labels[None] if labels.shape.rank == 2 else labels
    height, width = tf.shape(x)[1], tf.shape(x)[2]

    def window(values, size, combine, outside):
        """`combine` (tf.maximum or tf.minimum) over size x size windows, one axis after the
        other. SciPy's mode="nearest" repeats edge values, which a window crossing the border
        already holds: for a maximum or minimum that is the window cut at the border, so the
        padding holds a value that never wins. (Shifted slices: tf.nn.max_pool2d at stride 1
        took ten times longer outside XLA.)"""
        r = size // 2
        padded = tf.pad(values, [[0, 0], [r, r], [r, r]], constant_values=outside)
        rows = functools.reduce(combine, [padded[:, k:k + height] for k in range(size)])
        return functools.reduce(combine, [rows[:, :, k:k + width] for k in range(size)])

    def window_max(values, size):
        return window(values, size, tf.maximum, values.dtype.min)

    def window_min(values, size):
        return window(values, size, tf.minimum, values.dtype.max)

    nucleus = x > 0
    contour = nucleus & ((window_max(x, 5) != x) | (window_min(x, 5) != x))
    # Background counts as the largest label for the lowest, so that it never hides a nucleus.
    highest = window_max(x, 3)
    lowest = window_min(tf.where(nucleus, x, labels.dtype.max), 3)
    gap = (highest > 0) & (lowest < highest)
    targets = tf.cast(tf.stack([nucleus, contour, gap], axis=-1), tf.uint8)
    return targets[0] if labels.shape.rank == 2 else targets


def crop_store(inputs, labels):
    """Training images of different sizes as the tf.data stream reads them: every input's
    pixels in one (pixels, C) float32 tensor and every label image in one int32 vector, each
    image at an offset, with its height and width. Graph ops gather crops from them, so the
    stream's workers never enter Python."""
    import tensorflow as tf

    shapes = np.array([x.shape[:2] for x in inputs], np.int64)
    sizes = shapes.prod(axis=1)
    return {"pixels": tf.constant(np.concatenate([x.reshape(-1, x.shape[2]) for x in inputs])),
            "labels": tf.constant(np.concatenate([y.ravel() for y in labels]).astype(np.int32)),
            "offsets": tf.constant(np.cumsum(sizes) - sizes),
            "shapes": tf.constant(shapes)}


def _reflect(index, length):
    """Indices into an axis of `length`, continued past its end as numpy.pad's "reflect" mode
    continues it (edge not repeated, any number of times over)."""
    import tensorflow as tf

    period = tf.maximum(2 * (length - 1), 1)
    index = index % period
    return tf.where(index < length, index, period - index)


def _resize_axis(top, window, size, length, bilinear):
    """Where output rows (or columns) 0..size-1 of a `window` starting at `top` come from, on
    an image axis of `length` padded by reflection: skimage's resize grid (output pixel o at
    (o + 0.5) * window / size - 0.5). Bilinear: the two source indices and the second's weight,
    the window continued by reflection (mode="reflect"); else the nearest index, the window's
    edge repeated (mode="edge")."""
    import tensorflow as tf

    coords = ((tf.range(size, dtype=tf.float64) + 0.5) * tf.cast(window, tf.float64) / size
              - 0.5)
    if not bilinear:
        nearest = tf.clip_by_value(tf.cast(tf.floor(coords + 0.5), tf.int64), 0, window - 1)
        return _reflect(top + nearest, length)
    low = tf.floor(coords)
    weight = tf.cast(coords - low, tf.float32)
    low = tf.cast(low, tf.int64)
    return (_reflect(top + _reflect(low, window), length),
            _reflect(top + _reflect(low + 1, window), length), weight)


def crop_draws(store, n, seed, recipe):
    """Every random number of one training crop of image n of a crop_store (training_crop),
    from `seed` (two int64) alone, in plain TensorFlow operations: the window's size and place,
    the turn and flip, and the intensity changes (intensity_draws)."""
    import tensorflow as tf

    seeds = iter(tf.unstack(tf.random.experimental.stateless_split(seed, 12)))
    size = recipe["crop"]
    height, width = store["shapes"][n][0], store["shapes"][n][1]
    window = tf.constant(size, tf.int64)
    if recipe["augment"]:
        low, high = np.log(recipe["scale_range"])
        scale = tf.exp(tf.random.stateless_uniform([], next(seeds), low, high, tf.float64))
        window = tf.maximum(tf.cast(tf.round(size / scale), tf.int64), 8)
    draws = {"n": tf.cast(n, tf.int64), "window": window,
             "top": tf.random.stateless_uniform(
                 [], next(seeds), 0, tf.maximum(height, window) - window + 1, tf.int64),
             "left": tf.random.stateless_uniform(
                 [], next(seeds), 0, tf.maximum(width, window) - window + 1, tf.int64)}
    channels = store["pixels"].shape[1]
    if recipe["augment"]:
        draws["turns"] = tf.random.stateless_uniform([], next(seeds), 0, 4, tf.int32)
        draws["flip"] = tf.random.stateless_uniform([], next(seeds), 0, 2, tf.int32) > 0
        if recipe.get("intensity_augment"):
            draws["intensity"] = intensity_draws(next(seeds), (size, size, channels))
        else:
            draws["contrast"] = tf.random.stateless_uniform([], next(seeds), 0.7, 1.3)
            draws["offset"] = tf.random.stateless_uniform([], next(seeds), -0.2, 0.2)
    return draws


def crop_pixels(store, draws, size):
    """The size x size training crop that `draws` (crop_draws) describe, without a random
    number of its own: a random square window (the image reflect-padded at the bottom and
    right when smaller), rescaled to `size` (nucleus sizes differ several-fold between kinds of
    image; bilinear for the input, nearest neighbour for the labels), with
    turned and flipped; then intensity_jitter, or (augment
    without intensity_augment) brightness and contrast: as the draws hold them. Returns
    float32 (S, S, C) and the int32 (S, S) label crop, whose instance_targets_tf are the
    targets."""
    import tensorflow as tf

    n, window, top, left = draws["n"], draws["window"], draws["top"], draws["left"]
    height, width = tf.unstack(tf.gather(store["shapes"], n))
    # tf.gather, not store[...][n]: XLA would take a slice's start as a constant and compile
    # the function again for every image.
    offset = tf.gather(store["offsets"], n)

    def gather(values, rows, cols):
        return tf.gather(values, offset + rows[:, None] * width + cols[None, :])

    rows = _resize_axis(top, window, size, height, bilinear=False)
    cols = _resize_axis(left, window, size, width, bilinear=False)
    labels = gather(store["labels"], rows, cols)
    (row0, row1, down), (col0, col1, right) = (
        _resize_axis(top, window, size, height, bilinear=True),
        _resize_axis(left, window, size, width, bilinear=True))
    down, right = down[:, None, None], right[None, :, None]
    x = ((gather(store["pixels"], row0, col0) * (1 - right)
          + gather(store["pixels"], row0, col1) * right) * (1 - down)
         + (gather(store["pixels"], row1, col0) * (1 - right)
            + gather(store["pixels"], row1, col1) * right) * down)
    if "turns" in draws:
        turns, flip = draws["turns"], draws["flip"]
        x, labels = tf.image.rot90(x, turns), tf.image.rot90(labels[..., None], turns)[..., 0]
        x = tf.where(flip, x[:, ::-1], x)
        labels = tf.where(flip, labels[:, ::-1], labels)
        if "intensity" in draws:
            x = intensity_jitter(x, draws["intensity"])
        else:
            x = x * draws["contrast"] + draws["offset"]
    return x, labels


@functools.cache
def _compiled_crop(size):
    """crop_pixels and the label crop's instance_targets_tf, compiled by XLA, which fuses
    their passes over the pixels (docs/performance.md)."""
    import tensorflow as tf

    def crop(store, draws):
        x, labels = crop_pixels(store, draws, size)
        return x, labels, instance_targets_tf(labels)

    return tf.function(crop, jit_compile=True)


def training_crop(store, n, seed, recipe):
    """One augmented training crop of image n of a crop_store: crop_pixels of crop_draws, in
    TensorFlow operations, compiled by XLA but for the random numbers. Every random number
    comes from `seed` (two int64), so a crop depends on its seed only. Returns the float32
    (S, S, C) input, the int32 (S, S) label crop, and its uint8 (S, S, 3) instance_targets."""
    return _compiled_crop(recipe["crop"])(store, crop_draws(store, n, seed, recipe))


# Blur's largest sigma, and SciPy's gaussian_filter's reach: the kernel is cut at 4 sigmas.
MAX_BLUR = 1.5
BLUR_RADIUS = int(4 * MAX_BLUR + 0.5)


def intensity_draws(seed, shape):
    """intensity_jitter's random numbers for a crop of `shape` (S, S, C), from `seed` (two
    int64): the noise image only when noise is drawn."""
    import tensorflow as tf

    seeds = iter(tf.unstack(tf.random.experimental.stateless_split(seed, 10)))

    def uniform(low, high, shape=()):
        return tf.random.stateless_uniform(shape, next(seeds), low, high)

    def chance():
        return uniform(0.0, 1.0) < 1 / 3

    draws = {"gamma": tf.exp(uniform(np.log(0.5), np.log(2.0))), "blur": chance(),
             "sigma": uniform(0.5, MAX_BLUR), "noisy": chance(), "noise": uniform(0.01, 0.1)}
    noise_seed = next(seeds)
    draws["noise_image"] = tf.cond(draws["noisy"],
                                   lambda: tf.random.stateless_normal(shape, noise_seed),
                                   lambda: tf.zeros(shape))
    draws.update(gradient=chance(), slope=uniform(-0.3, 0.3, [2]), contrast=uniform(0.5, 1.5),
                 offset=uniform(-0.2, 0.2))
    return draws


def intensity_jitter(x, draws):
    """A scaled input (S, S, C) as another acquisition might show it, from intensity_draws:
    gamma 0.5 to 2 (dim or washed-out nuclei), out of focus (a Gaussian blur of sigma 0.5 to
    1.5, as SciPy's gaussian_filter with its "reflect" border) or noisy (sigma 0.01 to 0.1) a
    third of the time each, a linear background gradient a third of the time, contrast 0.5 to
    1.5 and an offset of up to 0.2."""
    import tensorflow as tf

    x = tf.maximum(x, 0) ** draws["gamma"]
    sigma = draws["sigma"]
    # SciPy's kernel: exp(-t^2 / 2 sigma^2) out to int(4 sigma + 0.5) pixels, normalised.
    t = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=tf.float32)
    kernel = tf.where(tf.abs(t) <= tf.floor(4 * sigma + 0.5), tf.exp(-0.5 * (t / sigma) ** 2), 0)
    kernel /= tf.reduce_sum(kernel)

    def blurred():
        # The kernel's taps as shifted copies, which XLA fuses into one pass per axis: XLA's
        # CPU convolution of one channel took 6 ms a crop, more than the rest of it together.
        height, width = x.shape[0], x.shape[1]
        padded = tf.pad(x, [[BLUR_RADIUS] * 2, [BLUR_RADIUS] * 2, [0, 0]], mode="SYMMETRIC")
        rows = functools.reduce(tf.add, [kernel[k] * padded[k:k + height]
                                         for k in range(2 * BLUR_RADIUS + 1)])
        return functools.reduce(tf.add, [kernel[k] * rows[:, k:k + width]
                                         for k in range(2 * BLUR_RADIUS + 1)])

    x = tf.cond(draws["blur"], blurred, lambda: x)
    x = tf.cond(draws["noisy"], lambda: x + draws["noise"] * draws["noise_image"], lambda: x)
    slope = draws["slope"]

    def with_gradient():
        rows = tf.linspace(-0.5, 0.5, tf.shape(x)[0])[:, None, None]
        cols = tf.linspace(-0.5, 0.5, tf.shape(x)[1])[None, :, None]
        return x + (slope[0] * rows + slope[1] * cols)

    x = tf.cond(draws["gradient"], with_gradient, lambda: x)
    return x * draws["contrast"] + draws["offset"]


def centre_crop(x, labels, recipe):
    """The fixed validation pair of an image: its centre crop-sized window (padded if smaller)."""
    size = recipe["crop"]
    x, labels = pad_to(x, size, size), pad_to(labels, size, size)
    top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
    window = (slice(top, top + size), slice(left, left + size))
    return x[window].astype(np.float32), instance_targets(labels[window])[..., :recipe["outputs"]]



def crop_dataset(store, kinds, recipe, batch_size, seed):
    """The instance recipe's training stream from a crop_store: every epoch as many random
    augmented crops (training_crop) as there are training images: one of each image in a
    new order, or with `balance_kinds` images drawn so that each kind of image gets a share
    proportional to the square root of its count (rare kinds seen more often, without
    repeating their few images endlessly).

    A parallel tf.data map, outside Python's lock: each crop's random numbers drawn in plain
    TensorFlow, its pixels and targets compiled by XLA (training_crop), on every core
    (a Python generator made 41 crops a second on one core; this makes hundreds on each, see
    docs/performance.md). Crop k of the stream draws its random numbers from (seed, k) alone,
    and the map keeps the stream's order, so that a seed gives the same batches and a resumed
    run can skip the batches it has trained on."""
    import tensorflow as tf

    images = len(kinds)
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    log_weights = tf.math.log(tf.constant([[counts[kind] ** -0.5 for kind in kinds]]))

    def epoch_order(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), -1 - epoch])  # apart from crops'
        if recipe["balance_kinds"]:
            order = tf.random.stateless_categorical(log_weights, images, epoch_seed)[0]
        else:
            order = tf.random.experimental.stateless_shuffle(tf.range(images, dtype=tf.int64),
                                                             epoch_seed)
        return tf.data.Dataset.from_tensor_slices(order)

    def crop(k, n):
        x, _, targets = training_crop(store, n, tf.stack([tf.constant(seed, tf.int64), k]),
                                           recipe)
        return x, targets[..., :recipe["outputs"]]

    return (tf.data.Dataset.counter().flat_map(epoch_order).enumerate()
            .map(crop, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))
