"""The notebook's settings, under the notebook's names.

Plain constants, no TensorFlow: `--help` and the data tests stay fast. The scripts take their
flag defaults from here.
"""
import json
from pathlib import Path

from files import InputError

ROOT = Path(__file__).resolve().parent

# The network sees 128x128 RGB: small enough to train on a laptop CPU, and the notebook's size.
IMG_WIDTH = 128
IMG_HEIGHT = 128
IMG_CHANNELS = 3

# `python download.py` fetches the DSB2018 stage-1 data (CC0, released as BBBC038) from
# DATA_URL into DATA_DIR; these file names under --mirror URL work as well.
DATA_URL = "https://data.broadinstitute.org/bbbc/BBBC038/"
DATA_FILES = ("stage1_train.zip", "stage1_test.zip", "stage1_solution.csv")
DATA_DIR = ROOT / "data"
SAMPLE_DIR = ROOT / "sample"


def data_root(data_dir=DATA_DIR):
    """Where the scripts' data defaults point: `data_dir` once both stage-1 folders are there
    (the notebook's ./U_NET/train/ and ./U_NET/validation/), else the bundled sample, so that a
    fresh clone runs end to end."""
    if all((data_dir / name).is_dir() for name in ("stage1_train", "stage1_test")):
        return data_dir
    return SAMPLE_DIR


DATA_ROOT = data_root()
TRAIN_PATH = DATA_ROOT / "stage1_train"
TEST_PATH = DATA_ROOT / "stage1_test"
# The test set's true nuclei, when the download has fetched them: predict.py then scores its
# submission against them by default.
SOLUTION_PATH = DATA_ROOT / "stage1_solution.csv"
if not SOLUTION_PATH.is_file():
    SOLUTION_PATH = None

SEED = 42
BATCH_SIZE = 16
EPOCHS = 10
# Keras takes the validation images from the last 10% of the (sorted) ids.
VALIDATION_SPLIT = 0.1
# EarlyStopping on val_loss; with 10 epochs it only fires if val_loss stalls for half the run.
PATIENCE = 5
# A pixel is nucleus when the predicted probability is above this.
THRESHOLD = 0.5

# The notebook saved nuclei_finder_unet_1.h5; Keras 3 wants the .keras format.
MODEL_PATH = Path("nuclei_finder_unet_1.keras")
# The model the project ships (trained by train.py with the command in the README): predict.py's
# default when no model has been trained here.
SHIPPED_MODEL = ROOT / "models" / "instance.keras"
OUT_DIR = Path("predictions")
# Resized arrays are cached here, keyed by the files' names and stamps and the settings.
CACHE_DIR = Path.home() / ".cache" / "dsb2018-unet"

