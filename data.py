"""Loading DSB2018 folders into the notebook's arrays.

A DSB2018 folder holds one sub-folder per image id: `<id>/images/<id>.png` and, for training
data, one PNG per nucleus in `<id>/masks/`. The arrays are the notebook's, bit for bit:

- `X`: the image's first three channels, resized to 128x128 with scikit-image's `resize`
  (`mode='constant', preserve_range=True`) and truncated to uint8 as the notebook's assignment
  into a uint8 array does;
- `Y`: every mask resized the same way, merged so that any resized value > 0 is nucleus.

Two things keep it that way on today's stack and make it fast:

- scikit-image >= 0.15 blurs before shrinking (`anti_aliasing=True`); with the "> 0" merge the
  blur's halo becomes nucleus (24.0% of the pixels instead of 15.5% on stage1_train). 2018 had
  no anti-aliasing, so neither do we.
- Masks never overlap and bilinear resizing is linear with non-negative weights, so the resized
  union is > 0 exactly where some resized mask is: we merge at full size and resize once per
  image instead of once per mask. Files are decoded on all cores (Pillow and zlib release the
  GIL), and the arrays are cached, keyed by the folder's files and the settings.

TensorFlow is imported only inside the functions of the instance recipe's training stream
(crop_store, training_crop and its parts, instance_targets_tf), so that the data tests and
`--help` stay fast.
"""
import functools
import hashlib
import json
import os
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.transform import resize
from tqdm import tqdm

import config
from files import InputError

# Bump when the arrays this module produces change, so that old caches are rebuilt.
LOADER_VERSION = 1


def _entries(folder):
    """The entries of a folder, sorted by name, hidden ones left out."""
    try:
        with os.scandir(folder) as scan:
            return sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    except PermissionError:
        raise InputError(f"{folder}: not readable (permission denied)") from None
    except NotADirectoryError:
        raise InputError(f"{folder}: is a file, not a folder") from None


def list_ids(folder):
    """The image ids of a DSB2018 folder, sorted: its sub-folders, hidden ones left out."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: no such data folder")
    ids = [e.name for e in _entries(folder) if e.is_dir()]
    for id_ in ids:
        try:
            id_.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{folder}: the id folder {id_!r} has a name that is not valid "
                             "UTF-8; rename it") from None
    if not ids:
        raise InputError(f"{folder}: no image folders in it (expected <id>/images/<id>.png)")
    return ids


# The file types read as images: PNG, TIFF, JPEG and BMP, by suffix in any case.
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def read_pixels(path, channel=None):
    """An image file's pixels in its own type (uint8, uint16, other integers, float32), as
    (H, W) or (H, W, 3): alpha dropped, palette and 1-bit images expanded. TIFFs are read with
    their axes: a z-stack or a time series is refused, and a file with more planes than grey or
    RGB(A) needs `channel`, the plane that holds the nuclei (which any image accepts)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array, planes_axis = _read_tiff(path, channel)
            if planes_axis:  # the channel is chosen
                return array
        else:
            array = _read_pillow(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"{path}: refused as a decompression bomb ({error})") from None
    except InputError:
        raise
    except Exception as error:  # a damaged file raises whatever its decoder meets first
        raise InputError(f"{path}: not a readable image ({error})") from None
    planes = array.shape[2] if array.ndim == 3 else 1
    if channel is not None:
        if not 0 <= channel < planes:
            raise InputError(f"{path}: --channel {channel}, but the image has {planes} "
                             f"plane{'s' if planes > 1 else ''} (0 to {planes - 1})")
        return array[:, :, channel] if array.ndim == 3 else array
    if planes in (2, 4):  # alpha is not part of the picture
        array = array[:, :, 0] if planes == 2 else array[:, :, :3]
    elif planes > 4:
        raise InputError(f"{path}: {planes} planes of {array.shape[1]}x{array.shape[0]} pixels "
                         f"(shape {array.shape}); choose the nuclei's with --channel N")
    return array


def _check_size(path, height, width):
    if height * width > config.MAX_IMAGE_PIXELS:
        raise InputError(f"{path}: {width}x{height} pixels is over the "
                         f"{config.MAX_IMAGE_PIXELS:,} limit (decompression bomb?)")


def _read_pillow(path):
    with Image.open(path) as im:
        _check_size(path, im.height, im.width)
        if im.mode in ("1", "P", "PA"):
            im = im.convert("RGBA" if im.mode != "1" else "L")
        elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "F"):
            im = im.convert("RGB")
        array = np.asarray(im)
    if array.dtype not in (np.uint8, np.float32):
        # 16-bit PNGs come as 16- or 32-bit integers holding 0..65535.
        array = array.astype(np.uint16)
    return array


