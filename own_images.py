"""`predict.py --images`: any microscopy images in, and per image a label image, an overlay and a
table of its nuclei out, with nuclei.csv and images.csv over the run.

Each image's files are written atomically, its summary last: the summary marks it done, with
the fingerprint of what made it (the model file and the settings), so that a rerun skips only
what the same model and settings made. The two tables are rebuilt once at the start from the
images done, then appended image by image (a kill between two images leaves them whole; a
kill inside a write is repaired by the next run's rebuild)."""
import contextlib
import hashlib
import json
import time
import warnings

import numpy as np

import blocks
import files
import imagefiles
import nuclei
import pictures

TABLES = ("nuclei.csv", "images.csv")


def image_files(paths, recursive):
    """[(path, output name)] of the images to segment: files and zarr folders as given, and each
    folder's image files (imagefiles.IMAGE_SUFFIXES) and zarr folders, hidden ones left out,
    sorted; a name is the path below its folder with "__" for each "/". Other files in a folder
    are named in a warning."""
    found = []
    for path in paths:
        if path.is_dir() and path.suffix.lower() != blocks.ZARR_SUFFIX:
            for member in sorted(_members(path, recursive)):
                if member.suffix.lower() in (*imagefiles.IMAGE_SUFFIXES, blocks.ZARR_SUFFIX):
                    name = member.relative_to(path).with_suffix("").as_posix().replace("/", "__")
                    found.append((member, name))
                else:
                    warnings.warn(f"{member}: not an image file ({member.suffix or 'no suffix'}), "
                                  "ignored")
        elif path.exists() or path.is_symlink():  # a broken link is reported when read
            found.append((path, path.stem))
        else:
            raise files.InputError(f"{path}: no such file or folder (--images)")
    if not found:
        raise files.InputError(f"{', '.join(map(str, paths))}: no images in it (--images reads "
                               f"{', '.join(imagefiles.IMAGE_SUFFIXES)} files and zarr folders)")
    first = {}
    for path, name in found:
        if name in first:
            raise files.InputError(f"{first[name]} and {path}: both would be written as {name}; "
                                   "rename one or segment them apart")
        first[name] = path
    return found


def _members(folder, recursive):
    """A folder's files and zarr folders (not what is inside them), and with `recursive` its
    sub-folders', hidden ones left out."""
    for member in folder.iterdir():
        if member.name.startswith("."):
            continue
        if member.is_dir() and member.suffix.lower() != blocks.ZARR_SUFFIX:
            if recursive:
                yield from _members(member, recursive)
        elif member.is_dir() or member.is_file():
            yield member


def image_outputs(out_dir, name):
    """An image's output files; its summary (the last one written) marks it done."""
    return {"labels": out_dir / "labels" / f"{name}.tif",
            "overlay": out_dir / "overlays" / f"{name}.png",
            "zarr": out_dir / "labels" / f"{name}{blocks.ZARR_SUFFIX}",
            "nuclei": out_dir / "measurements" / f"{name}.csv",
            "summary": out_dir / "measurements" / f"{name}.json"}


def make_output_folders(out_dir):
    """The folders of image_outputs."""
    for path in image_outputs(out_dir, "any").values():
        path.parent.mkdir(parents=True, exist_ok=True)


def fingerprint(model_path, recipe, args):
    """What made an image's outputs: the model file's SHA-256, the recipe as applied (--set and
    --threshold included) and the flags that change the nuclei or their measurements."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    settings = {"model": digest.hexdigest(), "recipe": recipe, "channel": args.channel,
                "diameter": args.diameter, "pixel_size": args.pixel_size,
                "block_size": args.block_size}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def is_done(outputs, made_by):
    """Whether the image's outputs are complete and were made by the same model and settings."""
    try:
        return json.loads(outputs["summary"].read_text()).get("fingerprint") == made_by
    except (OSError, ValueError):
        return False


