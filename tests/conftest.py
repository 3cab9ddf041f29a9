"""A fake DSB2018 tree of discs, in the stardist way: exact shapes, known masks."""
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


@pytest.fixture(autouse=True)
def sample_defaults(monkeypatch):
    """The scripts' data defaults as on a fresh clone, whether or not data/ has been fetched."""
    monkeypatch.setattr(config, "TRAIN_PATH", SAMPLE_TRAIN)
    monkeypatch.setattr(config, "TEST_PATH", SAMPLE_TEST)
    monkeypatch.setattr(config, "SOLUTION_PATH", None)


@pytest.fixture
def dsb_tree(tmp_path):
    root = tmp_path / "stage1_train"
    make_dsb_tree(root)
    return root


@pytest.fixture
def small_images(monkeypatch):
    monkeypatch.setattr(config, "IMG_HEIGHT", SMALL_SIZE)
    monkeypatch.setattr(config, "IMG_WIDTH", SMALL_SIZE)
