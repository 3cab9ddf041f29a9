"""`predict.py --images` on folders of hand-made microscopy images, with a model whose nucleus
output is a fixed function of the pixel (so that the nuclei are known), and tiled prediction
against whole-image prediction with the real network."""
import json

import numpy as np
import pandas as pd
import pytest
import tifffile

import config
import data
import device
import imagefiles
import nuclei
import predict
import scores
from tests.conftest import disc, make_dsb_tree, write_png

SHAPE = (96, 128)
CENTRES = [(24, 24), (30, 70), (70, 40), (66, 100)]


def discs(shape=SHAPE, centres=CENTRES, radius=9):
    """Four bright discs on a dim, slightly noisy background, 8-bit grey."""
    rng = np.random.default_rng(1)
    image = rng.integers(10, 30, size=shape).astype(np.uint8)
    for centre in centres:
        image[disc(shape, centre, radius)] = 200
    return image


def run(threshold_model, *args):
    """predict.main with --images; its exit status (0 when it returns)."""
    try:
        predict.main(["--images", *map(str, args[0]), "--model-path", str(threshold_model),
                      *map(str, args[1:])])
    except SystemExit as stop:
        return stop.code
    return 0


def test_16bit_tiff_gives_the_same_nuclei_as_its_8bit_png(tmp_path, threshold_model):
    image = discs()
    write_png(tmp_path / "in" / "a.png", image)
    tifffile.imwrite(tmp_path / "in" / "b.tif", image.astype(np.uint16) * 257 + 3)
    out = tmp_path / "out"
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 0
    png, tif = (tifffile.imread(out / "labels" / f"{n}.tif") for n in "ab")
    assert png.dtype == np.uint16 and png.shape == SHAPE
    assert png.max() == 4 and np.array_equal(png, tif)
    table = pd.read_csv(out / "nuclei.csv")
    assert list(table["image"]) == ["a"] * 4 + ["b"] * 4
    # Intensities are the file's own values: 200 in the PNG, 200 * 257 + 3 in the TIFF.
    assert set(table["max_intensity"]) == {200, 200 * 257 + 3}
    images = pd.read_csv(out / "images.csv")
    assert list(images["nuclei"]) == [4, 4] and list(images["height"]) == [96, 96]


def test_a_corrupt_file_among_good_ones_is_skipped_with_one_line(tmp_path, threshold_model,
                                                                 capsys):
    write_png(tmp_path / "in" / "good.png", discs())
    (tmp_path / "in" / "cut.png").write_bytes((tmp_path / "in" / "good.png").read_bytes()[:100])
    (tmp_path / "in" / "empty.tif").write_bytes(b"")
    out = tmp_path / "out"
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 1
    printed = capsys.readouterr()
    assert "warning: " + str(tmp_path / "in" / "cut.png") + ": not a readable image" in printed.err
    assert ("warning: " + str(tmp_path / "in" / "empty.tif") + ": not a readable image"
            in printed.err)
    assert "Traceback" not in printed.err
    assert "Segmented 1 images (4 nuclei)" in printed.out and "2 skipped" in printed.out
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["good.tif"]
    assert list(pd.read_csv(out / "images.csv")["image"]) == ["good"]


def test_several_channels_need_channel(tmp_path, threshold_model, capsys):
    planes = np.stack([np.full(SHAPE, 7, np.uint16), discs(centres=CENTRES[:1]).astype(np.uint16),
                       discs().astype(np.uint16) * 100])
    path = tmp_path / "in" / "cells.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, planes, photometric="minisblack", metadata={"axes": "CYX"})
    out = tmp_path / "out"
    assert run(threshold_model, [path], "--out-dir", out) == 1
    assert (f"warning: {path}: 3 planes (shape (3, 96, 128), axes CYX); choose the nuclei's "
            "with --channel N; skipped") in capsys.readouterr().err
    assert run(threshold_model, [path], "--out-dir", out, "--channel", "2") == 0
    assert tifffile.imread(out / "labels" / "cells.tif").max() == 4
    assert run(threshold_model, [path], "--out-dir", out, "--channel", "1", "--overwrite") == 0
    assert tifffile.imread(out / "labels" / "cells.tif").max() == 1


