"""Predict with a trained U-Net: the competition's score on the validation split, image / mask /
prediction triptychs, a Kaggle submission CSV for the test images, each test image with its
predicted nuclei outlined, and a contact sheet of them all; or, with --images, any microscopy
images: a label image, an overlay and a table of measurements per nucleus.

python predict.py            # headless: PNGs and submission.csv in --out-dir
python predict.py --show     # also open the triptychs and the contact sheet in windows
python predict.py --solution stage1_solution.csv   # also score the submission
python predict.py --images my_folder --out-dir results --pixel-size 0.65

The model file carries its recipe (config.RECIPES); the post-processing follows it. Without
--model-path and without a model trained here, the model shipped in models/ is used.
"""
import argparse
import contextlib
import random
import sys
from pathlib import Path

import numpy as np

import config
import data
import device
import files
import nuclei
import pictures
import scores


def block_size(text):
    value = int(text)
    if value < 64 or value % 16 or (value > config.TILE and value % config.TILE):
        raise argparse.ArgumentTypeError(
            f"{text} is not a block size: a multiple of 16 from 64 to {config.TILE}, or of "
            f"{config.TILE} above it")
    return value


def default_model():
    """The model trained here when there is one, else the one shipped with the project."""
    if not config.MODEL_PATH.exists() and config.SHIPPED_MODEL.is_file():
        print(f"No {config.MODEL_PATH} trained here: using the shipped model "
              f"{config.SHIPPED_MODEL.relative_to(config.ROOT)}")
        return config.SHIPPED_MODEL
    return config.MODEL_PATH


