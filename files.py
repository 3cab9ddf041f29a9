"""What every script's command line shares: one-line errors and warnings, atomic writes, a lock
per model file, clean stops on Ctrl-C and SIGTERM, and the --help layout. Nothing here knows about
images or models."""
import argparse
import contextlib
import math
import os
import signal
import sys
import warnings
from pathlib import Path


class InputError(ValueError):
    """A data folder, image, mask or model file that cannot be used, or an output that cannot be
    written; the message names it."""


def check_output_folder(folder, flag):
    """Refuse, before any work, a folder that cannot take outputs: a file on its path, or a
    nearest existing folder that is not writable. Nothing is created here."""
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{parent}: is a file, not a folder ({flag})")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"{parent}: not writable ({flag})")
            return


def partial_path(path):
    """Where `path` is written before it is renamed into place: beside it (the same file
    system), hidden, with the same suffix (Keras wants .keras)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_atomic(path, write):
    """Call write(tmp) on partial_path(path), flush it to disk, then rename it over `path`: a
    kill, a crash or a full disk at any moment leaves the earlier file whole, never a half file,
    and the partial file is removed. A failed write is an InputError naming `path`."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: could not be written ({error.strerror or error}); the earlier "
                         "file, if any, is kept") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself survives a power cut
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class FileLock:
    """An exclusive lock on a file beside `path` while a run writes `path`: a second run refuses
    at start, and the operating system releases the lock when the process ends, so a killed run
    never leaves it blocking (the lock file stays, unlocked)."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.handle = None

    def acquire(self):
        self.handle = open(self.lock_path, "a+")
        try:
            if os.name == "nt":
                import msvcrt
                msvcrt.locking(self.handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            self.handle = None
            raise InputError(f"{self.path}: in use by another run (locked: {self.lock_path}); "
                             "wait for it or choose another --model-path") from None

    def release(self):
        if self.handle is not None:
            self.handle.close()  # closing releases the lock
            self.handle = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class Stopped(Exception):
    """Ctrl-C or SIGTERM; the argument is the signal's name."""


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM raise Stopped, so that a script can end with one line instead of a
    traceback (or, for SIGTERM, silence); every file is written atomically, so none is half."""
    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as `warning: <message>` on stderr: the message names the file that is wrong;
    Python's default adds this project's source line, which tells the user nothing."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr)

    shown, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = shown


def exit_stopped(stopped, then):
    """End the process after Stopped with one line, and 128 + the signal's number."""
    name = str(stopped)
    print(f"stopped by {name}: {then}", file=sys.stderr)
    sys.exit(128 + getattr(signal, name))


# Argument types of the command lines: a bad value is argparse's one line, naming the flag.

def probability(text):
    value = float(text)
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a probability strictly between 0 and 1")
    return value


def positive(text):
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 1")
    return value


def natural(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 0")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the description's lines kept (its examples one to a line) and each flag's
    default said once: appended where the help does not say it and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, [], False)
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"
