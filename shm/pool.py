"""Released segments kept mapped and pre-faulted for the next capture.

Creating and faulting in a fresh segment costs more than the copy itself (first writes run at
0.3-1.4 GB/s against 12+ GB/s for memcpy into mapped pages), so a released segment is reused.
Sizes are rounded up to classes 2^k * {1, 1.25, 1.5, 1.75} (at most 25% slack) so that
captures of similar size find each other's segments.
"""

from __future__ import annotations

import mmap

from shm.segments import Segment

MIN_SEGMENT = 64 * 1024
MAX_REUSE_RATIO = 4  # don't hand a 1 GiB segment to a 1 MiB capture


def size_class(n: int) -> int:
    """The segment size to create for a stream of `n` bytes (page-aligned, >= n)."""
    n = max(int(n), MIN_SEGMENT)
    top = 1 << (n - 1).bit_length()  # next power of two >= n
    for eighths in (4, 5, 6, 7):  # top/2 * {1, 1.25, 1.5, 1.75}
        size = top // 8 * eighths
        if size >= n:
            break
    else:
        size = top
    page = mmap.PAGESIZE
    return -(-size // page) * page


class SegmentPool:
    """A free list of mapped segments holding at most `capacity` bytes. Not thread-safe: the
    registry calls it under its lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._free: list[Segment] = []

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self._free)

    def __len__(self) -> int:
        return len(self._free)

    def names(self) -> list[str]:
        return [s.name for s in self._free]

    def take(self, n: int) -> Segment | None:
        """The smallest free segment that holds `n` bytes, if one is not wastefully large."""
        fits = [s for s in self._free if n <= s.size <= max(n, MIN_SEGMENT) * MAX_REUSE_RATIO]
        if not fits:
            return None
        best = min(fits, key=lambda s: s.size)
        self._free.remove(best)
        return best

    def put(self, seg: Segment) -> list[Segment]:
        """Keep `seg`; returns the segments pushed out to stay within capacity (to unlink)."""
        if seg.size > self.capacity:
            return [seg]
        self._free.append(seg)
        out: list[Segment] = []
        while self.nbytes > self.capacity:
            out.append(self._free.pop(0))  # oldest first
        return out

    def evict(self, nbytes: int) -> list[Segment]:
        """Give up free segments, largest first, until at least `nbytes` are freed."""
        out: list[Segment] = []
        freed = 0
        for seg in sorted(self._free, key=lambda s: -s.size):
            if freed >= nbytes:
                break
            self._free.remove(seg)
            out.append(seg)
            freed += seg.size
        return out

    def drain(self) -> list[Segment]:
        out, self._free = self._free, []
        return out
