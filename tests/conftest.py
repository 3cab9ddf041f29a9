"""A fake DSB2018 tree of discs, in the stardist way: exact shapes, known masks."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "sample" / "stage1_train"
SAMPLE_TEST = ROOT / "sample" / "stage1_test"
# The network's input in the training tests, instead of 128: the same layers, 16x fewer pixels.
SMALL_SIZE = 32

# XLA's compiled programs (the notebook metric's, the instance step's) kept on disk for the
# suite's processes, set before TensorFlow starts: each training subprocess would compile the same
# programs again. A program is found by its fingerprint, so the cache never changes a result.
XLA_CACHE = tempfile.mkdtemp(prefix="xla-cache-")
atexit.register(shutil.rmtree, XLA_CACHE, ignore_errors=True)
os.environ["TF_XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("TF_XLA_FLAGS"), f"--tf_xla_persistent_cache_directory={XLA_CACHE}"]))


def disc(shape, center, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def make_dsb_tree(root, n_images=4, shape=(64, 80), masks=True):
    """`n_images` ids, each an RGBA image with three bright discs and, with `masks`, one 0/255
    mask PNG per disc. Returns the sorted ids."""
    rng = np.random.default_rng(0)
    ids = []
    for n in range(n_images):
        id_ = f"id{n:02d}"
        ids.append(id_)
        centers = [(16, 16), (40, 24 + 4 * n), (20, 60)]
        image = np.zeros((*shape, 4), dtype=np.uint8)
        image[..., 3] = 255
        image[..., :3] = rng.integers(0, 40, size=(*shape, 3))
        for k, center in enumerate(centers):
            nucleus = disc(shape, center, 6 + k)
            image[nucleus, :3] = 200
            if masks:
                write_png(root / id_ / "masks" / f"m{k}.png", nucleus.astype(np.uint8) * 255)
        write_png(root / id_ / "images" / f"{id_}.png", image)
    return ids


def pytest_collection_finish(session):
    """The recovery tests' training subprocesses start as soon as the tests are collected, in
    the background (test_recovery.BackgroundRuns), to run while the modules before it run."""
    tests = {item.originalname for item in session.items
             if getattr(item, "module", None) and item.module.__name__ == "tests.test_recovery"}
    if tests and not session.config.option.collectonly:
        from tests import test_recovery

        test_recovery.start_runs(tests)


@pytest.fixture(autouse=True)
def sample_defaults(monkeypatch):
    """The scripts' data defaults as on a fresh clone, whether or not data/ has been fetched."""
    monkeypatch.setattr(config, "TRAIN_PATH", SAMPLE_TRAIN)
    monkeypatch.setattr(config, "TEST_PATH", SAMPLE_TEST)
    monkeypatch.setattr(config, "SOLUTION_PATH", None)


@pytest.fixture(autouse=True)
def float32_policy():
    """Keras' global precision policy back to float32 after each test that changed it (train.py
    sets it for its run), so that no test builds models in another test's precision."""
    yield
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def dsb_tree(tmp_path):
    root = tmp_path / "stage1_train"
    make_dsb_tree(root)
    return root


@pytest.fixture
def small_images(monkeypatch):
    monkeypatch.setattr(config, "IMG_HEIGHT", SMALL_SIZE)
    monkeypatch.setattr(config, "IMG_WIDTH", SMALL_SIZE)


@pytest.fixture(scope="session")
def threshold_model(tmp_path_factory):
    """A saved instance-recipe model whose nucleus output is sigmoid(40 (x - 0.5)) of the scaled
    input and whose contour and gap outputs are about 0: nuclei are the bright regions."""
    import keras

    import checkpoints

    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(3, 1, activation="sigmoid", dtype="float32")(inputs)
    model = keras.Model(inputs, outputs)
    model.layers[1].set_weights([np.array([40.0, 0, 0], "float32").reshape(1, 1, 1, 3),
                                 np.array([-20.0, -20, -20], "float32")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    path = tmp_path_factory.mktemp("model") / "threshold.keras"
    checkpoints.save_atomic(model, path, config.RECIPES["instance"])
    return path