def _read_tiff(path, channel):
    """A TIFF's first image series as (H, W) or, for RGB(A) samples, (H, W, 3 or 4): axes of
    size 1 dropped, a labelled z or time axis refused, and any other axis (channels, or one the
    file does not name) reduced to its plane `channel`, which it needs; and whether it had
    such an axis."""
    import logging

    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its errors become our one line
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        sizes = dict(zip(axes, shape))
        if "Y" not in sizes or "X" not in sizes:
            raise InputError(f"{path}: no image plane in its axes {axes} (shape {shape})")
        _check_size(path, sizes["Y"], sizes["X"])
        for axis, what in (("Z", "a z-stack"), ("T", "a time series")):
            if sizes.get(axis, 1) > 1:
                raise InputError(f"{path}: {what} (shape {shape}, axes {axes}); save the plane "
                                 "to segment as an image of its own (a projection, or one slice)")
        planes = [axis for axis in axes if axis not in "YXS" and sizes[axis] > 1]
        if len(planes) > 1:
            raise InputError(f"{path}: more than one axis besides the image's (shape {shape}, "
                             f"axes {axes}); save the nuclei's plane as an image of its own")
        if planes and channel is None:
            raise InputError(f"{path}: {sizes[planes[0]]} planes (shape {shape}, axes {axes}); "
                             "choose the nuclei's with --channel N")
        array = series.asarray()
    keep = [n for n, axis in enumerate(axes) if sizes[axis] > 1 or axis in "YX"]
    array = array.reshape([shape[n] for n in keep])
    axes = "".join(axes[n] for n in keep)
    if planes:
        if not 0 <= channel < sizes[planes[0]]:
            raise InputError(f"{path}: --channel {channel}, but the image has "
                             f"{sizes[planes[0]]} planes (0 to {sizes[planes[0]] - 1})")
        array = np.take(array, channel, axis=axes.index(planes[0]))
        axes = axes.replace(planes[0], "")
    array = np.moveaxis(array, [axes.index("Y"), axes.index("X")], [0, 1])
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    elif array.dtype.kind == "b":
        array = array.astype(np.uint8) * 255
    return array, bool(planes)


def scaled_image(pixels):
    """Any image's pixels as float32 (H, W, 3) on the 0..255 scale that image_kind and
    native_input expect: 8-bit as it is; any other type mapped linearly so that the whole
    image's 0.1st and 99.9th percentiles are 0 and 255 (never per tile, never by dividing 16 bits
    by 255, not clipped: native_input scales again), computed on an evenly thinned copy of
    about a million pixels."""
    x = pixels.astype(np.float32)
    if pixels.dtype != np.uint8:
        step = max(1, int((x.shape[0] * x.shape[1] / 1e6) ** 0.5))
        low, high = np.percentile(x[::step, ::step], (0.1, 99.9))
        x -= low
        if high > low:  # a constant image stays 0
            x *= 255 / (high - low)
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def display_image(image):
    """A scaled_image as uint8 RGB for pictures."""
    return np.clip(image, 0, 255).astype(np.uint8)


def read_image(path):
    """An image as uint8 (H, W, 3): grey is repeated, 16 bits are scaled (not clipped) to 8."""
    array = read_pixels(path)
    if array.dtype == np.uint16:
        # The high byte, as Pillow itself reduces 16-bit RGB PNGs.
        array = (array >> 8).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, :3]


def read_mask(path):
    """A nucleus mask as bool (H, W): any non-zero value (in any colour channel) is nucleus."""
    array = read_pixels(path)
    return array.any(axis=2) if array.ndim == 3 else array > 0


def resize_2018(array, size):
    """scikit-image 0.13's resize: bilinear, constant border, values kept, no anti-aliasing."""
    return resize(array, size, mode="constant", preserve_range=True, anti_aliasing=False)


def _is_png(name):
    return name.lower().endswith(".png")  # .PNG too: the same file format


def image_path(folder, id_):
    """An id's image, `<id>/images/<id>.png` (the suffix in any case)."""
    images = Path(folder) / id_ / "images"
    if images.is_dir():
        for entry in _entries(images):
            if entry.name[:-4] == id_ and _is_png(entry.name):
                return Path(entry.path)
    raise InputError(f"{images / (id_ + '.png')}: missing (every id folder needs "
                     "images/<id>.png)")


