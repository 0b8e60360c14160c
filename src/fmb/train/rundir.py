"""One writer per output directory, and the run's status file.

`RunLock` holds an exclusive `flock` on `<dir>/.fmb.lock` for as long as a run (or an embedding
export) writes there. The kernel releases the lock when the process ends in any way, SIGKILL and
out-of-memory included, so a lock left by a crash is never in the way; the pid and host written
into the file only make the refusal message useful.

`status.json` says how the last run into a directory ended (completed, stopped, early_stopped,
failed), with its exit code, step, checkpoint and best step. `fmb status DIR` reads it and exits
with that code: under torchrun, whose agent reports a graceful stop (75) of its workers as its own
failure, this is how a requeue wrapper tells a stop from a crash. A status still saying "running"
while nobody holds the lock means the process was killed without a word (SIGKILL, OOM).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from fmb.errors import EXIT_OK, EXIT_RUNTIME, EXIT_STOPPED, ConfigError

LOCK_FILE = ".fmb.lock"
STATUS_FILE = "status.json"
EXIT_CODES = {"completed": EXIT_OK, "early_stopped": EXIT_OK, "stopped": EXIT_STOPPED, "failed": EXIT_RUNTIME}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunLock:
    """Exclusive lock on a directory; `acquire` raises ConfigError naming the holder."""

    def __init__(self, directory: Path, what: str = "run") -> None:
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = holder_of(self.path)
            raise ConfigError(
                f"{self.path.parent} is in use by another fmb {holder.get('what', self.what)} "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}): "
                "wait for it to end, or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now(),
                                 "what": self.what}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_of(lock_path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def is_locked(directory: Path) -> bool:
    """True while some process holds the directory's lock."""
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def write_status(directory: Path, **record: Any) -> None:
    """Replace `status.json` atomically (a reader never sees half a file)."""
    path = Path(directory) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp")
    tmp.write_text(json.dumps({**record, "updated": now()}, indent=1))
    os.replace(tmp, path)


def read_status(directory: Path) -> dict[str, Any]:
    """The status record, with `status` "crashed" for a run that says "running" but holds no lock."""
    path = Path(directory) / STATUS_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} has no {STATUS_FILE}: not an fmb run directory, or no run has started there")
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if record.get("status") == "running" and not is_locked(directory):
        record["status"] = "crashed"
    return record


def exit_code_of(record: dict[str, Any]) -> int:
    """The exit code a status stands for (running: 0, as nothing went wrong yet)."""
    return EXIT_CODES.get(record.get("status"), EXIT_OK if record.get("status") == "running" else EXIT_RUNTIME)
