"""Predict with a trained U-Net: image / mask / prediction triptychs, the DSB2018 metric on the
validation split, and a Kaggle submission CSV for the test images.

python predict.py            # headless: PNGs and submission.csv in --out-dir
python predict.py --show     # also open the triptychs in windows
"""
import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np

import config
import data


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-path", type=Path, default=config.MODEL_PATH,
                        help="model written by train.py (.keras, loaded in safe mode)")
    parser.add_argument("--train-dir", type=Path, default=config.TRAIN_PATH,
                        help="the folder the model was trained on (its last 10%% is validation)")
    parser.add_argument("--test-dir", type=Path, default=config.TEST_PATH,
                        help="DSB2018 folder of test images (no masks needed)")
    parser.add_argument("--out-dir", type=Path, default=config.OUT_DIR,
                        help="where the triptychs and submission.csv go")
    parser.add_argument("--threshold", type=float, default=config.THRESHOLD,
                        help="probability above which a pixel is nucleus")
    parser.add_argument("--seed", type=int, default=config.SEED,
                        help="picks the sample images shown")
    parser.add_argument("--show", action="store_true", help="open the triptychs in windows")
    parser.add_argument("--no-cache", action="store_true",
                        help=f"always decode the PNGs instead of using {config.CACHE_DIR}")
    return parser.parse_args(argv)


def rle_encoding(mask):
    """Kaggle's run-length encoding of a 2-D mask: pixels numbered from 1, top to bottom then
    left to right, as "start length" pairs."""
    pixels = np.concatenate([[False], np.asarray(mask, dtype=bool).T.ravel(), [False]])
    edges = np.flatnonzero(pixels[1:] != pixels[:-1])
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{start + 1} {end - start}" for start, end in zip(starts, ends))


def submission_rows(preds_test, sizes_test, test_ids, threshold):
    """(ImageId, EncodedPixels) rows: each prediction resized back to its image's size, one row
    per connected component; an image with no nucleus gets one row with no pixels."""
    from skimage.measure import label

    rows = []
    for pred, (height, width), id_ in zip(preds_test, sizes_test, test_ids):
        labels = label(data.resize_2018(np.squeeze(pred, axis=-1), (height, width)) > threshold)
        rows.extend((id_, rle_encoding(labels == n)) for n in range(1, labels.max() + 1))
        if labels.max() == 0:
            rows.append((id_, ""))
    return rows


def write_atomic(path, write):
    """Call write(tmp) then rename, so that a crash never leaves a half-written earlier output."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def save_triptych(plt, image, mask, prediction, title, path):
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, picture, name in zip(axes, (image, mask, prediction), ("Image", "Mask", "Prediction")):
        ax.imshow(np.squeeze(picture), cmap="gray")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    print(f"Wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    try:
        predict(args)
    except data.InputError as error:
        sys.exit(f"error: {error}")


def predict(args):
    cache_dir = None if args.no_cache else config.CACHE_DIR
    X, Y, ids = data.load_train(args.train_dir, cache_dir=cache_dir)
    X_test, sizes_test, test_ids = data.load_test(args.test_dir, cache_dir=cache_dir)
    split = data.split_index(len(X), args.train_dir)

    import matplotlib
    if not args.show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import unet

    model = unet.load_unet(args.model_path)
    # The first 90% was used for training, the last 10% for validation.
    preds_train = model.predict(X[:split], verbose=1)
    preds_val = model.predict(X[split:], verbose=1)
    preds_test = model.predict(X_test, verbose=1)
    preds_train_t = preds_train > args.threshold
    preds_val_t = preds_val > args.threshold

    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ix, iv = rng.randrange(split), split + rng.randrange(len(X) - split)
    save_triptych(plt, X[ix], Y[ix], preds_train_t[ix], f"train: {ids[ix]}",
                  args.out_dir / "train_sample.png")
    save_triptych(plt, X[iv], Y[iv], preds_val_t[iv - split], f"validation: {ids[iv]}",
                  args.out_dir / "val_sample.png")

    print(f"\nDSB2018 metric of validation image {ids[iv]}:")
    unet.iou_metric(Y[iv], preds_val_t[iv - split], print_table=True)
    print(f"\nMean DSB2018 metric: train {unet.iou_metric_batch(Y[:split], preds_train_t):.4f} "
          f"({split} images), validation {unet.iou_metric_batch(Y[split:], preds_val_t):.4f} "
          f"({len(X) - split} images)")

    import pandas as pd

    rows = submission_rows(preds_test, sizes_test, test_ids, args.threshold)
    submission = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])
    csv_path = args.out_dir / "submission.csv"
    write_atomic(csv_path, lambda tmp: submission.to_csv(tmp, index=False))
    print(f"Wrote {csv_path}: {len(submission)} nuclei in {len(test_ids)} test images")
    if args.show:
        plt.show()


if __name__ == "__main__":
    main()
