"""qcow v1 write path: append-only allocation, copy-on-write, compressed and encrypted writes.

qcow v1 has no refcounts: like qemu, new L2 tables and data clusters are appended at the end
of the file, cluster-aligned, and compressed data right after the previous end (qcow.md A.3).
Unlike qemu, which writes the L1 entry first and the L2 entry before the data, everything
reaches the disk in an order after which a crash leaves at worst leaked (unreferenced) space:

1. guest data goes to its new cluster straight away;
2. at :meth:`flush` the data is synced, then the changed and new L2 tables are written and
   synced, then the changed L1 entries are written and synced.

A cluster that is overwritten in place is written in place. Dirty L2 tables stay in memory
until step 2 (at most `MAX_DIRTY_TABLES`; more trigger a flush). Partial writes into a
cluster that is not allocated copy the rest of the cluster from what the guest reads there
(the backing file, a compressed cluster, or zeros).
"""

from __future__ import annotations

import bisect
import os
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..compress import compress_deflate
from ..crypto import SECTOR_SIZE
from ..image import Image, ImageError, UsageError
from ..structbase import words_to_bytes
from .masks import L2_COMPRESSED, L2_OFFSET, compressed_entry

if TYPE_CHECKING:
    from ..cache import LruCache
    from ..crypto import SectorCipher
    from .header import QcowHeader

__all__ = ["MAX_DIRTY_TABLES", "QcowWriter"]

MAX_DIRTY_TABLES = 64


