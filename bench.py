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
   predict.py runs it, both ways in both precisions; with the path device.py chooses here.

python bench.py --sections stream steps    # only these (the notebook arrays from the cache)

python bench.py --own-image big.tif --model-path models/instance.keras   # alone, in its process

times one image as `predict.py --images` segments it: reading, the network (tiled above
config.WHOLE_PIXELS), the post-processing, and the process's peak memory;

python bench.py --make-mosaic mosaic_4096.tif --test-dir data/stage1_test

writes such an image: the test set's fluorescence images side by side, in 16 bits.

The results are printed as they come and again at the end as a Markdown table for the README.
"""
import argparse
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import config
import data
import files
import imagefiles
import train

# Matmul size for the compute bound: large enough to run at the machine's peak.
MATMUL_N = 4096
MATMUL_REPEATS = 5
METRIC_BATCH = 16
# The stream's batches timed after its warm-up batches (tracing, XLA's compilation, starting
# the threads), and the training steps timed.
STREAM_BATCHES = 150
STREAM_WARM_UP = 10
STEPS = 10
# The prediction window timed, and its repeats.
WINDOW = 1024
WINDOW_REPEATS = 4
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
    parser.add_argument("--test-dir", type=Path, default=config.TEST_PATH,
                        help="the images of --make-mosaic")
    return parser.parse_args(argv)


def say(text=""):
    print(text, flush=True)


# The Markdown table's rows, (part, measurement, value, rate), in the order they are measured.
ROWS = []


def row(part, measurement, value, rate=""):
    """One measurement: printed as it comes, and a row of the table printed at the end."""
    ROWS.append((part, measurement, value, rate))
    say(f"{measurement}: {value}" + (f" ({rate})" if rate else ""))


class OtherCPU:
    """CPU seconds that other processes (not this one's children) used since the start: the
    timings are only this machine's speed when it stays near 0 (on Linux; None elsewhere)."""

    def __init__(self):
        self.start = self._others()

    @staticmethod
    def _others():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
        own = os.times()
        return busy - own.user - own.system - own.children_user - own.children_system

    def seconds(self):
        now = self._others()
        return None if now is None or self.start is None else max(now - self.start, 0.0)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def quiet_load(train_dir, cache_dir):
    """data.load_train with its status line kept off stdout (its progress bar is on stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        return data.load_train(train_dir, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# 1. Loading


def bench_loading(train_dir):
    from tests import reference

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
    from tests import reference

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


# ---------------------------------------------------------------------------------------------
# 3. Compute bound


def matmul_flops(dtype_name="float32", n=MATMUL_N, repeats=MATMUL_REPEATS):
    """Best-of-`repeats` FLOP/s of an n x n @ n x n matmul with TensorFlow, after a warm-up."""
    import tensorflow as tf

    dtype = getattr(tf, dtype_name)
    a = tf.cast(tf.random.normal((n, n), seed=1), dtype)
    b = tf.cast(tf.random.normal((n, n), seed=2), dtype)

    @tf.function
    def step(a, b):
        # One element out, so that only the matmul's time is measured, not a copy to NumPy.
        return tf.matmul(a, b)[0, 0]

    step(a, b).numpy()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        step(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def model_flops(model):
    """Forward FLOPs per image of the model's convolutions (a multiply-add is 2 FLOPs).

    Conv2D: 2*kh*kw*cin*cout*Hout*Wout. Conv2DTranspose: every input pixel is multiplied by the
    whole kh*kw*cin*cout kernel, 2*kh*kw*cin*cout*Hin*Win (= 2*cin*cout*Hout*Wout for the U-Net's
    kernel 2, stride 2). Biases, ELU, dropout, pooling, concatenation and the loss are left out
    (they are O(activations), not O(activations x channels)).
    """
    import keras

    total, rows = 0, []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, cin = layer.input.shape
        elif isinstance(layer, keras.layers.Conv2D):
            cin = layer.input.shape[-1]
            _, h, w, _ = layer.output.shape
        else:
            continue
        kh, kw = layer.kernel_size
        flops = 2 * kh * kw * cin * layer.filters * h * w
        rows.append((layer.name, flops))
        total += flops
    return total, rows


def bench_bound():
    import unet

    say("== 3. Compute bound " + "=" * 64)
    f32 = matmul_flops("float32")
    bf16 = matmul_flops("bfloat16")
    model = unet.build_unet()
    forward, _ = model_flops(model)
    train_per_image = 3 * forward
    bound = f32 / train_per_image
    matmul = f"TensorFlow matmul {MATMUL_N}x{MATMUL_N}, best of {MATMUL_REPEATS}"
    row("Bound", f"{matmul}, float32", f"{f32 / 1e9:.1f} GFLOP/s")
    row("Bound", f"{matmul}, bfloat16", f"{bf16 / 1e9:.1f} GFLOP/s")
    row("Bound", f"U-Net ({model.count_params():,} parameters) forward FLOPs per image "
        "(convolutions, multiply-add = 2 FLOPs)", f"{forward / 1e9:.3f} GFLOP")
    row("Bound", "training FLOPs per image (3 x forward: forward, input and weight gradients)",
        f"{train_per_image / 1e9:.3f} GFLOP")
    row("Bound", "compute-bound training speed (float32)", f"{bound:.1f} images/s")
    return dict(bound=bound)


# ---------------------------------------------------------------------------------------------
# 4. Training


def bench_training(X, Y, train_dir, epochs, bound):
    import keras

    import unet

    say("== 4. Training " + "=" * 69)
    split = data.split_index(len(X), train_dir)
    X_train, Y_train, X_val, Y_val = X[:split], Y[:split], X[split:], Y[split:]

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.validation = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            self.validation = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            end = time.perf_counter()
            train_part = (self.validation or end) - self.start
            logs = dict(logs or {})
            self.rows.append((end - self.start, train_part, logs))
            say(f"epoch {epoch + 1}: {end - self.start:6.2f} s (training part "
                f"{train_part:6.2f} s, {len(X_train) / train_part:5.1f} images/s)  "
                + "  ".join(f"{k} {v:.4f}" for k, v in logs.items()))

    keras.utils.set_random_seed(config.SEED)
    model = unet.build_unet()
    timer = EpochTimer()
    others = OtherCPU()
    say(f"unet.build_unet(), batch size {config.BATCH_SIZE}, {len(X_train)} training and "
        f"{len(X_val)} validation images, {epochs} epochs")
    model.fit(train.training_dataset(X_train, Y_train.astype("float32"), config.BATCH_SIZE,
                                     config.SEED),
              steps_per_epoch=math.ceil(len(X_train) / config.BATCH_SIZE),
              validation_data=(X_val, Y_val), batch_size=config.BATCH_SIZE, epochs=epochs,
              shuffle=False, verbose=0, callbacks=[timer])
    row("Training", f"first epoch (includes tracing), batch {config.BATCH_SIZE}, "
        f"{len(X_train)} training / {len(X_val)} validation images", f"{timer.rows[0][0]:.2f} s")
    steady = timer.rows[1:]
    if steady:
        epoch_time = float(np.mean([r[0] for r in steady]))
        train_time = float(np.mean([r[1] for r in steady]))
        best_train = min(r[1] for r in steady)
        row("Training", f"steady-state epoch (epochs 2-{len(timer.rows)}, mean), with "
            "validation", f"{epoch_time:.2f} s", f"{len(X_train) / epoch_time:.1f} images/s")
        row("Training", "steady-state epoch, training part", f"{train_time:.2f} s",
            f"{len(X_train) / train_time:.1f} images/s")
        row("Training", "training speed / compute bound",
            f"{len(X_train) / train_time / bound:.0%}")
        row("Training", "fastest steady-state epoch, training part", f"{best_train:.2f} s",
            f"{len(X_train) / best_train:.1f} images/s")
    else:
        say("only one epoch: no steady-state time (the first includes tracing); use --epochs 2+")
    say(other_cpu_note(others.seconds(), sum(r[0] for r in timer.rows)) + " (training)")


# ---------------------------------------------------------------------------------------------
# 5. The instance recipe's training stream


def stream_rate(train_dir, batches=STREAM_BATCHES):
    """train.py's instance-recipe stream alone, as train.py builds it: crops a second after
    its warm-up batches (tracing, XLA's compilation, starting the threads), the number of
    training images, and the first batch."""
    import argparse as arguments

    recipe = config.RECIPES["instance"]
    with contextlib.redirect_stdout(sys.stderr):
        stream, n_train, _, _ = train.load_instance_data(
            arguments.Namespace(train_dir=train_dir, seed=config.SEED), recipe)
    batches_of = iter(stream(recipe["batch_size"]))
    first = [next(batches_of) for _ in range(STREAM_WARM_UP)][0]
    _, seconds = timed(lambda: [next(batches_of) for _ in range(batches)])
    return batches * recipe["batch_size"] / seconds, n_train, first


def one_cpu_stream_rate(train_dir):
    """stream_rate in a child process bound to one CPU, every thread of it: tf.data's thread
    options do not bind the threads of XLA's compiled crops, nor its prefetching. None where
    the system cannot bind a process (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    code = "import sys, bench; print(bench.stream_rate(sys.argv[1])[0])"
    cpus = os.sched_getaffinity(0)
    child = subprocess.run([sys.executable, "-c", code, os.path.abspath(train_dir)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
                           preexec_fn=lambda: os.sched_setaffinity(0, [min(cpus)]))
    if child.returncode:
        raise RuntimeError(f"the one-CPU stream failed:\n{child.stderr[-2000:]}")
    return float(child.stdout.split()[-1])


def bench_stream(train_dir):
    """The stream's crops a second on one CPU (a bound child process) and on all of them.
    Returns the rates and one batch, the fixed tensors of the training step."""
    say("== 5. Instance stream " + "=" * 62)
    recipe = config.RECIPES["instance"]
    one_cpu = one_cpu_stream_rate(train_dir)
    all_cpus, n_train, first = stream_rate(train_dir)
    crops = f"instance recipe's crops, {n_train} training images, {recipe['crop']}x{recipe['crop']}"
    row("Stream", f"{crops}, one CPU", f"{one_cpu:.1f} crops/s" if one_cpu else
        "not measured (this system cannot bind a process to one CPU)")
    row("Stream", f"the same, all {os.cpu_count()} CPUs", f"{all_cpus:.1f} crops/s",
        f"{all_cpus / one_cpu:.2f}x" if one_cpu else "")
    return first


# ---------------------------------------------------------------------------------------------
# 6. Training steps alone, on fixed tensors


def time_steps(model, x, y, steps=STEPS):
    """Seconds per training step (train_on_batch) after two warm-up steps (compilation)."""
    for _ in range(2):
        model.train_on_batch(x, y)
    _, seconds = timed(lambda: [model.train_on_batch(x, y) for _ in range(steps)])
    return seconds / steps


def window_seconds(model, compute, window=WINDOW, repeats=WINDOW_REPEATS):
    """Seconds per call of nuclei.Network on one window x window input, after one warm-up call
    (tracing, compilation)."""
    import nuclei

    network = nuclei.Network(model, compute)
    x = np.random.default_rng(0).random((1, window, window, model.input_shape[-1]),
                                        dtype=np.float32)
    network(x)
    _, seconds = timed(lambda: [network(x) for _ in range(repeats)])
    return seconds / repeats


def bench_steps(X, Y, instance_batch):
    """Both paths (XLA and the plain graph) of: the instance recipe's training step on one batch
    of the stream, in float32 and (where the CPU has it) bfloat16; the notebook recipe's step
    on its first 16 images with its metric; and the instance network on one 1024x1024 window
    at prediction, in both precisions. Also which path train.py and predict.py choose here
    (device.py's rule) and how far it is from the fastest."""
    import keras

    import device
    import unet

    say("== 6. Training steps and the prediction window, both paths " + "=" * 25)
    recipe = config.RECIPES["instance"]
    policies = ["float32"] + (["mixed_bfloat16"] if device.cpu_has_bfloat16() else [])
    paths = {True: "XLA", False: "plain graph"}
    train_path = device.training_compute("auto", True, False)
    predict_path = device.prediction_compute("auto")
    chosen = {"train": (train_path.policy, train_path.jit is not False),
              "predict": (predict_path.policy, predict_path.jit is not False)}
    x, y = instance_batch
    steps, windows = {}, {}
    for policy in policies:
        for jit in paths:
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(config.SEED)
            model = unet.build_unet(recipe=recipe, steps=100, jit=jit)
            seconds = steps[policy, jit] = time_steps(model, x, y)
            mark = " (train.py's)" if chosen["train"] == (policy, jit) else ""
            row("Steps", f"instance recipe, batch of {x.shape[0]} crops {x.shape[1]}x{x.shape[2]}, "
                f"{policy}, {paths[jit]}{mark}", f"{seconds * 1e3:.0f} ms",
                f"{x.shape[0] / seconds:.1f} crops/s")
    keras.mixed_precision.set_global_policy("float32")
    model = unet.build_unet(recipe=recipe)
    for policy in policies:
        for jit in paths:
            seconds = windows[policy, jit] = window_seconds(model,
                                                            device.Compute(jit, policy, "bench"))
            mark = " (predict.py's)" if chosen["predict"] == (policy, jit) else ""
            row("Window", f"instance network, one {WINDOW}x{WINDOW} window, {policy}, "
                f"{paths[jit]}{mark}", f"{seconds:.2f} s",
                f"{WINDOW ** 2 / 1e6 / seconds:.1f} MP/s")
    x, y = X[:config.BATCH_SIZE], Y[:config.BATCH_SIZE].astype("float32")
    for jit in paths:
        keras.utils.set_random_seed(config.SEED)
        seconds = time_steps(unet.build_unet(jit=jit), x, y)
        row("Steps", f"notebook recipe, batch of {len(x)}, float32, metric compiled by XLA, "
            f"{paths[jit]}", f"{seconds * 1e3:.0f} ms")
    fastest = min(steps[policies[-1], jit] for jit in paths)
    say(f"train.py's instance step here: {train_path.describe()}; "
        f"{steps[chosen['train']] / fastest:.2f}x the faster path in {policies[-1]}")
    say(f"predict.py's network here: {predict_path.describe()}; "
        f"{windows[chosen['predict']] / min(windows.values()):.2f}x the fastest")


# ---------------------------------------------------------------------------------------------


def other_cpu_note(seconds, wall):
    if seconds is None:
        return "CPU use by other processes: unknown"
    note = (f"CPU used by other processes: {seconds:.1f} CPU-seconds in {wall:.0f} s "
            f"({seconds / wall / os.cpu_count():.0%} of the machine)")
    return note + (" - the timings are slowed by them" if seconds > 0.05 * wall * os.cpu_count()
                   else "")


def markdown(train_dir, n_images, others):
    """The rows measured (ROWS) as one Markdown table."""
    lines = [f"Benchmark: `{train_dir}`, {n_images} images, {os.cpu_count()} CPUs "
             f"({device_name()}).", "",
             "| Part | Measurement | Value | Speed-up / rate |", "|---|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ROWS]
    return "\n".join(lines + ["", others])


def device_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and its bfloat16 and AVX-512 flags, as /proc/cpuinfo gives them."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return "CPU unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "CPU unknown")
    flags = set(text.split())
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model}, {' '.join(shown) or 'no AVX2'}"


def make_mosaic(test_dir, path, size):
    """The fluorescence images of `test_dir` (grey, in id order, x 257 to 16 bits) packed in
    rows into a size x size image, repeated until it is full; the rest of a row stays black."""
    import tifffile

    ids = data.list_ids(test_dir)
    images, _ = data.load_native(test_dir, ids, with_labels=False)
    greys = [image.mean(axis=2).astype(np.uint16) * 257 for image in images
             if data.image_kind(image) == "fluorescence"]
    mosaic = np.zeros((size, size), np.uint16)
    top = left = row_height = placed = 0
    for grey in (greys[n % len(greys)] for n in range(10 ** 6)):
        height, width = grey.shape
        if left + width > size:
            top, left, row_height = top + row_height, 0, 0
        if top + height > size:
            break
        mosaic[top:top + height, left:left + width] = grey
        left, row_height, placed = left + width, max(row_height, height), placed + 1
    tifffile.imwrite(path, mosaic, compression="zlib")
    say(f"{path}: {size}x{size}, {placed} placements of {len(greys)} fluorescence images of "
        f"{test_dir}")


def bench_own_image(path, model_path):
    """Seconds per megapixel of the network and of the post-processing for one image, nuclei
    found, and the peak resident memory of this process (Linux reports it in KiB)."""
    import resource

    import checkpoints
    import device
    import nuclei

    model, recipe = checkpoints.load_unet(model_path), checkpoints.read_recipe(model_path)
    started = time.perf_counter()
    pixels = imagefiles.read_pixels(path)
    image = imagefiles.scaled_image(pixels)
    read = time.perf_counter() - started
    x = data.native_input(image, recipe)
    compute = device.prediction_compute("auto")
    say(f"Prediction: {compute.describe()}")
    prob, network = timed(nuclei.predict_tiled, nuclei.Network(model, compute), x, recipe["tta"])
    labels, post = timed(nuclei.nuclei_labels, prob, image.shape[:2], recipe)
    megapixels = image.shape[0] * image.shape[1] / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    say(f"{path}: {image.shape[1]}x{image.shape[0]} ({megapixels:.1f} MP), {labels.max():,} "
        f"nuclei; reading {read:.1f} s, network {network:.1f} s ({network / megapixels:.2f} "
        f"s/MP, tta={recipe['tta']}), post-processing {post:.1f} s ({post / megapixels:.2f} "
        f"s/MP), together {(network + post) / megapixels:.2f} s/MP; peak memory {peak:.2f} GB")


def main(argv=None):
    args = parse_args(argv)
    if args.make_mosaic:
        return make_mosaic(args.test_dir, args.make_mosaic, args.mosaic_size)
    if args.own_image:
        with files.one_line_warnings():
            try:
                return bench_own_image(args.own_image, args.model_path)
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
            bound = bench_bound()["bound"]
        if "training" in sections:
            bench_training(X, Y, args.train_dir, args.epochs, bound)
        if "stream" in sections or "steps" in sections:  # the steps train on its batch
            instance_batch = bench_stream(args.train_dir)
        if "steps" in sections:
            bench_steps(X, Y, instance_batch)
    except files.InputError as error:
        sys.exit(f"error: {error}")
    note = other_cpu_note(others.seconds(), time.perf_counter() - start) + " (whole run)"
    say()
    say(markdown(args.train_dir, len(ids), note))
    if not all(checks):
        sys.exit("error: the fast loader or a metric differs from the notebook's")


if __name__ == "__main__":
    main()
