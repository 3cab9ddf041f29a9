"""The competition's score of a model on labelled images, printed as predict.py reports it: the
validation split by kind of image, the held-out acquisitions over images and over acquisitions,
any DSB-layout folder (TNBC's slides) by group, and the notebook's own metric at 128x128."""
import numpy as np

import config
import data

TUNED = " - tuned on these images by this run's --tune, so optimistic"


def report_scores(scores, kinds, truths, preds, tuned=False):
    """The competition's score on the validation split, overall and by kind of image."""
    print(f"\nCompetition score (original resolution, every mask file one nucleus), validation: "
          f"{np.mean(scores):.4f} ({len(scores)} images, {sum(int(t.max()) for t in truths):,} "
          f"nuclei, {sum(int(p.max()) for p in preds):,} predicted)" + (TUNED if tuned else ""))
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
    import metrics  # here: TensorFlow takes seconds to import, and the checks come first

    ids = data.list_ids(folder)
    images, truths = data.load_native(folder, ids)
    preds = predictor.nuclei(images)
    scores = [metrics.competition_score(t, p) for t, p in zip(truths, preds)]
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


def notebook_metric(args, predictor, split):
    """The notebook's own metric at 128x128, for the notebook recipe."""
    import metrics

    X, Y, _ = data.load_train(args.train_dir,
                              cache_dir=None if args.no_cache else config.CACHE_DIR)
    preds = predictor.model.predict(X, verbose=0) > predictor.recipe["threshold"]
    print(f"Notebook's metric (128x128, connected components of the merged masks): train "
          f"{metrics.iou_metric_batch(Y[:split], preds[:split]):.4f} ({split} images), "
          f"validation {metrics.iou_metric_batch(Y[split:], preds[split:]):.4f} "
          f"({len(X) - split} images)")
