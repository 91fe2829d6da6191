"""Who owns which segment, for how long, and how much of /dev/shm we may use.

`ShmRegistry` is created once at server start. It
- removes segments that a crashed server (kill -9) left behind, using the registry files in
  its state directory (one JSON file per owning process, listing the names it created);
- hands out segments for captures within a total size budget, refusing a capture that does
  not fit with `CaptureBudgetExceeded` (live data is never evicted to make room);
- keeps each capture until the client releases it or its time-to-live expires. Released
  segments go back to a pool for reuse; expired ones are unlinked instead, since a client
  that let its handle expire may still be reading (unlinking never pulls pages from under a
  reader; reusing would overwrite them).
All methods are thread-safe.
"""

from __future__ import annotations

import atexit
import json
import logging
import mmap
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shm import segments
from shm.handle import HANDLE_FORMAT, ShmHandle
from shm.pool import SegmentPool, size_class
from shm.segments import Segment

log = logging.getLogger("nsbridge.shm")

MiB = 1 << 20
DEFAULT_TTL_S = 600.0
SMALL_SHM = 512 * MiB  # below this free in /dev/shm we warn (Docker's default is 64 MB)
_FILE_PREFIX = "owner-"


class CaptureBudgetExceeded(RuntimeError):
    """A capture does not fit in the shared-memory budget next to the unreleased ones."""

    def __init__(self, requested: int, live: int, budget: int, live_count: int) -> None:
        self.requested, self.live, self.budget, self.live_count = requested, live, budget, live_count
        super().__init__(
            f"capture needs {requested / MiB:.1f} MiB of shared memory but only "
            f"{max(budget - live, 0) / MiB:.1f} MiB of the {budget / MiB:.1f} MiB budget is free "
            f"({live_count} unreleased captures hold {live / MiB:.1f} MiB); release captures "
            f"you have read, wait for their TTL, or raise the budget"
        )


class UnknownSegment(KeyError):
    """A name or capture id this registry does not own (or no longer holds)."""


def shm_free_bytes() -> int | None:
    """Free space in /dev/shm, or None where there is none (macOS)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def default_budget(free: int | None) -> int:
    if free is not None:
        return free // 2
    try:  # macOS: shm is plain memory
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 1 << 30


def shm_space_message(free: int | None, budget: int) -> str | None:
    """A warning for a small /dev/shm or a budget larger than it, else None."""
    if free is None:
        return None
    if free < SMALL_SHM:
        return (
            f"/dev/shm has only {free / MiB:.0f} MiB free (Docker's default is 64 MB): captures "
            f"over {budget / MiB:.0f} MiB in total will be refused. Start the container with "
            f"--shm-size=2g (or mount a larger tmpfs), or request inline activations."
        )
    if budget > free:
        return (
            f"shared-memory budget {budget / MiB:.0f} MiB exceeds the {free / MiB:.0f} MiB free "
            f"in /dev/shm; captures may fail with 'no room' before the budget is reached"
        )
    return None


def default_state_dir() -> Path:
    """Cleared with /dev/shm on reboot where possible: $XDG_RUNTIME_DIR, else the temp dir."""
    env = os.environ.get("NSBRIDGE_STATE_DIR")
    if env:
        return Path(env) / "shm"
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"nsbridge-{os.getuid()}" / "shm"


def _start_time(pid: int) -> str | None:
    """The process start time (Linux), to tell a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] == b"Z" else fields[19].decode()  # fields 3 and 22 of stat(5)
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if sys.platform == "linux":
        now = _start_time(pid)
        return now is not None and (start is None or now == start)  # None: zombie or gone
    return True


@dataclass
class _Entry:
    segment: Segment
    capture_id: str
    byte_size: int  # the stream's length; 0 while the writer is still filling it
    created_at: float
    expires_at: float
    ttl_s: float
    state: str  # "writing" | "live"


@dataclass
class Lease:
    """A segment handed to a writer; `commit` or `abort` it."""

    segment: Segment
    capture_id: str
    offset: int = 0


