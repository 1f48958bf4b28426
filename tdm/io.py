"""Atomic writes and the artefact folders' integrity: the one place where tdm-flow touches disk.

Every artefact is written to a temporary sibling and renamed into place, so a failed or killed
command leaves the earlier output intact and never a half-written one:

- files: ``write_bytes``, ``write_text``, ``write_json``, ``save_torch``, or ``atomic_file`` for a
  writer that wants a path;
- folders: ``atomic_dir`` yields a temporary folder and swaps it in when the block succeeds.

A folder swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux (no moment without the folder).
Where the kernel or file system lacks it, two renames move the old folder aside and the new one
in; a crash between them leaves ``.<name>.old-<id>`` beside a missing ``<name>``, and
``recover_dir`` (called by every swap and by the loaders) puts it back.

A folder's ``manifest.json`` (``write_manifest``/``verify_manifest``) holds the sha256 of every
file in it, so a changed byte is found at load time instead of silently changing scores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tdm.errors import TdmError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


class IntegrityError(TdmError, ValueError):
    """An artefact whose bytes differ from what was recorded when it was written."""


# ----------------------------------------------------------------------------------- files
def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.{kind}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, it replaces ``path``.

    The temporary file is created empty (umask-governed mode, not mkstemp's 0600) so the writer
    may open it or hand its name to a library. On any exception it is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns ``path``."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def dumps_json(data: Any) -> str:
    """Indented JSON text with numpy scalars/arrays and paths converted."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically. Returns ``path``."""
    return write_text(path, dumps_json(data))


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically. Returns ``path``."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (``md5`` is what DVC 3 records)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path)


# ----------------------------------------------------------------------------------- folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    done = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _aside(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.*.old"))


def recover_dir(final: str | Path) -> None:
    """Finish or undo a folder swap that a crash interrupted.

    ``final`` missing with a ``.<name>.*.old`` beside it: the crash came between the two renames
    of ``swap_dir``, so the old folder (complete) is renamed back. ``final`` present: leftovers
    of a finished swap are removed.
    """
    final = Path(final)
    aside = _aside(final)
    if not aside:
        return
    if not final.exists():
        os.rename(aside.pop(), final)
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


def swap_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing what is there.

    One atomic exchange where the system has it; else old aside, new in, old removed, with
    ``recover_dir`` undoing a crash in between and an exception rolling back.
    """
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return
    if _exchange(tmp, final):  # tmp now holds the old folder
        _fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _temp_sibling(final, "old")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | Path, manifest: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final``; when the block succeeds it replaces
    ``final`` (``swap_dir``), with a ``manifest.json`` of its files when ``manifest``. On any
    exception the temporary folder is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the published folder
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        swap_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------- manifests
def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/manifest.json``: the sha256 and size of every file in it. Returns it."""
    folder = Path(folder)
    files = {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in _files(folder)
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def manifest_digest(folder: str | Path) -> str:
    """sha256 of the folder's manifest file: one hash that changes when any file changes."""
    return sha256_file(Path(folder) / MANIFEST_FILE)


def verify_manifest(folder: str | Path, required: bool = True) -> dict[str, Any] | None:
    """Check every file of ``folder`` against its manifest.

    Args:
        folder: a folder written with ``atomic_dir(..., manifest=True)``.
        required: a missing manifest is an error (else None is returned).
    Returns:
        The manifest, or None when there is none and it is not required.
    Raises:
        IntegrityError: naming the first file that is missing, extra, or changed.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        if required:
            raise IntegrityError(f"{path}: missing (written by an older tdm-flow? re-run it)")
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{path}: corrupt manifest") from None
    present = set(_files(folder))
    for name, entry in sorted(files.items()):
        if name not in present:
            raise IntegrityError(f"{folder / name}: missing (listed in {MANIFEST_FILE})")
        if (folder / name).stat().st_size != entry.get("bytes") or sha256_file(
            folder / name
        ) != entry.get("sha256"):
            raise IntegrityError(
                f"{folder / name}: sha256 differs from {MANIFEST_FILE} (the file changed after "
                "it was written; re-create it)"
            )
    extra = sorted(present - set(files))
    if extra:
        raise IntegrityError(f"{folder / extra[0]}: not listed in {MANIFEST_FILE}")
    return manifest


# ----------------------------------------------------------------------------------- locks
LOCK_FILE = ".tdm.lock"


class LockedError(TdmError, RuntimeError):
    """Another process holds the lock of an artefact root."""


@contextmanager
def root_lock(root: str | Path, what: str = "tdm") -> Iterator[Path]:
    """Hold an exclusive lock on the artefact folder ``root`` for the block.

    Two runs on one root would resume each other's checkpoints and evaluate on each other's
    splits; the second one fails at once instead, with a message naming the holder. The lock is
    an ``flock`` on ``<root>/.tdm.lock``, released by the kernel when the holder exits, even by
    ``kill -9``, so it never goes stale. Not re-entrant: take it once, where a run starts.

    Args:
        root: the folder (created if missing).
        what: a description of the holder written into the lock file (the command line).
    Raises:
        LockedError: naming the holder's pid, command and start time.
    """
    import datetime
    import fcntl
    import socket

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise LockedError(
                f"{root}: in use by {holder}; wait for it to finish or use another --root"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = f"pid {os.getpid()} on {socket.gethostname()} ({what}, started {started})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
