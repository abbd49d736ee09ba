"""Safe writing: one writer at a time per bundle directory or dataset id, and files replaced atomically.

`WriterLock(path, what)` is an exclusive lock file. Acquiring it creates the file with O_CREAT | O_EXCL, which
succeeds in exactly one process, and writes who holds it (pid, host, command, start time) as JSON, so that a
refused writer can say who is in the way. Releasing deletes the file. A process killed with -9 cannot delete
its lock: a lock whose pid no longer runs on this host is stale and is taken over with a `StaleLockWarning`.
A lock written on another host is never taken over (its pid cannot be checked from here); the error says to
delete it by hand once that writer is gone.

`write_atomically(path, payload)` writes a temporary `<path>.tmp-<pid>` next to `path`, fsyncs it and renames
it over `path`, so a crash leaves the old file or the new one, never a mix. Files get the permissions of
`open()` (0666 less the umask, usually 0644). `remove_stale_temporaries(directory)` deletes the temporaries
that killed processes left behind.

Only the standard library is used here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path

# a lock file is written right after it is created; one that is still unreadable after this long was left
# by a process that died between creating and writing it
UNREADABLE_LOCK_GRACE_S = 10.0
TEMPORARY_SUFFIX = re.compile(r"\.tmp-(\d+)$")


class LockedError(RuntimeError):
    """Another process holds the lock of a bundle directory or dataset id."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was taken over."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a possible pid
        return False
    return True


def this_process() -> dict:
    """What a lock file records about its holder; `token` tells this acquisition from any other."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}


def read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file, or None when it is unreadable (or gone)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
    if holder is None:
        return "a process that has not yet written its name into the lock"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('time')} "
            f"(`{holder.get('command')}`)")


def is_stale(holder: dict | None, path: Path) -> bool:
    """A lock is stale when its holder ran on this host and is gone, or when it was never written and is old."""
    if holder is None:
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_LOCK_GRACE_S
        except FileNotFoundError:
            return False  # released meanwhile: the next attempt to create it decides
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def fsync_directory(directory: Path) -> None:
    """Make renames in `directory` durable; not every filesystem allows fsync on a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def temporary_name(path: Path) -> Path:
    """Where a new version of `path` is written before it replaces `path`; the pid makes it this process's."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """Replace `path` by `payload` in one rename (see the module docstring)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:  # plain open(): the usual umask permissions
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(path.parent)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the `*.tmp-<pid>` files in `directory` whose process is gone; returns what was deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        match = TEMPORARY_SUFFIX.search(path.name)
        if match and path.is_file() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class WriterLock:
    """An exclusive lock file (see the module docstring); `what` names the locked thing in messages.

    Use as a context manager, or call `acquire` and `release`. Not re-entrant: a second acquisition, even in
    the same process, is refused."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.record: dict | None = None

    def acquire(self) -> None:
        if self.record is not None:
            raise LockedError(f"{self.what} is already locked by this writer")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = this_process()
        for _ in range(3):  # a stale lock is removed and the creation retried; twice covers a race on it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = read_lock(self.path)
                if not is_stale(holder, self.path):
                    raise LockedError(self.refusal(holder)) from None
                self.take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self.record = record
            return
        raise LockedError(self.refusal(read_lock(self.path)))

    def refusal(self, holder: dict | None) -> str:
        return (f"{self.what} is being written by another process: {describe_holder(holder)}; wait for it to "
                f"finish, or delete the lock file {self.path} if that process is gone")

    def take_over(self, holder: dict | None) -> None:
        """Remove a stale lock. A guard file makes sure that of two processes taking it over, the second does
        not remove the fresh lock of the first."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if time.time() - guard.stat().st_mtime > UNREADABLE_LOCK_GRACE_S:
                guard.unlink(missing_ok=True)  # left by a process that died while taking over
                return
            raise LockedError(self.refusal(holder)) from None
        os.close(fd)
        try:
            current = read_lock(self.path)
            if current == holder and is_stale(current, self.path):
                self.path.unlink(missing_ok=True)
                warnings.warn(f"{self.what}: took over the lock of {describe_holder(holder)}, which is no longer "
                              "running", StaleLockWarning, stacklevel=4)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete the lock file if it is still ours (someone may have deleted it by hand and taken it)."""
        if self.record is None:
            return
        current = read_lock(self.path)
        if current is not None and current.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
