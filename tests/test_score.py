"""The competition's score, run-length encoding both ways, and solution files."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import config
import data
import files
import metrics
import nuclei
import predict
from tests.conftest import SAMPLE_TRAIN, disc


def squares(*boxes, shape=(30, 40)):
    """A label image: box k (top, left, height, width) is label k + 1."""
    labels = np.zeros(shape, np.int32)
    for k, (top, left, height, width) in enumerate(boxes, start=1):
        labels[top:top + height, left:left + width] = k
    return labels


def test_two_touching_nuclei_predicted_as_one_score_zero():
    """Each true square is half of the merged object: IoU 0.5 is no match (IoU > t)."""
    truth = squares((5, 0, 10, 10), (5, 10, 10, 10))
    merged = squares((5, 0, 10, 20))
    assert metrics.competition_score(truth, merged) == 0.0
    assert metrics.competition_score(truth, truth) == 1.0


def test_one_found_one_missed_one_invented_scores_a_third():
    truth = squares((0, 0, 10, 10), (15, 20, 10, 10))
    pred = squares((0, 0, 10, 10), (0, 30, 5, 5))
    assert metrics.competition_score(truth, pred) == pytest.approx(1 / 3)


def test_shifted_nucleus_matches_at_the_thresholds_below_its_iou(capsys):
    """A 10x10 square shifted by 2 columns: IoU 80/120 = 2/3, a match at 0.50..0.65 only."""
    truth = squares((5, 5, 10, 10))
    pred = squares((5, 7, 10, 10))
    assert metrics.competition_score(truth, pred, print_table=True) == pytest.approx(0.4)
    table = capsys.readouterr().out.splitlines()
    assert table[4] == "0.650\t1\t0\t0\t1.000" and table[5] == "0.700\t0\t1\t1\t0.000"


def test_label_values_do_not_matter_and_empty_images():
    truth = squares((0, 0, 10, 10), (15, 20, 10, 10))
    renumbered = np.where(truth == 1, 70, np.where(truth == 2, 3, 0))
    assert metrics.competition_score(truth, renumbered) == 1.0
    empty = np.zeros_like(truth)
    assert metrics.competition_score(empty, empty) == 1.0
    assert metrics.competition_score(empty, truth) == 0.0 == metrics.competition_score(truth, empty)


def test_equals_the_notebook_metric_where_components_are_the_nuclei():
    """Apart nuclei: the kernel's connected-component score and the per-nucleus score agree."""
    from skimage.measure import label

    rng = np.random.default_rng(3)
    for _ in range(20):
        truth = np.zeros((64, 64), bool)
        pred = np.zeros((64, 64), bool)
        for row in range(4):
            for col in range(4):
                center = (8 + 16 * row, 8 + 16 * col)
                truth |= disc(truth.shape, center, rng.integers(3, 7))
                moved = (center[0] + rng.integers(-2, 3), center[1] + rng.integers(-2, 3))
                if rng.random() < 0.8:
                    pred |= disc(pred.shape, moved, rng.integers(3, 7))
        assert metrics.competition_score(label(truth), label(pred)) == pytest.approx(
            metrics.iou_metric(truth, pred))


def test_run_lengths_are_column_major_one_based_to_the_last_pixel():
    labels = np.array([[0, 2, 2],
                       [0, 2, 0],
                       [1, 0, 3]])
    # Column 0 holds pixels 1-3, column 1 pixels 4-6, column 2 pixels 7-9.
    assert nuclei.run_lengths(labels) == {1: "3 1", 2: "4 2 7 1", 3: "9 1"}
    corner = np.zeros((5, 7), bool)
    corner[-1, -1] = True
    assert nuclei.rle_encoding(corner) == "35 1"
    assert np.array_equal(nuclei.rle_decode("35 1", (5, 7)), corner)


def test_run_lengths_round_trip_a_label_image():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(37, 23))
    encoded = nuclei.run_lengths(labels)
    assert sorted(encoded) == [1, 2, 3, 4, 5]
    for value, runs in encoded.items():
        assert np.array_equal(nuclei.rle_decode(runs, labels.shape), labels == value)


@pytest.mark.parametrize("rows, message", [
    ("a,1 2 3,4,4", "row 2: odd number of run values (3)"),
    ("a,1 2,4,4\na,15 3,4,4", "row 3: a run ends at pixel 17, past the image's 4x4 = 16 pixels"),
    ("a,0 2,4,4", "row 2: runs start at pixel 1 and have a length of at least 1"),
    ("a,1 x,4,4", "row 2: run values are not integers"),
])
def test_bad_solution_rows_are_named(tmp_path, rows, message):
    path = tmp_path / "solution.csv"
    path.write_text("ImageId,EncodedPixels,Height,Width\n" + rows + "\n")
    with pytest.raises(files.InputError) as error:
        nuclei.read_solution(path)
    assert str(error.value) == f"{path} {message}"


def test_solution_without_a_column_is_named(tmp_path):
    path = tmp_path / "solution.csv"
    path.write_text("ImageId,EncodedPixels,Width\na,1 2,4\n")
    with pytest.raises(files.InputError, match=r"solution.csv: no Height column \(has ImageId, "):
        nuclei.read_solution(path)


def test_solution_from_training_masks_scores_the_true_masks_one(tmp_path):
    """A solution CSV written from bundled training masks, one row per mask file, read back:
    the same nuclei, and the true label images (as our submission writes them) score 1.0."""
    ids = data.list_ids(SAMPLE_TRAIN)[:3]
    images, truths = data.load_native(SAMPLE_TRAIN, ids)
    rows = nuclei.submission_rows(truths, ids)
    solution = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])
    solution["Height"] = [images[ids.index(id_)].shape[0] for id_ in solution["ImageId"]]
    solution["Width"] = [images[ids.index(id_)].shape[1] for id_ in solution["ImageId"]]
    solution["Usage"] = "Public"
    path = tmp_path / "solution.csv"
    solution.to_csv(path, index=False)
    read = nuclei.read_solution(path)
    assert sorted(read) == sorted(ids)
    assert len(solution) == sum(int(t.max()) for t in truths) > 3
    shapes = {id_: t.shape for id_, t in zip(ids, truths)}
    submitted = nuclei.labels_from_rows(rows, shapes)
    for id_, truth in zip(ids, truths):
        assert np.array_equal(read[id_] > 0, truth > 0)
        assert metrics.competition_score(read[id_], truth) == 1.0
        assert metrics.competition_score(read[id_], submitted[id_]) == 1.0


def test_image_kinds_by_the_stated_rule():
    dark = np.full((20, 20, 3), 12, np.uint8)
    bright = np.full((20, 20, 3), 200, np.uint8)
    purple = np.zeros((20, 20, 3), np.uint8) + np.array([150, 90, 200], np.uint8)
    assert [data.image_kind(i) for i in (dark, bright, purple)] == [
        "fluorescence", "bright-field", "histology"]


def test_the_downloaded_solution_is_the_default_only_for_the_downloaded_test_images(
        tmp_path, monkeypatch):

    solution = tmp_path / "stage1_solution.csv"
    monkeypatch.setattr(config, "SOLUTION_PATH", solution)
    assert predict.parse_args([]).solution == solution
    assert predict.parse_args(["--test-dir", str(tmp_path)]).solution is None
    assert predict.parse_args(["--test-dir", str(tmp_path), "--solution", "s.csv"]).solution == \
        Path("s.csv")
