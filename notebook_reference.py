"""The notebook's own code, kept as the oracle the fast versions are checked and timed against.

`load_train_notebook` is the notebook's loading loop (one resize per mask, `np.maximum` merge)
with scikit-image 0.13's resize (no anti-aliasing); `iou_metric_notebook` is the Kaggle
kernel's histogram-based metric. Used by the tests and by `bench.py`, nowhere else.
"""
import os

import numpy as np
from skimage.io import imread
from skimage.measure import label
from skimage.transform import resize
from tqdm import tqdm


def load_train_notebook(train_dir, size=(128, 128), channels=3):
    ids = sorted(d for d in next(os.walk(train_dir))[1] if not d.startswith("."))
    X = np.zeros((len(ids), *size, channels), dtype=np.uint8)
    Y = np.zeros((len(ids), *size, 1), dtype=bool)
    for n, id_ in tqdm(enumerate(ids), total=len(ids)):
        path = os.path.join(train_dir, id_)
        img = imread(os.path.join(path, "images", id_ + ".png"))[:, :, :channels]
        X[n] = resize(img, size, mode="constant", preserve_range=True, anti_aliasing=False)
        mask = np.zeros((*size, 1), dtype=bool)
        for mask_file in next(os.walk(os.path.join(path, "masks")))[2]:
            mask_ = imread(os.path.join(path, "masks", mask_file))
            mask_ = np.expand_dims(resize(mask_, size, mode="constant", preserve_range=True,
                                          anti_aliasing=False), axis=-1)
            mask = np.maximum(mask, mask_)
        Y[n] = mask
    return X, Y, ids


def iou_metric_notebook(y_true_in, y_pred_in):
    labels = label(y_true_in > 0.5)
    y_pred = label(y_pred_in > 0.5)
    true_objects = len(np.unique(labels))
    pred_objects = len(np.unique(y_pred))
    intersection = np.histogram2d(labels.flatten(), y_pred.flatten(),
                                  bins=(true_objects, pred_objects))[0]
    area_true = np.histogram(labels, bins=true_objects)[0]
    area_pred = np.histogram(y_pred, bins=pred_objects)[0]
    area_true = np.expand_dims(area_true, -1)
    area_pred = np.expand_dims(area_pred, 0)
    union = area_true + area_pred - intersection
    intersection = intersection[1:, 1:]
    union = union[1:, 1:]
    union[union == 0] = 1e-9
    iou = intersection / union
    prec = []
    for t in np.arange(0.5, 1.0, 0.05):
        matches = iou > t
        tp = np.sum(np.sum(matches, axis=1) == 1)
        fp = np.sum(np.sum(matches, axis=0) == 0)
        fn = np.sum(np.sum(matches, axis=1) == 0)
        prec.append(tp / (tp + fp + fn) if (tp + fp + fn) > 0 else 0)
    return np.mean(prec)


def iou_metric_batch_notebook(y_true_in, y_pred_in):
    return np.array(np.mean([iou_metric_notebook(t, p) for t, p in zip(y_true_in, y_pred_in)]),
                    dtype=np.float32)
