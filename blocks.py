"""Images larger than memory, block by block: a zarr array, an OME-Zarr image, a pyramidal TIFF,
or a TIFF over config.MAX_IMAGE_PIXELS, read through zarr (tifffile's zarr store for TIFFs).

1. statistics: the whole image's scaling (imagefiles.scaled_image's range, the kind of image and
   data.native_input's percentiles) from an evenly thinned copy of about a million pixels, the
   copy the in-memory path takes for 16-bit images (so an image of up to 4 megapixels gets
   exactly the in-memory scaling);
2. probabilities: each block of config.BLOCK pixels predicted tile by tile on the whole image's
   grid (nuclei.tile_windows), so that its probabilities are the in-memory tiled prediction's,
   into a temporary zarr array;
3. nuclei: each block's probabilities with config.BLOCK_OVERLAP pixels around it segmented as in
   memory (nuclei.segment); a connected piece of nucleus mask belongs to the block that holds
   its top-left corner, and that block keeps its nuclei. A piece that fits in the overlap is
   segmented as in the whole image, so a nucleus on a block border is one nucleus; a wider
   clump is cut at the overlap's edge, and counted;
4. labels: each block's label image assembled from the nuclei its neighbours keep, numbered
   across the image, written as a chunked zarr array (with OME-Zarr label metadata where the
   input is OME-Zarr) and a tiled TIFF, streamed; measurements as for any image.

Each step maps a function over the blocks with `mapper`: in this process, or on the Dask
cluster of `predict.py --workers/--scheduler` (cluster_map). Peak memory is bounded by the
block, not the image."""
import shutil
import warnings
from pathlib import Path

import numpy as np

import config
import data
import files
import imagefiles
import nuclei

ZARR_SUFFIX = ".zarr"


