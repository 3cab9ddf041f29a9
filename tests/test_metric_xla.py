"""metrics.my_iou_metric, the notebook's metric in TensorFlow operations that XLA compiles, against
metrics.iou_metric_batch (NumPy and SciPy): equal values, compared with ==."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import data
import metrics
import unet
from tests.conftest import SAMPLE_TRAIN

SIZE = 128


def squares(*corners, size=10):
    """A (SIZE, SIZE) mask of size x size squares with these top left corners."""
    mask = np.zeros((SIZE, SIZE), bool)
    for top, left in corners:
        mask[top:top + size, left:left + size] = True
    return mask


def both(truth, pred):
    """The two metrics (float32) of one batch: y_true bool, y_pred float32 probabilities,
    (B, H, W, 1)."""
    truth = np.asarray(truth, bool)[..., None]
    pred = np.asarray(pred, np.float32)[..., None]
    return (float(metrics.my_iou_metric(tf.constant(truth), tf.constant(pred))),
            float(metrics.iou_metric_batch(truth, pred)))


EMPTY = np.zeros((SIZE, SIZE), bool)
FULL = np.ones((SIZE, SIZE), bool)
# (name, truth, prediction, the NumPy metric's value)
HAND_MADE = [
    ("identical", squares((2, 2), (40, 70)), squares((2, 2), (40, 70)), 1.0),
    ("disjoint", squares((0, 0)), squares((60, 60)), 0.0),
    # IoU 80 / 120 = 2/3: a match at 0.50, 0.55, 0.60, 0.65 only.
    ("shifted square", squares((5, 5)), squares((5, 7)), 0.4),
    # Squares touching at a corner are one object (8-connected): one square found is IoU 1/2,
    # no match. The corner falls between blocks (19, 19)-(20, 20) or inside one (20, 20)-(21, 21).
    ("corner between blocks", squares((10, 10), (20, 20)), squares((10, 10)), 0.0),
    ("corner inside a block", squares((11, 11), (21, 21)), squares((11, 11)), 0.0),
    ("anti-diagonal corner", squares((30, 20), (20, 30)), squares((30, 20)), 0.0),
    ("corner-joined found", squares((10, 10), (20, 20)), squares((10, 10), (20, 20)), 1.0),
    # One column apart they are two objects: one found is TP 1, FN 1.
    ("one-pixel gap", squares((10, 10), (10, 21)), squares((10, 10)), 0.5),
    ("one-pixel gap, one row", squares((10, 10), (21, 10)), squares((10, 10)), 0.5),
    # Stripes on the left and right edges, side by side in the flat order of the blocks.
    ("left and right edges", squares((0, 0), (0, SIZE - 2), size=2) | squares((2, 0), size=2),
     squares((0, 0), (2, 0), size=2), 0.5),
    ("single pixels in the corners", squares((0, 0), (0, SIZE - 1), (SIZE - 1, 0),
                                             (SIZE - 1, SIZE - 1), size=1),
     squares((0, 0), (SIZE - 1, SIZE - 1), size=1), 0.5),
    # The kernel's quirks: the lowest label present is background, so an image that is all
    # nucleus has no object, and an empty truth scores 0 whatever the prediction.
    ("all nucleus", FULL, squares((5, 5)), 0.0),
    ("all nucleus, both", FULL, FULL, 0.0),
    ("all nucleus predicted", squares((5, 5)), FULL, 0.0),
    ("empty truth and prediction", EMPTY, EMPTY, 0.0),
    ("empty truth", EMPTY, squares((5, 5)), 0.0),
    ("empty prediction", squares((5, 5), (50, 50)), EMPTY, 0.0),
]


@pytest.mark.parametrize("name, truth, pred, expected", HAND_MADE, ids=[c[0] for c in HAND_MADE])
def test_hand_made_masks(name, truth, pred, expected):
    assert both([truth], [pred]) == (float(np.float32(expected)),) * 2


def test_images_of_a_batch_stay_apart():
    """Blocks of consecutive images are neighbours in the flat order the labelling rolls: a
    nucleus on image 0's last row and one on image 1's first row are not one object. (A batch
    of 16, the size the other tests compile for; the 14 empty images score 0.)"""
    bottom, top = squares((SIZE - 2, 0), size=2), squares((0, 0), size=2)
    masks = [bottom, top] + [EMPTY] * 14
    tf_value, np_value = both(masks, masks)
    assert tf_value == np_value == float(np.float32(2 / 16))


def blobs(rng, shape, smoothing=2.0):
    """Nuclei-like random masks: smoothed noise, thresholded at a different level per image,
    and a prediction that is the same noise, perturbed, through a sigmoid."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), (0, smoothing, smoothing))
    noise /= noise.std()
    levels = rng.uniform(-0.5, 1.5, (shape[0], 1, 1))
    truth = noise > levels
    pred = 1 / (1 + np.exp(-6 * (noise + rng.normal(0, 0.4, shape) - levels)))
    return truth, pred