def segment_one(predictor, path, name, out_dir, scale, args, made_by, mapper=blocks.local_map,
                get_predictor=None):
    """One image's label image, overlay, table and summary, written; returns (summary, table).
    An image too large for memory goes block by block (blocks.segment_large, its blocks mapped
    by `mapper` with the Predictor `get_predictor` gives), its labels also as zarr. An
    InputError (an unreadable file) is raised before anything is written."""
    import tifffile
    from PIL import Image

    began = time.perf_counter()
    outputs = image_outputs(out_dir, name)
    summary = {"image": name, "file": str(path)}
    if blocks.is_block_wise(path):
        shape, count, table, cut, image, labels = blocks.segment_large(
            get_predictor or (lambda: predictor), predictor.recipe, path, outputs, args, mapper,
            block=args.block_size)
        summary.update(labels_zarr=outputs["zarr"].relative_to(out_dir).as_posix(),
                       clumps_cut=cut)
        if cut:
            warnings.warn(f"{path}: {cut} clump{'s' if cut > 1 else ''} of nuclei wider than "
                          f"the block overlap cut at its edge")
    else:
        pixels = imagefiles.read_pixels(path, args.channel)
        image = imagefiles.scaled_image(pixels)
        labels = predictor.nuclei([image], scale)[0]
        shape, count = labels.shape, int(labels.max())
        labels = labels.astype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)
        files.write_atomic(outputs["labels"], lambda tmp: tifffile.imwrite(
            tmp, labels, compression="zlib"))
        table = nuclei.measure(labels, pixels, args.pixel_size)
    picture = Image.fromarray(pictures.overlay(imagefiles.display_image(image), labels))
    files.write_atomic(outputs["overlay"], lambda tmp: picture.save(tmp, format="PNG"))
    table.insert(0, "image", name)
    files.write_atomic(outputs["nuclei"], lambda tmp: table.to_csv(tmp, index=False))
    areas = table["area"]
    summary.update({"height": shape[0], "width": shape[1], "nuclei": count,
                    "mean_area": float(areas.mean()) if count else None,
                    "median_area": float(areas.median()) if count else None,
                    "covered": float(areas.sum() / (shape[0] * shape[1])),
                    "seconds": round(time.perf_counter() - began, 2)})
    if args.pixel_size:
        summary["mean_area_um2"] = summary["mean_area"] * args.pixel_size ** 2 if count else None
    summary["fingerprint"] = made_by
    files.write_atomic(outputs["summary"],
                       lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    return summary, table


class Tables:
    """nuclei.csv and images.csv of a run: rebuilt from the images already done (in the run's
    order, first), then one image's rows appended at a time as it is made. A table whose
    columns change (grey and colour images have other intensity columns) is rewritten whole,
    with the new columns."""

    def __init__(self, out_dir, done):
        import pandas as pd

        self.paths = [out_dir / name for name in TABLES]
        outputs = [image_outputs(out_dir, name) for name in done]
        self.frames = [[pd.read_csv(o["nuclei"]) for o in outputs],
                       [pd.DataFrame([json.loads(o["summary"].read_text())]) for o in outputs]]
        self.columns = [self._union(frames) for frames in self.frames]
        self.written = [False] * len(TABLES)  # a table of an earlier run is replaced, not extended
        for n in range(len(TABLES)):
            self._rewrite(n)

    @staticmethod
    def _union(frames):
        columns = []
        for frame in frames:
            columns += [c for c in frame.columns if c not in columns]
        return columns

    def _rewrite(self, n):
        import pandas as pd

        if not self.columns[n]:
            return
        # Images without nuclei add no rows (and concat warns about empty tables).
        frames = [f for f in self.frames[n] if len(f)] or self.frames[n][:1]
        whole = pd.concat([f.reindex(columns=self.columns[n]) for f in frames],
                          ignore_index=True)
        files.write_atomic(self.paths[n], lambda tmp: whole.to_csv(tmp, index=False))
        self.written[n] = True

    def add(self, summary, table):
        import pandas as pd

        for n, frame in enumerate((table, pd.DataFrame([summary]))):
            self.frames[n].append(frame)
            new = [c for c in frame.columns if c not in self.columns[n]]
            if new or not self.written[n]:
                self.columns[n] += new
                self._rewrite(n)
            elif len(frame):
                rows = frame.reindex(columns=self.columns[n]).to_csv(header=False, index=False)
                with open(self.paths[n], "a", newline="") as f:
                    f.write(rows)


def segment_images(args, images, made_by, results):
    """`--images`: each image's nuclei written as soon as it is done (by `results`, which
    yields for each image to do its (summary, table), or the one-line reason it could not be
    read), the tables appended here. Returns the number of files that could not be read."""
    from tqdm import tqdm

    make_output_folders(args.out_dir)
    names = [name for _, name in images]
    done = [] if args.overwrite else [
        name for name in names if is_done(image_outputs(args.out_dir, name), made_by)]
    tables = Tables(args.out_dir, done)
    todo = [(path, name) for path, name in images if name not in done]
    failed, total_nuclei, start = 0, 0, time.perf_counter()
    for result in tqdm(results(todo), total=len(todo), desc="images", unit="image"):
        if isinstance(result, str):
            warnings.warn(f"{result}; skipped")
            failed += 1
            continue
        tables.add(*result)
        total_nuclei += result[0]["nuclei"]
    print(f"Segmented {len(todo) - failed} images ({total_nuclei:,} nuclei) in "
          f"{time.perf_counter() - start:.1f} s into {args.out_dir}"
          + (f"; {len(done)} already done by this model and settings (--overwrite redoes them)"
             if done else "")
          + (f"; {failed} skipped, see the warnings above" if failed else ""))
    return failed


def local_results(predictor, args, scale, made_by):
    """segment_images' results computed in this process, in the images' order."""
    def results(todo):
        for path, name in todo:
            try:
                yield segment_one(predictor, path, name, args.out_dir, scale, args, made_by)
            except files.InputError as error:
                yield str(error)
    return results


# This process's Predictor on a Dask worker, made by its first image: each worker loads the
# model once.
_WORKER_PREDICTORS = {}


def worker_predictor(model_path, recipe, jit, precision, threads):
    """The Predictor of a Dask worker process, made once."""
    key = (str(model_path), json.dumps(recipe, sort_keys=True), jit, precision)
    if key not in _WORKER_PREDICTORS:
        import checkpoints
        import device

        limit_threads(threads)
        model = checkpoints.load_unet(model_path)
        _WORKER_PREDICTORS[key] = nuclei.Predictor(model, recipe,
                                                   device.prediction_compute(jit, precision))
    return _WORKER_PREDICTORS[key]


def limit_threads(threads):
    """TensorFlow on this Dask worker limited to `threads` threads (None: all), before its first
    operation, so that the workers share the machine's cores."""
    import tensorflow as tf

    if threads and tf.config.threading.get_intra_op_parallelism_threads() != threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def worker_threads(args):
    """Each worker's share of this machine's cores with --workers; None on a scheduler's."""
    import os

    return max(1, (os.cpu_count() or 1) // args.workers) if args.workers else None


def segment_task(path, name, options, scale, made_by, predictor_args):
    """One image on a Dask worker: segment_one's (summary, table), or the one-line reason it
    could not be read (not an exception, which Dask would retry)."""
    import functools

    predictor = worker_predictor(*predictor_args)
    try:
        return segment_one(predictor, path, name, options.out_dir, scale, options, made_by,
                           blocks.cluster_map,
                           functools.partial(worker_predictor, *predictor_args))
    except files.InputError as error:
        return str(error)


@contextlib.contextmanager
def dask_client(args):
    """A Dask client of the scheduler at --scheduler, or of a LocalCluster of --workers worker
    processes, one thread each (TensorFlow gets the cores' share of each), closed after the
    run. Its workers start importing TensorFlow at once."""
    import importlib

    from distributed import Client, LocalCluster

    if args.scheduler:
        try:
            client, cluster = Client(args.scheduler, timeout="30s"), None
        except OSError as error:
            raise files.InputError(f"--scheduler {args.scheduler}: cannot connect "
                                   f"({error})") from None
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    with cluster or contextlib.nullcontext(), client:
        # One task a worker, held until the run is over (a released task may be cancelled).
        importing = [client.submit(importlib.import_module, "checkpoints", workers=[worker],
                                   pure=False) for worker in client.scheduler_info()["workers"]]
        yield client
        client.cancel(importing)


def saved_recipe(model_path, threads):
    """On a Dask worker: checkpoints.load_unet's checks of the model file, then the recipe saved
    in it; or the one-line reason it cannot be used (returned: a raised one would be logged)."""
    import checkpoints

    limit_threads(threads)
    try:
        checkpoints.load_unet(model_path)
        return checkpoints.read_recipe(model_path)
    except files.InputError as error:
        return str(error)


def saved_recipe_on_worker(client, args):
    """saved_recipe of --model-path, computed by one of the client's workers (this process needs
    no TensorFlow); an unusable model is a files.InputError here."""
    saved = client.submit(saved_recipe, args.model_path.resolve(), worker_threads(args),
                          pure=False).result()
    if isinstance(saved, str):
        raise files.InputError(saved)
    return saved


def cluster_results(client, args, recipe, scale, made_by):
    """segment_images' results from the client's Dask workers, as they arrive: every image is a
    task, retried on another worker if its worker dies, and writes its files into --out-dir
    (which the workers must see)."""
    import argparse

    from distributed import as_completed

    options = argparse.Namespace(out_dir=args.out_dir.resolve(), channel=args.channel,
                                 pixel_size=args.pixel_size, diameter=args.diameter,
                                 block_size=args.block_size)
    predictor_args = (args.model_path.resolve(), recipe, args.jit, args.precision,
                      worker_threads(args))

    def results(todo):
        futures = [client.submit(segment_task, path.resolve(), name, options, scale, made_by,
                                 predictor_args, key=f"segment-{made_by}-{name}", retries=3)
                   for path, name in todo]
        for future in as_completed(futures):
            yield future.result()
    return results

