"""The instance recipe: targets, watershed, full-size prediction, the recipe in the model file,
and a tiny run end to end."""
import io
import json
import math
import zipfile

import h5py
import numpy as np
import pandas as pd
import pytest

import config
import crops
import data
import device
import nuclei
import pictures
import predict
import train
from tests.conftest import SAMPLE_TEST, SAMPLE_TRAIN, disc

INSTANCE = config.RECIPES["instance"]


def touching_discs(shape=(40, 60)):
    """Two discs of radius 10 whose centres are 19 apart: they share a short border."""
    labels = np.zeros(shape, np.int32)
    labels[disc(shape, (20, 20), 10)] = 1
    labels[disc(shape, (20, 39), 10) & (labels == 0)] = 2
    return labels


def window_labels(labels, row, col, radius):
    window = labels[max(row - radius, 0):row + radius + 1, max(col - radius, 0):col + radius + 1]
    return set(np.unique(window)) - {0}


def test_targets_of_two_touching_discs():
    labels = touching_discs()
    targets = crops.instance_targets(labels)
    assert targets.shape == (40, 60, 3) and targets.dtype == np.uint8
    nucleus, contour, gap = (targets[..., k].astype(bool) for k in range(3))
    assert np.array_equal(nucleus, labels > 0)
    for row in range(labels.shape[0]):
        for col in range(labels.shape[1]):
            # Gap: two different nuclei in the 3x3 window; contour: a nucleus pixel with
            # another label or background in its 5x5 window (image edges do not count).
            assert gap[row, col] == (len(window_labels(labels, row, col, 1)) == 2)
            around = labels[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3]
            assert contour[row, col] == (labels[row, col] > 0
                                         and (around != labels[row, col]).any())
    # A band along the shared border (columns 29 to 31, rows 15 to 25), nowhere else.
    rows, cols = np.nonzero(gap)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (15, 25, 29, 31)
    # 21 nucleus pixels either side of the border, and 4 background pixels of the notches.
    assert gap.sum() == 25 and (labels[gap] == 0).sum() == 4


def test_watershed_separates_touching_nuclei_components_do_not():
    labels = touching_discs()
    prob = crops.instance_targets(labels).astype(np.float32)
    split = nuclei.nuclei_labels(prob, labels.shape, INSTANCE)
    assert split.max() == 2 and split.dtype == np.int32
    import metrics

    assert metrics.competition_score(labels, split) == 1.0
    merged = nuclei.nuclei_labels(prob, labels.shape, {**INSTANCE, "post": "components"})
    # The merged object covers disc 1 (317 pixels) with IoU 317 / 632 > 0.5: a match at
    # t = 0.50 only, where TP 1 and FN 1 give 1/2, so the score is 0.05.
    assert (labels == 1).sum() == 317 and (labels > 0).sum() == 632
    assert merged.max() == 1 and metrics.competition_score(labels, merged) == pytest.approx(0.05)


def test_small_objects_dropped_and_seedless_pieces_kept():
    prob = np.zeros((30, 30, 3), np.float32)
    prob[2:12, 2:12, 0] = 0.9          # a nucleus with a seed
    prob[20:24, 20:24, 0] = 0.9        # 16 pixels, all contour: no seed, kept
    prob[20:24, 20:24, 1] = 0.9
    prob[2:5, 25:28, 0] = 0.9          # 9 pixels: under min_size 16
    labels = nuclei.nuclei_labels(prob, (30, 30), {**INSTANCE, "min_size": 16})
    assert labels.max() == 2
    assert (labels[2:12, 2:12] == 1).all() and (labels[20:24, 20:24] == 2).all()
    assert not labels[2:5, 25:28].any()


def test_native_input_inverts_bright_backgrounds_and_scales():
    dark = np.zeros((50, 50, 3), np.uint8)
    dark[20:30, 20:30] = 200
    bright = 255 - dark
    grey = {**INSTANCE, "input": "grey_native"}
    assert np.allclose(data.native_input(dark, grey), data.native_input(bright, grey), atol=1e-6)
    x = data.native_input(dark, grey)
    assert x.shape == (50, 50, 1) and x.dtype == np.float32
    assert x[25, 25, 0] == pytest.approx(1.0) and x[0, 0, 0] == pytest.approx(0.0)
    # Colour kept: a purple stain on white, inverted, scaled over all channels together.
    stained = np.full((50, 50, 3), 240, np.uint8)
    stained[20:30, 20:30] = (120, 40, 160)
    x = data.native_input(stained, {**INSTANCE, "input": "rgb_native"})
    assert x.shape == (50, 50, 3)
    # Inverted, the stain is (135, 215, 95) on a background of 15: the 1st and 99.8th
    # percentiles over all channels are 15 and 215.
    assert np.allclose(x[25, 25], [0.6, 1.0, 0.4], atol=1e-6)
    assert np.allclose(x[0, 0], 0, atol=1e-6)