def is_block_wise(path):
    """Whether `path` is read block by block: a zarr folder, a pyramidal TIFF, or a TIFF over
    config.MAX_IMAGE_PIXELS."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX and path.is_dir():
        return True
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            sizes = dict(zip(series.axes, series.shape))
            return series.is_pyramidal or (
                sizes.get("Y", 0) * sizes.get("X", 0) > config.MAX_IMAGE_PIXELS)
    except Exception:  # an unreadable TIFF is reported by the in-memory reader
        return False


class LargeImage:
    """A 2-D image (grey, RGB, or one plane of several) read by rectangles in its own pixel
    type, as imagefiles.read_pixels gives whole images. Pickled as its path and plane, and
    opened again where it is used (a Dask worker)."""

    def __init__(self, path, channel=None):
        self.path, self.channel = Path(path), channel
        self._array = None
        array, axes, self.ome = self._open()
        sizes = dict(zip(axes, array.shape))
        self.shape = (sizes["y"], sizes["x"])

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def _open(self):
        """(zarr array, its axes as lower-case letters, whether it is an OME-Zarr image),
        checked: an InputError names what is wrong."""
        import zarr

        try:
            ome = False
            if self.path.suffix.lower() == ZARR_SUFFIX:
                array, axes, ome = _open_zarr(zarr.open(self.path, mode="r"), self.path)
            else:
                import tifffile

                with tifffile.TiffFile(self.path) as tif:
                    axes = tif.series[0].axes.lower()
                array = zarr.open(tifffile.imread(self.path, aszarr=True, series=0, level=0),
                                  mode="r")
        except files.InputError:
            raise
        except Exception as error:
            raise files.InputError(f"{self.path}: not a readable image ({error})") from None
        self._index = _plane_index(self.path, array.shape, axes, self.channel)
        return array, axes, ome

    def read(self, top, left, bottom, right):
        """The pixels of rows top..bottom-1 and columns left..right-1: (h, w) or (h, w, 3)."""
        if self._array is None:
            self._array = self._open()[0]
        rows, cols = slice(top, bottom), slice(left, right)
        index = tuple(rows if i == "y" else cols if i == "x" else i for i in self._index)
        return _as_pixels(np.asarray(self._array[index]))

    def thinned(self, step):
        """Every `step`-th pixel of every `step`-th row, read block by block."""
        height, width = self.shape
        rows = []
        for top in range(0, height, config.BLOCK):
            bottom = min(top + config.BLOCK, height)
            rows.append(self.read(top, 0, bottom, width)[(-top) % step::step, ::step])
        return np.concatenate(rows)


def _plain_axes(array):
    return "yx" if array.ndim == 2 else "yxs" if array.ndim == 3 and array.shape[2] in (3, 4) \
        else "cyx"[-array.ndim:] if array.ndim <= 3 else None


def _open_zarr(node, path):
    """A zarr array, its axes, and whether it is OME-Zarr: an array as it is (YX, YXS with 3 or
    4 samples, or CYX), a group by its OME-Zarr multiscales metadata (the full-resolution
    level)."""
    import zarr

    if isinstance(node, zarr.Array):
        axes = _plain_axes(node)
        if axes is None:
            raise files.InputError(f"{path}: a {node.ndim}-D array (shape {node.shape}) without "
                                   "OME-Zarr axes; save the image's plane as a 2-D array")
        return node, axes, False
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise files.InputError(f"{path}: a zarr group without OME-Zarr multiscales metadata; "
                               "give the array's own folder")
    array = node[multiscales[0]["datasets"][0]["path"]]
    # OME-Zarr 0.4 names axes in dictionaries, 0.3 in strings, earlier versions are TCZYX.
    names = multiscales[0].get("axes", list("tczyx")[-array.ndim:])
    axes = "".join((a["name"] if isinstance(a, dict) else a)[0].lower() for a in names)
    return array, axes, True


def _plane_index(path, shape, axes, channel):
    """The index of the 2-D plane to read: "y", "x", slice(None) for RGB samples, and an
    integer for every other axis (its only plane, or `channel`)."""
    sizes = dict(zip(axes, shape))
    if "y" not in sizes or "x" not in sizes:
        raise files.InputError(f"{path}: no image plane in its axes {axes} (shape {shape})")
    for axis, what in (("z", "a z-stack"), ("t", "a time series")):
        if sizes.get(axis, 1) > 1:
            raise files.InputError(f"{path}: {what} (shape {shape}, axes {axes}); save the plane "
                                   "to segment as an image of its own")
    planes = [a for a in axes if a not in "yxstz" and sizes[a] > 1]
    if len(planes) > 1:
        raise files.InputError(f"{path}: more than one axis besides the image's (shape {shape}, "
                               f"axes {axes})")
    if planes and channel is None:
        raise files.InputError(f"{path}: {sizes[planes[0]]} planes (shape {shape}, axes "
                               f"{axes}); choose the nuclei's with --channel N")
    if planes and not 0 <= channel < sizes[planes[0]]:
        raise files.InputError(f"{path}: --channel {channel}, but the image has "
                               f"{sizes[planes[0]]} planes (0 to {sizes[planes[0]] - 1})")
    if sizes.get("s", 3) not in (3, 4):
        raise files.InputError(f"{path}: {sizes['s']} samples per pixel (shape {shape})")
    if not planes and channel is not None and not 0 <= channel < sizes.get("s", 1):
        # As imagefiles.read_pixels: any image takes its planes' numbers, grey only 0.
        raise files.InputError(f"{path}: --channel {channel}, but the image has "
                               f"{sizes.get('s', 1)} plane{'s' if 's' in sizes else ''}")
    sample = slice(None) if channel is None else channel
    return tuple("y" if a == "y" else "x" if a == "x" else sample if a == "s"
                 else (channel if a in planes else 0) for a in axes)


def _as_pixels(array):
    """read_pixels' types: float32 for floats, 0/255 for booleans, alpha dropped."""
    if array.ndim == 3:
        array = array[:, :, :3]
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind == "b":
        return array.astype(np.uint8) * 255
    return array


def grid(shape, block):
    """The blocks of an image: [(top, left, bottom, right)], in rows."""
    return [(top, left, min(top + block, shape[0]), min(left + block, shape[1]))
            for top in range(0, shape[0], block) for left in range(0, shape[1], block)]


def read_statistics(image, recipe):
    """The whole image's scaling, from its thinned copy: (scaled_image's value range or None
    for 8-bit, native_input's scaling)."""
    thinned = image.thinned(imagefiles.thinning_step(*image.shape))
    value_range = None if thinned.dtype == np.uint8 else imagefiles.intensity_range(thinned, 1)
    scaling = data.input_scaling(imagefiles.scaled_image(thinned, value_range), recipe)
    return value_range, scaling


def local_map(fn, items):
    """mapper in this process: fn(*item) for each item, in order."""
    return [fn(*item) for item in items]


def cluster_map(fn, items):
    """mapper on the Dask cluster of the task that calls it (distributed.worker_client: the
    calling task leaves its thread while the blocks run on every worker)."""
    from distributed import worker_client

    with worker_client() as client:
        return client.gather(client.map(fn, *zip(*items), pure=False, retries=3))


