"""Training speed and the network's, for bench.py: the machine's compute bound, the notebook
recipe's epochs, the instance recipe's training stream alone (on one CPU and on all), and training
steps and the prediction window on both compute paths and in both precisions. Each measurement
goes to the `row` it is given (bench.row: printed, and a row of the final table)."""
import contextlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import config
import data
import train

# The stream's batches timed after its warm-up batches (tracing, XLA's compilation, starting
# the threads), and the training steps timed.
STREAM_BATCHES = 150
STREAM_WARM_UP = 10
STEPS = 10
# The width bench_steps times beside the recipe's 16 (c1's filters).
WIDE_FILTERS = 24
# The prediction window timed, and its repeats.
WINDOW = 1024
WINDOW_REPEATS = 4
# Matmul size for the compute bound: large enough to run at the machine's peak.
MATMUL_N = 4096
MATMUL_REPEATS = 5


def say(text=""):
    print(text, flush=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


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


def other_cpu_note(seconds, wall):
    if seconds is None:
        return "CPU use by other processes: unknown"
    note = (f"CPU used by other processes: {seconds:.1f} CPU-seconds in {wall:.0f} s "
            f"({seconds / wall / os.cpu_count():.0%} of the machine)")
    return note + (" - the timings are slowed by them" if seconds > 0.05 * wall * os.cpu_count()
                   else "")


# The compute bound


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


def bench_bound(row):
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


# The notebook recipe's training epochs


def bench_training(X, Y, train_dir, epochs, bound, row):
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


# The instance recipe's training stream


def stream_rate(train_dir, batches=STREAM_BATCHES):
    """train.py's instance-recipe stream alone, as train.py builds it: crops a second after
    its warm-up batches (tracing, XLA's compilation, starting the threads), the number of
    training images, and the first batch."""
    import argparse as arguments

    recipe = config.RECIPES["instance"]
    with contextlib.redirect_stdout(sys.stderr):
        stream, n_train, _, _ = train.load_instance_data(
            arguments.Namespace(train_dir=train_dir, extra_train_dir=[], seed=config.SEED), recipe)
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
    code = "import sys, bench_training; print(bench_training.stream_rate(sys.argv[1])[0])"
    cpus = os.sched_getaffinity(0)
    child = subprocess.run([sys.executable, "-c", code, os.path.abspath(train_dir)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
                           preexec_fn=lambda: os.sched_setaffinity(0, [min(cpus)]))
    if child.returncode:
        raise RuntimeError(f"the one-CPU stream failed:\n{child.stderr[-2000:]}")
    return float(child.stdout.split()[-1])


def bench_stream(train_dir, row):
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


# Training steps alone, on fixed tensors


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


def bench_steps(X, Y, instance_batch, row):
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
    # What capacity costs: the step of the recipe widened (`--set filters=24`) on train.py's path.
    keras.mixed_precision.set_global_policy(train_path.policy)
    keras.utils.set_random_seed(config.SEED)
    wide = unet.build_unet(recipe={**recipe, "filters": WIDE_FILTERS}, steps=100,
                           jit=train_path.jit)
    seconds = time_steps(wide, x, y)
    row("Steps", f"instance recipe, --set filters={WIDE_FILTERS} ({wide.count_params():,} "
        f"parameters), {train_path.policy}, {paths[chosen['train'][1]]}",
        f"{seconds * 1e3:.0f} ms", f"{seconds / steps[chosen['train']]:.2f}x the recipe's")
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