@pytest.fixture(scope="module")
def small_instance_model():
    import keras

    import unet

    keras.utils.set_random_seed(0)
    return unet.build_unet(recipe=INSTANCE)


def test_padded_prediction_equals_whole_image_prediction(small_instance_model):
    model = small_instance_model
    x = np.random.default_rng(2).random((40, 37, 1)).astype(np.float32)
    padded = data.pad_to(x, 48, 48)
    eager = model(padded[None], training=False)[0].numpy()
    for jit in (True, False):
        network = nuclei.Network(model, device.Compute(jit, "float32", "a test"))
        whole = network(padded[None])[0]
        assert np.array_equal(nuclei.predict_full(network, x, tta=False), whole[:40, :37])
        aligned = padded[:32, :48]
        assert np.array_equal(nuclei.predict_full(network, aligned, tta=False),
                              network(aligned[None])[0])
        # Both compiled paths compute what Keras's eager call does, up to float32 rounding.
        assert np.allclose(whole, eager, atol=1e-5)


def test_flip_averaging_commutes_with_flips(small_instance_model):
    x = np.random.default_rng(3).random((32, 48, 1)).astype(np.float32)
    network = nuclei.Network(small_instance_model, device.Compute(False, "float32", "a test"))
    once = nuclei.predict_full(network, x, tta=True)
    flipped = nuclei.predict_full(network, x[:, ::-1], tta=True)
    assert once.shape == (32, 48, 3)
    assert np.allclose(flipped[:, ::-1], once, atol=1e-6)
    assert not np.allclose(nuclei.predict_full(network, x, tta=False), once, atol=1e-6)