def test_a_z_stack_is_refused_naming_its_shape(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 32, 32), np.uint16), imagej=True,
                     metadata={"axes": "ZYX"})
    with pytest.raises(data.InputError, match=r"stack.tif: a z-stack \(shape \(5, 32, 32\), "
                                              r"axes ZYX\)"):
        imagefiles.read_pixels(path)


def test_a_rerun_skips_what_is_done_and_overwrite_redoes_it(tmp_path, threshold_model, capsys):
    write_png(tmp_path / "in" / "a.png", discs())
    write_png(tmp_path / "in" / "blank.png", np.full(SHAPE, 20, np.uint8))
    out = tmp_path / "out"
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 0
    # An image without nuclei still gets its (empty) label image and its row.
    assert tifffile.imread(out / "labels" / "blank.tif").max() == 0
    assert list(pd.read_csv(out / "images.csv")["nuclei"]) == [4, 0]
    summary = out / "measurements" / "a.json"
    stamp = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 0
    assert "Segmented 0 images (0 nuclei)" in capsys.readouterr().out
    assert summary.stat().st_mtime_ns == stamp
    assert len(pd.read_csv(out / "nuclei.csv")) == 4
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out, "--overwrite") == 0
    assert summary.stat().st_mtime_ns != stamp and json.loads(summary.read_text())["nuclei"] == 4


def test_a_rerun_redoes_what_another_model_or_setting_made(tmp_path, threshold_model, capsys):
    write_png(tmp_path / "in" / "a.png", discs())
    out = tmp_path / "out"
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 0
    capsys.readouterr()
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out, "--diameter", "10") == 0
    assert "Segmented 1 images (4 nuclei)" in capsys.readouterr().out
    other = tmp_path / "other.keras"
    other.write_bytes(threshold_model.read_bytes() + b"")  # the same bytes: the same model
    assert run(other, [tmp_path / "in"], "--out-dir", out, "--diameter", "10") == 0
    assert "Segmented 0 images" in capsys.readouterr().out
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out, "--set", "min_size=300") == 0
    assert "Segmented 1 images (0 nuclei)" in capsys.readouterr().out


def test_tables_are_appended_in_order_and_take_new_columns(tmp_path, threshold_model):
    """A grey image, then a colour one (other intensity columns), then a rerun with one image
    more: each table whole, one header, every image's rows once, the images done first."""
    write_png(tmp_path / "in" / "a.png", discs())
    colour = np.repeat(discs()[:, :, None], 3, axis=2)
    write_png(tmp_path / "in" / "b.png", colour)
    out = tmp_path / "out"
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 0
    table = pd.read_csv(out / "nuclei.csv")
    assert list(table["image"]) == ["a"] * 4 + ["b"] * 4
    assert table["max_intensity"].notna().sum() == 4 and table["max_intensity_r"].notna().sum() == 4
    write_png(tmp_path / "in" / "0.png", discs())
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", out) == 0
    assert list(pd.read_csv(out / "nuclei.csv")["image"]) == ["a"] * 4 + ["b"] * 4 + ["0"] * 4
    images = pd.read_csv(out / "images.csv")
    assert list(images["image"]) == ["a", "b", "0"] and images["fingerprint"].nunique() == 1
    assert (out / "nuclei.csv").read_text().count("image,label") == 1


