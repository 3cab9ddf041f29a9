"""Images of one's own, for bench.py: one large image as `predict.py --images` segments it (in
memory or block by block), the mosaic that makes such an image from the test set, and the scaling
of `--images` on a Dask LocalCluster (with the folder of 16-bit TIFFs it is measured on)."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import config
import data
import imagefiles
from bench_training import say, timed

ROOT = Path(__file__).resolve().parent


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
    """Seconds per megapixel for one image as `predict.py --images` segments it (own_images.
    segment_one: reading, the network, the nuclei, their measurements, the label image and the
    overlay), in memory or block by block (blocks.is_block_wise) alike, nuclei found, and the
    peak resident memory of this process (Linux reports it in KiB); in memory, also the network
    and the post-processing apart."""
    import argparse
    import resource
    import tempfile

    import blocks
    import checkpoints
    import device
    import nuclei
    import own_images

    model, recipe = checkpoints.load_unet(model_path), checkpoints.read_recipe(model_path)
    compute = device.prediction_compute("auto")
    say(f"Prediction: {compute.describe()}")
    predictor = nuclei.Predictor(model, recipe, compute)
    block_wise = blocks.is_block_wise(path)
    if not block_wise:
        network_and_post_processing(path, predictor)
    options = argparse.Namespace(channel=None, diameter=None, pixel_size=None,
                                 block_size=config.BLOCK)
    with tempfile.TemporaryDirectory(prefix="bench-own-image-") as out:
        own_images.make_output_folders(Path(out))
        (summary, _), seconds = timed(own_images.segment_one, predictor, Path(path), "image",
                                      Path(out), 1.0, options, "bench")
    megapixels = summary["height"] * summary["width"] / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    way = (f"block by block ({config.BLOCK}-pixel blocks, {config.BLOCK_OVERLAP} overlap, "
           f"{summary['clumps_cut']} clumps cut)" if block_wise else "in memory")
    say(f"{path}: {summary['width']}x{summary['height']} ({megapixels:.1f} MP), {way}, "
        f"{summary['nuclei']:,} nuclei; predict.py --images' whole work (reading, network with "
        f"tta={recipe['tta']}, nuclei, measurements, label image, overlay) {seconds:.1f} s, "
        f"{seconds / megapixels:.2f} s/MP; peak memory {peak:.2f} GB")


def network_and_post_processing(path, predictor):
    """The in-memory path's network and post-processing of one image, timed apart."""
    import nuclei

    pixels = imagefiles.read_pixels(path)
    image = imagefiles.scaled_image(pixels)
    x = data.native_input(image, predictor.recipe)
    prob, network = timed(nuclei.predict_tiled, predictor.network, x, predictor.recipe["tta"])
    labels, post = timed(nuclei.nuclei_labels, prob, image.shape[:2], predictor.recipe)
    megapixels = image.shape[0] * image.shape[1] / 1e6
    say(f"{path}: network {network:.1f} s ({network / megapixels:.2f} s/MP), post-processing "
        f"{post:.1f} s ({post / megapixels:.2f} s/MP), {labels.max():,} nuclei")


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
    `--workers 2`, each a fresh process, in seconds from start to end."""
    import argparse
    import tempfile

    from distributed import Client, LocalCluster

    import checkpoints
    import own_images

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
            # A fresh process, as a user runs it: TensorFlow's start-up and the model included.
            command = [sys.executable, "predict.py", "--images", str(folder), "--model-path",
                       str(model_path), "--out-dir", out, *extra]
            _, seconds[name] = timed(subprocess.run, command, check=True, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        say(f"python predict.py --images, {name}: {seconds[name]:.1f} s for {len(images)} "
            "images")
    say(f"--workers 2 / one process: {seconds['--workers 2'] / seconds['one process']:.2f}x "
        "the time")
