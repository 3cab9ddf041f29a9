import numpy as np
import pandas as pd

import device
import nuclei
import pictures
import predict
import train
from tests.conftest import ROOT, SMALL_SIZE, make_dsb_tree


def test_rle_numbers_pixels_down_then_right_from_one():
    mask = np.array([[0, 1, 1],
                     [0, 1, 0],
                     [1, 0, 0]], bool)
    # Column-major, 1-based: pixels 3 (column 0), 4 and 5 (column 1) form one run, as in the
    # Kaggle kernel, which does not break runs at column ends; then pixel 7 (column 2).
    assert nuclei.rle_encoding(mask) == "3 3 7 1"
    assert nuclei.rle_encoding(np.zeros((3, 3), bool)) == ""


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 23)) < 0.4
    assert np.array_equal(nuclei.rle_decode(nuclei.rle_encoding(mask), mask.shape), mask)


def test_submission_resizes_back_and_labels_each_nucleus():
    import config

    pred = np.zeros((8, 8, 1), np.float32)
    pred[1:3, 1:3] = 0.9
    pred[5:7, 4:7] = 0.8
    notebook = config.RECIPES["notebook"]
    labels = nuclei.nuclei_labels(pred, (16, 24), notebook)
    assert labels.shape == (16, 24) and labels.max() == 2
    empty = nuclei.nuclei_labels(np.zeros((8, 8, 1), np.float32), (5, 5), notebook)
    rows = nuclei.submission_rows([labels, empty], ["a", "b"])
    assert [r[0] for r in rows] == ["a", "a", "b"] and rows[2][1] == ""
    first = nuclei.rle_decode(rows[0][1], (16, 24))
    second = nuclei.rle_decode(rows[1][1], (16, 24))
    assert first.shape == (16, 24) and first.any() and not (first & second).any()


def test_overlay_outlines_each_nucleus_in_its_own_colour():
    image = np.full((10, 12, 3), 7, np.uint8)
    labels = np.zeros((10, 12), np.int32)
    labels[1:4, 1:4] = 1   # 3x3: its 8 outer pixels are its outline
    labels[5:9, 6:11] = 2  # 4x5: 14
    out = pictures.overlay(image, labels)
    changed = (out != image).any(axis=2)
    assert changed.sum() == 8 + 14 and not changed[2, 2] and not changed[labels == 0].any()
    assert out[1, 1].tolist() == [255, 0, 0] and out[5, 6].tolist() == [0, 0, 255]


def test_contact_sheet_rows_of_ceil_sqrt_n_tiles():
    images = [np.zeros((256, 320, 3), np.uint8)] * 5 + [np.zeros((1040, 1388, 3), np.uint8)]
    labels = [np.zeros(image.shape[:2], np.int32) for image in images]
    sheet = pictures.contact_sheet(images, labels, [f"id{n}" for n in range(6)])
    assert sheet.size == (3 * pictures.TILE, 2 * (pictures.TILE + pictures.CAPTION))


def test_train_one_epoch_then_predict_headless(tmp_path, small_images):
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    make_dsb_tree(train_dir, n_images=10)
    test_ids = make_dsb_tree(test_dir, n_images=2, shape=(50, 70), masks=False)
    model_path = tmp_path / "model" / "unet.keras"
    train.main(["--train-dir", str(train_dir), "--epochs", "1", "--batch-size", "4",
                "--model-path", str(model_path), "--no-cache"])
    import checkpoints

    model = checkpoints.load_unet(model_path)
    assert model.count_params() == 1_941_105 and model.input_shape == (None, 32, 32, 3)
    history = pd.read_csv(model_path.with_suffix(".history.csv"))
    assert list(history.columns) == ["epoch", "loss", "my_iou_metric", "val_loss",
                                     "val_my_iou_metric"]
    assert len(history) == 1 and model_path.with_suffix(".history.png").stat().st_size > 0

    out_dir = tmp_path / "out"
    predict.main(["--model-path", str(model_path), "--train-dir", str(train_dir),
                  "--test-dir", str(test_dir), "--out-dir", str(out_dir), "--no-cache"])
    for name in ("train_sample.png", "val_sample.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    submission = pd.read_csv(out_dir / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["ImageId", "EncodedPixels"]
    assert set(submission["ImageId"]) == set(test_ids)
    for encoded in submission["EncodedPixels"]:
        numbers = [int(n) for n in encoded.split()]
        assert len(numbers) % 2 == 0 and all(n >= 1 for n in numbers)
        assert all(s + n - 1 <= 50 * 70 for s, n in zip(numbers[::2], numbers[1::2]))


def test_distribute_on_two_logical_cpus_with_mixed_precision(tmp_path, small_images):
    """MirroredStrategy over two logical CPU devices (a stand-in for two GPUs), bfloat16 compute."""
    import subprocess
    import sys


    train_dir, model_path = tmp_path / "train", tmp_path / "unet.keras"
    # 18 training and 2 validation images in batches of 4: every replica gets at least one image
    # of every batch (TensorFlow fails on an empty per-replica batch).
    make_dsb_tree(train_dir, n_images=20)
    code = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import config
config.IMG_HEIGHT = config.IMG_WIDTH = {SMALL_SIZE}
import train
import device
device.cpu_has_bfloat16 = lambda: True  # the bfloat16 path, whatever this CPU has
train.main(["--train-dir", {str(train_dir)!r}, "--model-path", {str(model_path)!r}, "--epochs", "1",
            "--batch-size", "4", "--no-cache", "--distribute", "--mixed-precision"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Training on 2 devices" in result.stdout
    import checkpoints

    model = checkpoints.load_unet(model_path)
    assert model.layers[2].dtype_policy.name == "mixed_bfloat16"
    assert model.output.dtype == "float32"


def test_bfloat16_only_where_the_cpu_has_its_instructions(tmp_path):
    with_bf16, without = tmp_path / "amx", tmp_path / "avx2"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert device.cpu_has_bfloat16(with_bf16)
    assert not device.cpu_has_bfloat16(without)
    assert not device.cpu_has_bfloat16(tmp_path / "missing")
