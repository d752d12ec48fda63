"""Names from untrusted sources, and writes that stay inside the folder they belong in.

A Hub listing, a manifest on disk or a registry entry can carry any string. `name_problem` says why a string
cannot be a file path relative to a target folder (absolute, `..`, backslash, drive, control characters, too
long). The file operations below walk the folder one component at a time through directory file descriptors
opened with O_NOFOLLOW, so a symlink planted anywhere under the root (a parent folder, the file itself) is
refused instead of followed: a write can never land outside the root, whatever was planted before or during
the run. Errors from the OS carry the full path, so the one-line message names the file. `folder_lock` keeps two
runs from writing one folder at once.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from dsv4cli.errors import UnsafePathError

MAX_COMPONENT_BYTES = 200  # below NAME_MAX (255) with room for suffixes such as `.part`
MAX_PATH_BYTES = 1024
MAX_DEPTH = 32
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}  # control, format, surrogate, private, line breaks
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def name_problem(name: object) -> str | None:
    """Why `name` is not a safe, normalised, relative POSIX path of a file, or None when it is."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    bad = next((c for c in name if unicodedata.category(c) in _FORBIDDEN_CATEGORIES), None)
    if bad is not None:
        return f"contains control character U+{ord(bad):04X}"
    if "\\" in name or ":" in name:
        return "contains a backslash or colon (a Windows or drive path)"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "is not a normalised relative path (empty, '.' or '..' component)"
    if len(parts) > MAX_DEPTH:
        return f"is nested deeper than {MAX_DEPTH} folders"
    if len(name.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        return f"is too long (at most {MAX_COMPONENT_BYTES} bytes per component, {MAX_PATH_BYTES} in all)"
    return None


def listing_problem(names: Iterable[str], *, reserved_prefix: str = "") -> tuple[str, str] | None:
    """The first (name, why) that makes a set of file names unsafe to create together, or None.

    Beyond each name on its own: no duplicates (ignoring case and Unicode normalisation, as macOS and Windows
    compare names), no name that is also another's folder, and no top-level name starting with
    `reserved_prefix` (where dsv4 keeps its state).
    """
    reserved_prefix = reserved_prefix.casefold()
    keys: dict[str, str] = {}
    folders: set[str] = set()
    for name in names:
        why = name_problem(name)
        if why:
            return name, why
        key = unicodedata.normalize("NFC", name).casefold()
        if reserved_prefix and key.startswith(reserved_prefix):
            return name, "uses a name dsv4 keeps for its own state"
        if key in keys:
            return name, "is listed twice"
        keys[key] = name
        parts = key.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = next((key for key in keys if key in folders), None)
    return (keys[clash], "is both a file and a folder in the listing") if clash is not None else None


def readable_name(name: object) -> str:
    """`name` for a one-line message: quoted, control characters escaped, cut short when huge."""
    text = repr(name)
    return text if len(text) <= 200 else f"{text[:200]}...'"


@contextmanager
def _opened_dir(root: Path, parts: list[str], *, create: bool) -> Iterator[int]:
    """An fd of root/parts..., each component opened without following symlinks (created first if asked)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as e:
                    _refuse_or_name(e, root.joinpath(*parts[: i + 1]))
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                _refuse_or_name(e, root.joinpath(*parts[: i + 1]))
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _refuse_or_name(e: OSError, path: Path) -> NoReturn:
    """Turn 'a symlink, FIFO or socket is there' into UnsafePathError; give other OS errors the full path."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
        raise UnsafePathError(
            f"{path} is a symlink, a hard link or not a regular file or folder; refusing to use it",
            hint="remove it (dsv4 never creates symlinks) and run the command again",
        ) from e
    e.filename = str(path)
    raise e


class SafeFile(io.FileIO):
    """An unbuffered file whose read/write errors name its path (the OS leaves ENOSPC unnamed)."""

    path = ""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        """Write all of `data` (a raw write may stop short, e.g. just before the disk is full)."""
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += super().write(view[done:]) or 0
        except OSError as e:
            e.filename = e.filename or self.path
            raise
        return done

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        try:
            return super().read(size) or b""
        except OSError as e:
            e.filename = e.filename or self.path
            raise


def _split(rel: str) -> tuple[list[str], str]:
    parts = rel.split("/")
    return parts[:-1], parts[-1]


def open_file(root: Path, rel: str, mode: str) -> SafeFile:
    """Open root/rel ('rb', 'wb' or 'ab') without following a symlink anywhere below root.

    Only a regular file is ever opened (a FIFO or device planted there is refused), a file is written only if
    it has no other hard link (one planted to a file elsewhere would carry the writes there), and writing modes
    create the parent folders the same careful way.
    """
    flags = {"rb": os.O_RDONLY, "wb": os.O_WRONLY | os.O_CREAT, "ab": os.O_WRONLY | os.O_CREAT}[mode]
    parents, name = _split(rel)
    path = root / rel
    with _opened_dir(root, parents, create=mode != "rb") as dir_fd:
        try:
            # O_NONBLOCK: opening a planted FIFO must not hang; it has no effect on regular files.
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666, dir_fd=dir_fd)
        except OSError as e:
            _refuse_or_name(e, path)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (mode != "rb" and st.st_nlink > 1):
        os.close(fd)
        _refuse_or_name(OSError(errno.ENXIO, "not a regular file"), path)
    if mode == "wb":
        os.ftruncate(fd, 0)
    elif mode == "ab":
        os.lseek(fd, 0, os.SEEK_END)
    f = SafeFile(fd, mode)
    f.path = str(path)
    return f


def file_size(root: Path, rel: str) -> int | None:
    """Size of root/rel if it is a regular file reached without symlinks, else None (missing or not ours)."""
    parents, name = _split(rel)
    try:
        with _opened_dir(root, parents, create=False) as dir_fd:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, UnsafePathError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def replace(root: Path, src: str, dst: str) -> None:
    """Rename root/src over root/dst (atomic); a symlink at dst is replaced itself, never followed."""
    src_parents, src_name = _split(src)
    dst_parents, dst_name = _split(dst)
    with (
        _opened_dir(root, src_parents, create=False) as src_fd,
        _opened_dir(root, dst_parents, create=True) as dst_fd,
    ):
        try:
            os.replace(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as e:
            _refuse_or_name(e, root / dst)


def unlink(root: Path, rel: str) -> None:
    """Remove root/rel if it is there (a symlink is removed itself)."""
    parents, name = _split(rel)
    try:
        with _opened_dir(root, parents, create=False) as dir_fd:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        _refuse_or_name(e, root / rel)


def make_dirs(root: Path, rel: str) -> None:
    """Create root/rel and its parents, refusing a symlink at any level."""
    with _opened_dir(root, rel.split("/"), create=True):
        pass


@contextmanager
def folder_lock(root: Path, name: str, *, what: str, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on root/name (flock) for the block, creating root if needed.

    The kernel drops the lock when the process dies, so a killed run never leaves a stale one. A second run
    waits for the first, as `hf download` does, after saying which process it waits for (the holder writes its
    pid into the file). The file stays: deleting it would let a third run lock a new file beside a waiter.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise UnsafePathError(
            f"{root} cannot be a folder ({e.strerror}: {e.filename})", hint="choose another folder"
        ) from e
    with open_file(root, name, "ab") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open_file(root, name, "rb") as holder:
                pid = holder.read(32).decode(errors="replace").strip()
            on_wait(f"{root} is in use by another {what} (pid {pid or 'unknown'}); waiting for it to finish")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.truncate(0)
        f.seek(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        yield
