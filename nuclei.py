"""From a trained model's probabilities to nuclei: whole-image prediction, the watershed or
connected components, the choice of their settings, and the competition's run-length format."""
import numpy as np

import config
import data
import files
import imagefiles


def run_lengths(labels):
    """Kaggle's run-length encoding of every object of a label image at once: {label: "start
    length ..."}, pixels numbered from 1, top to bottom then left to right. Runs continue from
    the bottom of one column to the top of the next, as in the Kaggle kernel."""
    flat = np.asarray(labels).T.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    runs = {}
    for value, start, length in zip(values, starts, lengths):
        if value:
            runs.setdefault(int(value), []).append(f"{start + 1} {length}")
    return {value: " ".join(parts) for value, parts in sorted(runs.items())}


def rle_encoding(mask):
    """Kaggle's run-length encoding of one 2-D mask ("" when empty)."""
    return run_lengths(np.asarray(mask, dtype=np.uint8)).get(1, "")


def rle_decode(encoded, shape, where="run-length"):
    """The bool (height, width) mask of a run-length string; an InputError names `where` when
    the runs do not fit the image."""
    try:
        numbers = np.array(encoded.split(), dtype=np.int64)
    except ValueError:
        raise files.InputError(f"{where}: run values are not integers") from None
    if len(numbers) % 2:
        raise files.InputError(f"{where}: odd number of run values ({len(numbers)})")
    starts, lengths = numbers[::2] - 1, numbers[1::2]
    size = shape[0] * shape[1]
    if len(numbers) and (starts.min() < 0 or lengths.min() < 1):
        raise files.InputError(f"{where}: runs start at pixel 1 and have a length of at least 1")
    if len(numbers) and (starts + lengths).max() > size:
        raise files.InputError(f"{where}: a run ends at pixel {(starts + lengths).max()}, past "
                               f"the image's {shape[0]}x{shape[1]} = {size} pixels")
    flat = np.zeros(size, dtype=bool)
    for start, length in zip(starts, lengths):
        flat[start:start + length] = True
    return flat.reshape(shape[1], shape[0]).T


def read_solution(path):
    """A solution CSV in the competition's format as {ImageId: int32 label image}, one label per
    row with pixels (rows with Usage 'Ignored' left out); an InputError names the file and row."""
    import pandas as pd

    try:
        table = pd.read_csv(path, keep_default_na=False, dtype=str)
    except FileNotFoundError:
        raise files.InputError(f"{path}: no such solution file") from None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise files.InputError(f"{path}: not a readable CSV ({error})") from None
    for column in ("ImageId", "EncodedPixels", "Height", "Width"):
        if column not in table.columns:
            raise files.InputError(f"{path}: no {column} column (has {', '.join(table.columns)})")
    truth = {}
    for row, record in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        where = f"{path} row {row}"
        try:
            shape = int(record.Height), int(record.Width)
        except ValueError:
            raise files.InputError(f"{where}: Height and Width must be integers") from None
        if min(shape) < 1:
            raise files.InputError(f"{where}: Height and Width must be at least 1")
        labels = truth.setdefault(record.ImageId, np.zeros(shape, dtype=np.int32))
        if labels.shape != shape:
            raise files.InputError(f"{where}: {record.ImageId} is {shape[0]}x{shape[1]} here "
                                   f"but {labels.shape[0]}x{labels.shape[1]} in an earlier row")
        if getattr(record, "Usage", "") == "Ignored" or not record.EncodedPixels.strip():
            continue
        labels[rle_decode(record.EncodedPixels, shape, where)] = labels.max() + 1
    if not truth:
        raise files.InputError(f"{path}: no rows")
    return truth


def labels_from_rows(rows, shapes):
    """{ImageId: label image} of submission rows: each row one object, numbered in row order."""
    labels = {id_: np.zeros(shape, dtype=np.int32) for id_, shape in shapes.items()}
    for id_, encoded in rows:
        if encoded:
            image = labels[id_]
            image[rle_decode(encoded, image.shape)] = image.max() + 1
    return labels


def submission_rows(label_images, ids):
    """(ImageId, EncodedPixels) rows: one per nucleus; an image with none gets one empty row."""
    rows = []
    for labels, id_ in zip(label_images, ids):
        encoded = run_lengths(labels)
        # Each pixel belongs to at most one object: the competition refused overlaps.
        assert sum(int(n) for runs in encoded.values() for n in runs.split()[1::2]) == \
            np.count_nonzero(labels), f"{id_}: overlapping objects"
        rows.extend((id_, runs) for runs in encoded.values())
        if not encoded:
            rows.append((id_, ""))
    return rows