def mask_paths(folder, id_):
    """An id's mask files, `<id>/masks/*.png` (the suffix in any case), sorted; anything else in
    masks/ is named in a warning, never dropped unseen."""
    masks = Path(folder) / id_ / "masks"
    if not masks.is_dir():
        return []
    paths = []
    for entry in _entries(masks):
        path = Path(entry.path)
        if not _is_png(entry.name):
            warnings.warn(f"{path}: not a PNG, skipped", stacklevel=2)
        elif entry.is_file():
            paths.append(path)
        elif entry.is_symlink():
            raise InputError(f"{path}: a broken symbolic link")
        else:
            warnings.warn(f"{path}: not a file, skipped", stacklevel=2)
    return paths


def read_id_image(folder, id_):
    """The image of one id folder as read_image gives it."""
    return read_image(image_path(folder, id_))


def shrink_image(image, size):
    """The notebook's network input: the image resized the 2018 way and truncated to uint8, as
    the notebook's `X_train[n] = img` does with the float resize output."""
    return resize_2018(image, size).astype(np.uint8)


def _load_one(folder, id_, size, with_masks):
    """One id: the resized image, and its merged resized mask or its original (height, width)."""
    image = read_id_image(folder, id_)
    x = shrink_image(image, size)
    if not with_masks:
        return x, image.shape[:2]
    union = (read_labels(folder, id_, image.shape[:2]) > 0).astype(np.uint8)
    y = resize_2018(union, size) > 0
    return x, y[:, :, None]


def _digest(path):
    """What changes with a file's content: its name, size, modification time and status-change
    time. The kernel sets the last on every write and nothing can set it back, so a rewrite that
    keeps the size and restores the modification time is noticed, without reading the file.
    Windows has no status-change time (st_ctime is the creation time there): its files' bytes
    are hashed instead (CRC-32)."""
    try:
        stat = path.stat()
        stamp = (zlib.crc32(path.read_bytes()) if os.name == "nt" else stat.st_ctime_ns)
    except FileNotFoundError:
        problem = "a broken symbolic link" if path.is_symlink() else "vanished while reading"
        raise InputError(f"{path}: {problem}") from None
    except OSError as error:
        raise InputError(f"{path}: not readable ({error.strerror})") from None
    return f"{path.parent.name}/{path.name} {stat.st_size} {stat.st_mtime_ns} {stamp}\n"


def _id_digest(folder, id_, with_masks):
    paths = [image_path(folder, id_), *(mask_paths(folder, id_) if with_masks else [])]
    return f"{id_}\n" + "".join(_digest(path) for path in paths)


def _fingerprint(folder, ids, with_masks, settings):
    """A digest of every image (and mask) file's name and state (_digest), and of the settings:
    0.3 s for stage1_train's 29,650 files (threads made it slower: the work is Python's)."""
    digest = hashlib.sha256(repr((LOADER_VERSION, settings)).encode())
    for id_ in ids:
        digest.update(_id_digest(folder, id_, with_masks).encode())
    return digest.hexdigest()


def _cache_path(cache_dir, folder, kind):
    # One cache file per folder and kind: a changed folder overwrites its old entry.
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-{key}.npz"