@pytest.mark.parametrize("shape", [(16, SIZE, SIZE), (3, 31, 33)])
def test_random_masks(shape):
    truth, pred = blobs(np.random.default_rng(0), shape)
    tf_value, np_value = both(truth, pred)
    assert tf_value == np_value
    assert 0 < np_value < 1


def test_random_masks_image_by_image():
    truth, pred = blobs(np.random.default_rng(1), (16, SIZE, SIZE))
    values = [both([t], [p]) for t, p in zip(truth, pred)]
    assert [tf_value for tf_value, _ in values] == [np_value for _, np_value in values]
    assert len({np_value for _, np_value in values}) > 8  # varied scores, not all 0 or 1


@pytest.fixture(scope="module")
def sample_masks():
    _, Y, _ = data.load_train(SAMPLE_TRAIN, cache_dir=None)
    return Y[..., 0]


def realistic(masks, rng):
    """Probabilities as a half-trained network gives them: masks shifted, eroded or dilated,
    blurred, with noise."""
    preds = []
    for n, mask in enumerate(masks):
        mask = [np.roll(mask, (1, -2), axis=(0, 1)), ndimage.binary_erosion(mask),
                ndimage.binary_dilation(mask, iterations=2)][n % 3]
        prob = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
        preds.append(np.clip(prob + rng.normal(0, 0.05, prob.shape), 0, 1))
    return np.stack(preds)


def test_sample_masks(sample_masks):
    """The batch with y_true float32, as Keras passes it, then image by image."""
    pred = realistic(sample_masks, np.random.default_rng(2)).astype(np.float32)
    truth = sample_masks.astype(np.float32)
    value = metrics.my_iou_metric(tf.constant(truth[..., None]), tf.constant(pred[..., None]))
    assert value.dtype == tf.float32 and value.shape == ()
    assert value.numpy() == metrics.iou_metric_batch(truth[..., None], pred[..., None])
    per_image = [both([t], [p]) for t, p in zip(sample_masks, pred)]
    assert [tf_value for tf_value, _ in per_image] == [np_value for _, np_value in per_image]


def test_inside_compiled_and_plain_graphs():
    """Inside a function XLA compiles, and inside a plain TensorFlow graph, whose optimizer
    (Grappler) would regroup float sums if the metric ran there uncompiled."""
    truth, pred = blobs(np.random.default_rng(4), (16, SIZE, SIZE))
    truth, pred = tf.constant(truth[..., None]), tf.constant(pred[..., None].astype(np.float32))
    expected = metrics.iou_metric_batch(truth.numpy(), pred.numpy())
    assert tf.function(metrics.my_iou_metric, jit_compile=True)(truth, pred).numpy() == expected
    assert tf.function(metrics.my_iou_metric)(truth, pred).numpy() == expected


NUMPY_SUM = tf.function(metrics._numpy_sum, jit_compile=True)


@pytest.mark.parametrize("length", [7, 9, 27, 129, 300])
def test_sums_in_numpys_order(length):
    """Under 8 values one by one, up to 128 in 8 lanes, longer ones by halves: thirds, whose sum
    depends on the order of the additions."""
    values = np.random.default_rng(length).random(length) / 3
    total = NUMPY_SUM(tf.constant(values))
    assert total.numpy() == np.sum(values)


def test_notebook_model_evaluates_with_xla(small_images):
    """build_unet's model with XLA on (Keras' default on a GPU, tried here on the CPU): its
    compiled test step computes the metric as the NumPy metric does on predict's output. The
    truth is that output thresholded, shifted for half the images, so that the score is neither
    0 nor 1. (Not fit: compiling the training step too took a minute on this CPU, and the
    metric is the same code in both steps.)"""
    keras.utils.set_random_seed(0)
    model = unet.build_unet()
    model.jit_compile = True
    X = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    pred = model.predict(X, verbose=0)
    Y = (pred > 0.5).astype(np.float32)
    Y[2:] = np.roll(Y[2:], 3, axis=2)
    result = model.evaluate(X, Y, batch_size=4, verbose=0, return_dict=True)
    assert model.jit_compile is True  # Keras falls back to False for a model XLA cannot run
    expected = metrics.iou_metric_batch(Y, pred)
    assert 0 < expected < 1
    assert result["my_iou_metric"] == expected