class ShmRegistry:
    """The server's shared-memory segments (create one at start, `close()` at shutdown)."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        budget_bytes: int | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        pool_bytes: int | None = None,
        prefault: bool = True,
        cleanup_at_exit: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        free = shm_free_bytes()
        self.budget = int(budget_bytes) if budget_bytes is not None else default_budget(free)
        self.ttl_s = float(ttl_s)
        self.prefault = prefault
        self.shm_message = shm_space_message(free, self.budget)
        if self.shm_message:
            log.warning(self.shm_message)
        self._pool = SegmentPool(pool_bytes if pool_bytes is not None else self.budget // 4)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}  # by segment name
        self._by_capture: dict[str, str] = {}  # capture_id -> name
        self._pending: dict[str, int] = {}  # capture_id -> size of a segment being created
        self._owned: dict[str, int] = {}  # every name created and not yet unlinked -> size
        self._pid = os.getpid()
        self._start = _start_time(self._pid)
        self._file = self.state_dir / f"{_FILE_PREFIX}{self._pid}-{secrets.token_hex(4)}.json"
        self._closed = False
        self.removed_orphans = self.cleanup_orphans()
        self._save()
        if cleanup_at_exit:
            atexit.register(self.close)

    # -- crash recovery -------------------------------------------------------------------

    def cleanup_orphans(self) -> list[str]:
        """Unlink segments listed by registry files whose owner process is gone."""
        removed: list[str] = []
        for path in sorted(self.state_dir.glob(f"{_FILE_PREFIX}*.json")):
            if path == self._file:
                continue
            try:
                data = json.loads(path.read_text())
                pid, start = int(data["pid"]), data.get("start_time")
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable shm registry file %s", path)
                continue
            if _alive(pid, start):
                continue
            for name in data.get("segments", {}):
                if segments.is_valid_name(name) and segments.unlink(name):  # never other names
                    removed.append(name)
            path.unlink(missing_ok=True)
            path.with_suffix(".tmp").unlink(missing_ok=True)  # a save cut short by the crash
        if removed:
            log.warning("removed %d shared-memory segments left by a dead server", len(removed))
        return removed

    def _save(self) -> None:
        """Write our registry file atomically. Called before a segment is created (so a
        crash between the two leaves a name to clean, never an unlisted segment)."""
        data = {"pid": self._pid, "start_time": self._start, "segments": self._owned}
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._file)

    # -- allocation -----------------------------------------------------------------------

    def acquire(self, nbytes: int, capture_id: str, ttl_s: float | None = None) -> Lease:
        """A mapped, pre-faulted segment of at least `nbytes` for `capture_id`."""
        if nbytes <= 0:
            raise ValueError("nbytes must be positive")
        ttl = self.ttl_s if ttl_s is None else float(ttl_s)
        with self._lock:
            self._check_open()
            self.reap_expired()
            if capture_id in self._by_capture or capture_id in self._pending:
                raise ValueError(f"capture {capture_id!r} is already stored")
            live = self._live_bytes()
            seg = self._pool.take(nbytes)
            if seg is not None and live + seg.size > self.budget:
                self._discard([seg])  # too roomy to fit; an exact-size one may
                seg = None
            if seg is not None:
                return self._register(seg, capture_id, ttl)
            size = size_class(nbytes)
            if live + size > self.budget:
                size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
            if live + size > self.budget:
                raise CaptureBudgetExceeded(nbytes, live, self.budget, len(self._entries))
            over = live + self._pool.nbytes + size - self.budget
            if over > 0:
                self._discard(self._pool.evict(over))  # free pooled pages, never live data
            name = segments.new_name()
            self._owned[name] = size
            self._save()  # listed before it exists: a crash now leaves nothing unlisted
            self._pending[capture_id] = size
        # Creating and faulting in pages takes ~0.3 ms/MiB: keep other threads running.
        try:
            seg = Segment.create(name, size, prefault=self.prefault)
        except BaseException:
            with self._lock:
                self._pending.pop(capture_id, None)
                self._owned.pop(name, None)
                self._save()
            raise
        with self._lock:
            self._pending.pop(capture_id, None)
            if self._closed:
                seg.unlink()
                seg.close()
                self._check_open()
            return self._register(seg, capture_id, ttl)

    def _live_bytes(self) -> int:
        return sum(e.segment.size for e in self._entries.values()) + sum(self._pending.values())

    def _register(self, seg: Segment, capture_id: str, ttl: float) -> Lease:
        now = time.time()
        self._entries[seg.name] = _Entry(seg, capture_id, 0, now, now + ttl, ttl, "writing")
        self._by_capture[capture_id] = seg.name
        return Lease(seg, capture_id)

    def commit(self, lease: Lease, byte_size: int) -> ShmHandle:
        """Mark a filled segment readable and return its handle."""
        with self._lock:
            entry = self._entries.get(lease.segment.name)
            if entry is None or entry.capture_id != lease.capture_id:
                raise UnknownSegment(lease.segment.name)
            if lease.offset + byte_size > entry.segment.size:
                raise ValueError("stream larger than its segment")
            entry.byte_size, entry.state = byte_size, "live"
            entry.expires_at = time.time() + entry.ttl_s  # the TTL runs from the handle
            return self._handle(entry, lease.offset)

    def abort(self, lease: Lease) -> None:
        """Give back a segment whose write failed."""
        with self._lock:
            entry = self._entries.get(lease.segment.name)
            if entry is not None and entry.capture_id == lease.capture_id:
                self._drop(entry, reuse=True)

    def _handle(self, entry: _Entry, offset: int = 0) -> ShmHandle:
        return ShmHandle(
            name=entry.segment.name,
            offset=offset,
            byte_size=entry.byte_size,
            format=HANDLE_FORMAT,
            capture_id=entry.capture_id,
            expires_at=entry.expires_at,
        )

    # -- release and expiry ---------------------------------------------------------------

    def release(self, capture_id: str) -> bool:
        """The client is done with `capture_id`: its segment returns to the pool. False if
        unknown (already released or expired)."""
        with self._lock:
            name = self._by_capture.get(capture_id)
            if name is None:
                return False
            self._drop(self._entries[name], reuse=True)
            return True

    def release_name(self, name: str) -> bool:
        """Release by segment name (validated against what this registry owns)."""
        with self._lock:
            entry = self._entries.get(name) if segments.is_valid_name(name) else None
            if entry is None:
                return False
            self._drop(entry, reuse=True)
            return True

    def reap_expired(self, now: float | None = None) -> list[str]:
        """Unlink live captures whose TTL has passed; returns their capture ids."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [e for e in self._entries.values() if e.state == "live" and e.expires_at <= now]
            for e in gone:
                self._drop(e, reuse=False)
            return [e.capture_id for e in gone]

    def _drop(self, entry: _Entry, reuse: bool) -> None:
        del self._entries[entry.segment.name]
        self._by_capture.pop(entry.capture_id, None)
        if reuse:
            # Zero the stream's first message header so a reader holding the old handle gets
            # StaleHandle instead of silently reading released data.
            entry.segment.array()[:8] = 0
            self._discard(self._pool.put(entry.segment))
        else:
            self._discard([entry.segment])

    def _discard(self, segs: list[Segment]) -> None:
        if not segs:
            return
        for seg in segs:
            seg.unlink()
            seg.close()
            self._owned.pop(seg.name, None)
        self._save()

    # -- lookups --------------------------------------------------------------------------

    def handle(self, capture_id: str) -> ShmHandle:
        with self._lock:
            self.reap_expired()
            name = self._by_capture.get(capture_id)
            entry = self._entries.get(name) if name else None
            if entry is None or entry.state != "live":
                raise UnknownSegment(capture_id)
            return self._handle(entry)

    def lookup(self, name: str) -> ShmHandle:
        """The handle of a live segment by name; rejects names this registry did not create."""
        if not segments.is_valid_name(name):
            raise UnknownSegment(name)
        with self._lock:
            self.reap_expired()
            entry = self._entries.get(name)
            if entry is None or entry.state != "live":
                raise UnknownSegment(name)
            return self._handle(entry)

    def read_bytes(self, capture_id: str) -> bytes:
        """A copy of a capture's stream (for sending over HTTP to another host)."""
        with self._lock:
            h = self.handle(capture_id)
            seg = self._entries[h.name].segment
            return seg.array()[h.offset : h.offset + h.byte_size].tobytes()

    def status(self) -> dict[str, Any]:
        """Live segments and totals, like Triton's shared-memory status."""
        with self._lock:
            self.reap_expired()
            now = time.time()
            rows = [
                {
                    "name": e.segment.name,
                    "capture_id": e.capture_id,
                    "state": e.state,
                    "byte_size": e.byte_size,
                    "segment_size": e.segment.size,
                    "created_at": e.created_at,
                    "age_s": round(now - e.created_at, 3),
                    "expires_at": e.expires_at,
                    "expires_in_s": round(e.expires_at - now, 3),
                }
                for e in sorted(self._entries.values(), key=lambda e: e.created_at)
            ]
            return {
                "budget_bytes": self.budget,
                "live_bytes": self._live_bytes(),
                "pooled_bytes": self._pool.nbytes,
                "pooled_segments": len(self._pool),
                "shm_free_bytes": shm_free_bytes(),
                "ttl_s": self.ttl_s,
                "segments": rows,
            }

    def owned_names(self) -> list[str]:
        """Every segment name this registry has created and not yet unlinked."""
        with self._lock:
            return list(self._owned)

    def prewarm(self, nbytes: int) -> None:
        """Create a pooled segment now so the first capture of this size skips page faults."""
        lease = self.acquire(nbytes, f"_prewarm_{secrets.token_hex(8)}")
        self.abort(lease)

    # -- shutdown -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ShmRegistry is closed")

    def close(self) -> None:
        """Unlink every segment and remove the registry file. Only the creating process
        acts (a forked child inherits the object but must not delete the parent's data)."""
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
            segs = [e.segment for e in self._entries.values()] + self._pool.drain()
            self._entries.clear()
            self._by_capture.clear()
            for seg in segs:
                seg.unlink()
                seg.close()
            for name in list(self._owned):  # e.g. a create that raised half-way
                segments.unlink(name)
            self._owned.clear()
            self._file.unlink(missing_ok=True)
        atexit.unregister(self.close)

    def __enter__(self) -> "ShmRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