def _read_cache(path, fingerprint):
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None
            return {name: cached[name] for name in cached.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(f"{path}: damaged cache ignored and rebuilt ({error})", stacklevel=3)
        return None


def _write_cache(path, **arrays):
    """Written to a temporary file and renamed, so a killed run never leaves a half cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as error:
        warnings.warn(f"{path}: could not write the cache ({error})", stacklevel=3)
        tmp.unlink(missing_ok=True)


def _load_folder(folder, kind, size, cache_dir):
    """(X, second array, ids) for every id of `folder`, from the cache when it is current."""
    folder = Path(folder)
    size = tuple(size or (config.IMG_HEIGHT, config.IMG_WIDTH))
    ids = list_ids(folder)
    with_masks = kind == "train"
    if cache_dir is not None:
        fingerprint = _fingerprint(folder, ids, with_masks, (kind, size))
        cache_path = _cache_path(cache_dir, folder, kind)
        cached = _read_cache(cache_path, fingerprint)
        if cached is not None:
            print(f"Loaded {len(ids)} {kind} images from the cache {cache_path}")
            return cached["X"], cached["second"], list(cached["ids"])

    print(f"Getting and resizing {kind} images ... ")
    X = np.zeros((len(ids), *size, config.IMG_CHANNELS), dtype=np.uint8)
    second = (np.zeros((len(ids), *size, 1), dtype=bool) if with_masks
              else np.zeros((len(ids), 2), dtype=np.int64))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = [pool.submit(_load_one, folder, id_, size, with_masks) for id_ in ids]
        try:
            for n, future in enumerate(tqdm(futures, total=len(ids))):
                X[n], second[n] = future.result()
                if with_masks and not second[n].any():
                    # Warned here, not in the worker thread, so that it points at the caller.
                    warnings.warn(f"{folder / ids[n] / 'masks'}: no nucleus in any mask file; "
                                  f"{ids[n]} is loaded as an image with no nuclei", stacklevel=3)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if cache_dir is not None:
        _write_cache(cache_path, X=X, second=second, ids=np.array(ids), fingerprint=fingerprint)
    return X, second, ids


def load_train(train_dir, size=None, cache_dir=None):
    """(X_train uint8 (N, H, W, 3), Y_train bool (N, H, W, 1), ids) of a folder with masks."""
    return _load_folder(train_dir, "train", size, cache_dir)


def load_test(test_dir, size=None, cache_dir=None):
    """(X_test uint8 (N, H, W, 3), sizes_test int (N, 2) original (height, width), ids)."""
    return _load_folder(test_dir, "test", size, cache_dir)


def sample_note(folder):
    """The line that ends a run on the bundled sample; None for any other folder."""
    if Path(folder).resolve().is_relative_to(config.SAMPLE_DIR):
        return ("This was a smoke test on the bundled sample, too small to learn from; "
                "fetch the real data with `python download.py` and run again.")
    return None


def split_index(n, folder):
    """Where Keras' validation_split cuts the n images of `folder`: the last VALIDATION_SPLIT
    of them are the validation set."""
    split = int(n * (1 - config.VALIDATION_SPLIT))
    if not 0 < split < n:
        raise InputError(f"{folder}: {n} images cannot be split into training and validation")
    return split


# Kinds of image, by a rule on the pixels: colour when the channels differ by more than this on
# average (stained histology), else bright-field when the median grey is above half range,
# else dark-background fluorescence.
COLOUR_SPREAD = 10
KINDS = ("fluorescence", "bright-field", "histology")


def image_kind(image):
    """'fluorescence', 'bright-field' or 'histology' for a uint8 (H, W, 3) image."""
    spread = (image.max(axis=2).astype(np.int16) - image.min(axis=2)).mean()
    if spread > COLOUR_SPREAD:
        return "histology"
    return "bright-field" if np.median(image) > 127 else "fluorescence"


def acquisition(image):
    """The source an image most likely comes from: (kind, height, width)."""
    return (image_kind(image), *image.shape[:2])


def held_out(image, recipe):
    """Whether the recipe trains without this image (its acquisition is held out)."""
    return (recipe.get("holdout") == "acquisitions"
            and acquisition(image) in config.HELD_OUT_ACQUISITIONS)


def read_labels(folder, id_, shape):
    """The id's nuclei at full size as one int32 label image: mask file k (sorted) is label k+1."""
    labels = np.zeros(shape, dtype=np.int32)
    for k, path in enumerate(mask_paths(folder, id_), start=1):
        mask = read_mask(path)
        if mask.shape != shape:
            raise InputError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                             f"its image is {shape[1]}x{shape[0]}")
        labels[mask] = k
    return labels


def _load_native(folder, id_, with_labels):
    image = read_id_image(folder, id_)
    return image, (read_labels(folder, id_, image.shape[:2]) if with_labels else None)


def load_native(folder, ids, with_labels=True):
    """(images, label images) of `ids` at their original size: uint8 (H, W, 3) and int32 (H, W),
    every mask file its own nucleus (the competition's truth); labels are None without masks."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(tqdm(pool.map(lambda id_: _load_native(folder, id_, with_labels), ids),
                            total=len(ids), desc="full-size images"))
    return [image for image, _ in results], [labels for _, labels in results]


# Channels of the network's input for each kind of recipe input.
INPUT_CHANNELS = {"rgb_128": 3, "grey_native": 1, "rgb_native": 3}


def native_input(image, recipe, channels=False):
    """The network's input for a full-size image, float32 (H, W, 1 or 3): inverted when the
    background is bright (bright-field, histology) so that nuclei are bright on dark as in
    fluorescence, then scaled so that the 1st and 99.8th percentiles are 0 and 1. `grey_native`
    averages the channels; `rgb_native` keeps the colour (stains tell nuclei from cytoplasm).
    With `channels`, a `grey_native` input comes as its three channels, each scaled as the grey
    is (their mean is the grey input), for training_crop's stain augmentation to mix."""
    x = image.astype(np.float32)
    if image_kind(image) != "fluorescence":
        x = 255 - x
    grey = x.mean(axis=2, keepdims=True)
    if recipe["input"] == "grey_native" and not channels:
        x = grey
    low, high = np.percentile(grey if recipe["input"] == "grey_native" else x, (1, 99.8))
    return ((x - low) / max(high - low, 1e-3)).astype(np.float32)


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