def test_one_image_gives_the_same_nuclei_through_both_flows(tmp_path, threshold_model):
    """The same pixels as a DSB test image (submission.csv) and as an own image (--images), with
    rescale=auto: nuclei twice the training size are found again at half the scale in both, and
    min_size with them (32 pixels become 128), which drops the small disc (81 pixels)."""
    image = discs(centres=[(24, 24), (70, 90)], radius=20)
    image[disc(SHAPE, (80, 20), 5)] = 200
    write_png(tmp_path / "test" / "t1" / "images" / "t1.png", image)
    train_dir = tmp_path / "train"
    make_dsb_tree(train_dir, n_images=2)
    common = ["--model-path", str(threshold_model), "--set", "rescale=auto", "--set", "tta=false"]
    predict.main(common + ["--train-dir", str(train_dir), "--test-dir", str(tmp_path / "test"),
                           "--out-dir", str(tmp_path / "dsb")])
    assert run(threshold_model, [tmp_path / "test" / "t1" / "images"], "--out-dir",
               tmp_path / "own", "--set", "rescale=auto", "--set", "tta=false") == 0
    own = tifffile.imread(tmp_path / "own" / "labels" / "t1.tif")
    rows = pd.read_csv(tmp_path / "dsb" / "submission.csv", keep_default_na=False)
    dsb = nuclei.labels_from_rows(rows.itertuples(index=False), {"t1": SHAPE})["t1"]
    assert own.max() == dsb.max() == 2
    assert np.array_equal(own > 0, dsb > 0)


def test_pixel_size_gives_microns_and_diameter_rescales(tmp_path, threshold_model):
    write_png(tmp_path / "a.png", discs())
    out = tmp_path / "out"
    assert run(threshold_model, [tmp_path / "a.png"], "--out-dir", out, "--pixel-size", "0.5",
               "--diameter", "10") == 0
    table = pd.read_csv(out / "nuclei.csv")
    assert len(table) == 4
    assert np.allclose(table["area_um2"], table["area"] * 0.25)
    assert np.allclose(table["equivalent_diameter_um"], table["equivalent_diameter"] * 0.5)
    # Predicted at twice the size and brought back: about the discs' 253 pixels.
    assert np.all(np.abs(table["area"] - disc(SHAPE, CENTRES[0], 9).sum()) <= 12)


def test_measurements_match_hand_computation():
    labels = np.zeros((60, 80), np.int32)
    labels[disc(labels.shape, (20, 30), 8)] = 1
    rows, cols = np.ogrid[:60, :80]
    labels[((rows - 40) / 6.0) ** 2 + ((cols - 60) / 12.0) ** 2 <= 1] = 2
    labels[0:4, 0:6] = 3
    pixels = np.where(labels > 0, 100 + labels, 5).astype(np.uint16)
    table = nuclei.measure(labels, pixels, pixel_size=0.25)
    areas = [np.count_nonzero(labels == k) for k in (1, 2, 3)]
    assert list(table["area"]) == areas
    assert list(table["x"]) == [30, 60, 2.5] and list(table["y"]) == [20, 40, 1.5]
    assert np.allclose(table["equivalent_diameter"], np.sqrt(4 * np.array(areas) / np.pi))
    assert list(table["mean_intensity"]) == [101, 102, 103]
    assert list(table["touches_border"]) == [False, False, True]
    assert list(table["area_um2"]) == [a / 16 for a in areas]


def test_measurements_are_regionprops_on_a_real_image():
    from skimage.measure import regionprops_table

    from tests.conftest import SAMPLE_TRAIN

    ids = data.list_ids(SAMPLE_TRAIN)[:2]
    images, labels = data.load_native(SAMPLE_TRAIN, ids)
    for image, label in zip(images, labels):
        table = nuclei.measure(label, image)
        expected = regionprops_table(label, image, properties=(
            "area", "perimeter", "solidity", "eccentricity", "centroid", "intensity_mean"))
        assert np.array_equal(table["area"], expected["area"])
        assert np.array_equal(table["perimeter"], expected["perimeter"])
        assert np.array_equal(table["solidity"], expected["solidity"])
        assert np.array_equal(table["x"], expected["centroid-1"])
        assert np.array_equal(table["mean_intensity_g"], expected["intensity_mean-1"])