def predict_block(get_predictor, image, core, value_range, scaling, probabilities, tile, margin):
    """Step 2 for one block: its probabilities, written into its chunk of `probabilities`."""
    import zarr

    predictor = get_predictor()
    height, width = image.shape
    padded_height, padded_width = -(-height // 16) * 16, -(-width // 16) * 16
    top, left = max(core[0] - margin, 0), max(core[1] - margin, 0)
    bottom, right = min(core[2] + margin, height), min(core[3] + margin, width)
    x = data.native_input(imagefiles.scaled_image(image.read(top, left, bottom, right),
                                                  value_range), predictor.recipe, scaling)
    # The whole image's reflection at its bottom and right, where the region reaches them.
    x = data.pad_to(x, padded_height - top if bottom == height else 0,
                    padded_width - left if right == width else 0)
    out = np.zeros((core[2] - core[0], core[3] - core[1], predictor.network.outputs), np.float32)
    nuclei.predict_tiles(predictor.network, x, (top, left), out, core, predictor.recipe["tta"],
                         tile, margin, image.shape)
    zarr.open(probabilities, mode="r+")[core[0]:core[2], core[1]:core[3]] = out


def segment_block(number, image, core, probabilities, recipe, overlap, work, pixel_size):
    """Step 3 for one block: the nuclei it keeps, saved as a label image of its region (the
    core with `overlap` pixels around it) in `work`; returns (number of nuclei, clumps cut at
    the overlap's edge, their measurements with block-local labels)."""
    import zarr
    from scipy import ndimage

    height, width = image.shape
    region = (max(core[0] - overlap, 0), max(core[1] - overlap, 0),
              min(core[2] + overlap, height), min(core[3] + overlap, width))
    prob = zarr.open(probabilities, mode="r")[region[0]:region[2], region[1]:region[3]]
    labels = nuclei.segment(prob, prob.shape[:2], recipe)
    pieces, count = ndimage.label(labels > 0)
    # The block that holds a piece's top-left corner keeps it.
    corners = np.array([(box[0].start, box[1].start) for box in ndimage.find_objects(pieces)],
                       np.int64).reshape(-1, 2) + region[:2]
    kept = np.zeros(count + 1, bool)
    kept[1:] = ((corners[:, 0] >= core[0]) & (corners[:, 0] < core[2])
                & (corners[:, 1] >= core[1]) & (corners[:, 1] < core[3]))
    # Pieces that reach the region's edge inside the image were cut there.
    edges = set()
    for side, inside in ((pieces[0], region[0] > 0), (pieces[-1], region[2] < height),
                         (pieces[:, 0], region[1] > 0), (pieces[:, -1], region[3] < width)):
        if inside:
            edges.update(np.unique(side[side > 0]).tolist())
    cut = sum(1 for piece in edges if kept[piece])
    labels = nuclei.drop_small(np.where(kept[pieces], labels, 0),
                               recipe.get("min_size", 0))
    np.save(Path(work) / f"nuclei_{number}.npy", labels)
    pixels = image.read(*region)
    table = nuclei.measure(labels, pixels, pixel_size, origin=region[:2], shape=image.shape)
    return int(labels.max()), cut, table


def assemble_block(number, blocks, offsets, image_shape, overlap, work, labels_path):
    """Step 4 for one block: its labels from the nuclei that it and its neighbours keep,
    numbered across the image (`offsets`: each block's first number less 1)."""

    core = blocks[number]
    out = np.zeros((core[2] - core[0], core[3] - core[1]), np.uint32)
    for other, (top, left, bottom, right) in enumerate(blocks):
        region = (max(top - overlap, 0), max(left - overlap, 0),
                  min(bottom + overlap, image_shape[0]), min(right + overlap, image_shape[1]))
        rows = (max(region[0], core[0]), min(region[2], core[2]))
        cols = (max(region[1], core[1]), min(region[3], core[3]))
        if rows[0] >= rows[1] or cols[0] >= cols[1]:
            continue
        kept = np.load(Path(work) / f"nuclei_{other}.npy", mmap_mode="r")[
            rows[0] - region[0]:rows[1] - region[0], cols[0] - region[1]:cols[1] - region[1]]
        target = out[rows[0] - core[0]:rows[1] - core[0], cols[0] - core[1]:cols[1] - core[1]]
        np.copyto(target, kept.astype(np.uint32) + offsets[other], where=kept > 0)
    label_array(labels_path, "r+")[core[0]:core[2], core[1]:core[3]] = out


def segment_large(get_predictor, recipe, path, outputs, args, mapper=local_map,
                  block=config.BLOCK, overlap=config.BLOCK_OVERLAP, tile=None,
                  margin=config.TILE_MARGIN):
    """Steps 1 to 4 for one image: writes the labels (`outputs["zarr"]`, and
    `outputs["labels"]`, a tiled TIFF) and returns (the image's shape, its number of nuclei,
    their measurements, the clumps cut, a thinned copy of the scaled image and of the labels
    for the overlay). A scale other than 1 (--diameter) is refused: it needs the whole
    image."""
    import pandas as pd
    import zarr

    if config.is_notebook(recipe):
        raise files.InputError(f"{path}: the notebook recipe shrinks whole images to 128x128; "
                               "segment large images with an instance-recipe model")
    if args.diameter:
        raise files.InputError(f"{path}: read block by block, so --diameter (a rescaling of "
                               "the whole image) is not applied; rescale the image first")
    if recipe.get("scales", [1.0]) != [1.0] or recipe.get("rescale") == "auto":
        warnings.warn(f"{path}: read block by block: the recipe's scales and rescale=auto are "
                      "not applied")
    # The in-memory path's tiles, or (blocks smaller than them) one tile a block.
    tile = tile or (config.TILE if block % config.TILE == 0 else block)
    assert block % tile == 0, "a block holds whole tiles"
    image = LargeImage(path, args.channel)
    value_range, scaling = read_statistics(image, recipe)
    blocks = grid(image.shape, block)
    work = outputs["zarr"].parent / f".{outputs['zarr'].name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        probabilities = str(work / "probabilities.zarr")
        zarr.create_array(probabilities, shape=(*image.shape, 3 if recipe["outputs"] >= 3
                                                else recipe["outputs"]),
                          chunks=(block, block, recipe["outputs"]), dtype="float32",
                          compressors=None)
        mapper(predict_block, [(get_predictor, image, core, value_range, scaling,
                                probabilities, tile, margin) for core in blocks])
        found = mapper(segment_block, [(n, image, core, probabilities, recipe, overlap,
                                        str(work), args.pixel_size)
                                       for n, core in enumerate(blocks)])
        counts = [count for count, _, _ in found]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.uint32)
        labels_path = work / "labels.zarr"
        write_label_array(labels_path, image, block)
        mapper(assemble_block, [(n, blocks, offsets, image.shape, overlap, str(work),
                                 str(labels_path)) for n in range(len(blocks))])
        total = int(sum(counts))
        write_tiff(outputs["labels"], label_array(labels_path), total)
        replace_folder(labels_path, outputs["zarr"])
        tables = [table.assign(label=table["label"] + int(offset))
                  for offset, (_, _, table) in zip(offsets, found)]
        step = imagefiles.thinning_step(*image.shape)
        thinned = imagefiles.scaled_image(image.thinned(step), value_range)
        return (image.shape, total, pd.concat([t for t in tables if len(t)] or tables[:1],
                                              ignore_index=True),
                sum(cut for _, cut, _ in found), thinned,
                label_array(outputs["zarr"])[::step, ::step])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_label_array(path, image, block):
    """An empty uint32 label array of the image's size in chunks of a block; OME-Zarr label
    metadata (image-label, one multiscale level) where the input is OME-Zarr."""
    import zarr

    if not image.ome:
        zarr.create_array(str(path), shape=image.shape, chunks=(block, block), dtype="uint32")
        return
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=image.shape, chunks=(block, block), dtype="uint32")
    group.attrs.update({"multiscales": [{"version": "0.4", "name": "nuclei",
                                         "axes": [{"name": "y", "type": "space"},
                                                  {"name": "x", "type": "space"}],
                                         "datasets": [{"path": "0", "coordinateTransformations":
                                                       [{"type": "scale", "scale": [1, 1]}]}]}],
                        "image-label": {"version": "0.4",
                                        "source": {"image": str(image.path.resolve())}}})