class Predictor:
    """The model, its recipe and its compute path (device.prediction_compute): probabilities of
    full-size images, and their nuclei (`nuclei`, what every flow of predict.py calls)."""

    def __init__(self, model, recipe, compute=None):
        self.model, self.recipe = model, recipe
        self.network = None if config.is_notebook(recipe) else Network(model, compute)

    def probabilities(self, images):
        if config.is_notebook(self.recipe):
            size = (config.IMG_HEIGHT, config.IMG_WIDTH)
            X = np.stack([data.shrink_image(imagefiles.display_image(image), size)
                          for image in images])
            return list(self.model.predict(X, verbose=0))
        return [self.probabilities_at_scale(image, 1.0) for image in images]

    def probabilities_at_scale(self, image, scale):
        """The full-size probabilities (H, W, outputs) of one image (H, W, 3) whose input is
        rescaled by `scale`: the mean over the recipe's scales (multi-scale test-time
        augmentation; [1.0] is none), each predicted at `scale` times that scale and its
        probabilities rescaled back."""
        x = data.native_input(image, self.recipe)
        scales = self.recipe.get("scales", [1.0])
        return sum(self._probabilities_of(x, scale * s) for s in scales) / len(scales)

    def _probabilities_of(self, x, scale):
        from skimage.transform import resize

        if scale == 1:
            return predict_tiled(self.network, x, self.recipe["tta"])
        shape = x.shape[:2]
        size = (max(round(shape[0] * scale), 16), max(round(shape[1] * scale), 16))
        x = resize(x, size, order=1, anti_aliasing=scale < 1, preserve_range=True)
        prob = predict_tiled(self.network, x.astype(np.float32), self.recipe["tta"])
        return resize(prob, shape, order=1, preserve_range=True).astype(np.float32)

    def nuclei(self, images, scale=1.0, probs=None):
        """The nuclei of each image (H, W, 3) as int32 label images. With `scale` (from the
        nuclei's known diameter) the input is rescaled by it and min_size with it; else, with
        the recipe's rescale "auto", an image whose nuclei come out with a median diameter over
        1.5 times off config.NUCLEUS_DIAMETER is predicted again at the scale that brings them
        to it (as Cellpose's diameter estimate). `probs`: the images' probabilities at scale 1,
        when already predicted."""
        if probs is None:
            probs = (self.probabilities(images) if scale == 1 else
                     [self.probabilities_at_scale(image, scale) for image in images])
        recipe = {**self.recipe, "min_size": round(self.recipe.get("min_size", 0) / scale ** 2)}
        found = []
        for image, prob in zip(images, probs):
            labels = nuclei_labels(prob, image.shape[:2], recipe)
            if scale == 1 and self.recipe.get("rescale") == "auto" and labels.max():
                diameter = np.median(np.sqrt(4 / np.pi * np.bincount(labels.ravel())[1:]))
                again = config.NUCLEUS_DIAMETER / diameter
                if not 1 / 1.5 < again < 1.5:
                    labels = self.nuclei([image], again)[0]
            found.append(labels)
        return found