# A recipe is data, not a second pipeline: train.py saves the one it used inside the model file
# and predict.py applies it from there. "notebook" is the default and reproduces the notebook.
RECIPES = {
    "notebook": {
        "input": "rgb_128",      # whole images shrunk to IMG_HEIGHT x IMG_WIDTH, RGB, x / 255
        "outputs": 1,            # one sigmoid channel: nucleus
        "loss": "bce",
        "dropout": True,         # the notebook's rates: 0.1, 0.1, 0.2, 0.2, 0.3 and back up
        "post": "components",    # connected components of the mask resized back to full size
        "threshold": THRESHOLD,
        "batch_size": BATCH_SIZE,
        "epochs": EPOCHS,
        "patience": PATIENCE,
        "mixed_precision": False,
    },
    "instance": {
        # Native resolution, grey, bright backgrounds inverted, per-image percentile scaling:
        # every kind of image then shows bright nuclei on a dark background.
        "input": "grey_native",
        # Nucleus, its 2-pixel inner contour, and the gaps where two nuclei touch.
        "outputs": 3,
        "loss": "bce_dice",
        "gap_weight": 1.0,       # cross-entropy weight of the gaps between touching nuclei
        # No dropout: this small network underfits 30 minutes of crops rather than overfits, and
        # dropout's random numbers took a third of each step (see the README's table).
        "dropout": False,
        # c1's filters (the notebook's 16); every level widens in proportion. 24 gained within
        # the seeds' spread at 40 epochs for 2.15x the step (docs/instance.md).
        "filters": 16,
        "crop": 256,             # training crops; whole images at prediction, padded to x16
        "augment": True,         # flips, 90-degree turns, rescaling, brightness and contrast
        # Gamma, blur, noise, a background gradient, wider contrast (crops.intensity_jitter).
        # Kept on 40-epoch runs of two seeds each: the held-out acquisitions and TNBC gain,
        # validation loses within the seeds' spread (docs/instance.md).
        "intensity_augment": True,
        "scale_range": [0.5, 2.0],
        "balance_kinds": False,  # draw rare kinds of image more often (see crops.crop_dataset)
        # "acquisitions": train without the images of HELD_OUT_ACQUISITIONS, which predict.py
        # then scores as a second validation: images from sources the model has never seen.
        "holdout": "none",
        "post": "watershed",     # seeds = nucleus without contour, flooded over the nucleus
        # Chosen by `predict.py --tune` on the validation split for the model of this recipe
        # in the README's table (never chosen on test images).
        "threshold": 0.7,
        "seed_threshold": 0.5,   # contour and gap probability below which a nucleus pixel seeds
        "min_size": 32,          # smaller objects (pixels at full size) are dropped
        "tta": True,             # mean of the 4 flips
        # Multi-scale test-time augmentation: the probabilities' mean over the input rescaled by
        # each factor (nuclei.Predictor.probabilities_at_scale); [1.0] is none.
        "scales": [1.0],
        # "auto": images whose nuclei come out over 1.5x off the training size are predicted
        # again, rescaled to it (nuclei.Predictor.nuclei)
        "rescale": "none",
        "batch_size": 8,
        "lr_schedule": "cosine",  # Adam's 1e-3 decayed to 0 over the run (cosine)
        "epochs": 40,            # about 29 minutes on 2 cores of an AVX-512 BF16 CPU
        "patience": 10,          # with lr_schedule=constant; a cosine run goes to its end
        "mixed_precision": True,
    },
}



def is_notebook(recipe):
    """Whether `recipe` is the notebook's: whole images shrunk to 128x128 RGB."""
    return recipe["input"] == "rgb_128"


# Settings added to the recipes after models were saved with them: the value a model saved
# without the setting was trained with.
RECIPE_DEFAULTS = {"dropout": True, "holdout": "none", "intensity_augment": False,
                   "rescale": "none", "scales": [1.0], "gap_weight": 1.0, "filters": 16}
# Settings the recipes no longer have, and the value the code now always trains with: a model
# saved with another value was trained otherwise, and train.py does not continue it. The stain
# augmentation lost on 40-epoch runs of two seeds (docs/instance.md).
RETIRED_SETTINGS = {"stain_augment": False}

# The values a text setting of the instance recipe can take (`--set KEY=VALUE`).
RECIPE_CHOICES = {
    "input": ("grey_native", "rgb_native"),
    "loss": ("bce", "bce_dice"),
    "post": ("components", "watershed"),
    "lr_schedule": ("constant", "cosine"),
    "holdout": ("none", "acquisitions"),
    "rescale": ("none", "auto"),
}

# An acquisition (one microscope, stain and magnification) is approximated by the image's kind
# and size, (kind, height, width): images of one source share both. Held out by
# `--set holdout=acquisitions`: every such group with fewer than 20 of the 597 training images of
# stage1_train (40 images in 6 groups, the largest 16), because rare sources are what the test
# set's new acquisitions resemble, and no single group then dominates the score. The validation
# split has 3 of their images; they stay in it.
HELD_OUT_ACQUISITIONS = (
    ("bright-field", 1024, 1024),
    ("fluorescence", 512, 640),
    ("fluorescence", 603, 1272),
    ("fluorescence", 256, 320),
    ("fluorescence", 260, 347),
    ("fluorescence", 1040, 1388),
)

# The recipe settings that only change how probabilities become nuclei: `predict.py --set` and
# `--tune` may change them in a trained model; train.py ignores them when it compares recipes.
POST_SETTINGS = ("post", "threshold", "seed_threshold", "min_size", "tta", "rescale",
                 "scales")

