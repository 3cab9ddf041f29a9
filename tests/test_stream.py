"""The instance recipe's training stream (crops.crop_dataset, crops.training_crop): a tf.data
pipeline of TensorFlow operations; its batches, its targets, and its augmentation."""
import numpy as np
import pytest
import tensorflow as tf

import config
import crops
import data
from tests.conftest import SAMPLE_TRAIN

INSTANCE = config.RECIPES["instance"]
CROP = 64


@pytest.fixture(scope="module")
def sample():
    """The first 4 sample images as the instance recipe trains on them."""
    ids = data.list_ids(SAMPLE_TRAIN)[:4]
    images, labels = data.load_native(SAMPLE_TRAIN, ids)
    inputs = [data.native_input(image, INSTANCE) for image in images]
    return inputs, labels, [data.image_kind(image) for image in images]


def first_batch(store, kinds, recipe, seed, batch_size=4):
    return [t.numpy() for t in next(iter(
        crops.crop_dataset(store, kinds, recipe, batch_size, seed)))]


def test_batches_shapes_types_and_seeds(sample):
    inputs, labels, kinds = sample
    store = crops.crop_store(inputs, labels)
    recipe = {**INSTANCE, "crop": CROP}
    x, y = first_batch(store, kinds, recipe, seed=7)
    assert x.shape == (4, CROP, CROP, 1) and x.dtype == np.float32
    assert y.shape == (4, CROP, CROP, 3) and y.dtype == np.uint8
    assert set(np.unique(y)) <= {0, 1} and y[..., 0].any()
    again = first_batch(store, kinds, recipe, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((x, y), again))
    assert not np.array_equal(x, first_batch(store, kinds, recipe, seed=8)[0])