def add_own_image_flags(parser):
    """The flags of `--images`: a folder in, nuclei and their measurements out."""
    own = parser.add_argument_group(
        "your own images",
        "--images segments any PNG, TIFF, JPEG or BMP (8 or 16 bits, integer or float, grey,\n"
        "RGB or RGBA) and zarr or OME-Zarr folders into --out-dir: labels/<name>.tif (and\n"
        "labels/<name>.zarr for images read block by block), overlays/<name>.png, nuclei.csv\n"
        "(one row per nucleus) and images.csv (one row per image)")
    own.add_argument("--images", nargs="+", type=Path, metavar="PATH",
                     help="image files and folders (a folder's images, sorted)")
    own.add_argument("--recursive", action="store_true", help="also the folders' sub-folders")
    own.add_argument("--channel", type=files.natural, metavar="N",
                     help="the plane that holds the nuclei, for images with more planes than "
                          "grey or RGB(A) (0 is the first)")
    own.add_argument("--diameter", type=files.positive, metavar="PIXELS",
                     help=f"the nuclei's typical diameter in these images: each is rescaled so "
                          f"that they are {config.NUCLEUS_DIAMETER} pixels (the training "
                          f"images' median), and the nuclei back")
    own.add_argument("--pixel-size", type=files.positive, metavar="MICRONS",
                     help="microns per pixel: measurements in microns too")
    own.add_argument("--block-size", type=block_size, default=config.BLOCK, metavar="PIXELS",
                     help="zarr folders, pyramidal TIFFs and TIFFs over "
                          f"{config.MAX_IMAGE_PIXELS // 10 ** 6} megapixels are segmented in "
                          "blocks of this size (memory per process grows with its square)")
    own.add_argument("--workers", type=files.positive_int, metavar="N",
                     help="segment on a Dask LocalCluster of N worker processes, each loading "
                          "the model once and using its share of the cores")
    own.add_argument("--scheduler", metavar="ADDRESS",
                     help="segment on the workers of a running Dask scheduler (e.g. "
                          "tcp://host:8786); --out-dir must be visible to them")
    own.add_argument("--overwrite", action="store_true",
                     help="redo every image (by default a rerun skips the images this model and "
                          "these settings made)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=files.HelpFormatter)
    parser.add_argument("--model-path", type=Path,
                        help=f"model written by train.py (.keras, loaded in safe mode); default: "
                             f"{config.MODEL_PATH} once trained, else {config.SHIPPED_MODEL}")
    parser.add_argument("--train-dir", type=Path, default=config.TRAIN_PATH,
                        help="the folder the model was trained on (its last 10%% is validation)")
    parser.add_argument("--test-dir", type=Path, default=config.TEST_PATH,
                        help="DSB2018 folder of test images (no masks needed)")
    parser.add_argument("--out-dir", type=Path, default=config.OUT_DIR,
                        help="where the triptychs, submission.csv, overlays/ and "
                             "contact_sheet.png go")
    parser.add_argument("--solution", type=Path,
                        help="score the submission against this solution CSV "
                             "(ImageId,EncodedPixels,Height,Width[,Usage]); by default the "
                             "downloaded one, when there is one and --test-dir is the default")
    parser.add_argument("--score-dir", type=Path, action="append", default=[], metavar="FOLDER",
                        help="also score every image of this DSB-layout folder, e.g. TNBC's "
                             "histology: by group (an id up to its last '_', TNBC's slides) and "
                             "over groups; repeatable")
    parser.add_argument("--threshold", type=files.probability,
                        help="probability above which a pixel is nucleus; default: the recipe's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change a post-processing setting of the model's recipe "
                             f"({', '.join(config.POST_SETTINGS)}), e.g. --set tta=false")
    parser.add_argument("--tune", action="store_true",
                        help="choose threshold, seed_threshold and min_size on the validation "
                             "split and save them in the model's recipe")
    parser.add_argument("--jit", choices=device.JIT_CHOICES, default="auto",
                        help="compile the network with XLA (on) or as TensorFlow's plain graph "
                             "(off); auto: the faster where it runs (see device.py)")
    parser.add_argument("--precision", choices=device.PRECISIONS, default="auto",
                        help="the network's arithmetic; auto: bfloat16 on a CPU that computes it "
                             "natively (AVX-512 BF16, AMX), else float32")
    parser.add_argument("--seed", type=int, default=config.SEED,
                        help="picks the sample images shown")
    parser.add_argument("--show", action="store_true",
                        help="open the triptychs and the contact sheet in windows")
    parser.add_argument("--no-cache", action="store_true",
                        help=f"always decode the PNGs instead of using {config.CACHE_DIR}")
    add_own_image_flags(parser)
    args = parser.parse_args(argv)
    if args.workers and args.scheduler:
        parser.error("--workers and --scheduler: choose one")
    if (args.workers or args.scheduler) and not args.images:
        parser.error("--workers and --scheduler segment --images")
    if args.model_path is None:
        args.model_path = default_model()
    if args.solution is None and args.test_dir == config.TEST_PATH:
        # The downloaded solution describes the downloaded test images only.
        args.solution = config.SOLUTION_PATH
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.tune and args.model_path.resolve() == config.SHIPPED_MODEL.resolve():
            raise files.InputError(f"{args.model_path}: --tune does not change the shipped model; "
                                   "copy it and tune the copy (--model-path)")
        # --tune rewrites the model file: not while train.py may be replacing it.
        lock = (files.FileLock(args.model_path) if args.tune and args.model_path.is_file()
                else contextlib.nullcontext())
        with files.stop_on_signals(), files.one_line_warnings(), lock:
            if args.images:
                skipped = segment_images(args)
            else:
                skipped = predict(args)
    except files.InputError as error:
        sys.exit(f"error: {error}")
    except files.Stopped as stopped:
        files.exit_stopped(stopped, "every file written so far is whole, the others are as they "
                                    "were")
    if skipped:
        sys.exit(1)


def model_recipe(args):
    """--model-path's model (checkpoints.load_unet's checks) and its recipe_of_flags."""
    import checkpoints  # after the cheap checks: TensorFlow takes seconds to import

    model = checkpoints.load_unet(args.model_path)
    return model, recipe_of_flags(args, checkpoints.read_recipe(args.model_path))


def recipe_of_flags(args, saved):
    """The recipe saved in the model, with --set and --threshold applied, checked against the
    flags."""
    recipe = config.recipe_with(saved, args.set, config.POST_SETTINGS)
    if args.threshold is not None:
        recipe["threshold"] = args.threshold
    if args.images and args.diameter and config.is_notebook(recipe):
        raise files.InputError(f"{args.model_path}: --diameter needs a model of native "
                               "resolution (the notebook recipe shrinks every image to 128x128)")
    return recipe


def load_predictor(args):
    """The Predictor of both flows: model_recipe's model and recipe, on the path --jit,
    --precision and this machine give (said in a line)."""
    model, recipe = model_recipe(args)
    compute = device.prediction_compute(args.jit, args.precision)
    if not config.is_notebook(recipe):
        print(f"Prediction: {compute.describe()}")
    return nuclei.Predictor(model, recipe, compute)


def segment_images(args):
    """--images, in this process or (--workers, --scheduler) on a Dask cluster, after the checks
    that need no model. On a cluster the model is checked by a worker: this process never
    imports TensorFlow, and the workers start theirs at once."""
    import own_images

    files.check_output_folder(args.out_dir, "--out-dir")
    images = own_images.image_files(args.images, args.recursive)
    scale = config.NUCLEUS_DIAMETER / args.diameter if args.diameter else 1.0
    if not (args.workers or args.scheduler):
        predictor = load_predictor(args)
        made_by = own_images.fingerprint(args.model_path, predictor.recipe, args)
        results = own_images.local_results(predictor, args, scale, made_by)
        return own_images.segment_images(args, images, made_by, results)
    with own_images.dask_client(args) as client:
        recipe = recipe_of_flags(args, own_images.saved_recipe_on_worker(client, args))
        made_by = own_images.fingerprint(args.model_path, recipe, args)
        results = own_images.cluster_results(client, args, recipe, scale, made_by)
        return own_images.segment_images(args, images, made_by, results)


def pyplot(show):
    """matplotlib's pyplot, headless unless --show and a display can open windows."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends import BackendFilter, backend_registry

    if show and plt.get_backend().lower() not in backend_registry.list_builtin(
            BackendFilter.INTERACTIVE):
        # No display (or no GUI toolkit): matplotlib fell back to a file-only backend.
        print(f"--show: no display to open windows on (matplotlib's backend is "
              f"{plt.get_backend()}); writing the pictures only")
        return plt, False
    return plt, show


def tune(args, predictor, probs, truths):
    """--tune: the post-processing settings with the best score on the validation split, saved
    in the model's recipe. Never on the held-out acquisitions: they stay images the model's
    settings were not chosen on."""
    import checkpoints

    results = nuclei.tune(probs, truths, predictor.recipe)
    print("\nCompetition score on the validation split by post-processing setting (best 10):")
    for score, settings in results[:10]:
        print(f"  {score:.4f}  " + "  ".join(f"{k}={v}" for k, v in settings.items()))
    predictor.recipe.update(results[0][1])
    checkpoints.write_recipe(args.model_path, predictor.recipe)
    print(f"Saved the best in {args.model_path}'s recipe: " +
          ", ".join(f"{k}={v}" for k, v in results[0][1].items()))


def score_training_folder(args, predictor, plt, ids, split):
    """The validation split's scores (and the held-out acquisitions'), after --tune when asked,
    and the triptychs of a training and a validation image."""
    import metrics

    val_images, val_truths = data.load_native(args.train_dir, ids[split:])
    val_probs = predictor.probabilities(val_images)
    held_images, held_truths, groups = scores.held_out_set(args.train_dir, ids[:split],
                                                           predictor.recipe)
    held_probs = predictor.probabilities(held_images) if groups else []
    if args.tune:
        tune(args, predictor, val_probs, val_truths)
    val_preds = predictor.nuclei(val_images, probs=val_probs)
    val_scores = [metrics.competition_score(t, p) for t, p in zip(val_truths, val_preds)]
    rng = random.Random(args.seed)
    ix, iv = rng.randrange(split), rng.randrange(len(ids) - split)
    train_images, train_truths = data.load_native(args.train_dir, [ids[ix]])
    pictures.save_triptych(plt, train_images[0], train_truths[0],
                           predictor.nuclei(train_images)[0], f"train: {ids[ix]}",
                           args.out_dir / "train_sample.png")
    pictures.save_triptych(plt, val_images[iv], val_truths[iv], val_preds[iv],
                           f"validation: {ids[split + iv]}, competition score "
                           f"{val_scores[iv]:.3f}",
                           args.out_dir / "val_sample.png")
    print(f"\nCompetition score of validation image {ids[split + iv]}:")
    metrics.competition_score(val_truths[iv], val_preds[iv], print_table=True)
    scores.report_scores(val_scores, [data.image_kind(image) for image in val_images],
                         val_truths, val_preds, tuned=args.tune)
    if groups:
        held_scores = [metrics.competition_score(t, p) for t, p in
                       zip(held_truths, predictor.nuclei(held_images, probs=held_probs))]
        scores.report_held_out(held_scores, groups)


def write_submission(args, predictor, test_ids, solution):
    """submission.csv of the test images, scored against --solution when given; returns the
    test images and their nuclei."""
    import pandas as pd

    import metrics

    test_images, _ = data.load_native(args.test_dir, test_ids, with_labels=False)
    test_preds = predictor.nuclei(test_images)
    rows = nuclei.submission_rows(test_preds, test_ids)
    submission = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])
    csv_path = args.out_dir / "submission.csv"
    files.write_atomic(csv_path, lambda tmp: submission.to_csv(tmp, index=False))
    print(f"Wrote {csv_path}: {sum(1 for _, runs in rows if runs)} nuclei in {len(test_ids)} "
          f"test images")
    if solution is not None:
        shapes = {id_: labels.shape for id_, labels in solution.items()}
        submitted = nuclei.labels_from_rows([row for row in rows if row[0] in shapes], shapes)
        test_scores = [metrics.competition_score(solution[id_], submitted[id_])
                       for id_ in solution]
        print(f"Competition score of {csv_path} against {args.solution}: "
              f"{np.mean(test_scores):.4f} ({len(solution)} images, "
              f"{sum(int(t.max()) for t in solution.values()):,} nuclei; images missing from "
              f"the submission score 0)")
    return test_images, test_preds


def predict(args):
    """The DSB flow: validation scores and triptychs, --score-dir folders, the submission and
    the test images' overlays and contact sheet."""
    files.check_output_folder(args.out_dir, "--out-dir")
    solution = nuclei.read_solution(args.solution) if args.solution else None
    for folder in args.score_dir:
        data.list_ids(folder)  # a missing or empty folder is refused before any work
    ids = data.list_ids(args.train_dir)
    split = data.split_index(len(ids), args.train_dir)
    test_ids = data.list_ids(args.test_dir)
    predictor = load_predictor(args)
    plt, args.show = pyplot(args.show)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    score_training_folder(args, predictor, plt, ids, split)
    for folder in args.score_dir:
        scores.report_folder(predictor, folder)
    if config.is_notebook(predictor.recipe):
        scores.notebook_metric(args, predictor, split)
    test_images, test_preds = write_submission(args, predictor, test_ids, solution)
    sheet = pictures.save_pictures(test_images, test_preds, test_ids, args.out_dir)
    if note := data.sample_note(args.train_dir):
        print(note)
    if args.show:
        fig, ax = plt.subplots(figsize=(10, 10 * sheet.height / sheet.width))
        ax.imshow(sheet)
        ax.set_title("Test images, predicted nuclei outlined")
        ax.axis("off")
        fig.tight_layout()
        plt.show()


if __name__ == "__main__":
    main()
