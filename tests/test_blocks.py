"""Images read block by block (blocks.py): the in-memory path's probabilities and nuclei from a
zarr image several blocks wide, nuclei across block borders whole, and `predict.py --images` on
zarr, OME-Zarr and a TIFF over the in-memory limit."""
import argparse
import json

import numpy as np
import pandas as pd
import pytest
import tifffile

import blocks
import checkpoints
import config
import data
import device
import imagefiles
import nuclei
from tests.conftest import disc
from tests.test_own_images import run

zarr = pytest.importorskip("zarr")

SHAPE = (300, 420)
# Discs on block corners and edges (blocks of 128) and inside blocks.
CENTRES = [(128, 128), (64, 200), (250, 256), (128, 300), (20, 20), (200, 60), (127, 384),
           (255, 130)]
OPTIONS = argparse.Namespace(channel=None, diameter=None, pixel_size=None)


def discs_16bit(shape=SHAPE, centres=CENTRES, radius=11):
    rng = np.random.default_rng(0)
    image = (1000 + rng.integers(0, 200, shape)).astype(np.uint16)
    for centre in centres:
        image[disc(shape, centre, radius)] = 20000
    return image


def write_zarr(path, image, chunks=(100, 100)):
    zarr.create_array(str(path), shape=image.shape, chunks=chunks, dtype=image.dtype)[:] = image


def same_up_to_numbering(a, b):
    """Whether two label images hold the same objects, whatever their numbers."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (np.array_equal(a > 0, b > 0) and pairs.shape[1] == a.max() + 1 == b.max() + 1)


@pytest.fixture(scope="module")
def threshold_predictor(threshold_model):
    return nuclei.Predictor(checkpoints.load_unet(threshold_model),
                            checkpoints.read_recipe(threshold_model),
                            device.Compute(False, "float32", "test"))


def test_block_probabilities_are_the_in_memory_tiled_ones(tmp_path):
    """A U-Net of random weights (its outputs depend on 122 pixels around): each block's
    probabilities, tile by tile on the whole image's grid, equal the in-memory tiled
    prediction bit for bit."""
    import keras

    import unet

    keras.utils.set_random_seed(1)
    recipe = config.RECIPES["instance"]
    predictor = nuclei.Predictor(unet.build_unet(recipe=recipe), recipe,
                                 device.Compute(False, "float32", "test"))
    pixels = np.random.default_rng(0).integers(0, 4000, (203, 290)).astype(np.uint16)
    write_zarr(tmp_path / "im.zarr", pixels, chunks=(64, 64))
    image = blocks.LargeImage(tmp_path / "im.zarr")
    value_range, scaling = blocks.read_statistics(image, recipe)
    probabilities = str(tmp_path / "p.zarr")
    zarr.create_array(probabilities, shape=(203, 290, 3), chunks=(128, 128, 3), dtype="float32")
    for core in blocks.grid(image.shape, 128):
        blocks.predict_block(lambda: predictor, image, core, value_range, scaling, probabilities,
                             64, 32)
    x = data.native_input(imagefiles.scaled_image(pixels), recipe)
    config_whole, config.WHOLE_PIXELS = config.WHOLE_PIXELS, 0
    try:
        expected = nuclei.predict_tiled(predictor.network, x, True, tile=64, margin=32)
    finally:
        config.WHOLE_PIXELS = config_whole
    assert np.array_equal(zarr.open(probabilities)[:], expected)


def test_a_zarr_image_gives_the_in_memory_nuclei(tmp_path, threshold_predictor):
    """Eight discs, four on block borders or corners: the nuclei of the in-memory path, one
    per disc, their measurements at the image's coordinates, the TIFF equal to the zarr."""
    pixels = discs_16bit()
    write_zarr(tmp_path / "im.zarr", pixels)
    outputs = {"zarr": tmp_path / "labels" / "im.zarr", "labels": tmp_path / "labels" / "im.tif"}
    shape, count, table, cut, thinned, thinned_labels = blocks.segment_large(
        lambda: threshold_predictor, threshold_predictor.recipe, tmp_path / "im.zarr", outputs,
        OPTIONS, block=128, overlap=48)
    labels = zarr.open(outputs["zarr"])[:]
    in_memory = threshold_predictor.nuclei([imagefiles.scaled_image(pixels)])[0]
    assert shape == SHAPE and count == len(CENTRES) == labels.max() and cut == 0
    assert labels.dtype == np.uint32 and same_up_to_numbering(in_memory, labels)
    assert np.array_equal(tifffile.imread(outputs["labels"]), labels)
    assert sorted(zip(table["y"], table["x"])) == sorted(CENTRES)
    assert sorted(table["label"]) == list(range(1, count + 1))
    assert list(table["touches_border"]) == [False] * count
    assert thinned.shape == (*SHAPE, 3) and np.array_equal(thinned_labels, labels)
    assert not list(outputs["zarr"].parent.glob(".*"))  # the work folder is gone