class QcowWriter:
    """The write half of QcowImage (mixed in; uses the image's tables and caches)."""

    path: Path
    size: int
    cluster_size: int
    head: QcowHeader
    writable: bool
    backing: Image | None
    _f: BinaryIO
    _l1: array[int]
    _l2_cache: LruCache[int, array[int]]
    _zcache: LruCache[int, bytes]
    _cipher: SectorCipher | None

    def _read(self, n: int, offset: int) -> bytes:
        raise NotImplementedError

    def _read_l2(self, offset: int) -> array[int]:
        raise NotImplementedError

    if TYPE_CHECKING:

        def _check_range(self, n: int, offset: int) -> None: ...

    # state --------------------------------------------------------------------------------

    def _writer_init(self, file_size: int) -> None:
        self._l2_dirty: dict[int, array[int]] = {}
        self._l1_dirty: set[int] = set()
        self._data_unsynced = False
        self._tables_at: list[tuple[int, int]] | None = None  # sorted L2 ranges, for overlaps
        # the next free byte: past the file and past tables reserved but not yet written
        self._end = max(file_size, self.head.metadata_end)

    def _allocate(self, n: int, aligned: bool = True) -> int:
        """``n`` bytes at the end of the file, cluster-aligned unless ``aligned`` is False."""
        cs = self.cluster_size
        start = -(-self._end // cs) * cs if aligned else self._end
        self._end = start + n
        return start

    def _writable_check(self, n: int, offset: int) -> None:
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._check_range(n, offset)

    # tables -------------------------------------------------------------------------------

    def _table(self, offset: int) -> array[int]:
        table = self._l2_dirty.get(offset)
        if table is not None:
            return table
        return self._l2_cache.get(offset, self._read_l2)

    def _entry(self, cstart: int) -> int:
        """The L2 entry of the guest cluster at ``cstart`` (0 when it has no table)."""
        l1_index = cstart >> self.head.l1_shift
        offset = self._l1[l1_index] if l1_index < len(self._l1) else 0
        if not offset:
            return 0
        return self._table(offset)[self._l2_index(cstart)]

    def _l2_index(self, cstart: int) -> int:
        return (cstart >> self.head.cluster_bits) & (self.head.raw.header.num_l2_entries - 1)

    def _guard_table(self, cstart: int) -> None:
        """Refuse, before anything is written, to change an L2 table that lies over the
        header, the backing name or the L1 table."""
        offset = self._l1[cstart >> self.head.l1_shift]
        if offset and offset < self.head.metadata_end:
            self._no_metadata_overlap(offset, self.head.l2_bytes, "an L2 table")

    def _set_entry(self, cstart: int, entry: int) -> None:
        """Change one L2 entry in memory (a new table if needed); written at flush."""
        l1_index = cstart >> self.head.l1_shift
        offset = self._l1[l1_index]
        self._guard_table(cstart)
        if offset:
            table = self._table(offset)
        else:
            if not entry:
                return
            offset = self._allocate(self.head.l2_bytes)
            table = array("Q", bytes(self.head.l2_bytes))
            self._l1[l1_index] = offset
            self._l1_dirty.add(l1_index)
            if self._tables_at is not None:
                bisect.insort(self._tables_at, (offset, offset + self.head.l2_bytes))
        self._l2_dirty[offset] = table
        self._l2_cache.drop(offset)
        table[self._l2_index(cstart)] = entry

    def _maybe_flush(self) -> None:
        if len(self._l2_dirty) > MAX_DIRTY_TABLES:
            self.flush()

    # writes -------------------------------------------------------------------------------

    def _write(self, data: bytes, offset: int) -> None:
        if self.head.encrypted and self._cipher is None:
            raise ImageError(f"{self.path}: the image is encrypted; open it with its passphrase")
        cs = self.cluster_size
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            cstart = pos - pos % cs
            cend = min(end, cstart + cs)
            self._write_cluster(cstart, pos - cstart, view[pos - offset : cend - offset])
            pos = cend
        self._maybe_flush()

    def _guest_cluster(self, cstart: int) -> bytearray:
        """What the guest reads in the cluster now, a whole cluster (zeros past the disk)."""
        n = min(self.cluster_size, self.size - cstart)
        return bytearray(self._read(n, cstart)).ljust(self.cluster_size, b"\0")

    def _write_cluster(self, cstart: int, inner: int, chunk: memoryview) -> None:
        cs = self.cluster_size
        entry = self._entry(cstart)
        in_place = bool(entry) and not entry & L2_COMPRESSED
        if in_place and self._cipher is None:
            self._host_write((entry & L2_OFFSET) + inner, chunk)
            return
        if inner == 0 and len(chunk) == cs:
            content = bytearray(chunk)
        else:
            content = self._guest_cluster(cstart)
            content[inner : inner + len(chunk)] = chunk
        if self._cipher is not None:
            content = bytearray(self._cipher.encrypt(content, cstart // SECTOR_SIZE))
        if in_place:
            self._host_write(entry & L2_OFFSET, content)
            return
        self._guard_table(cstart)
        host = self._allocate(cs)
        self._host_write(host, content)
        self._set_entry(cstart, host)

    def _no_metadata_overlap(self, offset: int, n: int, what: str) -> None:
        """Refuse a write over the header, the backing name, the L1 table or an L2 table
        (which only a hostile image can ask for; qemu's qcow driver does not check)."""
        if self._tables_at is None:
            size = self.head.l2_bytes
            self._tables_at = sorted((t, t + size) for t in set(self._l1) if t)
        at = bisect.bisect_left(self._tables_at, (offset + n,)) - 1
        hit = at >= 0 and self._tables_at[at][1] > offset
        if offset < self.head.metadata_end or hit:
            raise ImageError(
                f"{self.path}: Preventing invalid write on metadata ({what} at host offset "
                f"{offset:#x}, {n} bytes)"
            )

    def _host_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._no_metadata_overlap(offset, len(data), "guest data")
        os.pwrite(self._f.fileno(), data, offset)
        self._data_unsynced = True

    def write_zeroes(self, offset: int, n: int, unmap: bool = False) -> None:
        """Make a range read as zeros. qcow v1 has no zero flag: clusters that would read
        zeros unallocated (no backing data under them) are dropped when whole, or kept
        unallocated; everything else gets real zeros."""
        self._writable_check(n, offset)
        cs = self.cluster_size
        pos, end = offset, offset + n
        while pos < end:
            cstart = pos - pos % cs
            cend = min(end, cstart + cs)
            whole = pos == cstart and (cend == cstart + cs or cend == self.size)
            entry = self._entry(cstart)
            bare = self.backing is None or cstart >= self.backing.size
            if whole and bare and (not entry or unmap or entry & L2_COMPRESSED):
                if entry:
                    self._set_entry(cstart, 0)  # reads as zeros; the old cluster is leaked
            else:
                self._write(bytes(cend - pos), pos)
            pos = cend
        self._maybe_flush()

    def discard(self, offset: int, n: int) -> None:
        """``discard``: qemu's qcow driver ignores it, so the data stays as it is."""
        self._writable_check(n, offset)

    def write_compressed(self, data: bytes, offset: int) -> None:
        """Write one whole cluster compressed (``qemu-io write -c``, ``convert -c``).

        The cluster must be unallocated; data that does not compress below one cluster is
        written as a normal cluster, as qemu does. The last cluster of the disk may be given
        short: the rest of it then reads as zeros. Encrypted images are refused: qemu would
        store compressed clusters in plaintext.
        """
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        cs = self.cluster_size
        last = offset + cs >= self.size and offset + len(data) <= self.size
        if offset % cs or (len(data) != cs and not last):
            raise UsageError(f"{self.path}: compressed writes cover exactly one cluster")
        self._check_range(len(data), offset)
        if self.head.encrypted:
            raise UsageError(f"{self.path}: compression and encryption cannot be combined")
        packed = compress_deflate(bytes(data) + bytes(cs - len(data)))
        if len(packed) >= cs:
            self._write(bytes(data) + bytes(min(cs, self.size - offset) - len(data)), offset)
            return
        if self._entry(offset):
            raise ImageError(
                f"{self.path}: compressed write to an allocated cluster (offset {offset:#x}): "
                "Input/output error"
            )
        self._guard_table(offset)
        host = self._allocate(len(packed), aligned=False)
        try:
            entry = compressed_entry(host, len(packed), self.head.cluster_bits)
        except ValueError as exc:
            raise ImageError(f"{self.path}: {exc}: File too large") from exc
        self._host_write(host, packed)
        self._set_entry(offset, entry)
        self._maybe_flush()

    # metadata -----------------------------------------------------------------------------

    def _flush_tables(self) -> None:
        fd = self._f.fileno()
        if self._data_unsynced:
            os.fsync(fd)
            self._data_unsynced = False
        if self._l2_dirty:
            size = self.head.l2_bytes
            for offset in self._l2_dirty:
                if offset < self.head.metadata_end:
                    self._no_metadata_overlap(offset, size, "an L2 table")
            for offset, table in sorted(self._l2_dirty.items()):
                os.pwrite(fd, words_to_bytes(table, True), offset)
            os.fsync(fd)
            for offset, table in self._l2_dirty.items():
                self._l2_cache.put(offset, table)
            self._l2_dirty.clear()
        if self._l1_dirty:
            for index in sorted(self._l1_dirty):
                word = words_to_bytes(array("Q", [self._l1[index]]), True)
                os.pwrite(fd, word, self.head.l1_offset + 8 * index)
            os.fsync(fd)
            self._l1_dirty.clear()

    def flush(self) -> None:
        if not self.writable:
            return
        try:
            self._flush_tables()
        except OSError as exc:
            raise ImageError(f"{self.path}: writing metadata failed: {exc}") from exc

    def make_empty(self) -> None:
        """Drop every cluster (after a commit), as qemu: a zeroed L1 table, and the file cut
        right after it."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self.flush()
        fd = self._f.fileno()
        head = self.head
        self._l1 = array("Q", bytes(8 * head.l1_size))
        os.pwrite(fd, bytes(8 * head.l1_size), head.l1_offset)
        os.fsync(fd)
        os.ftruncate(fd, head.metadata_end)
        os.fsync(fd)
        self._l2_cache.clear()
        self._zcache.clear()
        self._tables_at = None
        self._end = head.metadata_end
