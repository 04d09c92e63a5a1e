"""Writing files so that a crash never leaves a half-written result where a whole one is expected.

Everything gptx publishes (a checkpoint, an export, a prepared dataset, a cache entry) is built
in a hidden sibling directory named ``.<name>.<kind>-<pid>-<random>`` and renamed into place when
complete. A process killed with -9 leaves its temporary behind; the next writer of the same name
removes the temporaries whose process is gone (and never one a live process is still writing).

A name proves nothing (a user or another tool may own ``.out.tmp-123-abc``), so each temporary
carries a marker file, ``.gptx-temporary``, holding its own name: only a directory whose marker
says so is ever removed as a leftover. ``publishable`` takes the marker out just before the
temporary is renamed into place, so no published output carries it.
"""
from __future__ import annotations

import contextlib
import errno
import io  # noqa: F401 (the type open_regular returns)
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Optional

from gptx.errors import GptxError

MARKER = ".gptx-temporary"


def cache_root() -> Path:
    """Where gptx caches tokenized data and downloaded runs: $GPTX_CACHE_DIR, else ~/.cache/gptx."""
    return Path(os.environ.get("GPTX_CACHE_DIR") or Path.home() / ".cache" / "gptx")


MAX_NAME_BYTES = 255  # the longest file name Linux and macOS file systems take


def path_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder's name inside another (None when it can): a name that
    becomes a path (an experiment, a run) must stay inside its parent, whatever it holds."""
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty name"
    if name in (".", ".."):
        return f"must be a folder name, not {name!r}"
    if "/" in name or "\\" in name:
        return "must not contain '/' or '\\' (it names one folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain control characters (NUL, newline, ...)"
    if name.startswith("-"):
        return "must not start with '-' (it would read as an option on a command line)"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes as a file name, got {len(name.encode('utf-8', 'surrogatepass'))}"
    return None


def refuse_to_replace(out: Path, protected) -> None:
    """An output folder gptx would replace (``--force`` replaces it whole) must not be, or hold, one
    of ``protected`` (the source, the working directory) nor the user's home directory: replacing it
    would delete them. It must also be a folder if it exists."""
    target = Path(out).resolve()
    for p in (*protected, Path.home()):
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise GptxError(f"{out}: refusing to replace a directory that contains {p}")
    if os.path.lexists(out) and not Path(out).is_dir():
        raise GptxError(f"{out}: exists and is not a directory")


def refuse_foreign_files(out: Path, manifest: str, written: set[str], not_ours: str, ours: str) -> None:
    """A non-empty ``out`` that gptx would replace must be its own earlier output (``manifest``
    there) holding only the files it wrote (``written``): replacing anything else would delete
    what gptx did not write. ``not_ours`` / ``ours`` say what the folder is not / is, in the
    messages (e.g. "a previous gptx export")."""
    if not (out / manifest).is_file():
        raise GptxError(f"{out}: not empty and not {not_ours}; choose another -o or pass --force to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GptxError(f"{out}: {ours}, but it also holds files gptx did not write ({shown}); "
                        "move them, choose another -o, or pass --force to replace the whole directory")


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """A new hidden directory beside ``final`` for building it (mode as an ordinary mkdir),
    marked as gptx's temporary."""
    for _ in range(100):
        path = final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:  # name the path the user gave, not our hidden temporary
            raise OSError(e.errno, f"cannot be written there: {e.strerror}", str(final)) from None
        try:
            (path / MARKER).write_text(path.name)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise OSError(e.errno, f"cannot be written there: {e.strerror}", str(final)) from None
        return path
    raise FileExistsError(f"cannot create a temporary directory beside {final}")


def publishable(tmp: Path) -> Path:
    """``tmp`` without its marker, ready to be renamed into place (a kill right after this leaves
    an unmarked temporary: never removed automatically, never data lost)."""
    (tmp / MARKER).unlink(missing_ok=True)
    return tmp


def is_our_temporary(entry: Path) -> bool:
    """Whether ``entry`` is a directory that temp_sibling made (its marker names it), or one it
    was killed in the middle of making (empty, or an empty marker alone: removing it loses nothing)."""
    try:
        if entry.is_symlink() or not entry.is_dir():
            return False
        names = os.listdir(entry)
        if MARKER not in names:
            return not names
        text = (entry / MARKER).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return text == entry.name or (text == "" and names == [MARKER])


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished directory ``new`` (a temp_sibling) to ``final``. A directory already there
    is renamed into a temporary sibling first (put back if the move fails, deleted after), so
    ``final`` is at every moment the old or the new whole; the parent is synced so the rename
    survives a crash."""
    old = None
    publishable(new)
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
    """Remove gptx's temporaries beside ``final`` (``.<name>.<kind>-<pid>-*``, marked) whose process
    has exited. A killed replace_dir's earlier output (``.<name>.old-*/old``) goes back to ``final``
    when nothing took its place: the kill came between its two renames. Anything without gptx's
    marker is left alone, whatever its name."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.([a-z]+)-([0-9]+)-[0-9a-f]+$")
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or pid_alive(int(m.group(2))) or not is_our_temporary(entry):
            continue
        if m.group(1) == "old" and (entry / "old").is_dir() and not os.path.lexists(final):
            os.rename(entry / "old", final)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def remove_created_dirs(deepest: Path, created: Optional[Path]) -> None:
    """Remove the directories from ``deepest`` up to ``created`` that a failed writer made, each
    only while it is empty: another writer (or the user) may have put something there meanwhile."""
    if created is None:
        return
    path = deepest
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == created or path.parent == path:
            return
        path = path.parent


def unwritable_ancestor(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` (itself included) when gptx could not create
    entries in it (not a directory, or no write/search permission); None when ``path`` can be made."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return None if p.is_dir() and os.access(p, os.W_OK | os.X_OK) else p


def first_missing(path: Path) -> Optional[Path]:
    """The outermost directory of ``path``'s parents (or ``path``) that does not exist yet."""
    return next((p for p in [*reversed(path.parents), path] if not os.path.lexists(p)), None)


@contextlib.contextmanager
def directory_lock(directory: Path):
    """An exclusive lock held on the directory itself while the block runs (nothing is left
    behind in it); waits for another holder."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class HeldLock:
    """An exclusive ``flock`` on a lock file, held until ``release()`` or the process's end (the OS
    drops it when the process dies, even by kill -9: a lock is never stale)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release  # a lock nobody refers to any more is not held


def try_lock(path: Path) -> tuple[Optional[HeldLock], str]:
    """Take the lock file ``path`` (created if missing) without waiting: the held lock, or None
    and what the holder wrote into it (its pid). The holder's pid is written into the file."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None, holder
        raise OSError(err.errno, f"cannot be locked: {err.strerror}", str(path)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return HeldLock(fd, path), ""


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


def open_regular(path, what: str = "") -> "io.BufferedReader":
    """``open(path, "rb")`` for a file a user named, refusing anything but a regular file: opening a
    FIFO waits for a writer forever and a device never ends. Opened without blocking, checked on
    the open descriptor (no window between a check and the open). ``what``: a prefix for the error
    (the option or key that named the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            problem = ("is a directory, not a file" if stat.S_ISDIR(mode)
                       else "is not a regular file (a FIFO, socket or device, which would block or never end)")
            raise GptxError(f"{what + ': ' if what else ''}{path}: {problem}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, what: str = "") -> bytes:
    """The bytes of a regular file (see ``open_regular``)."""
    with open_regular(path, what) as f:
        return f.read()
