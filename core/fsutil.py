"""Writing files so that a crash never leaves a half-written result where a whole one is expected.

Everything gptx publishes (a checkpoint, an export, a prepared dataset, a cache entry) is built
in a hidden sibling named ``.<name>.tmp-<pid>-<random>`` and renamed into place when complete.
A process killed with -9 leaves its temporary behind; the next writer of the same name removes
the temporaries whose process is gone (and never one a live process is still writing).
"""
from __future__ import annotations

import io  # noqa: F401 (the type open_regular returns)

import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from gptx.errors import GptxError


def cache_root() -> Path:
    """Where gptx caches tokenized data and downloaded runs: $GPTX_CACHE_DIR, else ~/.cache/gptx."""
    return Path(os.environ.get("GPTX_CACHE_DIR") or Path.home() / ".cache" / "gptx")


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """A new hidden directory beside ``final`` for building it (mode as an ordinary mkdir)."""
    for _ in range(100):
        path = final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:  # name the path the user gave, not our hidden temporary
            raise OSError(e.errno, f"cannot be written there: {e.strerror}", str(final)) from None
    raise FileExistsError(f"cannot create a temporary directory beside {final}")


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished directory ``new`` to ``final``. A directory already there is renamed into
    a temporary sibling first (put back if the move fails, deleted after), so ``final`` is at every
    moment the old or the new whole; the parent is synced so the rename survives a crash."""
    old = None
    if final.exists():
        old = temp_sibling(final.resolve(), "old")
        os.rename(final, old / "old")
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None:
            os.rename(old / "old", final)
        raise
    fd = os.open(final.resolve().parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_siblings(final: Path) -> list[Path]:
    """Remove ``.<name>.<kind>-<pid>-*`` leftovers beside ``final`` whose process has exited,
    with the side files SQLite keeps beside a database being written (``-journal``, ``-wal``, ``-shm``).
    A killed replace_dir's earlier output (``.<name>.old-*/old``) goes back to ``final`` when nothing
    took its place: the kill came between its two renames."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.([a-z]+)-(\d+)-[0-9a-f]+(-journal|-wal|-shm)?$")
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not pid_alive(int(m.group(2))):
            if m.group(1) == "old" and (entry / "old").is_dir() and not os.path.lexists(final):
                os.rename(entry / "old", final)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def open_regular(path, what: str = "") -> "io.BufferedReader":
    """``open(path, "rb")`` for a file a user named, refusing anything but a regular file: opening a
    FIFO waits for a writer forever and a device never ends. Opened without blocking, checked on
    the open descriptor (no window between a check and the open). ``what``: a prefix for the error
    (the option or key that named the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device, which would block or never end"
            raise GptxError(f"{what + ': ' if what else ''}{path}: is not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, what: str = "") -> bytes:
    """The bytes of a regular file (see ``open_regular``)."""
    with open_regular(path, what) as f:
        return f.read()