def pad_to(array, height, width):
    """`array` (H, W, ...) reflect-padded at the bottom and right to at least height x width."""
    pad = [(0, max(height - array.shape[0], 0)), (0, max(width - array.shape[1], 0))]
    return np.pad(array, pad + [(0, 0)] * (array.ndim - 2), mode="reflect")


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
    the stain weights (Gamma draws, which XLA cannot compile), the turn and flip, and the
    intensity changes (intensity_draws)."""
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
    if recipe.get("stain_augment"):
        # Dirichlet weights: independent Gamma draws, normalised.
        draws["mix"] = tf.random.stateless_gamma([channels], next(seeds), STAIN_CONCENTRATION)
        channels = 1
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
    `stain_augment` the input's three channels mixed into grey (a stain or a camera that
    renders nuclei differently), turned and flipped; then intensity_jitter, or (augment
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
    if "mix" in draws:
        mix = draws["mix"]
        x = tf.reduce_sum(x * mix / tf.reduce_sum(mix), axis=2, keepdims=True)
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


# Stain mixing weights come from a Dirichlet distribution with this concentration per channel:
# 4 keeps them around a third each (the grey input), at times one channel twice the others.
STAIN_CONCENTRATION = 4.0
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


def recipe_with(recipe, settings, allowed=None):
    """A copy of `recipe` with KEY=VALUE settings (JSON values, or plain words for text
    settings: --set augment=false, --set input=rgb_native); each key must be one of the
    recipe's (and of `allowed`), its value of the same type and, for text, one of its choices."""
    recipe = dict(recipe)
    for setting in settings:
        key, _, text = setting.partition("=")
        keys = sorted(k for k in recipe if allowed is None or k in allowed)
        if key not in keys:
            raise InputError(f"--set {setting}: no setting {key!r} here (settable: {', '.join(keys)})")
        try:
            value = json.loads(text)
        except ValueError:
            if not isinstance(recipe[key], str):
                raise InputError(f"--set {setting}: {text!r} is not a JSON value") from None
            value = text
        if type(value) is not type(recipe[key]) and not (
                type(value) is int and type(recipe[key]) is float):
            raise InputError(f"--set {setting}: {key} takes a {type(recipe[key]).__name__}")
        if key in config.RECIPE_CHOICES and value not in config.RECIPE_CHOICES[key]:
            raise InputError(f"--set {setting}: {key} is one of "
                             f"{', '.join(config.RECIPE_CHOICES[key])}")
        recipe[key] = value
    scales = recipe.get("scales", [1.0])
    if not scales or not all(type(s) in (int, float) and 0.25 <= s <= 4 for s in scales):
        raise InputError(f"--set scales={json.dumps(scales)}: a list of input scales between "
                         f"0.25 and 4, e.g. [0.7, 1, 1.4]")
    if scales != [1.0] and config.is_notebook(recipe):
        raise InputError("--set scales: the notebook recipe shrinks every image to 128x128, so "
                         "there is no scale to vary")
    if recipe.get("gap_weight", 1.0) != 1 and not (
            recipe["loss"] == "bce_dice" and recipe["outputs"] == 3 and recipe["gap_weight"] > 0):
        raise InputError(f"--set gap_weight={recipe['gap_weight']}: a positive weight of the gap "
                         f"target, for loss=bce_dice with outputs=3")
    if recipe.get("rescale") == "auto" and config.is_notebook(recipe):
        raise InputError("--set rescale=auto: the notebook recipe shrinks every image to "
                         "128x128, so there is no nucleus size to match")
    if recipe.get("stain_augment") and recipe["input"] != "grey_native":
        raise InputError("--set stain_augment=true: mixes the colour channels into grey, so it "
                         "needs input=grey_native")
    if recipe["post"] == "watershed" and recipe["outputs"] < 3:
        raise InputError(f"--set: the watershed needs the contour and gap outputs (outputs=3), "
                         f"not outputs={recipe['outputs']}")
    return recipe
