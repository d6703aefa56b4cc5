"""Atomic file writes and output locks: a reader never sees a half-written model, label file or cubin,
and two runs never write the same output at once."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Temporary files are named ``.<name>.<host>-<pid>.<random>.part<suffix>`` so that a later run can
#: tell a dead writer's leftovers (same host, process gone) from a live writer's file.
PART = ".part"
LOCK_SUFFIX = ".octreenca-lock"


class OutputLocked(RuntimeError):
    """Another process holds the lock of an output path."""


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    """An existing file keeps its mode; a new one gets 0666 less the umask, like ``open()``."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_parts(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files of ``path`` left by killed writers on this host; returns what was removed.

    A part file whose writer (host, pid in its name) is still running is left alone.
    """
    path = Path(path)
    removed: list[Path] = []
    host = socket.gethostname()
    try:
        candidates = list(path.parent.glob("." + path.name + ".*" + PART + "*"))
    except OSError:
        return removed
    for part in candidates:
        tag = part.name[len(path.name) + 2 :].split(".", 1)[0]
        owner_host, _, pid = tag.rpartition("-")
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            part.unlink()
            removed.append(part)
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it into place.

    ``suffix`` ends the temporary name, for writers that pick the format from it (``.nii.gz``).
    On any error the temporary file is removed and ``path`` is left as it was; an ``OSError``
    (disk full, permission denied) names ``path``. The result has the mode of the file it
    replaces, or 0666 less the umask for a new file; leftovers of killed writers are removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_parts(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_tag()}.", suffix=PART + suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _naming(exc, path) from None
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error, naming ``path`` when it named no file (e.g. ENOSPC from a library)."""
    if exc.filename is not None and str(exc.filename) != "" and not str(exc.filename).endswith(PART):
        return exc
    new = type(exc)(exc.errno, exc.strerror or str(exc), str(path)) if exc.errno else OSError(str(exc) + f": {path}")
    return new


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The hidden lock file of an output path: ``.<name>.octreenca-lock`` beside it."""
    path = Path(path)
    return path.parent / ("." + path.name.rstrip("/") + LOCK_SUFFIX)


@contextmanager
def output_lock(path: str | os.PathLike[str], *, wait: bool = False, poll: float = 0.2) -> Iterator[Path]:
    """Hold an exclusive lock on output ``path`` for the block (``fcntl.flock`` on a lock file beside it).

    A second holder fails at once with :class:`OutputLocked`, or with ``wait`` blocks until the
    first is done. The lock file is removed on release; a holder re-checks that the file it locked
    is still the one on disk, so removal never lets two runs in. A killed holder's lock is released
    by the kernel.
    """
    import fcntl

    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputLocked(
                    f"another octreenca run is writing {path}: wait for it to finish, pass --wait, "
                    "or choose another output"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        time.sleep(poll if wait else 0)
    try:
        try:
            os.write(fd, f"{_tag()}\n".encode())  # who holds it, for a curious user; optional
        except OSError:
            pass
        yield lp
    finally:
        try:
            lp.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