# Prediction: images up to WHOLE_PIXELS (DSB2018's largest is 1040x1388) are predicted whole;
# larger ones in TILE x TILE squares, each with TILE_MARGIN pixels of context on every side (at
# least the network's receptive field, 122 pixels), so that memory is bounded by the tile.
WHOLE_PIXELS = 1_500_000
# The median equivalent diameter, in pixels, of the 26,389 nuclei of stage1_train's 597 training
# images: what `predict.py --diameter` rescales the nuclei to.
NUCLEUS_DIAMETER = 20
TILE = 1024
TILE_MARGIN = 128

# Images larger than this are read block by block when they are TIFFs (blocks.py), and refused
# as decompression bombs in other formats; DSB2018's largest is 1040x1388.
MAX_IMAGE_PIXELS = 64_000_000
# Blocks of images read block by block (a multiple of TILE: the tiles, and so the network's
# work, are the whole image's whatever the block), and the pixels around each block segmented
# with it, so that a clump of nuclei up to this wide is whole in one block. On a 400-megapixel
# image 3072-pixel blocks peaked at 2.41 GiB, 4096-pixel ones at 3.01 (docs/own_images.md).
BLOCK = 3072
BLOCK_OVERLAP = 256


def recipe_with(recipe, settings, allowed=None):
    """A copy of `recipe` with KEY=VALUE settings (JSON values, or plain words for text
    settings: --set augment=false, --set input=rgb_native); each key must be one of the
    recipe's (and of `allowed`), its value of the same type and, for text, one of its choices."""
    recipe = dict(recipe)
    for setting in settings:
        key, _, text = setting.partition("=")
        keys = sorted(k for k in recipe if allowed is None or k in allowed)
        if key not in keys:
            raise InputError(f"--set {setting}: no setting {key!r} here "
                             f"(settable: {', '.join(keys)})")
        try:
            value = json.loads(text)
        except ValueError:
            if not isinstance(recipe[key], str):
                raise InputError(f"--set {setting}: {text!r} is not a JSON value") from None
            value = text
        if type(value) is not type(recipe[key]) and not (
                type(value) is int and type(recipe[key]) is float):
            raise InputError(f"--set {setting}: {key} takes a {type(recipe[key]).__name__}")
        if key in RECIPE_CHOICES and value not in RECIPE_CHOICES[key]:
            raise InputError(f"--set {setting}: {key} is one of "
                             f"{', '.join(RECIPE_CHOICES[key])}")
        recipe[key] = value
    scales = recipe.get("scales", [1.0])
    if not scales or not all(type(s) in (int, float) and 0.25 <= s <= 4 for s in scales):
        raise InputError(f"--set scales={json.dumps(scales)}: a list of input scales between "
                         f"0.25 and 4, e.g. [0.7, 1, 1.4]")
    if scales != [1.0] and is_notebook(recipe):
        raise InputError("--set scales: the notebook recipe shrinks every image to 128x128, so "
                         "there is no scale to vary")
    if recipe.get("gap_weight", 1.0) != 1 and not (
            recipe["loss"] == "bce_dice" and recipe["outputs"] == 3 and recipe["gap_weight"] > 0):
        raise InputError(f"--set gap_weight={recipe['gap_weight']}: a positive weight of the gap "
                         f"target, for loss=bce_dice with outputs=3")
    filters = recipe.get("filters", 16)
    if type(filters) is not int or not 4 <= filters <= 64 or filters % 4:
        raise InputError(f"--set filters={json.dumps(filters)}: c1's filters, a multiple of 4 "
                         f"from 4 to 64 (the notebook's 16)")
    if recipe.get("rescale") == "auto" and is_notebook(recipe):
        raise InputError("--set rescale=auto: the notebook recipe shrinks every image to "
                         "128x128, so there is no nucleus size to match")
    if recipe["post"] == "watershed" and recipe["outputs"] < 3:
        raise InputError(f"--set: the watershed needs the contour and gap outputs (outputs=3), "
                         f"not outputs={recipe['outputs']}")
    return recipe
