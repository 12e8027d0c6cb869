"""One `dsv4 train` per run directory: the lock file RUN_DIR/dsv4.lock.

`dsv4 train` takes the lock before it starts torchrun or writes anything into checkpoint.dir, and
holds it until its ranks have exited; it is released on every exit (the file is removed; an
exception or signal included). The lock is an exclusive `fcntl.flock` on the file, which the
kernel drops when its holder dies, however it dies; the file's JSON names the holder:

    {"pid": 1234, "host": "node0", "started": <process start time>, "children": [[pid, started]],
     "command": "dsv4 train ..."}

`children` is the torchrun agent, so ranks that outlive a killed `dsv4 train` still hold the run.
A second run finds the flock taken (or the named processes alive on this host) and is refused
(RunLocked: exit 2 naming the holder's pid and host), without writing anything. A lock left by
a dead process (flock free, no named process alive on this host) is taken over with a note. A
lock naming another host whose flock is free cannot be checked from here: it is refused, with
the file to delete if that run is gone. No torch import.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

LOCK_NAME = "dsv4.lock"


class RunLocked(Exception):
    """The run directory is held by another live `dsv4 train`, or cannot hold a lock file (exit 2)."""


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _start_time(pid: int) -> Optional[float]:
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except psutil.Error:
        return None


def _alive(pid: int, started: Optional[float]) -> bool:
    """Is `pid` (started at `started`, if known) running on this host? A reused pid does not count."""
    now = _start_time(int(pid))
    return now is not None and (started is None or abs(now - float(started)) < 1.0)


def read_holder(run_dir: str | Path) -> Optional[dict]:
    """The lock file's record, {} if unreadable, None if there is no lock file."""
    try:
        text = lock_path(run_dir).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def holder_alive(holder: dict) -> bool:
    """Does the record name a process still running on this host (the holder or its torchrun)?"""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    procs = [(holder.get("pid"), holder.get("started"))] + [tuple(c) for c in holder.get("children", [])]
    return any(pid is not None and int(pid) != os.getpid() and _alive(int(pid), started) for pid, started in procs)


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (its lock file is being written or unreadable)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid", -1), holder.get("started")):
        orphans = [str(pid) for pid, started in holder.get("children", []) if _alive(pid, started)]
        if orphans:
            text += f", whose torchrun (pid {', '.join(orphans)}) is still running"
    return text


def _refusal(run_dir: Path, holder: Optional[dict]) -> str:
    return (f"checkpoint.dir: {run_dir} is in use by another dsv4 train ({describe(holder)}); "
            f"wait for it to finish, stop it, or use another --set checkpoint.dir=...")


def _other_host(run_dir: Path, holder: dict) -> str:
    return (f"checkpoint.dir: {run_dir} is locked by {describe(holder)}, which cannot be checked from "
            f"{socket.gethostname()}; if no run uses the directory any more, delete {lock_path(run_dir)}")


def check_free(run_dir: str | Path) -> None:
    """Quick look before any work (writes nothing, creates nothing): raises RunLocked if the
    directory is visibly held. `RunLock.acquire` is the real test."""
    run_dir = Path(run_dir)
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RunLocked(_refusal(run_dir, read_holder(run_dir))) from None
        return
    finally:
        os.close(fd)
    holder = read_holder(run_dir)
    if holder_alive(holder):
        raise RunLocked(_refusal(run_dir, holder))


class RunLock:
    """`with RunLock(run_dir) as lock:` holds RUN_DIR/dsv4.lock; `lock.notes` says what was taken over.

    `lock.add_child(pid)` records a child process (torchrun) as part of the holder.
    """

    def __init__(self, run_dir: str | Path, command: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self.command = command if command is not None else " ".join(["dsv4", *sys.argv[1:]])
        self.notes: list[str] = []
        self._fd: Optional[int] = None
        self._record: dict = {}

    def acquire(self) -> "RunLock":
        while True:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunLocked(f"checkpoint.dir: cannot create {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunLocked(_refusal(self.run_dir, read_holder(self.run_dir))) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file while we waited: lock the new one
        previous = read_holder(self.run_dir)
        if previous:
            if previous.get("host") != socket.gethostname():
                os.close(fd)
                raise RunLocked(_other_host(self.run_dir, previous))
            if holder_alive(previous):  # a file system without working flock
                os.close(fd)
                raise RunLocked(_refusal(self.run_dir, previous))
            self.notes.append(f"took over the lock of {describe(previous)}, which is no longer running")
        self._fd = fd
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
                        "children": [], "command": self.command}
        self._write()
        return self

    def add_child(self, pid: int) -> None:
        self._record["children"].append([pid, _start_time(pid)])
        self._write()

    def _write(self) -> None:
        data = (json.dumps(self._record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