def test_recipe_survives_save_and_reload(tmp_path, small_instance_model):
    import keras

    import checkpoints
    import unet

    recipe = {**INSTANCE, "min_size": 5}
    path = tmp_path / "instance.keras"
    checkpoints.save_atomic(small_instance_model, path, recipe)
    assert checkpoints.read_recipe(path) == recipe
    reloaded = checkpoints.load_unet(path)
    # The notebook's blocks: 1,941,105 parameters less 3x3x2x16 for the input channels, plus
    # 2x17 for the two extra outputs.
    assert reloaded.count_params() == 1_941_105 - 288 + 34 == 1_940_851
    assert reloaded.output_shape == (None, None, None, 3) and reloaded.input_shape[-1] == 1
    x = np.random.default_rng(4).random((1, 32, 32, 1)).astype(np.float32)
    assert np.array_equal(reloaded(x).numpy(), small_instance_model(x).numpy())
    # A model saved without a recipe (before recipes existed) is the notebook's.
    old = tmp_path / "old.keras"
    unet.build_unet().save(old)
    assert checkpoints.read_recipe(old) == config.RECIPES["notebook"]
    # A recipe saved before `dropout` was a setting: those models were trained with it.
    earlier = {key: value for key, value in recipe.items() if key != "dropout"}
    checkpoints.write_recipe(path, earlier)
    assert checkpoints.read_recipe(path) == {**earlier, "dropout": True}
    keras.mixed_precision.set_global_policy("float32")


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    for setting, message in [
        ("colour=1", "--set colour=1: no setting 'colour' here"),
        ("augment=maybe", "--set augment=maybe: 'maybe' is not a JSON value"),
        ("crop=true", "--set crop=true: crop takes a int"),
        ("input=colour", "--set input=colour: input is one of grey_native, rgb_native"),
        ("outputs=1", "--set: the watershed needs the contour and gap outputs (outputs=3)"),
        ("scales=[1,8]", "--set scales=[1, 8]: a list of input scales between 0.25 and 4"),
        ("scales=[]", "--set scales=[]: a list of input scales between 0.25 and 4"),
        ("gap_weight=0", "--set gap_weight=0: a positive weight of the gap target"),
        ("filters=18", "--set filters=18: c1's filters, a multiple of 4 from 4 to 64"),
        ("filters=0", "--set filters=0: c1's filters, a multiple of 4 from 4 to 64"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train.main(["--recipe", "instance", "--set", setting, "--model-path",
                        str(tmp_path / "m.keras")])
        assert str(stop.value).startswith(f"error: {message}")
    assert not (tmp_path / "m.keras").exists()


def test_tiny_instance_run_end_to_end(tmp_path, capsys):
    """Train the instance recipe on the bundled sample (small crops, 1 epoch), predict with no
    recipe flag: the recipe comes from the model file. --show without a display says so and
    writes every picture."""
    import matplotlib
    from PIL import Image

    import checkpoints

    model_path = tmp_path / "instance.keras"
    train.main(["--recipe", "instance", "--set", "crop=64", "--epochs", "1", "--batch-size",
                "8", "--model-path", str(model_path), "--train-dir", str(SAMPLE_TRAIN)])
    recipe = checkpoints.read_recipe(model_path)
    assert recipe == {**INSTANCE, "crop": 64}
    # What prediction needs and how it was made; no optimizer state (Adam's moments).
    record = checkpoints.read_training(model_path)
    assert {key: record[key] for key in ("epochs", "epochs_run", "best_epoch", "seed",
                                         "batch_size", "validation_images")} == {
        "epochs": 1, "epochs_run": 1, "best_epoch": 1, "seed": 42, "batch_size": 8,
        "validation_images": 3}
    assert record["training_images"] == 24 and record["train_dir"] == str(SAMPLE_TRAIN)
    assert record["policy"] in ("float32", "mixed_bfloat16") and record["seconds"] >= 0
    with zipfile.ZipFile(model_path) as archive, h5py.File(
            io.BytesIO(archive.read("model.weights.h5"))) as weights:
        assert list(weights["optimizer"]["vars"]) == ["0"]  # its step count only
    history = pd.read_csv(model_path.with_suffix(".history.csv"))
    assert list(history.columns) == ["epoch", "loss", "val_loss"] and len(history) == 1
    assert capsys.readouterr().out.splitlines()[-1] == data.sample_note(SAMPLE_TRAIN)

    # The notebook recipe, or another augmentation, on the same path is refused before any
    # work, naming the settings that differ.
    with pytest.raises(SystemExit) as stop:
        train.main(["--model-path", str(model_path), "--train-dir", str(SAMPLE_TRAIN)])
    assert 'input="grey_native" there, "rgb_128" here' in str(stop.value)
    with pytest.raises(SystemExit) as stop:
        train.main(["--recipe", "instance", "--set", "crop=64", "--set", "augment=false",
                    "--model-path", str(model_path), "--train-dir", str(SAMPLE_TRAIN)])
    assert str(stop.value) == (f"error: {model_path}: trained with other settings (augment=true "
                               "there, false here); choose another --model-path or move it")
    # A model trained with a setting the recipes no longer have (config.RETIRED_SETTINGS).
    stained = tmp_path / "stained.keras"
    with zipfile.ZipFile(model_path) as old, zipfile.ZipFile(stained, "w") as new:
        for member in old.namelist():
            new.writestr(member, json.dumps({**recipe, "stain_augment": True})
                         if member == checkpoints.RECIPE_MEMBER else old.read(member))
    with pytest.raises(SystemExit) as stop:
        train.main(["--recipe", "instance", "--set", "crop=64", "--model-path", str(stained),
                    "--train-dir", str(SAMPLE_TRAIN)])
    assert "(stain_augment=true there, false here)" in str(stop.value)

    out_dir = tmp_path / "out"
    capsys.readouterr()
    matplotlib.use("Agg")  # no display, even when the tests run on a desktop
    predict.main(["--model-path", str(model_path), "--train-dir", str(SAMPLE_TRAIN),
                  "--test-dir", str(SAMPLE_TEST), "--out-dir", str(out_dir), "--set", "tta=false",
                  "--show"])
    printed = capsys.readouterr().out
    assert ("--show: no display to open windows on (matplotlib's backend is Agg); writing the "
            "pictures only") in printed.splitlines()
    assert "Competition score (original resolution, every mask file one nucleus), validation: " \
        in printed and "Notebook's metric" not in printed
    assert printed.splitlines()[-1] == data.sample_note(SAMPLE_TRAIN)
    submission = pd.read_csv(out_dir / "submission.csv", keep_default_na=False)
    test_ids = data.list_ids(SAMPLE_TEST)
    assert set(submission["ImageId"]) == set(test_ids)
    images, _ = data.load_native(SAMPLE_TEST, test_ids, with_labels=False)
    shapes = {id_: image.shape[:2] for id_, image in zip(test_ids, images)}
    labels = nuclei.labels_from_rows(submission.itertuples(index=False), shapes)
    assert (sum(int(image.max()) for image in labels.values())
            == (submission["EncodedPixels"] != "").sum())
    for name in ("train_sample.png", "val_sample.png"):
        assert (out_dir / name).is_file()
    overlays = sorted((out_dir / "overlays").iterdir())
    assert [path.name for path in overlays] == [f"{id_}.png" for id_ in test_ids]
    for path, image in zip(overlays, images):
        with Image.open(path) as picture:
            assert picture.mode == "RGB" and picture.size == (image.shape[1], image.shape[0])
    with Image.open(out_dir / "contact_sheet.png") as sheet:  # 6 images, 3 to a row
        assert sheet.size == (3 * pictures.TILE, 2 * (pictures.TILE + pictures.CAPTION))
    json.loads(json.dumps(recipe))  # plain JSON: readable without this project


def test_tune_finds_the_threshold_that_matches_the_truth_and_saves_it(tmp_path,
                                                                      small_instance_model):
    """Each disc has probability 0.9 inside and 0.45 in a 3-pixel halo around it: thresholds
    0.5 and above give the true nuclei (score 1), 0.3 and 0.4 take the halo in (IoU < 0.5 with
    these small discs, score 0)."""
    from scipy import ndimage

    import checkpoints

    truth = np.zeros((60, 60), np.int32)
    for k, centre in enumerate([(15, 15), (15, 45), (45, 30)], start=1):
        truth[disc(truth.shape, centre, 5)] = k
    prob = np.zeros((60, 60, 3), np.float32)
    prob[..., 0] = np.where(truth > 0, 0.9, np.where(ndimage.binary_dilation(
        truth > 0, iterations=3), 0.45, 0.0))
    results = nuclei.tune([prob], [truth], INSTANCE)
    best_score, best = results[0]
    assert best_score == 1.0 and best["threshold"] >= 0.5
    scores = {(s["threshold"], s["seed_threshold"], s["min_size"]): score for score, s in results}
    assert len(scores) == 6 * 3 * 5
    assert scores[(0.4, 0.5, 0)] == 0.0 and scores[(0.5, 0.5, 0)] == 1.0

    path = tmp_path / "m.keras"
    checkpoints.save_atomic(small_instance_model, path, INSTANCE)
    checkpoints.write_recipe(path, {**INSTANCE, **best})
    assert checkpoints.read_recipe(path) == {**INSTANCE, **best}
    assert checkpoints.load_unet(path).count_params() == small_instance_model.count_params()


def test_epochs_and_batch_size_below_one_are_refused(tmp_path, capsys):
    for flag in ("--epochs", "--batch-size"):
        with pytest.raises(SystemExit) as stop:
            train.main([flag, "0", "--model-path", str(tmp_path / "m.keras")])
        assert stop.value.code == 2
        assert f"argument {flag}: 0 is not a whole number of at least 1" in capsys.readouterr().err


def test_a_cosine_run_goes_to_the_end_of_its_schedule(tmp_path):
    """EarlyStopping's patience: the run's length under a cosine schedule (it never stops
    early), the recipe's patience at a constant learning rate."""
    import keras

    def patience(recipe, epochs):
        _, _, callbacks = train.make_callbacks(tmp_path / "m.keras", recipe, math.inf, None,
                                               {"epochs": epochs}, 0)
        stopping, = (c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
        return stopping.patience

    assert patience(INSTANCE, 80) == 80 and patience(INSTANCE, 40) == 40
    assert patience({**INSTANCE, "lr_schedule": "constant"}, 80) == INSTANCE["patience"] == 10
    assert patience(config.RECIPES["notebook"], 10) == config.PATIENCE == 5
