"""Every PNG flavour the data can hold is normalised; every bad input is one clear error."""
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import files
import imagefiles
from tests.conftest import ROOT, SMALL_SIZE, disc, make_dsb_tree, write_png


def write_raw_png(path, array, bit_depth, color_type, size=None):
    """A PNG written by hand, for what Pillow cannot save (16-bit colour, lying headers)."""
    height, width = size or array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    raw = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in array)

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GREY = np.array([[0, 100], [200, 255]], np.uint8)
RGB = np.stack([GREY, 255 - GREY, GREY // 2], axis=-1)


def palette_image():
    image = Image.fromarray(np.arange(4, dtype=np.uint8).reshape(2, 2), "P")
    image.putpalette(RGB.reshape(-1).tolist())
    return image


def save(tmp_path, image):
    path = tmp_path / "x.png"
    image.save(path)
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.fromarray(RGB), RGB),
    (lambda: Image.fromarray(RGB).convert("RGBA"), RGB),
    (lambda: Image.fromarray(GREY), np.repeat(GREY[..., None], 3, axis=2)),
    (lambda: Image.fromarray(GREY).convert("LA"), np.repeat(GREY[..., None], 3, axis=2)),
    (palette_image, RGB),
    (lambda: Image.fromarray(GREY > 150), np.repeat((GREY > 150)[..., None] * 255, 3, axis=2)),
])
def test_8_bit_flavours_become_rgb_uint8(tmp_path, make, expected):
    image = imagefiles.read_image(save(tmp_path, make()))
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert np.array_equal(image, expected)


def test_palette_with_transparency(tmp_path):
    image = palette_image()
    image.info["transparency"] = 0
    assert np.array_equal(imagefiles.read_image(save(tmp_path, image)), RGB)


def test_16_bit_grey_and_rgb_are_scaled_not_clipped(tmp_path):
    grey16 = np.array([[0, 256], [40000, 65535]], np.uint16)
    write_raw_png(tmp_path / "g.png", grey16, 16, 0)
    image = imagefiles.read_image(tmp_path / "g.png")
    assert np.array_equal(image[..., 0], [[0, 1], [156, 255]]) and image.dtype == np.uint8
    rgb16 = np.stack([grey16, 65535 - grey16, grey16], axis=-1)
    write_raw_png(tmp_path / "c.png", rgb16, 16, 2)
    assert np.array_equal(imagefiles.read_image(tmp_path / "c.png")[..., 1], [[255, 254], [99, 0]])


def test_masks_of_any_flavour_are_nonzero_pixels(tmp_path):
    mask16 = np.array([[0, 1], [0, 65535]], np.uint16)
    write_raw_png(tmp_path / "m.png", mask16, 16, 0)
    assert np.array_equal(imagefiles.read_mask(tmp_path / "m.png"), [[False, True], [False, True]])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha is not nucleus
    rgba[1, 0, 0] = 255
    Image.fromarray(rgba).save(tmp_path / "m2.png")
    assert np.array_equal(imagefiles.read_mask(tmp_path / "m2.png"),
                          [[False, False], [True, False]])


@pytest.mark.parametrize("content, reason", [
    (b"", "not a readable image"),
    (b"just some text\n", "not a readable image"),
])
def test_non_images_are_refused(tmp_path, content, reason):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(files.InputError, match=reason) as error:
        imagefiles.read_image(tmp_path / "x.png")
    assert str(tmp_path / "x.png") in str(error.value)