def _multiple_of_16(n):
    return -(-n // 16) * 16


class Network:
    """The model's forward pass (training=False) on batches, compiled once per input shape on
    the path `compute` gives (device.prediction_compute("auto") by default): XLA or
    TensorFlow's plain graph, float32 or bfloat16 (a copy of the model with the layers computing
    in bfloat16, the output layer in float32, as train.py's mixed precision; the copy takes the
    weights when the Network is made). Keras's eager call keeps every layer's output until it
    returns; a tf.function frees them as it goes. Nothing here outlives the Network: a dropped
    model is freed."""

    def __init__(self, model, compute=None):
        import tensorflow as tf

        import device

        self.compute = compute or device.prediction_compute("auto")
        self.outputs = model.output_shape[-1]
        # A model trained in mixed precision carries its layers' policy: set the one asked for.
        inner = model.layers[1:-1]
        net = (model if all(layer.dtype_policy.name == self.compute.policy for layer in inner)
               else _with_policy(model, self.compute.policy))
        self._call = tf.function(lambda x: net(x, training=False),
                                 jit_compile=self.compute.jit is not False)

    def __call__(self, batch):
        return self._call(batch).numpy()


def _with_policy(model, policy):
    """A copy of `model` whose layers compute under the Keras dtype `policy`, but for the
    output layer (float32, so that the probabilities stay float32), with the model's weights."""
    import keras

    output = model.layers[-1]

    def clone(layer):
        config_ = layer.get_config()
        config_["dtype"] = "float32" if layer is output else policy
        return layer.__class__.from_config(config_)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def predict_window(network, padded, tta):
    """The probabilities (H, W, outputs) of an input whose sides are multiples of 16 (the four
    2x2 poolings); with `tta` the mean over the four flips, each undone."""
    flips = [(), (0,), (1,), (0, 1)] if tta else [()]
    total = 0
    for axes in flips:
        flipped = np.flip(padded, axis=axes) if axes else padded
        out = network(np.ascontiguousarray(flipped[None]))[0]
        total = total + (np.flip(out, axis=axes) if axes else out)
    return total / len(flips)


def predict_full(network, x, tta):
    """A full-size probability map (H, W, outputs) of one input (H, W, C): reflect-padded to a
    multiple of 16, predicted whole, cropped back."""
    height, width = x.shape[:2]
    padded = data.pad_to(x, _multiple_of_16(height), _multiple_of_16(width))
    return predict_window(network, padded, tta)[:height, :width]


def predict_tiled(network, x, tta, tile=config.TILE, margin=config.TILE_MARGIN):
    """predict_full's probabilities with memory bounded by the tile, not the image: an image
    over config.WHOLE_PIXELS is cut into tile x tile squares (tile_windows), each predicted
    with `margin` pixels of the image around it and pasted into one map."""
    height, width = x.shape[:2]
    if height * width <= config.WHOLE_PIXELS:
        return predict_full(network, x, tta)
    padded = data.pad_to(x, _multiple_of_16(height), _multiple_of_16(width))
    probabilities = np.zeros((height, width, network.outputs), dtype=np.float32)
    predict_tiles(network, padded, (0, 0), probabilities, (0, 0, height, width), tta, tile,
                  margin, (height, width))
    return probabilities


def tile_windows(core, shape, tile, margin):
    """The tiles of `core` (top, left, bottom, right, its corners multiples of `tile`) of an
    image of `shape` (H, W): [(tile square, its window)], each (top, left, bottom, right),
    the square cut at the image's end, the window the square with `margin` pixels around it
    (the network's receptive field reaches 122 pixels, so the square sees what it would see in
    the whole image) within the image padded to a multiple of 16. Every window starts at a
    multiple of 16, so that the poolings fall on the same pixels as in the whole image; a
    block's tiles are the whole image's."""
    assert tile % 16 == 0 and margin % 16 == 0, "tiles must keep the 16-pixel pooling grid"
    padded_height, padded_width = _multiple_of_16(shape[0]), _multiple_of_16(shape[1])
    top0, left0, bottom0, right0 = core
    tiles = []
    for top in range(top0, min(bottom0, padded_height), tile):
        for left in range(left0, min(right0, padded_width), tile):
            square = (top, left, min(top + tile, shape[0]), min(left + tile, shape[1]))
            window = (max(top - margin, 0), max(left - margin, 0),
                      min(top + tile + margin, padded_height),
                      min(left + tile + margin, padded_width))
            if square[2] > top and square[3] > left:
                tiles.append((square, window))
    return tiles


def predict_tiles(network, padded, origin, out, core, tta, tile, margin, shape):
    """The probabilities of the tiles of `core` of an image of `shape` into `out`, whose
    corner is the core's; `padded` holds the padded image's pixels from `origin` (row, col)
    on, at least the core's tiles' windows."""
    for (top, left, bottom, right), (w_top, w_left, w_bottom, w_right) in tile_windows(
            core, shape, tile, margin):
        window = padded[w_top - origin[0]:w_bottom - origin[0],
                        w_left - origin[1]:w_right - origin[1]]
        prob = predict_window(network, window, tta)
        out[top - core[0]:bottom - core[0], left - core[1]:right - core[1]] = \
            prob[top - w_top:bottom - w_top, left - w_left:right - w_left]


def nuclei_labels(prob, shape, recipe):
    """The nuclei of one image as an int32 label image of its original `shape`, from the
    network's probabilities, by the recipe's post-processing; the submission writes exactly
    these objects.
    - components (the Kaggle kernel's): the nucleus channel resized back, thresholded, its
      8-connected components;
    - watershed: holes in the nucleus mask filled (nuclei have none; large textured ones come
      out ring-like), seeds are nucleus pixels away from contours and gaps, flooded over the
      mask with the contour and gap probabilities as the relief, so touching nuclei meet at
      the line between them; a piece of mask no seed reached is a nucleus of its own.
    Then objects under min_size pixels (when the recipe has one) are dropped."""
    return drop_small(segment(prob, shape, recipe), recipe.get("min_size", 0))


def segment(prob, shape, recipe):
    from scipy import ndimage
    from skimage.measure import label
    from skimage.segmentation import watershed

    nucleus = prob[..., 0]
    if nucleus.shape != tuple(shape):
        nucleus = data.resize_2018(nucleus, shape)
    mask = nucleus > recipe["threshold"]
    if recipe["post"] == "components":
        return label(mask).astype(np.int32)
    mask = ndimage.binary_fill_holes(mask)
    contour, gap = prob[..., 1], prob[..., 2]
    seeds, _ = ndimage.label(mask & (contour < recipe["seed_threshold"]) &
                             (gap < recipe["seed_threshold"]))
    labels = watershed(contour + gap, seeds, mask=mask)
    orphans, _ = ndimage.label(mask & (labels == 0))
    return np.where(orphans > 0, orphans + labels.max(), labels).astype(np.int32)


def drop_small(labels, min_size):
    """`labels` without objects under min_size pixels, renumbered 1..n."""
    from skimage.segmentation import relabel_sequential

    if min_size > 1:
        labels = np.where(np.bincount(labels.ravel())[labels] < min_size, 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32)


# What --tune tries on the validation split (every combination).
TUNE_GRID = {"threshold": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "seed_threshold": [0.3, 0.5, 0.7],
             "min_size": [0, 8, 16, 32, 64]}


def tune(probs, truths, recipe):
    """The post-processing settings with the best mean competition score: [(score, settings)]
    best first. min_size is tried last, on each segmentation."""
    import itertools

    import metrics

    grid = dict(TUNE_GRID)
    if recipe["post"] == "components":
        grid["seed_threshold"] = [recipe.get("seed_threshold")]
    results = []
    for threshold, seed_threshold in itertools.product(grid["threshold"], grid["seed_threshold"]):
        settings = {**recipe, "threshold": threshold, "seed_threshold": seed_threshold}
        segmented = [segment(p, t.shape, settings) for p, t in zip(probs, truths)]
        for min_size in grid["min_size"]:
            score = np.average([metrics.competition_score(t, drop_small(s, min_size))
                                for t, s in zip(truths, segmented)])
            chosen = {"threshold": threshold, "seed_threshold": seed_threshold,
                      "min_size": min_size}
            results.append((float(score), {k: v for k, v in chosen.items() if v is not None}))
    return sorted(results, key=lambda result: -result[0])



# The measurements of each nucleus (scikit-image's regionprops names), and the columns they get.
MEASUREMENTS = {
    "label": "label", "centroid-1": "x", "centroid-0": "y", "area": "area",
    "perimeter": "perimeter", "equivalent_diameter_area": "equivalent_diameter",
    "axis_major_length": "major_axis", "axis_minor_length": "minor_axis",
    "eccentricity": "eccentricity", "solidity": "solidity", "orientation": "orientation",
}
# Lengths and areas, which --pixel-size also gives in microns.
LENGTHS = ("x", "y", "perimeter", "equivalent_diameter", "major_axis", "minor_axis")


def measure(labels, pixels, pixel_size=None, origin=(0, 0), shape=None):
    """A table of the nuclei of a label image: one row each, with its shape, its mean and
    maximum intensity in the original pixel values (per colour channel for RGB), whether it
    touches the image's border (its shape is then cut), and with `pixel_size` (microns per
    pixel) lengths in microns and areas in square microns too. For a block of an image, its
    corner (`origin`, row and column) and the image's `shape`."""
    import pandas as pd
    from skimage.measure import regionprops_table

    properties = ["label", "centroid", *list(MEASUREMENTS)[3:], "bbox", "intensity_mean",
                  "intensity_max"]
    table = pd.DataFrame(regionprops_table(labels, intensity_image=pixels,
                                           properties=properties))
    columns = dict(MEASUREMENTS)
    channels = ("",) if pixels.ndim == 2 else [f"_{c}" for c in "rgb"]
    for kind in ("mean", "max"):
        for n, suffix in enumerate(channels):
            source = f"intensity_{kind}" + ("" if pixels.ndim == 2 else f"-{n}")
            columns[source] = f"{kind}_intensity{suffix}"
    top, left = origin
    height, width = shape or labels.shape
    touches = ((table["bbox-0"] + top == 0) | (table["bbox-1"] + left == 0)
               | (table["bbox-2"] + top == height) | (table["bbox-3"] + left == width))
    table = table.rename(columns=columns)[list(columns.values())]
    table["x"] += left
    table["y"] += top
    table["touches_border"] = touches
    if pixel_size:
        for name in LENGTHS:
            table[f"{name}_um"] = table[name] * pixel_size
        table["area_um2"] = table["area"] * pixel_size ** 2
    return table