@pytest.fixture(scope="module")
def network():
    import keras

    import unet

    keras.utils.set_random_seed(3)
    return unet.build_unet(recipe=config.RECIPES["instance"])


def test_tiled_prediction_equals_whole_image_prediction(network, monkeypatch):
    monkeypatch.setattr(config, "WHOLE_PIXELS", 0)  # tile even this small image
    x = np.random.default_rng(0).random((176, 208, 1)).astype(np.float32)
    network = nuclei.Network(network, device.Compute(True, "float32", "a test"))
    whole = nuclei.predict_full(network, x, tta=True)
    tiled = nuclei.predict_tiled(network, x, tta=True, tile=64, margin=128)
    # The same probabilities as the whole image gives, though every 64x64 square was predicted
    # on its own window.
    assert tiled.shape == whole.shape == (176, 208, 3)
    assert np.abs(tiled - whole).max() < 1e-4


def test_a_tile_border_through_a_nucleus_does_not_split_it(threshold_model, monkeypatch):
    import checkpoints

    monkeypatch.setattr(config, "WHOLE_PIXELS", 0)
    image = imagefiles.scaled_image(discs(centres=[(64, 64)], radius=12))
    predictor = nuclei.Predictor(checkpoints.load_unet(threshold_model), config.RECIPES["instance"])
    prob = nuclei.predict_tiled(predictor.network, data.native_input(image, predictor.recipe),
                                tta=False, tile=64, margin=32)
    labels = nuclei.nuclei_labels(prob, SHAPE, predictor.recipe)
    assert labels.max() == 1 and np.count_nonzero(labels) == disc(SHAPE, (64, 64), 12).sum()


def test_scales_average_each_scales_probabilities(threshold_model):
    import checkpoints

    model = checkpoints.load_unet(threshold_model)
    image = imagefiles.scaled_image(discs())

    def predictor(scales):
        recipe = config.recipe_with(config.RECIPES["instance"], [f"scales={json.dumps(scales)}"])
        return nuclei.Predictor(model, recipe)

    one, half, double = (predictor([s]).probabilities([image])[0] for s in (1.0, 0.5, 2.0))
    assert one.shape == half.shape == double.shape == SHAPE + (3,)
    assert np.allclose(predictor([0.5, 1, 2]).probabilities([image])[0],
                       (half + one + double) / 3, atol=1e-6)
    assert not np.allclose(half, one, atol=1e-3)
    # A pixel-wise model sees the same discs at every scale: the same four nuclei, about as big.
    labels = predictor([0.5, 1, 2]).nuclei([image])[0]
    assert labels.max() == 4
    assert abs(np.count_nonzero(labels) - 4 * disc(SHAPE, CENTRES[0], 9).sum()) <= 4 * 12


def test_score_dir_scores_every_image_by_slide(tmp_path, threshold_model, capsys):
    import checkpoints

    tree = tmp_path / "tnbc"
    for id_ in ("tnbc_01_1", "tnbc_01_2", "tnbc_02_1"):  # four discs each, four masks
        write_png(tree / id_ / "images" / f"{id_}.png", discs())
        for k, centre in enumerate(CENTRES):
            write_png(tree / id_ / "masks" / f"{k}.png",
                      disc(SHAPE, centre, 9).astype(np.uint8) * 255)
    predictor = nuclei.Predictor(checkpoints.load_unet(threshold_model),
                                 config.RECIPES["instance"],
                                 device.Compute(False, "float32", "a test"))
    scores.report_folder(predictor, tree)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Competition score, {tree}: 1.0000 over 3 images, 1.0000 over 2 groups "
                     "(each counts once); 12 nuclei, 12 predicted",
                     "  tnbc_01                2 images  1.0000",
                     "  tnbc_02                1 images  1.0000"]
