"""Measure loading, the metric, the machine's compute bound, training throughput, the instance
recipe's training stream and both recipes' training steps.

python bench.py --train-dir ../shared/data/dsb2018/stage1_train     # the full set, ~3-4 minutes

In one run:

1. loading: the notebook's loop (one resize per mask) against data.load_train, cold and from
   the cache, and a check that both give the same arrays;
2. the metric: metrics.iou_metric_batch and metrics.my_iou_metric (TensorFlow, compiled by XLA)
   against the Kaggle kernel's on real masks and realistic predictions (eroded, dilated,
   shifted, speckled, empty), time per batch and equality;
3. the compute bound: TensorFlow's float32 matmul FLOP/s on this machine and the U-Net's FLOPs
   per image, hence the images/s training could reach if it ran at matmul speed;
4. training: train.py's model and settings (unet.build_unet(), batch size, validation split),
   steady-state epoch time, images/s and the fraction of the compute bound;
5. stream: the instance recipe's training stream alone (train.py's, on the training split), in
   crops a second on one CPU (a child process bound to it) and on all;
6. steps: training steps alone on fixed tensors, each compiled both ways (XLA and TensorFlow's
   plain graph): the instance recipe's (a batch of the stream) in float32 and, where the CPU has
   it, bfloat16, and the notebook recipe's; and the instance network on one 1024x1024 window as
   predict.py runs it, both ways in both precisions; with the path device.py chooses here
   (sections 3 to 6 are in bench_training.py, the own images below in bench_images.py).

python bench.py --sections stream steps    # only these (the notebook arrays from the cache)

python bench.py --own-image big.tif --model-path models/instance.keras   # alone, in its process

times one image as `predict.py --images` segments it: reading, the network (tiled above
config.WHOLE_PIXELS), the post-processing, and the process's peak memory;

python bench.py --make-mosaic mosaic_4096.tif --test-dir data/stage1_test

writes such an image: the test set's fluorescence images side by side, in 16 bits (a zarr
array when the name ends in .zarr, which --own-image then times block by block);

python bench.py --make-tiffs tiffs --test-dir data/stage1_test
python bench.py --workers-scaling tiffs --model-path models/instance.keras

time `predict.py --images` on a Dask LocalCluster: one worker process against two (one thread
each), and one process against --workers 2.

The results are printed as they come and again at the end as a Markdown table for the README.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_images
import bench_training
import config
import data
import device
import files
from bench_training import OtherCPU, other_cpu_note, say, timed

METRIC_BATCH = 16
SECTIONS = ("loading", "metric", "bound", "training", "stream", "steps")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=files.HelpFormatter)
    parser.add_argument("--train-dir", type=Path, default=config.TRAIN_PATH,
                        help="DSB2018 folder of <id>/images and <id>/masks")
    parser.add_argument("--epochs", type=int, default=3,
                        help="training epochs to time; the first (tracing) is excluded, so >= 2")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        metavar="SECTION",
                        help=f"measure only these ({', '.join(SECTIONS)}); without loading, "
                             "the arrays come from the cache")
    parser.add_argument("--own-image", type=Path, metavar="PATH",
                        help="instead, time one image of your own as `predict.py --images` "
                             "segments it (network and post-processing, seconds per megapixel) "
                             "and this process's peak memory")
    parser.add_argument("--model-path", type=Path, default=config.SHIPPED_MODEL,
                        help="the model for --own-image")
    parser.add_argument("--make-mosaic", type=Path, metavar="PATH",
                        help="instead, write a --mosaic-size square 16-bit TIFF of the "
                             "fluorescence images of --test-dir side by side (repeated until "
                             "it is full), the large image --own-image times")
    parser.add_argument("--mosaic-size", type=int, default=4096, metavar="PIXELS")
    parser.add_argument("--make-tiffs", type=Path, metavar="FOLDER",
                        help="instead, write the images of --test-dir as 16-bit TIFFs into "
                             "FOLDER, the folder --workers-scaling times")
    parser.add_argument("--workers-scaling", type=Path, metavar="FOLDER",
                        help="instead, time `predict.py --images FOLDER` on Dask: one worker "
                             "process of one thread against two, and one process against "
                             "--workers 2")
    parser.add_argument("--test-dir", type=Path, default=config.TEST_PATH,
                        help="the images of --make-mosaic")
    return parser.parse_args(argv)


# The Markdown table's rows, (part, measurement, value, rate), in the order they are measured.
ROWS = []


def row(part, measurement, value, rate=""):
    """One measurement: printed as it comes, and a row of the table printed at the end."""
    ROWS.append((part, measurement, value, rate))
    say(f"{measurement}: {value}" + (f" ({rate})" if rate else ""))


def quiet_load(train_dir, cache_dir):
    """data.load_train with its status line kept off stdout (its progress bar is on stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        return data.load_train(train_dir, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# 1. Loading


def bench_loading(train_dir):
    import notebook_reference as reference

    say("== 1. Loading " + "=" * 70)
    (Xn, Yn, idn), t_notebook = timed(reference.load_train_notebook, str(train_dir))
    row("Loading", "notebook loop (one resize per mask)", f"{t_notebook:.2f} s", "1x")
    (X, Y, ids), t_cold = timed(quiet_load, train_dir, None)
    row("Loading", "`data.load_train`, cold", f"{t_cold:.2f} s", f"{t_notebook / t_cold:.1f}x")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        _, t_build = timed(quiet_load, train_dir, cache_dir)
        (Xc, Yc, idc), t_cached = timed(quiet_load, train_dir, cache_dir)
    row("Loading", "`data.load_train`, building the cache", f"{t_build:.2f} s",
        f"{t_notebook / t_build:.1f}x")
    row("Loading", "`data.load_train`, from the cache", f"{t_cached:.3f} s",
        f"{t_notebook / t_cached:.0f}x")
    same = {
        "X": np.array_equal(Xn, X) and Xn.dtype == X.dtype,
        "Y": np.array_equal(Yn, Y) and Yn.dtype == Y.dtype,
        "ids": list(idn) == list(ids),
    }
    same_cache = (np.array_equal(X, Xc) and np.array_equal(Y, Yc) and list(ids) == list(idc))
    for name, ok in same.items():
        say(f"  {name:3s} notebook loop == data.load_train: {'identical' if ok else 'DIFFERENT'}")
    if not same["Y"] and Yn.shape == Y.shape:
        say(f"  Y differs in {int((Yn != Y).sum())} of {Y.size} pixels")
    say(f"  cached arrays == cold arrays: {'identical' if same_cache else 'DIFFERENT'}")
    say(f"  {len(ids)} images, X {X.shape} {X.dtype}, Y {Y.shape} {Y.dtype}, "
        f"nucleus pixels {Y.mean():.1%}")
    identical = all(same.values()) and same_cache
    row("Loading", "arrays (X, Y, ids) identical to the notebook loop's",
        "yes" if identical else "**NO**")
    return dict(X=X, Y=Y, ids=ids, identical=identical)


# ---------------------------------------------------------------------------------------------
# 2. Metric


def realistic_predictions(Y, seed=config.SEED):
    """Probability maps as a half-trained U-Net gives them: the true masks eroded, dilated,
    shifted, with false-positive speckles, or empty, smoothed so that the 0.5 threshold falls
    on a soft edge; float32 (N, H, W, 1) like Keras' y_pred."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    preds = np.empty(Y.shape, dtype=np.float32)
    kinds = ("exact", "eroded", "dilated", "shifted", "speckled", "empty")
    for n, truth in enumerate(Y[..., 0]):
        kind = kinds[n % len(kinds)]
        if kind == "exact":
            mask = truth
        elif kind == "eroded":
            mask = ndimage.binary_erosion(truth, iterations=1)
        elif kind == "dilated":
            mask = ndimage.binary_dilation(truth, iterations=2)
        elif kind == "shifted":
            mask = np.roll(truth, (2, -3), axis=(0, 1))
        elif kind == "speckled":
            mask = ndimage.binary_erosion(truth) | (rng.random(truth.shape) > 0.995)
            mask = ndimage.binary_dilation(mask)
        else:
            mask = np.zeros_like(truth)
        prob = ndimage.gaussian_filter(mask.astype(np.float32), sigma=1.0)
        prob += rng.normal(0, 0.05, prob.shape).astype(np.float32)
        preds[n, ..., 0] = np.clip(prob, 0, 1)
    return preds, kinds


def bench_metric(Y):
    import tensorflow as tf

    import metrics
    import notebook_reference as reference

    say("== 2. Metric " + "=" * 71)
    n_batches = len(Y) // METRIC_BATCH
    y_true = Y[:n_batches * METRIC_BATCH].astype(np.float32)
    y_pred, kinds = realistic_predictions(Y[:n_batches * METRIC_BATCH])
    batches = [(y_true[i:i + METRIC_BATCH], y_pred[i:i + METRIC_BATCH])
               for i in range(0, len(y_true), METRIC_BATCH)]
    # The tensors Keras hands the metric, already in TensorFlow.
    tensors = [(tf.constant(t), tf.constant(p)) for t, p in batches]
    # Warm up all three (imports, first-call allocations, XLA's compilation).
    metrics.iou_metric_batch(*batches[0])
    reference.iou_metric_batch_notebook(*batches[0])
    _, t_compile = timed(lambda: metrics.my_iou_metric(*tensors[0]).numpy())
    fast, t_fast = timed(lambda: [metrics.iou_metric_batch(t, p) for t, p in batches])
    slow, t_slow = timed(lambda: [reference.iou_metric_batch_notebook(t, p) for t, p in batches])
    compiled, t_compiled = timed(lambda: [metrics.my_iou_metric(t, p).numpy() for t, p in tensors])
    per_fast, per_slow = t_fast / n_batches * 1e3, t_slow / n_batches * 1e3
    per_compiled = t_compiled / n_batches * 1e3
    identical = all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, slow))
    compiled_identical = all(np.array_equal(a, b) and a.dtype == b.dtype
                             for a, b in zip(fast, compiled))
    per_image_same = all(
        metrics.iou_metric(t, p) == reference.iou_metric_notebook(t, p)
        for t, p in zip(y_true, y_pred))
    say(f"{n_batches} batches of {METRIC_BATCH} real {Y.shape[1]}x{Y.shape[2]} masks, "
        f"predictions: {', '.join(kinds)}")
    row("Metric", f"notebook metric, batch of {METRIC_BATCH}", f"{per_slow:.2f} ms", "1x")
    row("Metric", f"`metrics.iou_metric_batch`, batch of {METRIC_BATCH}", f"{per_fast:.2f} ms",
        f"{per_slow / per_fast:.1f}x")
    row("Metric", f"values identical ({n_batches} batches, every image)",
        "yes" if identical and per_image_same else "**NO**")
    row("Metric", f"`metrics.my_iou_metric` (TensorFlow, XLA; compiling took {t_compile:.1f} s),"
        f" batch of {METRIC_BATCH}", f"{per_compiled:.2f} ms", f"{per_slow / per_compiled:.1f}x")
    row("Metric", f"its values identical to `metrics.iou_metric_batch`'s ({n_batches} batches)",
        "yes" if compiled_identical else "**NO**")
    say(f"mean score {np.mean(fast):.4f}")
    return dict(compiled_identical=compiled_identical, identical=identical and per_image_same)


def markdown(train_dir, n_images, others):
    """The rows measured (ROWS) as one Markdown table."""
    lines = [f"Benchmark: `{train_dir}`, {n_images} images, {os.cpu_count()} CPUs "
             f"({device.cpu_name() or 'CPU unknown'}).", "",
             "| Part | Measurement | Value | Speed-up / rate |", "|---|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ROWS]
    return "\n".join(lines + ["", others])


def main(argv=None):
    args = parse_args(argv)
    if args.make_mosaic:
        return bench_images.make_mosaic(args.test_dir, args.make_mosaic, args.mosaic_size)
    if args.make_tiffs:
        return bench_images.make_tiffs(args.test_dir, args.make_tiffs)
    if args.workers_scaling:
        return bench_images.bench_workers(args.workers_scaling, args.model_path)
    if args.own_image:
        with files.one_line_warnings():
            try:
                return bench_images.bench_own_image(args.own_image, args.model_path)
            except files.InputError as error:
                sys.exit(f"error: {error}")
    if args.epochs < 1:
        sys.exit("error: --epochs must be at least 1")
    others, start = OtherCPU(), time.perf_counter()
    sections, checks = set(args.sections), []
    try:
        if "loading" in sections:
            loading = bench_loading(args.train_dir)
            X, Y, ids = loading["X"], loading["Y"], loading["ids"]
            checks.append(loading["identical"])
        else:
            X, Y, ids = quiet_load(args.train_dir, config.CACHE_DIR)
        if "metric" in sections:
            metric = bench_metric(Y)
            checks += [metric["identical"], metric["compiled_identical"]]
        if "bound" in sections or "training" in sections:
            bound = bench_training.bench_bound(row)["bound"]
        if "training" in sections:
            bench_training.bench_training(X, Y, args.train_dir, args.epochs, bound, row)
        if "stream" in sections or "steps" in sections:  # the steps train on its batch
            instance_batch = bench_training.bench_stream(args.train_dir, row)
        if "steps" in sections:
            bench_training.bench_steps(X, Y, instance_batch, row)
    except files.InputError as error:
        sys.exit(f"error: {error}")
    note = other_cpu_note(others.seconds(), time.perf_counter() - start) + " (whole run)"
    say()
    say(markdown(args.train_dir, len(ids), note))
    if not all(checks):
        sys.exit("error: the fast loader or a metric differs from the notebook's")


if __name__ == "__main__":
    main()
