"""Persistent dirty bitmaps kept consistent by the writer (qcow.md B.9).

While an image is open for writing, every enabled ("auto") bitmap is marked in_use on disk and
kept in memory; each guest write sets its bits. At close the bitmap data clusters and tables
are written in the safe order (refcounts before references, decrements last) and in_use is
cleared again, so qemu sees consistent bitmaps. A crash leaves them in_use: inconsistent, as
the format says, never wrong.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ..generated import qcow2 as q
from ..structbase import words_to_bytes

if TYPE_CHECKING:
    from .write import Qcow2Writer

__all__ = ["DirtyBitmaps", "bitmap_clusters"]

IN_USE = q.BitmapFlag.IN_USE
AUTO = q.BitmapFlag.AUTO
DATA_OFFSET = q.BitmapTableEntry.OFS_DATA_DIV512_MASK
ALL_ONES = q.BitmapTableEntry.ALL_ONES_MASK


def bitmap_clusters(f: BinaryIO, ext: q.ExtBitmaps, cluster_size: int) -> list[int]:
    """Every cluster the bitmaps use: the directory, each bitmap table and its data."""
    start = ext.ofs_bitmap_directory // cluster_size
    last = (ext.ofs_bitmap_directory + ext.len_bitmap_directory - 1) // cluster_size
    out = list(range(start, last + 1))
    for entry in ext.read_bitmap_directory(f).entries:
        first = entry.ofs_bitmap_table // cluster_size
        out += range(first, first + -(-entry.num_bitmap_table_entries * 8 // cluster_size))
        out += [w // cluster_size for w in entry.read_bitmap_table(f) if w & DATA_OFFSET]
    return out


@dataclass(slots=True)
class _Tracked:
    entry: q.BitmapDirectoryEntry
    table: array[int]
    bits: bytearray


class DirtyBitmaps:
    """The enabled bitmaps of one image opened for writing."""

    def __init__(self, img: Qcow2Writer) -> None:
        self.img = img
        ext = img.head.bitmaps
        self.directory: q.BitmapDirectory | None = None
        self.tracked: list[_Tracked] = []
        self.started = False
        if ext is None or not img.head.autoclear & q.AutoclearFeature.BITMAPS:
            return
        self.ext = ext
        self.directory = ext.read_bitmap_directory(img._f)

    @property
    def present(self) -> bool:
        return self.directory is not None

    def _write_directory(self) -> None:
        assert self.directory is not None
        data = self.directory.build()
        fd = self.img._f.fileno()
        os.pwrite(fd, data, self.ext.ofs_bitmap_directory)
        os.fsync(fd)

    def start(self) -> None:
        """Before the first guest write: load the enabled bitmaps and mark them in use."""
        if self.started or self.directory is None:
            return
        self.started = True
        cs = self.img.cluster_size
        size = self.img.size
        for entry in self.directory.entries:
            flags = int(entry.flags)
            if not flags & AUTO or flags & IN_USE:
                continue  # disabled bitmaps stay as they are; in-use ones are already stale
            table = entry.read_bitmap_table(self.img._f)
            nbits = -(-size >> entry.granularity_bits) if size else 0
            bits = bytearray((nbits + 7) // 8)
            for i, word in enumerate(table):
                lo = i * cs
                if lo >= len(bits):
                    break
                hi = min(len(bits), lo + cs)
                if word & DATA_OFFSET:
                    chunk = os.pread(self.img._f.fileno(), hi - lo, word & DATA_OFFSET)
                    bits[lo : lo + len(chunk)] = chunk
                elif word & ALL_ONES:
                    bits[lo:hi] = b"\xff" * (hi - lo)
            entry.flags = q.BitmapFlag(flags | IN_USE)
            self.tracked.append(_Tracked(entry, table, bits))
        if self.tracked:
            self._write_directory()

    def mark(self, offset: int, n: int) -> None:
        """A guest write changed [offset, offset + n)."""
        if n <= 0:
            return
        for t in self.tracked:
            g = t.entry.granularity_bits
            first, last = offset >> g, (offset + n - 1) >> g
            bits = t.bits
            if last - first < 64:
                for b in range(first, last + 1):
                    bits[b >> 3] |= 1 << (b & 7)
                continue
            # whole bytes in the middle at once
            head_end = min(last + 1, (first + 7) & ~7)
            for b in range(first, head_end):
                bits[b >> 3] |= 1 << (b & 7)
            tail_start = max(head_end, (last + 1) & ~7)
            bits[head_end >> 3 : tail_start >> 3] = b"\xff" * ((tail_start - head_end) >> 3)
            for b in range(tail_start, last + 1):
                bits[b >> 3] |= 1 << (b & 7)

    def finish(self) -> None:
        """At close: write data clusters, then tables, then clear in_use."""
        if not self.tracked:
            return
        img = self.img
        cs = img.cluster_size
        fd = img._f.fileno()
        rc = img._refcounts()
        freed: list[int] = []
        for t in self.tracked:
            for i in range(len(t.table)):
                chunk = bytes(t.bits[i * cs : (i + 1) * cs])
                old = t.table[i]
                if not chunk.strip(b"\0"):
                    new = 0
                elif not chunk.strip(b"\xff") and len(chunk) == cs:
                    new = ALL_ONES
                else:
                    host = old & DATA_OFFSET or rc.allocate(1) * cs
                    os.pwrite(fd, chunk.ljust(cs, b"\0"), host)
                    new = host
                if old & DATA_OFFSET and old & DATA_OFFSET != new & DATA_OFFSET:
                    freed.append((old & DATA_OFFSET) // cs)
                t.table[i] = new
        if rc.write_dirty():
            os.fsync(fd)
        img._refcount_table_switch_if_moved()
        for t in self.tracked:
            os.pwrite(fd, words_to_bytes(t.table, True), t.entry.ofs_bitmap_table)
        os.fsync(fd)
        for cluster in freed:
            rc.change(cluster, -1)
        if rc.write_dirty():
            os.fsync(fd)
        for t in self.tracked:
            t.entry.flags = q.BitmapFlag(int(t.entry.flags) & ~IN_USE)
        self._write_directory()
        self.tracked = []
