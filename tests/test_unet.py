import numpy as np
import pytest

import checkpoints
import config
import metrics
import unet
from notebook_reference import iou_metric_batch_notebook, iou_metric_notebook
from tests.conftest import SAMPLE_TRAIN


def square(top, left, size=10, shape=(32, 32)):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_parameter_count_and_output_shape():
    model = unet.build_unet()
    assert model.count_params() == 1_941_105
    assert model.output_shape == (None, 128, 128, 1)
    assert model.layers[1].__class__.__name__ == "Rescaling"
    assert len([x for x in model.layers if x.__class__.__name__ == "Conv2D"]) == 19
    assert model.predict(np.zeros((2, 128, 128, 3), np.uint8), verbose=0).shape == (2, 128, 128, 1)


def test_metric_identical_masks_score_one():
    mask = square(2, 2) | square(18, 18)
    assert metrics.iou_metric(mask, mask) == 1.0


def test_metric_disjoint_masks_score_zero():
    assert metrics.iou_metric(square(0, 0), square(20, 20)) == 0.0


def test_metric_one_missed_nucleus():
    """Two true nuclei, one found exactly: TP 1, FN 1 at every threshold -> 1/2."""
    truth = square(2, 2) | square(18, 18)
    assert metrics.iou_metric(truth, square(2, 2)) == 0.5


def test_metric_shifted_square_exact_fraction(capsys):
    """A 10x10 square shifted by 2 columns: IoU = 80 / 120 = 2/3, a match at t = 0.50, 0.55,
    0.60, 0.65 only, so the score is 4/10."""
    assert metrics.iou_metric(square(5, 5), square(5, 7), print_table=True) == pytest.approx(0.4)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "Thresh\tTP\tFP\tFN\tPrec."
    assert table[4] == "0.650\t1\t0\t0\t1.000"
    assert table[5] == "0.700\t0\t1\t1\t0.000"
    assert table[-1] == "AP\t-\t-\t-\t0.400"


def test_metric_keeps_the_kernels_quirks():
    empty = np.zeros((32, 32), bool)
    assert metrics.iou_metric(empty, empty) == 0.0
    full = np.ones((32, 32), bool)
    assert metrics.iou_metric(full, full) == 0.0 == iou_metric_notebook(full, full)


def test_metric_equals_the_kernels_on_random_and_real_masks():
    from scipy.ndimage import binary_dilation, binary_erosion, shift

    import data

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(200):
        a = rng.random((32, 32)) < rng.uniform(0, 0.6)
        b = rng.random((32, 32)) < rng.uniform(0, 0.6)
        pairs.append((a, b))
    _, Y, _ = data.load_train(SAMPLE_TRAIN)
    for y in Y[..., 0]:
        pairs += [(y, y), (y, binary_erosion(y)), (y, binary_dilation(y)),
                  (y, shift(y, (1, 2), order=0)), (y, np.zeros_like(y)), (np.zeros_like(y), y)]
    for a, b in pairs:
        assert metrics.iou_metric(a, b) == iou_metric_notebook(a, b)
    batch_true = np.stack([a for a, _ in pairs[:16]])[..., None]
    batch_pred = np.stack([b for _, b in pairs[:16]])[..., None].astype(np.float32)
    assert metrics.iou_metric_batch(batch_true, batch_pred) == iou_metric_batch_notebook(
        batch_true, batch_pred)


def test_tensorflow_metric_equals_numpy_metric():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    y_true = rng.random((4, 32, 32, 1)) < 0.3
    y_pred = rng.random((4, 32, 32, 1)).astype(np.float32)
    value = metrics.my_iou_metric(tf.constant(y_true), tf.constant(y_pred))
    assert value.shape == () and value.dtype == tf.float32
    assert float(value) == metrics.iou_metric_batch(y_true, y_pred)


def test_dropout_is_recipe_data_and_holds_no_weights():
    import config

    def rates(model):
        return [layer.rate for layer in model.layers if layer.__class__.__name__ == "Dropout"]

    assert rates(unet.build_unet()) == [0.1, 0.1, 0.2, 0.2, 0.3, 0.2, 0.2, 0.1, 0.1]
    instance = config.RECIPES["instance"]
    with_dropout = unet.build_unet(recipe={**instance, "dropout": True})
    without = unet.build_unet(recipe={**instance, "dropout": False})
    assert rates(with_dropout) == [0.1, 0.1, 0.2, 0.2, 0.3, 0.2, 0.2, 0.1, 0.1]
    assert rates(without) == []
    assert with_dropout.count_params() == without.count_params() == 1_940_851


def test_filters_widen_every_level_in_proportion():
    """c1's filters 24 instead of 16: every convolution but the output 1.5x as wide."""
    import config

    recipe = {**config.RECIPES["instance"], "filters": 24}
    wide = unet.build_unet(recipe=recipe)
    convolutions = [layer for layer in wide.layers
                    if layer.__class__.__name__ in ("Conv2D", "Conv2DTranspose")]
    assert [layer.filters for layer in convolutions] == [
        24, 24, 48, 48, 96, 96, 192, 192, 384, 384,
        192, 192, 192, 96, 96, 96, 48, 48, 48, 24, 24, 24, 3]
    assert wide.count_params() == 4_365_483
    assert unet.build_unet(recipe={**recipe, "filters": 16}).count_params() == 1_940_851


def test_gap_weight_multiplies_the_cross_entropy_of_gap_pixels(tmp_path):
    y_true = np.zeros((1, 2, 2, 3), np.uint8)
    y_true[0, 0, 0] = (1, 1, 0)
    y_true[0, 1, 1] = (1, 0, 1)  # one gap pixel
    y_pred = np.full((1, 2, 2, 3), 0.25, np.float32)
    bce = -np.where(y_true == 1, np.log(0.25), np.log(0.75))
    dice = 1 - (2 * (y_true * y_pred).sum((0, 1, 2)) + 1) / ((y_true + y_pred).sum((0, 1, 2)) + 1)
    weights = np.ones((1, 2, 2, 1))
    weights[0, 1, 1] = 3
    assert np.isclose(float(unet.bce_dice(y_true, y_pred)), bce.mean() + dice.mean(), atol=1e-6)
    assert np.isclose(float(unet.bce_dice(y_true, y_pred, 3.0)),
                      (bce * weights).mean() + dice.mean(), atol=1e-6)
    # A gap-weighted model reloads with its loss (for --resume).
    recipe = {**config.RECIPES["instance"], "gap_weight": 3.0}
    model = unet.build_unet(recipe=recipe)
    checkpoints.save_atomic(model, tmp_path / "m.keras", recipe)
    reloaded = checkpoints.load_unet(tmp_path / "m.keras")
    assert reloaded.loss.gap_weight == 3.0
    assert np.isclose(float(reloaded.loss(y_true, y_pred)),
                      float(unet.bce_dice(y_true, y_pred, 3.0)))
