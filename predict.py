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
import math
import random
import sys
import warnings
from pathlib import Path

import numpy as np

import config
import data
import device
import files
import nuclei


def probability(text):
    value = float(text)
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a probability strictly between 0 and 1")
    return value


def positive(text):
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def natural(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 0")
    return value


def default_model():
    """The model trained here when there is one, else the one shipped with the project."""
    if not config.MODEL_PATH.exists() and config.SHIPPED_MODEL.is_file():
        print(f"No {config.MODEL_PATH} trained here: using the shipped model "
              f"{config.SHIPPED_MODEL.relative_to(config.ROOT)}")
        return config.SHIPPED_MODEL
    return config.MODEL_PATH


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
    parser.add_argument("--threshold", type=probability,
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
    parser.add_argument("--seed", type=int, default=config.SEED,
                        help="picks the sample images shown")
    parser.add_argument("--show", action="store_true",
                        help="open the triptychs and the contact sheet in windows")
    parser.add_argument("--no-cache", action="store_true",
                        help=f"always decode the PNGs instead of using {config.CACHE_DIR}")
    own = parser.add_argument_group(
        "your own images",
        "--images segments any PNG, TIFF, JPEG or BMP (8 or 16 bits, integer or float, grey,\n"
        "RGB or RGBA) into --out-dir: labels/<name>.tif, overlays/<name>.png, nuclei.csv (one\n"
        "row per nucleus) and images.csv (one row per image)")
    own.add_argument("--images", nargs="+", type=Path, metavar="PATH",
                     help="image files and folders (a folder's images, sorted)")
    own.add_argument("--recursive", action="store_true", help="also the folders' sub-folders")
    own.add_argument("--channel", type=natural, metavar="N",
                     help="the plane that holds the nuclei, for images with more planes than "
                          "grey or RGB(A) (0 is the first)")
    own.add_argument("--diameter", type=positive, metavar="PIXELS",
                     help=f"the nuclei's typical diameter in these images: each is rescaled so "
                          f"that they are {config.NUCLEUS_DIAMETER} pixels (the training "
                          f"images' median), and the nuclei back")
    own.add_argument("--pixel-size", type=positive, metavar="MICRONS",
                     help="microns per pixel: measurements in microns too")
    own.add_argument("--overwrite", action="store_true",
                     help="redo images whose outputs exist (by default a rerun skips them)")
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = default_model()
    if args.solution is None and args.test_dir == config.TEST_PATH:
        # The downloaded solution describes the downloaded test images only.
        args.solution = config.SOLUTION_PATH
    return args


def save_triptych(plt, image, truth, prediction, title, path):
    """Image / Mask / Prediction side by side, the nuclei of both label images in colours (one
    per nucleus), so that merged and split nuclei show."""
    from skimage.color import label2rgb

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    pictures = (image, label2rgb(truth, bg_label=0), label2rgb(prediction, bg_label=0))
    for ax, picture, name in zip(axes, pictures, ("Image", "Mask", "Prediction")):
        ax.imshow(picture)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    print(f"Wrote {path}")


def overlay(image, labels):
    """The image (H, W, 3) with each nucleus of `labels` outlined (its inner boundary) in its own
    colour, the triptychs' colours."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(labels, mode="inner")
    picture = image.copy()
    if not edges.any():
        return picture
    # Colours by rank among the labels, as label2rgb gives the whole image (every nucleus has
    # boundary pixels), at the memory of the boundaries only.
    colours = label2rgb(labels[edges][None], bg_label=0)[0]
    picture[edges] = (colours * 255).round().astype(np.uint8)
    return picture


# The contact sheet: each test image fitted into a TILE x TILE square, a caption strip below.
TILE = 200
CAPTION = 14


def contact_sheet(images, label_images, ids):
    """All the test images in one PIL image, ceil(sqrt(n)) to a row, nuclei outlined at the
    tile's size (outlines drawn at full size would vanish in the shrinking), each captioned with
    the start of its id and its number of nuclei."""
    from PIL import Image, ImageDraw

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)))
    draw = ImageDraw.Draw(sheet)
    for n, (image, labels, id_) in enumerate(zip(images, label_images, ids)):
        scale = TILE / max(image.shape[:2])
        size = (max(round(image.shape[1] * scale), 1), max(round(image.shape[0] * scale), 1))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        small_labels = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
        left, top = (n % columns) * TILE, (n // columns) * (TILE + CAPTION)
        sheet.paste(Image.fromarray(overlay(small, small_labels)), (left, top))
        draw.text((left + 2, top + TILE + 1), f"{id_[:8]}  {labels.max()} nuclei", fill="white")
    return sheet


def save_pictures(images, label_images, ids, out_dir):
    """`out_dir/overlays/<id>.png` for each image (only this run's: older ones removed) and
    `out_dir/contact_sheet.png`; returns the sheet."""
    from PIL import Image

    folder = out_dir / "overlays"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):
        if old.stem not in ids:
            old.unlink()
    for image, labels, id_ in zip(images, label_images, ids):
        picture = Image.fromarray(overlay(image, labels))
        files.write_atomic(folder / f"{id_}.png", lambda tmp: picture.save(tmp, format="PNG"))
    print(f"Wrote {folder}: {len(ids)} test images with their predicted nuclei outlined")
    sheet = contact_sheet(images, label_images, ids)
    path = out_dir / "contact_sheet.png"
    files.write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))
    print(f"Wrote {path}")
    return sheet


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


def make_predictor(model, recipe, jit):
    """The Predictor of both flows, on the path `--jit` and this machine give (said in a line)."""
    compute = device.prediction_compute(jit)
    if not config.is_notebook(recipe):
        print(f"Prediction: {compute.describe()}")
    return nuclei.Predictor(model, recipe, compute)


def report_scores(scores, kinds, truths, preds):
    """The competition's score on the validation split, overall and by kind of image."""
    print(f"\nCompetition score (original resolution, every mask file one nucleus), validation: "
          f"{np.mean(scores):.4f} ({len(scores)} images, {sum(int(t.max()) for t in truths):,} "
          f"nuclei, {sum(int(p.max()) for p in preds):,} predicted)")
    for kind in data.KINDS:
        chosen = [score for score, k in zip(scores, kinds) if k == kind]
        value = f"{np.mean(chosen):.4f}" if chosen else "-"
        print(f"  {kind:<13} {len(chosen):>3} images  {value}")


def group_weights(groups):
    """Per-image weights that make each group count once: 1 / (groups x its images)."""
    return [1 / (len(set(groups)) * groups.count(group)) for group in groups]


def report_held_out(scores, groups):
    """The competition's score on the held-out acquisitions: over images, and over acquisitions
    (each counts once, so that a large one cannot hide the failure of a rare one)."""
    print(f"Competition score, held-out acquisitions (trained without them): "
          f"{np.mean(scores):.4f} over {len(scores)} images, "
          f"{np.average(scores, weights=group_weights(groups)):.4f} over "
          f"{len(set(groups))} acquisitions (each counts once)")
    for group in sorted(set(groups), key=groups.index):
        chosen = [score for score, g in zip(scores, groups) if g == group]
        kind, height, width = group
        print(f"  {kind:<13} {f'{height}x{width}':>9} {len(chosen):>3} images  "
              f"{np.mean(chosen):.4f}")


def image_group(id_):
    """The group of an image id: up to its last "_" (TNBC's tnbc_<slide>_<n> gives its slide),
    the whole id where it has none."""
    return id_.rpartition("_")[0] or id_


def report_folder(predictor, folder):
    """The competition's score on every image of a DSB-layout folder, over images, over groups
    (image_group; each counts once) and by group."""
    import unet

    ids = data.list_ids(folder)
    images, truths = data.load_native(folder, ids)
    preds = predictor.nuclei(images)
    scores = [unet.competition_score(t, p) for t, p in zip(truths, preds)]
    groups = [image_group(id_) for id_ in ids]
    print(f"Competition score, {folder}: {np.mean(scores):.4f} over {len(ids)} images, "
          f"{np.average(scores, weights=group_weights(groups)):.4f} over {len(set(groups))} "
          f"groups (each counts once); {sum(int(t.max()) for t in truths):,} nuclei, "
          f"{sum(int(p.max()) for p in preds):,} predicted")
    for group in sorted(set(groups)):
        chosen = [score for score, g in zip(scores, groups) if g == group]
        print(f"  {group:<20} {len(chosen):>3} images  {np.mean(chosen):.4f}")


def held_out_set(train_dir, train_ids, recipe):
    """(images, label images, acquisitions) of the training images the recipe held out."""
    if recipe.get("holdout") != "acquisitions":
        return [], [], []
    images, _ = data.load_native(train_dir, train_ids, with_labels=False)
    chosen = [id_ for id_, image in zip(train_ids, images) if data.held_out(image, recipe)]
    images, truths = data.load_native(train_dir, chosen)
    return images, truths, [data.acquisition(image) for image in images]


def image_files(paths, recursive):
    """[(path, output name)] of the images to segment: files as given, and each folder's image
    files (data.IMAGE_SUFFIXES, hidden ones left out), sorted; a name is the path below its
    folder with "__" for each "/". Other files in a folder are named in a warning."""
    found = []
    for path in paths:
        if path.is_dir():
            members = sorted(p for p in path.glob("**/*" if recursive else "*")
                             if p.is_file() and not any(part.startswith(".")
                                                        for part in p.relative_to(path).parts))
            for member in members:
                if member.suffix.lower() in data.IMAGE_SUFFIXES:
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
                               f"{', '.join(data.IMAGE_SUFFIXES)})")
    first = {}
    for path, name in found:
        if name in first:
            raise files.InputError(f"{first[name]} and {path}: both would be written as {name}; "
                                   "rename one or segment them apart")
        first[name] = path
    return found


def image_outputs(out_dir, name):
    """An image's output files; its summary (the last one written) marks it done."""
    return {"labels": out_dir / "labels" / f"{name}.tif",
            "overlay": out_dir / "overlays" / f"{name}.png",
            "nuclei": out_dir / "measurements" / f"{name}.csv",
            "summary": out_dir / "measurements" / f"{name}.json"}


def segment_images(args):
    """`--images`: each image's nuclei written as soon as it is done; the tables over all of
    them rewritten after each. Returns the number of files that could not be segmented."""
    import json
    import time

    import tifffile
    from PIL import Image
    from tqdm import tqdm

    files.check_output_folder(args.out_dir, "--out-dir")
    images = image_files(args.images, args.recursive)
    import unet  # after the cheap checks: TensorFlow takes seconds to import
    model = unet.load_unet(args.model_path)
    recipe = data.recipe_with(unet.read_recipe(args.model_path), args.set, config.POST_SETTINGS)
    if args.threshold is not None:
        recipe["threshold"] = args.threshold
    if args.diameter and config.is_notebook(recipe):
        raise files.InputError(f"{args.model_path}: --diameter needs a model of native "
                               "resolution (the notebook recipe shrinks every image to 128x128)")
    scale = config.NUCLEUS_DIAMETER / args.diameter if args.diameter else 1.0
    predictor = make_predictor(model, recipe, args.jit)
    for folder in ("labels", "overlays", "measurements"):
        (args.out_dir / folder).mkdir(parents=True, exist_ok=True)

    done, failed, total_nuclei, start = 0, 0, 0, time.perf_counter()
    for path, name in tqdm(images, desc="images", unit="image"):
        outputs = image_outputs(args.out_dir, name)
        if outputs["summary"].exists() and not args.overwrite:
            done += 1
            continue
        began = time.perf_counter()
        try:
            pixels = data.read_pixels(path, args.channel)
        except files.InputError as error:
            warnings.warn(f"{error}; skipped")
            failed += 1
            continue
        image = data.scaled_image(pixels)
        labels = predictor.nuclei([image], scale)[0]
        count = int(labels.max())
        labels = labels.astype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)
        files.write_atomic(outputs["labels"], lambda tmp: tifffile.imwrite(
            tmp, labels, compression="zlib"))
        picture = Image.fromarray(overlay(data.display_image(image), labels))
        files.write_atomic(outputs["overlay"], lambda tmp: picture.save(tmp, format="PNG"))
        table = nuclei.measure(labels, pixels, args.pixel_size)
        table.insert(0, "image", name)
        files.write_atomic(outputs["nuclei"], lambda tmp: table.to_csv(tmp, index=False))
        areas = table["area"]
        summary = {"image": name, "file": str(path), "height": labels.shape[0],
                   "width": labels.shape[1], "nuclei": count,
                   "mean_area": float(areas.mean()) if count else None,
                   "median_area": float(areas.median()) if count else None,
                   "covered": float(np.count_nonzero(labels) / labels.size),
                   "seconds": round(time.perf_counter() - began, 2)}
        if args.pixel_size:
            summary["mean_area_um2"] = (summary["mean_area"] * args.pixel_size ** 2
                                        if count else None)
        files.write_atomic(outputs["summary"],
                           lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        total_nuclei += count
        write_tables(args.out_dir, [name for _, name in images])
    write_tables(args.out_dir, [name for _, name in images])
    made = len(images) - done - failed
    print(f"Segmented {made} images ({total_nuclei:,} nuclei) in "
          f"{time.perf_counter() - start:.1f} s into {args.out_dir}"
          + (f"; {done} already done (--overwrite redoes them)" if done else "")
          + (f"; {failed} skipped, see the warnings above" if failed else ""))
    return failed


def write_tables(out_dir, names):
    """nuclei.csv and images.csv of the images of this run that are done, in the run's order."""
    import json

    import pandas as pd

    summaries, tables = [], []
    for name in names:
        outputs = image_outputs(out_dir, name)
        if outputs["summary"].exists():
            summaries.append(json.loads(outputs["summary"].read_text()))
            tables.append(pd.read_csv(outputs["nuclei"]))
    if not summaries:
        return
    # Images without nuclei add no rows (and concat warns about empty tables).
    nuclei_table = pd.concat([t for t in tables if len(t)] or tables[:1], ignore_index=True)
    files.write_atomic(out_dir / "nuclei.csv", lambda tmp: nuclei_table.to_csv(tmp, index=False))
    images_table = pd.DataFrame(summaries)
    files.write_atomic(out_dir / "images.csv", lambda tmp: images_table.to_csv(tmp, index=False))


def predict(args):
    files.check_output_folder(args.out_dir, "--out-dir")
    solution = nuclei.read_solution(args.solution) if args.solution else None
    for folder in args.score_dir:
        data.list_ids(folder)  # a missing or empty folder is refused before any work
    import unet  # after the cheap checks: TensorFlow takes seconds to import
    model = unet.load_unet(args.model_path)
    recipe = data.recipe_with(unet.read_recipe(args.model_path), args.set, config.POST_SETTINGS)
    if args.threshold is not None:
        recipe["threshold"] = args.threshold
    ids = data.list_ids(args.train_dir)
    split = data.split_index(len(ids), args.train_dir)
    test_ids = data.list_ids(args.test_dir)

    import matplotlib
    if not args.show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends import BackendFilter, backend_registry

    if args.show and plt.get_backend().lower() not in backend_registry.list_builtin(
            BackendFilter.INTERACTIVE):
        # No display (or no GUI toolkit): matplotlib fell back to a file-only backend.
        print(f"--show: no display to open windows on (matplotlib's backend is "
              f"{plt.get_backend()}); writing the pictures only")
        args.show = False

    predictor = make_predictor(model, recipe, args.jit)
    val_images, val_truths = data.load_native(args.train_dir, ids[split:])
    val_probs = predictor.probabilities(val_images)
    held_images, held_truths, groups = held_out_set(args.train_dir, ids[:split], recipe)
    held_probs = predictor.probabilities(held_images) if groups else []
    if args.tune:
        # With held-out acquisitions, the settings must hold up on both: each score counts half.
        weights = ([0.5 / len(val_probs)] * len(val_probs)
                   + [0.5 * w for w in group_weights(groups)]) if groups else None
        results = nuclei.tune(val_probs + held_probs, val_truths + held_truths, recipe, weights)
        which = "the validation split and the held-out acquisitions" if groups else \
            "the validation split"
        print(f"\nCompetition score on {which} by post-processing setting (best 10):")
        for score, settings in results[:10]:
            print(f"  {score:.4f}  " + "  ".join(f"{k}={v}" for k, v in settings.items()))
        recipe.update(results[0][1])
        unet.write_recipe(args.model_path, recipe)
        print(f"Saved the best in {args.model_path}'s recipe: " +
              ", ".join(f"{k}={v}" for k, v in results[0][1].items()))
    val_preds = predictor.nuclei(val_images, probs=val_probs)
    scores = [unet.competition_score(t, p) for t, p in zip(val_truths, val_preds)]
    kinds = [data.image_kind(image) for image in val_images]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ix, iv = rng.randrange(split), rng.randrange(len(ids) - split)
    train_images, train_truths = data.load_native(args.train_dir, [ids[ix]])
    save_triptych(plt, train_images[0], train_truths[0], predictor.nuclei(train_images)[0],
                  f"train: {ids[ix]}", args.out_dir / "train_sample.png")
    save_triptych(plt, val_images[iv], val_truths[iv], val_preds[iv],
                  f"validation: {ids[split + iv]}, competition score {scores[iv]:.3f}",
                  args.out_dir / "val_sample.png")

    print(f"\nCompetition score of validation image {ids[split + iv]}:")
    unet.competition_score(val_truths[iv], val_preds[iv], print_table=True)
    report_scores(scores, kinds, val_truths, val_preds)
    if groups:
        held_scores = [unet.competition_score(t, p) for t, p in
                       zip(held_truths, predictor.nuclei(held_images, probs=held_probs))]
        report_held_out(held_scores, groups)
    for folder in args.score_dir:
        report_folder(predictor, folder)
    if config.is_notebook(recipe):
        X, Y, _ = data.load_train(args.train_dir, cache_dir=None if args.no_cache else config.CACHE_DIR)
        preds = model.predict(X, verbose=0) > recipe["threshold"]
        print(f"Notebook's metric (128x128, connected components of the merged masks): train "
              f"{unet.iou_metric_batch(Y[:split], preds[:split]):.4f} ({split} images), "
              f"validation {unet.iou_metric_batch(Y[split:], preds[split:]):.4f} "
              f"({len(X) - split} images)")

    import pandas as pd

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
        test_scores = [unet.competition_score(solution[id_], submitted[id_]) for id_ in solution]
        print(f"Competition score of {csv_path} against {args.solution}: "
              f"{np.mean(test_scores):.4f} ({len(solution)} images, "
              f"{sum(int(l.max()) for l in solution.values()):,} nuclei; images missing from the "
              f"submission score 0)")
    sheet = save_pictures(test_images, test_preds, test_ids, args.out_dir)
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
