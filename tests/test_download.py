"""`python download.py` against a local HTTP server that the test starts, serving small
zips that the test builds: a full fetch, a transfer cut mid-file then resumed, a damaged zip, a
404 and no server at all."""
import http.server
import subprocess
import sys
import threading
import zipfile

import pytest

import data
import download
from tests.conftest import ROOT, make_dsb_tree

SOLUTION = b"ImageId,EncodedPixels,Height,Width,Usage\nt00,1 3,64,80,Public\n"


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` {name: bytes}, honours `Range: bytes=N-`, records every request's path
    and Range header, and cuts the first transfer of each name in `cut` after half its bytes."""

    def __init__(self, files, cut=()):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.cut, self.requests = files, set(cut), []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name, server = self.path.lstrip("/"), self.server
        server.requests.append((name, self.headers.get("Range")))
        if name not in server.files:
            self.send_error(404)
            return
        body = server.files[name]
        start = int(self.headers["Range"][len("bytes="):-1]) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in server.cut:
            server.cut.discard(name)
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(files, cut=()):
        server = Server(files, cut)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def zip_tree(tree, path, enclosing="", compression=zipfile.ZIP_DEFLATED):
    """A zip of the folders in `tree`, at its top level or inside one `enclosing` folder."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for file in sorted(tree.rglob("*")):
            if file.is_file():
                zf.write(file, f"{enclosing}{file.relative_to(tree)}")
    return path.read_bytes()


@pytest.fixture
def archives(tmp_path):
    """stage1_train.zip with 3 ids at its top level, stage1_test.zip with 2 ids inside one
    stage1_test/ folder, as the BBBC038 archives and a hand-made zip hold them."""
    train, test = tmp_path / "src" / "train", tmp_path / "src" / "test"
    make_dsb_tree(train, n_images=3)
    make_dsb_tree(test, n_images=2, masks=False)
    return {"stage1_train.zip": zip_tree(train, tmp_path / "train.zip"),
            "stage1_test.zip": zip_tree(test, tmp_path / "test.zip", enclosing="stage1_test/"),
            "stage1_solution.csv": SOLUTION}


def test_full_fetch_extracts_the_layout_and_a_second_run_fetches_nothing(tmp_path, serve,
                                                                         archives, capsys):
    server = serve(archives)
    to = tmp_path / "data"
    download.main(["--to", str(to), "--mirror", server.url])
    assert server.requests == [("stage1_train.zip", None), ("stage1_test.zip", None),
                               ("stage1_solution.csv", None)]
    assert sorted(p.name for p in to.iterdir()) == [
        "stage1_solution.csv", "stage1_test", "stage1_test.zip", "stage1_train",
        "stage1_train.zip"]
    assert data.list_ids(to / "stage1_train") == ["id00", "id01", "id02"]
    assert data.list_ids(to / "stage1_test") == ["id00", "id01"]
    assert sorted(p.name for p in (to / "stage1_train" / "id01" / "masks").iterdir()) == [
        "m0.png", "m1.png", "m2.png"]
    source = tmp_path / "src" / "test" / "id01" / "images" / "id01.png"
    assert (to / "stage1_test" / "id01" / "images" / "id01.png").read_bytes() == \
        source.read_bytes()
    assert (to / "stage1_solution.csv").read_bytes() == SOLUTION
    out = capsys.readouterr().out
    assert f"{to / 'stage1_train'}: 3 images" in out and f"{to / 'stage1_test'}: 2 images" in out

    download.main(["--to", str(to), "--mirror", server.url])
    assert len(server.requests) == 3
    assert capsys.readouterr().out.splitlines() == [
        f"{to / 'stage1_train'}: in place (3 images)",
        f"{to / 'stage1_test'}: in place (2 images)",
        f"{to / 'stage1_solution.csv'}: in place",
        f"Everything is in place in {to}: nothing to fetch.",
        f"Pass --train-dir {to / 'stage1_train'} --test-dir {to / 'stage1_test'} to the scripts."]


def test_a_cut_transfer_resumes_with_a_range_request(tmp_path, serve, archives):
    size = len(archives["stage1_train.zip"])
    server = serve(archives, cut=["stage1_train.zip"])
    to = tmp_path / "data"
    download.main(["--to", str(to), "--mirror", server.url])
    assert server.requests[:2] == [("stage1_train.zip", None),
                                   ("stage1_train.zip", f"bytes={size // 2}-")]
    assert (to / "stage1_train.zip").read_bytes() == archives["stage1_train.zip"]
    assert data.list_ids(to / "stage1_train") == ["id00", "id01", "id02"]


def test_a_run_that_gives_up_leaves_the_partial_file_and_the_next_run_resumes(
        tmp_path, serve, archives, monkeypatch):
    monkeypatch.setattr(download, "FETCH_ATTEMPTS", 1)
    size = len(archives["stage1_test.zip"])
    server = serve(archives, cut=["stage1_test.zip"])
    to = tmp_path / "data"
    partial = to / "stage1_test.zip.partial"
    with pytest.raises(SystemExit) as stop:
        download.main(["--to", str(to), "--mirror", server.url])
    assert str(stop.value) == (f"error: {server.url}stage1_test.zip: transfer cut 1 times; run "
                               f"again to resume from {partial}")
    assert partial.read_bytes() == archives["stage1_test.zip"][:size // 2]
    assert not (to / "stage1_test").exists()
    download.main(["--to", str(to), "--mirror", server.url])
    assert server.requests[-2] == ("stage1_test.zip", f"bytes={size // 2}-")
    assert (to / "stage1_test.zip").read_bytes() == archives["stage1_test.zip"]
    assert not partial.exists() and data.list_ids(to / "stage1_test") == ["id00", "id01"]


def test_a_damaged_archive_stops_in_one_line_and_leaves_no_folder(tmp_path, serve, archives):
    stored = tmp_path / "src" / "stored.zip"
    body = bytearray(zip_tree(tmp_path / "src" / "train", stored, compression=zipfile.ZIP_STORED))
    image = (tmp_path / "src" / "train" / "id00" / "images" / "id00.png").read_bytes()
    body[body.index(image) + len(image) // 2] ^= 0xFF
    server = serve({**archives, "stage1_train.zip": bytes(body)})
    to = tmp_path / "data"
    with pytest.raises(SystemExit) as stop:
        download.main(["--to", str(to), "--mirror", server.url])
    archive = to / "stage1_train.zip"
    assert str(stop.value) == (f"error: {archive}: damaged archive (bad CRC in "
                               f"id00/images/id00.png); removed, run again to download it afresh")
    assert list(to.iterdir()) == []

    server.files["stage1_train.zip"] = b"<html>Not here</html>"
    with pytest.raises(SystemExit) as stop:
        download.main(["--to", str(to), "--mirror", server.url])
    assert str(stop.value) == (f"error: {archive}: damaged archive (File is not a zip file); "
                               "removed, run again to download it afresh")
    assert list(to.iterdir()) == []


def test_a_zip_of_other_folders_is_refused(tmp_path, serve, archives):
    other = tmp_path / "other"
    (other / "a" / "b").mkdir(parents=True)
    (other / "a" / "b" / "c.txt").write_text("x")
    server = serve({**archives, "stage1_test.zip": zip_tree(other, tmp_path / "other.zip")})
    to = tmp_path / "data"
    with pytest.raises(SystemExit) as stop:
        download.main(["--to", str(to), "--mirror", server.url])
    assert str(stop.value) == (f"error: {to / 'stage1_test.zip'}: not DSB2018 data (expected "
                               "<id>/images/<id>.png for every folder, at the top level or "
                               "inside one folder)")
    assert sorted(p.name for p in to.iterdir()) == ["stage1_test.zip", "stage1_train",
                                                     "stage1_train.zip"]


def test_a_404_and_no_server_stop_in_one_line_naming_the_url(tmp_path, serve, archives):
    server = serve({k: v for k, v in archives.items() if k != "stage1_test.zip"})
    to = tmp_path / "data"
    with pytest.raises(SystemExit) as stop:
        download.main(["--to", str(to), "--mirror", server.url])
    assert str(stop.value) == f"error: {server.url}stage1_test.zip: HTTP 404 Not Found"
    # What came before is kept; nothing of the missing file is.
    assert sorted(p.name for p in to.iterdir()) == ["stage1_train", "stage1_train.zip"]

    server.shutdown()
    server.server_close()
    result = subprocess.run([sys.executable, "download.py", "--to", str(to),
                             "--mirror", server.url], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"error: {server.url}stage1_test.zip: cannot download "
                             "([Errno 111] Connection refused)\n")


def test_a_missing_solution_is_a_warning_the_images_are_enough(tmp_path, serve, archives,
                                                               capsys):
    del archives["stage1_solution.csv"]
    server = serve(archives)
    to = tmp_path / "data"
    download.main(["--to", str(to), "--mirror", server.url])  # no SystemExit
    assert data.list_ids(to / "stage1_train") == ["id00", "id01", "id02"]
    assert not (to / "stage1_solution.csv").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line]
    assert [line for line in lines if line.strip()] == [
        f"warning: {server.url}stage1_solution.csv: HTTP 404 Not Found; the images are in place, "
        "only the test set's score needs it (run again to fetch it)"]
