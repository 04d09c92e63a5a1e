"""Writing files so that a crash never leaves a half-written result where a whole one is expected.

Everything gptx publishes (a checkpoint, an export, a prepared dataset, a cache entry) is built
in a hidden sibling named ``.<name>.tmp-<pid>-<random>`` and renamed into place when complete.
A process killed with -9 leaves its temporary behind; the next writer of the same name removes
the temporaries whose process is gone (and never one a live process is still writing).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Optional

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


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` (UTF-8): written beside it and renamed, so a
    crash leaves the previous version whole. A write the machine refuses (a full disk, a file
    size limit, a read-only folder) leaves no temporary behind and is an OSError naming ``path``,
    never a bare "No space left on device"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(path)) from None


def refused_write(err: BaseException, final: Path, what: str) -> Optional[GptxError]:
    """The one-line error for a build of ``final`` (``what``: "the shards", "the export") that
    the machine refused to write (a full disk, a file size limit, a read-only folder): the OS's
    reason from anywhere in the exception's chain (torch, onnx and numpy wrap it), the path the user
    named rather than our hidden temporary, and what is left there. None when ``err`` is no such
    refusal (or is an interrupt), so the caller re-raises it as it was."""
    if not isinstance(err, Exception):
        return None
    e, seen = err, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            left = "the earlier one there is intact" if os.path.lexists(final) else "nothing was written there"
            return GptxError(f"{final}: cannot write {what} ({e.strerror}); {left}")
        e = e.__cause__ or e.__context__
    return None