def test_truncated_png_is_refused(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(files.InputError, match=f"{path}: not a readable image"):
        imagefiles.read_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # The header claims 100000 x 100000 pixels; the data is a few bytes.
    write_raw_png(tmp_path / "bomb.png", np.zeros((1, 1), np.uint8), 8, 0, size=(100_000, 100_000))
    with pytest.raises(files.InputError, match="decompression bomb"):
        imagefiles.read_image(tmp_path / "bomb.png")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(files.InputError, match=f"{tmp_path / 'nope'}: no such data folder"):
        data.load_train(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".ipynb_checkpoints").mkdir()
    with pytest.raises(files.InputError, match="no image folders"):
        data.load_train(tmp_path / "empty")


def test_id_without_its_image(dsb_tree):
    (dsb_tree / "id02" / "images" / "id02.png").unlink()
    with pytest.raises(files.InputError, match=r"id02\.png: missing"):
        data.load_train(dsb_tree)


def test_mask_of_another_size(dsb_tree):
    write_png(dsb_tree / "id01" / "masks" / "odd.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(files.InputError, match=r"odd\.png: mask is 10x10 but its image is 80x64"):
        data.load_train(dsb_tree)


def test_missing_or_empty_masks_mean_no_nuclei_with_a_warning(dsb_tree):
    for mask in (dsb_tree / "id01" / "masks").iterdir():
        mask.unlink()
    for mask in (dsb_tree / "id02" / "masks").iterdir():
        mask.unlink()
    (dsb_tree / "id02" / "masks").rmdir()
    with pytest.warns(UserWarning) as warned:
        _, Y, _ = data.load_train(dsb_tree)
    assert [Path(str(w.message).split(": ")[0]).parts[-2:] for w in warned] == [
        ("id01", "masks"), ("id02", "masks")]
    assert all(": no nucleus in any mask file" in str(w.message) for w in warned)
    assert not Y[1].any() and not Y[2].any() and Y[0].any()


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    root = tmp_path / "train"
    make_dsb_tree(root)
    (root / "id00" / "masks" / "m1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--train-dir", str(root),
                             "--no-cache", "--model-path", str(tmp_path / "m.keras")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {root / 'id00' / 'masks' / 'm1.png'}: not a readable image")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.keras").exists()


# Issue 8: nothing silently wrong, one line for each bad input. ---------------------------------

def test_png_suffix_in_any_case_is_read(dsb_tree):
    _, Y_before, _ = data.load_train(dsb_tree)
    for mask in (dsb_tree / "id01" / "masks").iterdir():
        mask.rename(mask.with_suffix(".PNG"))
    image = dsb_tree / "id02" / "images" / "id02.png"
    image.rename(image.with_suffix(".PNG"))
    _, Y_after, _ = data.load_train(dsb_tree)
    assert np.array_equal(Y_after, Y_before) and Y_after[1].any()
    assert data.read_labels(dsb_tree, "id01", (64, 80)).max() == 3


def test_a_file_in_masks_that_is_not_a_png_is_named_in_a_warning(dsb_tree):
    notes = dsb_tree / "id01" / "masks" / "notes.txt"
    notes.write_text("not a mask")
    with pytest.warns(UserWarning, match=f"{notes}: not a PNG, skipped"):
        labels = data.read_labels(dsb_tree, "id01", (64, 80))
    assert labels.max() == 3


def test_cache_notices_a_mask_rewritten_with_the_same_size_and_time(dsb_tree, tmp_path):
    """Uncompressed PNGs of the same shape have the same size whatever their pixels."""
    mask_path = dsb_tree / "id00" / "masks" / "m0.png"
    Image.fromarray(disc((64, 80), (16, 16), 6).astype(np.uint8) * 255).save(
        mask_path, compress_level=0)
    cache = tmp_path / "cache"
    _, Y_before, _ = data.load_train(dsb_tree, cache_dir=cache)
    stat = mask_path.stat()
    Image.fromarray(disc((64, 80), (50, 70), 6).astype(np.uint8) * 255).save(
        mask_path, compress_level=0)
    os.utime(mask_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mask_path.stat().st_size == stat.st_size
    assert mask_path.stat().st_mtime_ns == stat.st_mtime_ns
    _, Y_after, _ = data.load_train(dsb_tree, cache_dir=cache)
    assert np.array_equal(Y_after, data.load_train(dsb_tree)[1])
    assert not np.array_equal(Y_after, Y_before)


@pytest.mark.parametrize("cache", [True, False])
def test_a_mask_that_is_a_broken_link_is_named(dsb_tree, tmp_path, cache):
    link = dsb_tree / "id01" / "masks" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(files.InputError, match=f"^{link}: a broken symbolic link$"):
        data.load_train(dsb_tree, cache_dir=tmp_path / "cache" if cache else None)


def test_an_id_folder_whose_name_is_not_utf8_is_named(dsb_tree):
    os.mkdir(os.fsencode(dsb_tree) + b"/bad\xff")
    with pytest.raises(files.InputError, match=r"id folder 'bad\\udcff' has a name that is not "
                                              "valid UTF-8"):
        data.list_ids(dsb_tree)


def test_an_unreadable_folder_is_named(dsb_tree, monkeypatch):
    masks = dsb_tree / "id01" / "masks"
    scandir = os.scandir

    def refuse(path):  # as a non-root user after chmod 000 (root reads anything)
        if Path(path) == masks:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(files.InputError, match=f"^{masks}: not readable \\(permission denied\\)$"):
        data.load_train(dsb_tree)


def test_an_unreadable_file_is_named(dsb_tree, monkeypatch):
    mask = dsb_tree / "id01" / "masks" / "m1.png"
    open_image = Image.open

    def refuse(path, *args, **kwargs):  # as chmod 000 does for a non-root user
        if Path(path) == mask:
            raise PermissionError(13, "Permission denied", str(path))
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(files.InputError, match=f"^{mask}: not a readable image \\(.*Permission "
                                              "denied"):
        data.load_train(dsb_tree)


def test_the_scripts_print_warnings_in_one_line(dsb_tree, tmp_path):
    (dsb_tree / "id01" / "masks" / "notes.txt").write_text("not a mask")
    # train.py's own entry (main, which turns warnings into lines), on small images.
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import config; "
            f"config.IMG_HEIGHT = config.IMG_WIDTH = {SMALL_SIZE}; import train; train.main()")
    result = subprocess.run([sys.executable, "-c", code, "--train-dir", str(dsb_tree),
                             "--no-cache", "--model-path", str(tmp_path / "a-file" / "m.keras"),
                             "--epochs", "1"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert f"warning: {dsb_tree / 'id01' / 'masks' / 'notes.txt'}: not a PNG, skipped\n" in \
        result.stderr
    assert "UserWarning" not in result.stderr and "mask_paths(" not in result.stderr


def test_a_data_folder_that_is_a_file(tmp_path):
    path = tmp_path / "train.zip"
    path.write_bytes(b"PK")
    with pytest.raises(files.InputError, match="train.zip: is a file, not a folder$"):
        data.list_ids(path)
