"""One writer per store: a lock file that a crashed writer cannot leave stuck forever.

`writer_lock(url)` holds ``<store>/.stroke-ray-lock`` for the length of a conversion. The
file names its holder (host, pid, command, start time) and when it was last renewed; a
background thread renews it every quarter of the lease. A second writer gets one line::

    <store>: being written by another process (convert on host h, pid 123, since
    2026-11-25 16:40:01 UTC); wait for it to finish

A lock is stale, and is taken over, when its holder is on this host and its pid is gone,
or when it has not been renewed for a whole lease (a holder on another host that died).

Local stores create the lock atomically (a complete file is hard-linked into place, which
fails if one exists) and take over a stale lock by renaming it aside first and checking
that what was renamed is the stale lock that was read. Object stores (fsspec URLs) have no
exclusive create here: the lock is written after checking that none exists and read back,
which keeps sequential writers apart but can let two writers that start within the same
moment both proceed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import fsspec

from stroke_ray.locations import is_url, local_or_url
from stroke_ray.store import StoreError

__all__ = ["LEASE_SECONDS", "LOCK_NAME", "StoreBusyError", "writer_lock"]

LOCK_NAME = ".stroke-ray-lock"
LEASE_SECONDS = 300.0


class StoreBusyError(StoreError):
    """Another process is writing the store."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(info: dict, lease: float) -> bool:
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return True
    return time.time() - float(info.get("renewed", 0)) > float(info.get("lease", lease))


class _LocalLock:
    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME

    def create(self, payload: bytes) -> bool:
        tmp = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.part")
        tmp.write_bytes(payload)
        try:
            os.link(tmp, self.path)  # fails if a lock exists: exclusive and complete at once
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def replace(self, payload: bytes) -> None:
        # Not files.atomic_write_bytes: its temporary file (mkstemp) is private to its owner,
        # and after a renewal so would the lock be, so another user's writer sharing the store
        # could no longer read who holds it. The rename keeps a renewal atomic all the same.
        tmp = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.part")
        tmp.write_bytes(payload)
        os.replace(tmp, self.path)

    def take_over(self, seen: bytes) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_bytes() != seen:
            # Another process took the lock over between our read and the rename: give it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _UrlLock:
    def __init__(self, url: str, storage_options: dict | None):
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.path = f"{root.rstrip('/')}/{LOCK_NAME}"

    def create(self, payload: bytes) -> bool:
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, payload)
        return self.read() == payload

    def read(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def replace(self, payload: bytes) -> None:
        self.fs.pipe_file(self.path, payload)

    def take_over(self, seen: bytes) -> None:
        if self.read() == seen:
            self.remove()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


def _describe(info: dict) -> str:
    since = datetime.fromtimestamp(float(info.get("started", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{info.get('command', '?')} on host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {since}"


@contextlib.contextmanager
def writer_lock(
    url: str,
    command: str = "convert",
    storage_options: dict | None = None,
    lease: float = LEASE_SECONDS,
) -> Iterator[None]:
    """Hold the store's writer lock for the block (the store's folder is created if needed).

    Args:
        url: the store (local path, file:// or fsspec URL).
        command: what the holder is doing, shown to a second writer.
        storage_options: fsspec options for URL stores.
        lease: seconds after the last renewal that a lock from another host counts as stale.

    Raises:
        StoreBusyError: a live writer holds the lock.
    """
    location = local_or_url(url)
    if is_url(location):
        backend = _UrlLock(location, storage_options)
    else:
        Path(location).mkdir(parents=True, exist_ok=True)
        backend = _LocalLock(Path(location))
    now = time.time()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": now,
            "renewed": now, "lease": lease, "token": uuid.uuid4().hex}
    for _ in range(5):
        if backend.create(json.dumps(info).encode()):
            break
        seen = backend.read()
        if seen is None:
            continue  # released between our two steps: try again
        try:
            holder = json.loads(seen)
        except ValueError:
            holder = {}
        if not _stale(holder, lease):
            raise StoreBusyError(f"{location}: being written by another process ({_describe(holder)}); "
                                 "wait for it to finish")
        backend.take_over(seen)
    else:
        raise StoreBusyError(f"{location}: could not take the writer lock {LOCK_NAME}; try again")

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 4):
            current = backend.read()
            if current is None or json.loads(current).get("token") != info["token"]:
                return  # taken over (we were thought dead): stop renewing someone else's lock
            backend.replace(json.dumps({**info, "renewed": time.time()}).encode())

    thread = threading.Thread(target=renew, name="stroke-ray-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        current = backend.read()
        if current is not None and json.loads(current).get("token") == info["token"]:
            backend.remove()
