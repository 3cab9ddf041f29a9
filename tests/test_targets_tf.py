"""crops.instance_targets_tf, the instance recipe's targets from TensorFlow window maxima and
minima, against crops.instance_targets (SciPy filters): equal pixel for pixel, borders included."""
import numpy as np
import pytest
import tensorflow as tf

import crops
import data
from tests.conftest import SAMPLE_TRAIN, disc


def boxes(shape, *rectangles):
    """An int32 label image: (label, top, left, height, width) rectangles, later ones on top."""
    labels = np.zeros(shape, np.int32)
    for label, top, left, height, width in rectangles:
        labels[top:top + height, left:left + width] = label
    return labels


SHAPE = (24, 30)
H, W = SHAPE
HAND_MADE = {
    "touching nuclei": boxes(SHAPE, (1, 4, 4, 8, 8), (2, 4, 12, 8, 8), (3, 12, 4, 6, 16)),
    "one-pixel gap": boxes(SHAPE, (1, 4, 4, 8, 8), (2, 4, 13, 8, 8)),
    "diagonal contact": boxes(SHAPE, (1, 2, 2, 5, 5), (2, 7, 7, 5, 5)),
    # Every border and corner: the windows leave the image there (SciPy repeats edge values).
    "at the borders": boxes(SHAPE, (1, 0, 0, 3, 4), (2, 0, W - 4, 3, 4), (3, H - 3, 0, 3, 4),
                            (4, H - 3, W - 4, 3, 4), (5, 0, 10, 2, 6), (6, H - 1, 10, 1, 6),
                            (7, 9, 0, 5, 1), (8, 9, W - 2, 5, 2), (9, 8, 12, 7, 7)),
    "touching at a border": boxes(SHAPE, (1, 0, 5, 4, 5), (2, 0, 10, 4, 5), (3, 10, W - 3, 5, 3),
                                  (4, 15, W - 3, 5, 3)),
    "single pixels": boxes(SHAPE, (1, 5, 5, 1, 1), (2, 0, 0, 1, 1), (3, H - 1, W - 1, 1, 1),
                           (4, 5, 7, 1, 1), (5, 12, 20, 1, 1), (6, 13, 21, 1, 1)),
    "large labels": boxes(SHAPE, (60000, 3, 3, 9, 9), (59999, 3, 12, 9, 9),
                          (2 ** 31 - 2, 14, 3, 6, 12), (1, 14, 15, 6, 6)),
    "one nucleus, whole image": np.full(SHAPE, 7, np.int32),
    "no nucleus": np.zeros(SHAPE, np.int32),
    "two discs": np.where(disc(SHAPE, (12, 10), 7), 1, np.where(disc(SHAPE, (12, 20), 6), 2, 0)
                          ).astype(np.int32),
}


@pytest.mark.parametrize("name", HAND_MADE)
def test_hand_made_labels(name):
    labels = HAND_MADE[name]
    expected = crops.instance_targets(labels)
    targets = crops.instance_targets_tf(tf.constant(labels))
    assert targets.dtype == tf.uint8 and targets.shape == (H, W, 3)
    assert np.array_equal(targets.numpy(), expected)


def test_hand_made_labels_show_every_target():
    """The cases above are not all background: each target channel is set somewhere, and the
    gap channel where two nuclei touch (so equality tests something)."""
    stacked = np.stack([crops.instance_targets(labels) for labels in HAND_MADE.values()])
    assert stacked.reshape(-1, 3).any(axis=0).tolist() == [True, True, True]
    assert crops.instance_targets(HAND_MADE["touching nuclei"])[..., 2].sum() > 0


def test_a_batch_equals_its_images():
    batch = np.stack(list(HAND_MADE.values()))
    targets = crops.instance_targets_tf(tf.constant(batch)).numpy()
    assert targets.shape == (len(HAND_MADE), H, W, 3)
    assert np.array_equal(targets, np.stack([crops.instance_targets(labels) for labels in batch]))


@pytest.fixture(scope="module")
def sample_labels():
    ids = data.list_ids(SAMPLE_TRAIN)[:6]
    _, labels = data.load_native(SAMPLE_TRAIN, ids)
    return labels


def test_sample_labels_whole_and_cropped(sample_labels):
    """Whole label images of the sample, and 64x80 crops at their corners and centre (nuclei
    cut by the crop's border, as in training crops)."""
    for labels in sample_labels:
        assert np.array_equal(crops.instance_targets_tf(tf.constant(labels)).numpy(),
                              crops.instance_targets(labels))
        h, w = labels.shape
        for top, left in [(0, 0), (0, w - 80), (h - 64, 0), (h - 64, w - 80),
                          ((h - 64) // 2, (w - 80) // 2)]:
            crop = labels[top:top + 64, left:left + 80]
            assert np.array_equal(crops.instance_targets_tf(tf.constant(crop)).numpy(),
                                  crops.instance_targets(crop))


def test_compiled_by_xla(sample_labels):
    compiled = tf.function(crops.instance_targets_tf, jit_compile=True)
    for batch in (np.stack(list(HAND_MADE.values())),
                  np.stack([labels[:64, :80] for labels in sample_labels])):
        targets = compiled(tf.constant(batch))
        assert targets.dtype == tf.uint8
        assert np.array_equal(targets.numpy(), np.stack([crops.instance_targets(b) for b in batch]))


def test_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        crops.instance_targets_tf(tf.zeros([2, 8, 8, 1], tf.int32))