def test_an_epoch_shows_every_image_once(sample):
    """Without balance_kinds, each epoch is a permutation of the images: an image whose every
    pixel is its index shows it in each crop (no augmentation)."""
    plain = {**INSTANCE, "crop": 8, "augment": False}
    shapes = [(9, 12), (30, 20), (8, 8), (15, 15)]
    inputs = [np.full((*shape, 1), n, np.float32) for n, shape in enumerate(shapes)]
    labels = [np.zeros(shape, np.int32) for shape in shapes]
    stream = crops.crop_dataset(crops.crop_store(inputs, labels), ["fluorescence"] * 4, plain,
                                4, seed=3)
    epochs = [x.numpy()[:, 0, 0, 0].tolist() for x, _ in stream.take(3)]
    assert all((x.numpy() == x.numpy()[:, :1, :1]).all() for x, _ in stream.take(3))
    assert all(sorted(epoch) == [0, 1, 2, 3] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # a new order each epoch


def test_a_resumed_stream_continues_where_it_was(sample):
    """train.py resumes a run with `stream(batch_size).skip(finished batches)`: the batches after
    the skip are the uninterrupted stream's, across an epoch's end (4 images, batches of 3)."""
    inputs, labels, kinds = sample
    store = crops.crop_store(inputs, labels)
    recipe = {**INSTANCE, "crop": 16}
    whole = [x.numpy() for x, _ in crops.crop_dataset(store, kinds, recipe, 3, 9).take(4)]
    resumed = [x.numpy() for x, _ in crops.crop_dataset(store, kinds, recipe, 3, 9).skip(2)
               .take(2)]
    assert all(np.array_equal(a, b) for a, b in zip(whole[2:], resumed, strict=True))


def test_stream_targets_are_the_targets_of_its_label_crops(sample):
    """Crop k of the stream is crops.training_crop with the seed (seed, k); its targets equal
    crops.instance_targets (SciPy) of the label crop, with the recipe's augmentation on."""
    inputs, labels, kinds = sample
    store = crops.crop_store(inputs[:1], labels[:1])  # one image: crop k is of image 0
    recipe = {**INSTANCE, "crop": CROP}
    x, y = first_batch(store, kinds[:1], recipe, seed=11, batch_size=6)
    for k in range(6):
        crop, label_crop, targets = crops.training_crop(store, 0, tf.constant([11, k], tf.int64),
                                                       recipe)
        # Eagerly and in the stream's graph the float arithmetic may round apart in the last bit.
        np.testing.assert_allclose(crop.numpy(), x[k], rtol=1e-6, atol=1e-6)
        assert np.array_equal(targets.numpy(), crops.instance_targets(label_crop.numpy()))
        assert np.array_equal(y[k], targets.numpy())
    assert y[..., 1].any() and y[..., 2].any()  # contours and gaps, not only background


def test_compiled_crops_are_the_plain_operations_crops(sample):
    """XLA compiles crop_pixels (crops.training_crop): the same label crops as its plain
    TensorFlow operations, pixel for pixel, and inputs within float rounding (XLA fuses the
    arithmetic), for every recipe path: intensity changes, contrast alone, none."""
    inputs, labels, _ = sample
    store = crops.crop_store(inputs, labels)
    recipes = [{**INSTANCE, "crop": CROP}, {**INSTANCE, "crop": CROP, "intensity_augment": False},
               {**INSTANCE, "crop": CROP, "augment": False}]
    for recipe in recipes:
        for k in range(8):
            n = k % len(store["offsets"])
            seed = tf.constant([3, k], tf.int64)
            x, label_crop, _ = crops.training_crop(store, n, seed, recipe)
            plain_x, plain_labels = crops.crop_pixels(
                store, crops.crop_draws(store, n, seed, recipe), CROP)
            assert np.array_equal(label_crop.numpy(), plain_labels.numpy())
            np.testing.assert_allclose(x.numpy(), plain_x.numpy(), rtol=0, atol=1e-5)


def test_rescaled_flipped_turned_crops_keep_image_and_labels_aligned():
    """An image whose every pixel is its label, in blocks of 14x18 pixels (7x9 at the
    smallest scale): wherever the label crop is one label over 5x5 pixels, the bilinear input
    crop is that label, up to the contrast and offset jitter, so the labels come from where
    the image does, whatever the scale, turn and flip."""
    rows, cols = np.indices((200, 230))
    labels = (rows // 14 * 13 + cols // 18 + 1).astype(np.int32)
    store = crops.crop_store([labels[..., None].astype(np.float32)], [labels])
    recipe = {**INSTANCE, "crop": CROP, "intensity_augment": False}
    windows = set()
    for k in range(12):
        x, label_crop, _ = (t.numpy() for t in crops.training_crop(
            store, 0, tf.constant([5, k], tf.int64), recipe))
        assert label_crop.shape == (CROP, CROP) and label_crop.dtype == np.int32
        padded = np.pad(label_crop, 2, mode="edge")
        windows_5x5 = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
        uniform = (windows_5x5 == label_crop[..., None, None]).all(axis=(2, 3))
        contrast, offset = np.polyfit(label_crop[uniform], x[..., 0][uniform], 1)
        assert 0.7 <= contrast <= 1.3 and -0.2 <= offset <= 0.2
        assert np.allclose(x[..., 0][uniform], contrast * label_crop[uniform] + offset,
                           rtol=0, atol=1e-3)
        # How many block edges the crop crosses: its scale and turn.
        windows.add(((np.diff(label_crop, axis=0) != 0).sum(),
                     (np.diff(label_crop, axis=1) != 0).sum()))
    assert len(windows) > 6  # rescaled and turned differently


def test_intensity_stays_in_range(sample):
    """Inputs in 0..1: contrast and offset alone keep crops within -0.2..1.5; with
    intensity_jitter (gamma, blur, noise up to sigma 0.1, gradient up to 0.15, contrast 0.5 to
    1.5, offset 0.2) within -0.2 - 1.5 * (0.15 + 6 * 0.1) and 1.5 * (1 + 0.15 + 0.6) + 0.2."""
    rng = np.random.default_rng(0)
    inputs = [rng.random((80, 90, 1)).astype(np.float32) for _ in range(4)]
    labels = [np.zeros((80, 90), np.int32)] * 4
    store = crops.crop_store(inputs, labels)
    kinds = ["fluorescence"] * 4
    plain = {**INSTANCE, "crop": CROP, "intensity_augment": False}
    x, _ = first_batch(store, kinds, plain, seed=1, batch_size=16)
    assert x.min() >= -0.2 and x.max() <= 1.5
    x, _ = first_batch(store, kinds, {**plain, "intensity_augment": True}, seed=1, batch_size=16)
    assert x.min() >= -0.2 - 1.5 * 0.75 and x.max() <= 1.5 * 1.75 + 0.2
    medians = np.median(x, axis=(1, 2, 3))
    assert medians.max() - medians.min() > 0.3  # gamma, contrast and offset vary by crop


def test_blur_is_scipys_gaussian_filter():
    """intensity_jitter's blur alone (its other changes drawn off) is SciPy's gaussian_filter
    with the "reflect" border, kernel cut at 4 sigmas, for sigmas across its range."""
    from scipy import ndimage

    x = np.random.default_rng(0).random((40, 50, 1)).astype(np.float32)
    off = {"gamma": tf.constant(1.0), "blur": tf.constant(True), "noisy": tf.constant(False),
           "gradient": tf.constant(False), "contrast": tf.constant(1.0),
           "offset": tf.constant(0.0)}
    for sigma in (0.5, 0.77, 1.0, 1.12, 1.5):
        draws = {**crops.intensity_draws(tf.constant([1, 0], tf.int64), x.shape), **off,
                 "sigma": tf.constant(sigma)}
        expected = ndimage.gaussian_filter(x[..., 0].astype(np.float64), sigma, mode="reflect")
        np.testing.assert_allclose(crops.intensity_jitter(x, draws).numpy()[..., 0], expected,
                                   rtol=0, atol=1e-6)


def test_an_extra_folder_adds_training_images_and_leaves_validation_alone(tmp_path, capsys):
    import argparse

    import train

    extra = tmp_path / "extra"
    extra.mkdir()
    ids = data.list_ids(SAMPLE_TRAIN)
    for id_ in ids[:3]:
        (extra / id_).symlink_to(SAMPLE_TRAIN / id_)
    options = dict(train_dir=SAMPLE_TRAIN, seed=1)
    _, n_alone, X_alone, Y_alone = train.load_instance_data(
        argparse.Namespace(extra_train_dir=[], **options), INSTANCE)
    _, n_more, X_more, Y_more = train.load_instance_data(
        argparse.Namespace(extra_train_dir=[extra], **options), INSTANCE)
    assert (n_alone, n_more) == (data.split_index(len(ids), SAMPLE_TRAIN), n_alone + 3)
    assert np.array_equal(X_alone, X_more) and np.array_equal(Y_alone, Y_more)
    assert f", 3 from {extra} and" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        train.main(["--extra-train-dir", str(extra), "--model-path", str(tmp_path / "m.keras")])
    assert str(stop.value) == ("error: --extra-train-dir: the notebook recipe trains on its one "
                               "folder's arrays; use --recipe instance")
