"""Claims: one process per unit of work (a slide and an encoder) among processes, torchrun ranks and
hosts that share a store.

A claim is a JSON file `<dir>/<name>.claim` ({host, pid, pid_start, time, token}). Every change to a
claim (take, take over, release) happens under an exclusive `flock` on `<dir>/.lock`, held for
milliseconds: "is this claim stale?" and "replace it" are one atomic step, so two processes that
both find a stale claim can never both take it over. The kernel drops the lock when its holder dies,
so the lock itself never goes stale. (flock works across hosts on NFSv4 and Lustre/GPFS mounted with
locking; where a filesystem refuses it, the takeover still moves the stale claim aside with an
atomic rename and checks it moved the claim it judged, which leaves only a far narrower race.)

A claim is stale when its process is gone: on this host, when its pid is dead (or now belongs to
a process started later); on another host, whose pids cannot be checked, once it is older than
`timeout_s` (24 h by default, the age after which TRIDENT clears other hosts' locks). No heartbeat
is needed: a live process on another host is trusted for `timeout_s`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 24 * 3600.0
_warned_no_flock = False


def _pid_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    if start is not None:
        now = _pid_start(pid)
        return now is None or now == start
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The claim's content; None when it is gone; {} when unreadable (an old or damaged claim)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def is_stale(path: Path, data: dict[str, Any], timeout_s: float) -> bool:
    """Whether the claim in `path` (holding `data`) was left by a process that is gone."""
    host, pid = data.get("host"), data.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return not _pid_alive(pid, data.get("pid_start"))
    started = data.get("time")
    if not isinstance(started, (int, float)):
        try:
            started = path.stat().st_mtime
        except OSError:
            return False
    return time.time() - float(started) > timeout_s


@contextlib.contextmanager
def _mutex(directory: Path) -> Iterator[None]:
    """An exclusive flock on `directory/.lock` (see the module docstring); a no-op where refused."""
    global _warned_no_flock
    import fcntl

    fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if not _warned_no_flock:
                log.warning("%s: the filesystem refuses file locks (%s); claims fall back to rename checks",
                            directory, e)
                _warned_no_flock = True
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _write_new(path: Path, data: dict[str, Any]) -> bool:
    """Create `path` holding `data` if it does not exist: complete content or nothing, never a
    half-written claim (written to a temp file, then hard-linked into place, which fails if it exists)."""
    tmp = path.with_name(f".{path.name}.{data['token']}.tmp")
    tmp.write_text(json.dumps(data))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:  # no hard links here: exclusive create, then write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _move_aside(path: Path, judged: dict[str, Any]) -> None:
    """Remove the stale claim `judged` from `path` by an atomic rename to a unique name. If what was
    moved is not that claim (a fresh one replaced it since it was read), it is put back."""
    grave = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    try:
        if (_read(grave) or {}).get("token") != judged.get("token"):
            with contextlib.suppress(OSError):
                os.link(grave, path)
    finally:
        grave.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(directory: str | Path, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[bool]:
    """Yield True while this process holds the claim `name` in `directory`, False if a live process
    holds it. A stale claim (see the module docstring) is taken over; on exit a held claim is
    released, unless another process has since taken it over (then it is left alone)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.claim"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
          "time": time.time(), "token": uuid.uuid4().hex}
    mine = False
    with _mutex(d):
        for _ in range(3):
            if _write_new(path, me):
                mine = True
                break
            other = _read(path)
            if other is None:  # released between the two looks
                continue
            if not is_stale(path, other, timeout_s):
                break
            log.info("%s: taking over a stale claim of %s pid %s", path, other.get("host"), other.get("pid"))
            _move_aside(path, other)
    try:
        yield mine
    finally:
        if mine:
            with _mutex(d):
                if (_read(path) or {}).get("token") == me["token"]:
                    path.unlink(missing_ok=True)
