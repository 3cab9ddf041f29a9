"""The notebook's settings, under the notebook's names.

Plain constants, no TensorFlow: `--help` and the data tests stay fast. The scripts take their
flag defaults from here.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# The network sees 128x128 RGB: small enough to train on a laptop CPU, and the notebook's size.
IMG_WIDTH = 128
IMG_HEIGHT = 128
IMG_CHANNELS = 3

# The bundled sample, so a fresh clone runs end to end; pass --train-dir / --test-dir for the
# full DSB2018 stage-1 folders (the notebook's ./U_NET/train/ and ./U_NET/validation/).
TRAIN_PATH = ROOT / "sample" / "stage1_train"
TEST_PATH = ROOT / "sample" / "stage1_test"

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
OUT_DIR = Path("predictions")
# Resized arrays are cached here, keyed by the folder's file list, sizes, times and the settings.
CACHE_DIR = Path.home() / ".cache" / "dsb2018-unet"

# Images larger than this are refused as decompression bombs; DSB2018's largest is 1040x1388.
MAX_IMAGE_PIXELS = 64_000_000
