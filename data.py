"""DSB2018 folders in: the notebook's arrays and their cache, the full-size images and their label
images, the kinds of image and the held-out acquisitions, and the instance recipe's network input.

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

At full size (`load_native`, for the competition's score and the instance recipe), each mask
file is one nucleus of a label image; `image_kind` and `acquisition` name what an image is, and
`native_input` makes the instance recipe's grey, scaled input of any image. No TensorFlow here.
"""
import hashlib
import os
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from skimage.transform import resize
from tqdm import tqdm

import config
import imagefiles
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
    return imagefiles.read_image(image_path(folder, id_))


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
        mask = imagefiles.read_mask(path)
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


def input_scaling(image, recipe):
    """native_input's scaling of an image (H, W, 3): whether it is inverted (a bright
    background) and the 1st and 99.8th percentiles of the input, which become 0 and 1."""
    return _oriented_and_scaling(image, recipe)[1]


def _oriented_and_scaling(image, recipe):
    invert = image_kind(image) != "fluorescence"
    x = _oriented(image, recipe, invert)
    low, high = np.percentile(x, (1, 99.8))
    return x, (invert, low, high)


def _oriented(image, recipe, invert):
    x = image.astype(np.float32)
    if invert:
        x = 255 - x
    return x.mean(axis=2, keepdims=True) if recipe["input"] == "grey_native" else x


def native_input(image, recipe, scaling=None):
    """The network's input for a full-size image, float32 (H, W, 1 or 3): inverted when the
    background is bright (bright-field, histology) so that nuclei are bright on dark as in
    fluorescence, then scaled so that the 1st and 99.8th percentiles are 0 and 1 (input_scaling;
    or the `scaling` given, the whole image's for a block of it). `grey_native` averages the
    channels; `rgb_native` keeps the colour (stains tell nuclei from cytoplasm)."""
    if scaling is None:
        x, scaling = _oriented_and_scaling(image, recipe)
    else:
        x = _oriented(image, recipe, scaling[0])
    _, low, high = scaling
    return ((x - low) / max(high - low, 1e-3)).astype(np.float32)


def pad_to(array, height, width):
    """`array` (H, W, ...) reflect-padded at the bottom and right to at least height x width."""
    pad = [(0, max(height - array.shape[0], 0)), (0, max(width - array.shape[1], 0))]
    return np.pad(array, pad + [(0, 0)] * (array.ndim - 2), mode="reflect")
