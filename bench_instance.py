"""The instance recipe's speed and prediction's, for bench.py: the training stream alone (on one
CPU and on all), training steps and the prediction window on both compute paths and in both
precisions, and one large image of one's own as `predict.py --images` segments it (with the
mosaic that makes such an image from the test set). Each measurement goes to the `row` it is
given (bench.row: printed, and a row of the final table)."""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import config
import data
import imagefiles
import train

# The stream's batches timed after its warm-up batches (tracing, XLA's compilation, starting
# the threads), and the training steps timed.
STREAM_BATCHES = 150
STREAM_WARM_UP = 10
STEPS = 10
# The prediction window timed, and its repeats.
WINDOW = 1024
WINDOW_REPEATS = 4


def say(text=""):
    print(text, flush=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


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
    code = "import sys, bench_instance; print(bench_instance.stream_rate(sys.argv[1])[0])"
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


# Images of one's own


def make_mosaic(test_dir, path, size):
    """The fluorescence images of `test_dir` (grey, in id order, x 257 to 16 bits) packed in
    rows into a size x size image, repeated until it is full; the rest of a row stays black.
    A TIFF, or a zarr array in blocks of config.BLOCK when `path` ends in .zarr."""
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
    if Path(path).suffix == ".zarr":
        import zarr

        zarr.create_array(str(path), shape=mosaic.shape, chunks=(config.BLOCK, config.BLOCK),
                          dtype=mosaic.dtype)[:] = mosaic
    else:
        tifffile.imwrite(path, mosaic, compression="zlib")
    say(f"{path}: {size}x{size}, {placed} placements of {len(greys)} fluorescence images of "
        f"{test_dir}")


def bench_own_image(path, model_path):
    """Seconds per megapixel for one image as `predict.py --images` segments it, nuclei found,
    and the peak resident memory of this process (Linux reports it in KiB): in memory, the
    network and the post-processing apart; block by block (blocks.is_block_wise), the whole of
    blocks.segment_large, reading and writing included."""
    import resource

    import blocks
    import checkpoints
    import device
    import nuclei

    model, recipe = checkpoints.load_unet(model_path), checkpoints.read_recipe(model_path)
    compute = device.prediction_compute("auto")
    say(f"Prediction: {compute.describe()}")
    if blocks.is_block_wise(path):
        return bench_block_wise(path, nuclei.Predictor(model, recipe, compute))
    started = time.perf_counter()
    pixels = imagefiles.read_pixels(path)
    image = imagefiles.scaled_image(pixels)
    read = time.perf_counter() - started
    x = data.native_input(image, recipe)
    prob, network = timed(nuclei.predict_tiled, nuclei.Network(model, compute), x, recipe["tta"])
    labels, post = timed(nuclei.nuclei_labels, prob, image.shape[:2], recipe)
    megapixels = image.shape[0] * image.shape[1] / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    say(f"{path}: {image.shape[1]}x{image.shape[0]} ({megapixels:.1f} MP), {labels.max():,} "
        f"nuclei; reading {read:.1f} s, network {network:.1f} s ({network / megapixels:.2f} "
        f"s/MP, tta={recipe['tta']}), post-processing {post:.1f} s ({post / megapixels:.2f} "
        f"s/MP), together {(network + post) / megapixels:.2f} s/MP; peak memory {peak:.2f} GB")


def bench_block_wise(path, predictor):
    import argparse
    import resource
    import tempfile

    import blocks

    with tempfile.TemporaryDirectory(prefix="bench-blocks-") as out:
        outputs = {"zarr": Path(out) / "labels.zarr", "labels": Path(out) / "labels.tif"}
        options = argparse.Namespace(channel=None, diameter=None, pixel_size=None)
        (shape, count, _, cut, _, _), seconds = timed(
            blocks.segment_large, lambda: predictor, predictor.recipe, path, outputs, options)
    megapixels = shape[0] * shape[1] / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    say(f"{path}: {shape[1]}x{shape[0]} ({megapixels:.1f} MP), block by block "
        f"({config.BLOCK}-pixel blocks, {config.BLOCK_OVERLAP} overlap), {count:,} nuclei, "
        f"{cut} clumps cut; {seconds:.1f} s, {seconds / megapixels:.2f} s/MP (reading, "
        f"network with tta={predictor.recipe['tta']}, post-processing and writing); peak "
        f"memory {peak:.2f} GB")


def make_tiffs(test_dir, folder):
    """The images of `test_dir` as 16-bit TIFFs (x 257), the own-image folder the scaling of
    --workers is measured on."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = data.list_ids(test_dir)
    for id_ in ids:
        image = imagefiles.read_image(Path(test_dir) / id_ / "images" / f"{id_}.png")
        tifffile.imwrite(folder / f"{id_}.tif", image.astype(np.uint16) * 257)
    say(f"{folder}: {len(ids)} 16-bit TIFFs of {test_dir}")


def load_model(predictor_args):
    """A Dask worker's Predictor, made (own_images.worker_predictor keeps it)."""
    import own_images

    own_images.worker_predictor(*predictor_args)


def bench_workers(folder, model_path):
    """The images of `folder` segmented (a) on LocalClusters of one and of two worker
    processes of one thread each (TensorFlow limited to one thread), in images a second once
    every worker has loaded the model; and (b) by `predict.py --images` in one process and with
    `--workers 2`, in seconds from start to end."""
    import argparse
    import tempfile

    from distributed import Client, LocalCluster

    import checkpoints
    import own_images
    import predict

    recipe = checkpoints.read_recipe(model_path)
    images = own_images.image_files([Path(folder)], False)
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as out, \
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             dashboard_address=None) as cluster, Client(cluster) as client:
            options = argparse.Namespace(out_dir=Path(out), channel=None, pixel_size=None,
                                         diameter=None, block_size=config.BLOCK)
            args = (Path(model_path).resolve(), recipe, "auto", "auto", 1)
            client.run(load_model, args)  # each worker's start-up and model, not timed
            started = time.perf_counter()
            futures = client.map(own_images.segment_task, [p.resolve() for p, _ in images],
                                 [n for _, n in images], options=options, scale=1.0,
                                 made_by="bench", predictor_args=args, pure=False)
            client.gather(futures)
            rates[workers] = len(images) / (time.perf_counter() - started)
        say(f"{workers} worker process{'es' if workers > 1 else ''} of one thread: "
            f"{rates[workers]:.2f} images/s")
    say(f"two workers / one: {rates[2] / rates[1]:.2f}x the images a second")
    seconds = {}
    for name, extra in (("one process", []), ("--workers 2", ["--workers", "2"])):
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as out:
            with contextlib.redirect_stdout(sys.stderr):
                _, seconds[name] = timed(predict.main, ["--images", str(folder), "--model-path",
                                                        str(model_path), "--out-dir", out,
                                                        *extra])
        say(f"predict.py --images, {name}: {seconds[name]:.1f} s for {len(images)} images")
    say(f"--workers 2 / one process: {seconds['--workers 2'] / seconds['one process']:.2f}x "
        "the time")
