"""Reading microscopy image files: PNG, TIFF, JPEG and BMP, 8 or 16 bits, integer or float,
grey, RGB(A), palette or multi-plane, as their own pixel values, and their scaling to the 0..255
scale the network's inputs start from."""
from pathlib import Path

import numpy as np
from PIL import Image

import config
from files import InputError

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


def intensity_range(pixels, step=None):
    """scaled_image's (low, high) of an image that is not 8-bit: its 0.1st and 99.9th
    percentiles, computed on an evenly thinned copy of about a million pixels (every `step`-th
    pixel; blocks.read_statistics takes the same copy, block by block)."""
    step = step or thinning_step(pixels.shape[0], pixels.shape[1])
    return tuple(np.percentile(pixels[::step, ::step].astype(np.float32), (0.1, 99.9)))


def thinning_step(height, width):
    """The step of the evenly thinned copy of about a million pixels that image statistics
    come from."""
    return max(1, int((height * width / 1e6) ** 0.5))


def scaled_image(pixels, value_range=None):
    """Any image's pixels as float32 (H, W, 3) on the 0..255 scale that image_kind and
    native_input expect: 8-bit as it is; any other type mapped linearly so that the whole
    image's intensity_range (or the `value_range` given, the whole image's for a block of it)
    becomes 0..255 (never per tile, never by dividing 16 bits by 255, not clipped: native_input
    scales again)."""
    x = pixels.astype(np.float32)
    if pixels.dtype != np.uint8:
        low, high = value_range or intensity_range(pixels)
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
