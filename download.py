"""Fetch the DSB2018 stage-1 data (BBBC038, CC0: stage1_train.zip, stage1_test.zip and
stage1_solution.csv) and extract the archives into the layout the scripts read.

python download.py                    # into data/: train.py and predict.py then use it
python download.py --to DIR --mirror URL
"""
import argparse
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

import config
from data import image_path, list_ids
from files import HelpFormatter, InputError, Stopped, exit_stopped, stop_on_signals

# A transfer cut after it started is resumed up to this many times in one run (a run that still
# fails leaves the partial file, and the next run resumes it); a failed connection stops at once.
FETCH_ATTEMPTS = 5


FETCH_TIMEOUT = 60  # seconds without a byte before a connection counts as cut


CHUNK = 1 << 20


def fetch(url, path):
    """Download `url` to `path` through `<path>.partial`, renamed into place once complete; a cut
    transfer continues where the partial file ends, with an HTTP Range request."""
    partial = path.with_name(path.name + ".partial")
    for _ in range(FETCH_ATTEMPTS):
        start = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                              timeout=FETCH_TIMEOUT)
        except urllib.error.HTTPError as error:
            if error.code == 416:  # the partial file is not the start of this file: start over
                partial.unlink()
                continue
            raise InputError(f"{url}: HTTP {error.code} {error.reason}") from None
        except OSError as error:  # URLError, refused, timed out, no route, unknown host
            reason = getattr(error, "reason", error)
            raise InputError(f"{url}: cannot download ({reason})") from None
        with response:
            if response.status != 206:  # the server ignored the Range: the whole file comes
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            received = start
            with open(partial, "ab" if start else "wb") as file, \
                    tqdm(total=total, initial=start, desc=path.name, unit="B", unit_scale=True,
                         unit_divisor=1024) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException):
                        break  # cut: resumed below
                    if not chunk:
                        break
                    file.write(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
        if total is None or received == total:
            os.replace(partial, path)
            return
        print(f"{url}: transfer cut at {received:,} of {total:,} bytes")
    raise InputError(f"{url}: transfer cut {FETCH_ATTEMPTS} times; run again to resume from "
                     f"{partial}")


def extract(archive, folder):
    """Check `archive` (a zip of DSB2018 id folders, at its top level or inside one folder) and
    extract it as `folder`: into a hidden temporary folder first, renamed once complete and
    checked, so that a half-extracted folder never looks like data. A damaged archive is
    removed, so that the next run downloads it afresh."""
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while extracting
    tmp.mkdir()
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"bad CRC in {bad}")
                for member in tqdm(zf.infolist(), desc=f"extracting {archive.name}",
                                   unit="files"):
                    zf.extract(member, tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            archive.unlink()
            raise InputError(f"{archive}: damaged archive ({error}); removed, run again to "
                             "download it afresh") from None
        entries = list(tmp.iterdir())
        root = tmp
        if len(entries) == 1 and entries[0].is_dir() and not (entries[0] / "images").is_dir():
            root = entries[0]  # one enclosing folder around the id folders
        try:  # the scripts' own reading of a data folder
            ids = list_ids(root)
            for id_ in ids:
                image_path(root, id_)
        except InputError:
            raise InputError(f"{archive}: not DSB2018 data (expected <id>/images/<id>.png for "
                             "every folder, at the top level or inside one folder)") from None
        os.replace(root, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ids


def download(to, base_url):
    """Fetch config.DATA_FILES from `base_url` into `to` and extract the archives; what is
    already in place is left as it is."""
    to.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for name in config.DATA_FILES:
        url, path = base_url.rstrip("/") + "/" + name, to / name
        folder = to / Path(name).stem if name.endswith(".zip") else path
        if folder.exists():
            count = f" ({len(list_ids(folder))} images)" if folder.is_dir() else ""
            print(f"{folder}: in place{count}")
            continue
        fetched += 1
        if not path.exists():
            try:
                fetch(url, path)
            except InputError as error:
                if name.endswith(".zip"):
                    raise
                # The images are what train.py and predict.py need; the solution only scores
                # the test submission.
                print(f"warning: {error}; the images are in place, only the test set's score "
                      "needs it (run again to fetch it)", file=sys.stderr)
                continue
        if name.endswith(".zip"):
            print(f"{folder}: {len(extract(path, folder))} images")
            continue
        with open(path, "rb") as file:
            header = file.readline(200)
        if not header.startswith(b"ImageId,EncodedPixels"):
            path.unlink()
            raise InputError(f"{url}: not a solution CSV (its first line is {header[:60]!r})")
        print(f"{path}: the stage-1 test solution")
    if not fetched:
        print(f"Everything is in place in {to}: nothing to fetch.")
    if to.resolve() == config.DATA_DIR:
        print("train.py and predict.py use it by default.")
    else:
        print(f"Pass --train-dir {to / 'stage1_train'} --test-dir {to / 'stage1_test'} to the "
              "scripts.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--to", type=Path, default=config.DATA_DIR,
                        help="folder for the archives and the extracted data")
    parser.add_argument("--mirror", default=config.DATA_URL, metavar="URL",
                        help="base URL holding the same file names")
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():
            download(args.to, args.mirror)
    except InputError as error:
        sys.exit(f"error: {error}")
    except OSError as error:  # writing: a full disk, a folder that is not writable
        sys.exit(f"error: {error.filename or args.to}: {error.strerror or error}; run again to "
                 "resume")
    except Stopped as stopped:
        exit_stopped(stopped, "a partial download is kept and resumed by the next run")


if __name__ == "__main__":
    main()
