"""`predict.py --images` on a Dask cluster: the single-process outputs, a bad file one warning,
a worker's death costs nothing."""
import os
import signal

import numpy as np
import pandas as pd
import pytest
import tifffile

from tests.conftest import write_png
from tests.test_own_images import CENTRES, discs, run

distributed = pytest.importorskip("distributed")


def folder_of_images(folder):
    """Four images of discs in other places, and one cut PNG."""
    for n in range(4):
        write_png(folder / f"{n}.png", discs(centres=[(c[0], c[1] + 4 * n) for c in CENTRES]))
    (folder / "cut.png").write_bytes((folder / "0.png").read_bytes()[:100])


def same_outputs(a, b, images=4):
    """The same label files byte for byte (zarr arrays value for value), and the same table
    rows (arrival order aside)."""
    names = sorted(p.name for p in (a / "labels").iterdir())
    assert names == sorted(p.name for p in (b / "labels").iterdir())
    assert len([n for n in names if n.endswith(".tif")]) == images
    for name in names:
        if name.endswith(".zarr"):
            import zarr

            assert np.array_equal(zarr.open(a / "labels" / name)[:],
                                  zarr.open(b / "labels" / name)[:])
        else:
            assert (a / "labels" / name).read_bytes() == (b / "labels" / name).read_bytes()
    for table, key in (("nuclei.csv", ["image", "label"]), ("images.csv", ["image"])):
        x, y = (pd.read_csv(folder / table).drop(columns=["seconds"], errors="ignore")
                .sort_values(key).reset_index(drop=True) for folder in (a, b))
        pd.testing.assert_frame_equal(x, y)


def test_a_local_cluster_gives_the_single_process_outputs(tmp_path, threshold_model, capsys):
    """Four PNGs, a cut one, and a zarr image of 12 blocks (its blocks spread over the
    workers)."""
    from tests.test_blocks import discs_16bit, write_zarr

    folder_of_images(tmp_path / "in")
    write_zarr(tmp_path / "in" / "large.zarr", discs_16bit())
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", tmp_path / "one",
               "--block-size", "128") == 1
    capsys.readouterr()
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", tmp_path / "two",
               "--workers", "2", "--block-size", "128") == 1
    printed = capsys.readouterr()
    assert printed.err.count(": not a readable image") == 1 and "Traceback" not in printed.err
    assert "Segmented 5 images (24 nuclei)" in printed.out and "1 skipped" in printed.out
    same_outputs(tmp_path / "one", tmp_path / "two", images=5)


class KillFirstTask(distributed.WorkerPlugin):
    """The first worker to start an image's task dies at once (SIGKILL), once: its nanny starts
    a new worker and the scheduler gives the task to a worker again. (The model's check, the
    run's first task, is left alone: the death is mid-run.)"""

    def __init__(self, marker):
        self.marker = str(marker)

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("segment-"):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_run_loses_nothing(tmp_path, threshold_model, capsys):
    folder_of_images(tmp_path / "in")
    assert run(threshold_model, [tmp_path / "in"], "--out-dir", tmp_path / "one") == 1
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.register_plugin(KillFirstTask(tmp_path / "killed"))
        capsys.readouterr()
        assert run(threshold_model, [tmp_path / "in"], "--out-dir", tmp_path / "two",
                   "--scheduler", cluster.scheduler_address) == 1
    assert (tmp_path / "killed").exists()
    assert "Segmented 4 images (16 nuclei)" in capsys.readouterr().out
    same_outputs(tmp_path / "one", tmp_path / "two")
    assert tifffile.imread(tmp_path / "two" / "labels" / "0.tif").max() == 4
    assert np.array_equal(tifffile.imread(tmp_path / "two" / "labels" / "3.tif") > 0,
                          discs(centres=[(c[0], c[1] + 12) for c in CENTRES]) > 100)


def test_a_model_the_workers_cannot_load_is_one_line_and_no_output(tmp_path, capsys):
    """The model is checked by a worker (the client imports no TensorFlow): its reason comes
    back as the one line of any bad model, before any image is done."""
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    folder_of_images(tmp_path / "in")
    assert run(bad, [tmp_path / "in"], "--out-dir", tmp_path / "out", "--workers", "1") == (
        f"error: {bad}: damaged model file (not a .keras archive); retrain or restore it")
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out" / "labels").exists()