def label_array(path, mode="r"):
    """The label array of write_label_array's folder (its level 0 in OME-Zarr)."""
    import zarr

    node = zarr.open(str(path), mode=mode)
    return node if isinstance(node, zarr.Array) else node["0"]


def write_tiff(path, array, count):
    """A label array of `count` nuclei as a tiled, compressed TIFF (BigTIFF when large),
    written tile by tile from the array, atomically."""
    import tifffile

    height, width = array.shape
    dtype = np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32
    side = 512

    def tiles():
        for top in range(0, height, side):
            strip = np.asarray(array[top:min(top + side, height)])
            for left in range(0, width, side):
                tile = np.zeros((side, side), dtype)
                piece = strip[:, left:left + side]
                tile[:piece.shape[0], :piece.shape[1]] = piece
                yield tile

    files.write_atomic(path, lambda tmp: tifffile.imwrite(
        tmp, tiles(), shape=(height, width), dtype=dtype, tile=(side, side),
        compression="zlib", bigtiff=height * width * np.dtype(dtype).itemsize > 2 ** 31))


def replace_folder(source, target):
    """Move the folder `source` to `target`, replacing an earlier one only once the new one is
    in place."""
    target = Path(target)
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    Path(source).rename(target)
    shutil.rmtree(old, ignore_errors=True)
