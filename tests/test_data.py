import numpy as np
import pytest

import config
import data
import files
from notebook_reference import load_train_notebook
from tests.conftest import SAMPLE_TEST, SAMPLE_TRAIN, disc, write_png


def test_load_train_shapes_dtypes_and_sorted_ids(dsb_tree):
    (dsb_tree / ".ipynb_checkpoints").mkdir()
    (dsb_tree / "notes.txt").write_text("not an id")
    X, Y, ids = data.load_train(dsb_tree)
    assert X.shape == (4, 128, 128, 3) and X.dtype == np.uint8
    assert Y.shape == (4, 128, 128, 1) and Y.dtype == bool
    assert ids == ["id00", "id01", "id02", "id03"]


def test_mask_merge_is_any_resized_value_above_zero(tmp_path):
    """One 1-pixel nucleus in a 256x256 image: at 128x128 it is 1 pixel with 2018's resize,
    and every pixel the bilinear weights touch (none dropped) is nucleus."""
    id_dir = tmp_path / "one"
    write_png(id_dir / "images" / "one.png", np.zeros((256, 256, 3), np.uint8))
    mask = np.zeros((256, 256), np.uint8)
    mask[100, 100] = 255
    write_png(id_dir / "masks" / "a.png", mask)
    _, Y, _ = data.load_train(tmp_path)
    expected = data.resize_2018(mask, (128, 128)) > 0
    assert np.array_equal(Y[0, :, :, 0], expected)
    assert Y.sum() == expected.sum() >= 1


def test_no_anti_aliasing_keeps_nuclei_apart(tmp_path):
    """Two discs 3 pixels apart at 512x512 stay apart at 128x128 (today's default blur fuses
    them under the "> 0" merge)."""
    from skimage.measure import label
    from skimage.transform import resize

    shape = (512, 512)
    a, b = disc(shape, (256, 200), 40), disc(shape, (256, 283), 40)
    id_dir = tmp_path / "two"
    write_png(id_dir / "images" / "two.png", np.zeros((*shape, 3), np.uint8))
    write_png(id_dir / "masks" / "a.png", a.astype(np.uint8) * 255)
    write_png(id_dir / "masks" / "b.png", b.astype(np.uint8) * 255)
    _, Y, _ = data.load_train(tmp_path)
    assert label(Y[0, :, :, 0]).max() == 2
    blurred = np.maximum(resize(a * 255.0, (128, 128), preserve_range=True, mode="constant"),
                         resize(b * 255.0, (128, 128), preserve_range=True, mode="constant")) > 0
    assert label(blurred).max() == 1


def test_fast_loader_equals_notebook_loop_on_bundled_sample():
    X, Y, ids = data.load_train(SAMPLE_TRAIN)
    X_ref, Y_ref, ids_ref = load_train_notebook(SAMPLE_TRAIN)
    assert ids == ids_ref
    assert np.array_equal(X, X_ref)
    assert np.array_equal(Y, Y_ref)


def test_load_test_keeps_original_sizes():
    X, sizes, ids = data.load_test(SAMPLE_TEST)
    assert X.shape == (6, 128, 128, 3) and X.dtype == np.uint8
    from PIL import Image

    for (height, width), id_ in zip(sizes, ids):
        with Image.open(SAMPLE_TEST / id_ / "images" / f"{id_}.png") as im:
            assert (height, width) == (im.height, im.width)


def test_image_size_follows_config(dsb_tree, monkeypatch):
    monkeypatch.setattr(config, "IMG_HEIGHT", 32)
    monkeypatch.setattr(config, "IMG_WIDTH", 48)
    X, Y, _ = data.load_train(dsb_tree)
    assert X.shape == (4, 32, 48, 3) and Y.shape == (4, 32, 48, 1)


def test_data_defaults_follow_the_downloaded_folders(tmp_path):
    assert config.data_root(tmp_path) == config.SAMPLE_DIR
    (tmp_path / "stage1_train").mkdir()
    assert config.data_root(tmp_path) == config.SAMPLE_DIR  # the test images are needed too
    (tmp_path / "stage1_test").mkdir()
    assert config.data_root(tmp_path) == tmp_path


def test_only_runs_on_the_sample_are_called_a_smoke_test(tmp_path):
    assert data.sample_note(SAMPLE_TRAIN) == (
        "This was a smoke test on the bundled sample, too small to learn from; fetch the real "
        "data with `python download.py` and run again.")
    assert data.sample_note(tmp_path / "stage1_train") is None


def test_split_index_matches_keras_validation_split(tmp_path):
    assert data.split_index(664, tmp_path) == 597
    assert data.split_index(27, tmp_path) == 24
    with pytest.raises(files.InputError, match="cannot be split"):
        data.split_index(1, tmp_path)


def test_cache_returns_the_same_arrays_and_notices_changes(dsb_tree, tmp_path, capsys):
    cache = tmp_path / "cache"
    X, Y, ids = data.load_train(dsb_tree, cache_dir=cache)
    X2, Y2, ids2 = data.load_train(dsb_tree, cache_dir=cache)
    assert "from the cache" in capsys.readouterr().out
    assert np.array_equal(X, X2) and np.array_equal(Y, Y2) and ids == ids2

    # A nucleus removed from one image: the cache is rebuilt and the mask shrinks.
    (dsb_tree / "id01" / "masks" / "m2.png").unlink()
    _, Y3, _ = data.load_train(dsb_tree, cache_dir=cache)
    assert "from the cache" not in capsys.readouterr().out
    assert Y3[1].sum() < Y[1].sum() and np.array_equal(Y3[0], Y[0])


def test_cache_is_keyed_by_settings(dsb_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    data.load_train(dsb_tree, cache_dir=cache)
    monkeypatch.setattr(config, "IMG_HEIGHT", 64)
    X, _, _ = data.load_train(dsb_tree, cache_dir=cache)
    assert X.shape == (4, 64, 128, 3)


def test_damaged_cache_is_rebuilt(dsb_tree, tmp_path):
    cache = tmp_path / "cache"
    X, _, _ = data.load_train(dsb_tree, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged cache"):
        X2, _, _ = data.load_train(dsb_tree, cache_dir=cache)
    assert np.array_equal(X, X2)