def test_a_clump_wider_than_the_overlap_is_counted(tmp_path, threshold_predictor):
    """A bar 200 pixels long across a block border, with 48 pixels of overlap: cut, and said."""
    pixels = discs_16bit(centres=[(40, 40)])
    pixels[150:160, 20:220] = 20000
    write_zarr(tmp_path / "bar.zarr", pixels)
    outputs = {"zarr": tmp_path / "bar_labels.zarr", "labels": tmp_path / "bar.tif"}
    _, count, _, cut, _, _ = blocks.segment_large(
        lambda: threshold_predictor, threshold_predictor.recipe, tmp_path / "bar.zarr", outputs,
        OPTIONS, block=128, overlap=48)
    assert cut >= 1 and count >= 2


def test_predict_images_reads_zarr_ome_zarr_and_a_tiff_over_the_limit(tmp_path, threshold_model,
                                                                      monkeypatch, capsys):
    """`--images` on a folder: a zarr array, an OME-Zarr image of two channels (the nuclei in
    channel 1), a TIFF over the in-memory limit (lowered for the test) and a PNG: the same
    nuclei from each; OME-Zarr label metadata for the OME-Zarr input."""
    pixels = discs_16bit()
    folder = tmp_path / "in"
    folder.mkdir()
    write_zarr(folder / "plain.zarr", pixels)
    group = zarr.open_group(str(folder / "ome.zarr"), mode="w")
    group.create_array("0", shape=(2, *SHAPE), chunks=(1, 100, 100), dtype="uint16")[:] = \
        np.stack([np.zeros(SHAPE, np.uint16), pixels])
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
        {"name": "x", "type": "space"}], "datasets": [{"path": "0"}]}]
    tifffile.imwrite(folder / "big.tif", pixels)
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 100_000)
    out = tmp_path / "out"
    assert run(threshold_model, [folder / "plain.zarr", folder / "big.tif"], "--out-dir", out,
               "--block-size", "128") == 0
    assert "Segmented 2 images (16 nuclei)" in capsys.readouterr().out
    assert run(threshold_model, [folder / "ome.zarr"], "--out-dir", out, "--channel", "1",
               "--block-size", "128") == 0
    labels = {name: zarr.open(out / "labels" / f"{name}.zarr") for name in ("plain", "big")}
    ome = zarr.open_group(str(out / "labels" / "ome.zarr"))
    assert ome.attrs["image-label"]["source"]["image"] == str((folder / "ome.zarr").resolve())
    reference = labels["plain"][:]
    for other in (labels["big"][:], ome["0"][:], tifffile.imread(out / "labels" / "ome.tif")):
        assert np.array_equal(other, reference)
    images = pd.read_csv(out / "images.csv")
    assert list(images["image"]) == ["ome"] and list(images["nuclei"]) == [8]
    assert list(images["clumps_cut"]) == [0]
    assert (out / "overlays" / "big.png").is_file()
    summary = json.loads((out / "measurements" / "big.json").read_text())
    assert summary["width"] == SHAPE[1] and summary["labels_zarr"] == "labels/big.zarr"
    assert run(threshold_model, [folder / "plain.zarr"], "--out-dir", out, "--block-size",
               "128", "--diameter", "30") == 1
    assert "read block by block, so --diameter" in capsys.readouterr().err
