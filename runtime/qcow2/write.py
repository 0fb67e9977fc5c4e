"""qcow2 write path: allocation, copy-on-write, zero writes, discard, in qemu's safe order.

Nothing reaches the disk in an order that could leave a reference to a cluster whose refcount
is 0 (qcow.md C.2):

1. guest data goes to its (new) clusters straight away;
2. at :meth:`flush`, refcount increments (and new refcount blocks, and a moved refcount table
   with its header switch) are written and synced first;
3. then the L2 tables and L1 entries that reference the new clusters, synced;
4. only then the decrements of clusters those tables stopped referencing, synced.

A crash at any point leaves at worst leaked clusters. Freed clusters are not reused before step
4, and dirty L2 tables stay pinned in memory until step 3.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..compress import compress_deflate, compress_zstd
from ..generated import qcow2 as q
from ..image import ImageError, UsageError
from ..structbase import words_to_bytes
from .bitmaps import DirtyBitmaps
from .create import (
    FEATURE_TABLE_MIN_CLUSTER,
    V3_HEADER_LENGTH,
    _bool,
    _extension,
    feature_name_table,
)
from .masks import (
    L1_COPIED,
    L1_OFFSET,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET,
    L2_ZERO,
    SUB_ALLOC,
    SUB_ZERO,
    SUB_ZERO_SHIFT,
    SUBCLUSTERS,
    H,
)
from .refcount import Refcounts

if TYPE_CHECKING:
    from ..cache import LruCache
    from ..crypto import SectorCipher
    from .header import Qcow2Header

__all__ = ["Qcow2Writer"]



class Qcow2Writer:
    """The write half of Qcow2Image (mixed in; uses the image's tables and caches)."""

    path: Path
    size: int
    cluster_size: int
    head: Qcow2Header
    writable: bool
    _f: BinaryIO
    _data: BinaryIO | None
    _l1: array[int]
    _l2_cache: LruCache[int, array[int]]
    _zcache: LruCache[int, bytes]
    _cipher: SectorCipher | None

    def _read(self, n: int, offset: int) -> bytes:
        raise NotImplementedError

    def _read_l2(self, offset: int) -> array[int]:
        raise NotImplementedError

    # state ------------------------------------------------------------------------------------

    def _writer_init(self) -> None:
        self._rc: Refcounts | None = None
        self._l2_dirty: dict[int, array[int]] = {}
        self._l1_dirty: set[int] = set()
        self._pending_free: list[int] = []  # clusters to decrement once unreferenced on disk
        self._header_prepared = False
        self._set_dirty_bit = False
        self._bitmaps: DirtyBitmaps | None = None
        self._zpos: int | None = None  # where the next compressed data may be packed
        self._zfrees = -1
        self._meta_gen = 0  # bumped when metadata clusters are added
        self._meta_key: tuple[int, ...] = ()
        self._meta_set: set[int] = set()

    def _refcounts(self) -> Refcounts:
        if self._rc is None:
            head = self.head
            self._f.seek(0)
            table = head.raw.read_refcount_table(self._f)
            self._rc = Refcounts(
                self._f, head.cluster_bits, head.refcount_order, table, head.refcount_table_offset
            )
        return self._rc

    def _lazy(self) -> bool:
        # Lazy refcounts allow stale refcounts while the dirty bit is set; this writer sets
        # the bit as qemu does but still writes refcounts in the safe order.
        return self.head.lazy_refcounts

    def _prepare_header(self) -> None:
        """Before the first change: clear unknown autoclear bits (and bitmaps, which this
        writer does not keep), and set the dirty bit when refcounts are lazy."""
        if self._header_prepared:
            return
        self._header_prepared = True
        head = self.head
        if head.version < 3:
            return
        self._bitmaps = DirtyBitmaps(self)
        known = int(q.AutoclearFeature.DATA_FILE_RAW)
        if self._bitmaps.present:
            known |= int(q.AutoclearFeature.BITMAPS)
            self._bitmaps.start()
        autoclear = int(head.autoclear) & known
        incompatible = int(head.incompatible)
        if self._lazy():
            incompatible |= int(q.IncompatibleFeature.DIRTY)
            self._set_dirty_bit = True
        if autoclear != int(head.autoclear) or incompatible != int(head.incompatible):
            self._write_features(incompatible, autoclear)

    def _write_features(self, incompatible: int, autoclear: int) -> None:
        raw = self.head.raw.header
        raw.incompatible_features = q.IncompatibleFeature(incompatible)
        raw.autoclear_features = q.AutoclearFeature(autoclear)
        self.head.incompatible = raw.incompatible_features
        self.head.autoclear = raw.autoclear_features
        self._write_header_range(H.INCOMPATIBLE_FEATURES_AT, H.REFCOUNT_ORDER_AT)

    def _write_header_range(self, start: int, stop: int) -> None:
        """Rewrite header bytes [start, stop) from the header object, and sync."""
        data = self.head.raw.header.build()
        os.pwrite(self._f.fileno(), data[start:stop], start)
        os.fsync(self._f.fileno())

    # tables -------------------------------------------------------------------------------------

    def _table(self, offset: int) -> array[int]:
        table = self._l2_dirty.get(offset)
        if table is not None:
            return table
        return self._l2_cache.get(offset, self._read_l2)

    def _writable_table(self, l1_index: int) -> tuple[int, array[int]]:
        """The L2 table of ``l1_index``, allocated or copied so it may be changed in place."""
        entry = self._l1[l1_index]
        offset = entry & L1_OFFSET
        if offset and entry & L1_COPIED:
            table = self._table(offset)
            self._l2_dirty[offset] = table
            self._l2_cache.drop(offset)
            return offset, table
        rc = self._refcounts()
        new = rc.allocate(1) * self.cluster_size
        if offset:
            table = array("Q", self._table(offset))
            self._pending_free.append(offset // self.cluster_size)
        else:
            table = array("Q", bytes(self.cluster_size))
        self._l2_dirty[new] = table
        self._meta_gen += 1
        self._l1[l1_index] = new | L1_COPIED
        self._l1_dirty.add(l1_index)
        return new, table

    # writes ---------------------------------------------------------------------------------------

    def _mark(self, offset: int, n: int) -> None:
        if self._bitmaps is not None:
            self._bitmaps.mark(offset, n)

    def _write(self, data: bytes, offset: int) -> None:
        self._prepare_header()
        self._mark(offset, len(data))
        cs = self.cluster_size
        pos, end = offset, offset + len(data)
        view = memoryview(data)
        while pos < end:
            cstart = pos - (pos % cs)
            cend = min(end, cstart + cs)
            self._write_cluster(cstart, pos, view[pos - offset : cend - offset])
            pos = cend

    def _guest_cluster(self, cstart: int) -> bytearray:
        """What the guest reads in the cluster now (past the end of the disk: zeros)."""
        n = min(self.cluster_size, self.size - cstart)
        content = bytearray(self._read(n, cstart))
        content += bytes(self.cluster_size - n)
        return content

    def _write_cluster(self, cstart: int, pos: int, chunk: memoryview) -> None:
        head = self.head
        cs = self.cluster_size
        l1_index = cstart >> head.l1_shift
        index = (cstart >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
        ext = head.extended_l2
        slot = 2 * index if ext else index
        # the current entry, before the table may be copied
        l1e = self._l1[l1_index] & L1_OFFSET
        entry = self._table(l1e)[slot] if l1e else 0
        bitmap = self._table(l1e)[slot + 1] if l1e and ext else 0
        inner = pos - cstart
        full = inner == 0 and len(chunk) == cs
        in_place = (
            entry & L2_COPIED and not entry & L2_COMPRESSED and (entry & L2_OFFSET or self._data)
        )
        if self._cipher is not None:
            self._write_encrypted(cstart, inner, chunk, entry, bool(in_place), l1_index, slot)
            return
        if in_place:
            host = entry & L2_OFFSET
            self._no_metadata_overlap(host, l1_index, index)
            if ext:
                bitmap = self._fill_subclusters(cstart, host, inner, len(chunk), bitmap)
                self._host_write(host + inner, chunk)
            elif entry & L2_ZERO and not full:
                # a preallocated zero cluster: the unwritten bytes must read as zeros
                content = bytearray(cs)
                content[inner : inner + len(chunk)] = chunk
                self._host_write(host, content)
            else:
                self._host_write(host + inner, chunk)
            if ext or entry & L2_ZERO:
                _, table = self._writable_table(l1_index)
                table[slot] = entry & ~L2_ZERO
                if ext:
                    table[slot + 1] = bitmap
            return
        # copy-on-write: a new cluster with the old content around the written bytes
        # with an external data file, guest and host offsets are the same (not refcounted)
        host = cstart if self._data is not None else self._refcounts().allocate(1) * cs
        if ext and not (entry & L2_OFFSET):
            # unallocated before: only the subclusters written become allocated
            bitmap = self._fill_subclusters(cstart, host, inner, len(chunk), bitmap & ~SUB_ALLOC)
            self._host_write(host + inner, chunk)
        else:
            content = bytearray(chunk) if full else self._guest_cluster(cstart)
            if not full:
                content[inner : inner + len(chunk)] = chunk
            self._host_write(host, content)
            if ext:
                bitmap = SUB_ALLOC
        _, table = self._writable_table(l1_index)
        old = table[slot]
        table[slot] = host | L2_COPIED
        if ext:
            table[slot + 1] = bitmap
        self._release(old)

    def _write_encrypted(
        self,
        cstart: int,
        inner: int,
        chunk: memoryview,
        entry: int,
        in_place: bool,
        l1_index: int,
        slot: int,
    ) -> None:
        """Encrypted images are written whole clusters at a time (sectors are the cipher's
        unit): the cluster's current content with the new bytes, encrypted, then mapped."""
        assert self._cipher is not None
        cs = self.cluster_size
        content = self._guest_cluster(cstart)
        content[inner : inner + len(chunk)] = chunk
        host = entry & L2_OFFSET if in_place else self._refcounts().allocate(1) * cs
        luks = self.head.crypt_method == q.CryptMethod.LUKS
        sealed = self._cipher.encrypt(bytes(content), (host if luks else cstart) // 512)
        self._host_write(host, sealed)
        _, table = self._writable_table(l1_index)
        old = table[slot]
        table[slot] = host | L2_COPIED
        if self.head.extended_l2:
            table[slot + 1] = SUB_ALLOC
        if not in_place:
            self._release(old)

    def _metadata_clusters(self) -> set[int]:
        """Host clusters holding metadata: header, L1, L2 tables, refcount table and blocks,
        snapshot table and snapshot L1s (what qemu's overlap check protects)."""
        head = self.head
        cs = self.cluster_size

        def span(offset: int, size: int) -> range:
            return range(offset // cs, -(-(offset + size) // cs)) if size else range(0)

        found: set[int] = {0}
        found.update(span(head.l1_offset, 8 * head.l1_size))
        found.update(e & L1_OFFSET and (e & L1_OFFSET) // cs for e in self._l1 if e & L1_OFFSET)
        found.update(offset // cs for offset in self._l2_dirty)
        rc = self._refcounts()
        found.update(span(rc.table_offset, 8 * len(rc.table)))
        found.update(rc.block_offset(i) // cs for i in range(len(rc.table)) if rc.block_offset(i))
        if head.nb_snapshots:
            entries = head.raw.read_snapshot_table(self._f)
            found.update(span(head.snapshots_offset, sum(len(e.build()) for e in entries)))
            for e in entries:
                found.update(span(e.ofs_l1_table, 8 * e.num_l1_entries))
        return found

    def _no_metadata_overlap(self, host: int, l1_index: int, index: int) -> None:
        """Refuse (and mark the image corrupt, as qemu does) a guest write over metadata."""
        if self._data is not None:
            return
        rc = self._refcounts()
        key = (self._meta_gen, rc.generation, rc.created, self.head.l1_offset,
               self.head.snapshots_offset, self.head.nb_snapshots)
        if self._meta_key != key:
            self._meta_set = self._metadata_clusters()
            self._meta_key = key
        if host // self.cluster_size not in self._meta_set:
            return
        message = (f"Preventing invalid write on metadata (L2 entry {index:#x} of L1 index "
                   f"{l1_index} points at host offset {host:#x})")
        if self.head.version >= 3:
            corrupt = int(self.head.incompatible) | int(q.IncompatibleFeature.CORRUPT)
            self._write_features(corrupt, int(self.head.autoclear))
        self.writable = False
        raise ImageError(f"{self.path}: qcow2: Marking image as corrupt: {message}")

    def _fill_subclusters(self, cstart: int, host: int, inner: int, n: int, bitmap: int) -> int:
        """Mark written subclusters allocated; fill the unwritten part of partial ones."""
        sub = self.cluster_size // SUBCLUSTERS
        first, last = inner // sub, (inner + n - 1) // sub
        for s in sorted({first, last}):
            if bitmap >> s & 1:
                continue  # allocated already: its other bytes are in place
            lo, hi = s * sub, (s + 1) * sub
            if inner <= lo and inner + n >= hi:
                continue
            n_guest = max(0, min(sub, self.size - (cstart + lo)))
            old = bytearray(self._read(n_guest, cstart + lo)) if n_guest else bytearray()
            old += bytes(sub - len(old))
            self._host_write(host + lo, old)
        for s in range(first, last + 1):
            bitmap |= 1 << s
            bitmap &= ~(1 << (s + SUB_ZERO_SHIFT))
        return bitmap

    def _host_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        f = self._data if self._data is not None else self._f
        os.pwrite(f.fileno(), data, offset)

    def _release(self, entry: int) -> None:
        """Queue the decrement of what an L2 entry referenced (after the tables are written)."""
        if self._data is not None:
            return
        cs = self.cluster_size
        if entry & L2_COMPRESSED:
            self._zcache.clear()  # its bytes may be reused for other compressed data
            desc = q.CompressedDescriptor(cluster_bits=self.head.cluster_bits, raw=entry)
            first = desc.ofs_compressed // cs
            last = (desc.ofs_compressed + desc.len_compressed_max - 1) // cs
            self._pending_free.extend(range(first, last + 1))
        elif entry & L2_OFFSET:
            self._pending_free.append((entry & L2_OFFSET) // cs)

    # zeroes and discard -------------------------------------------------------------------------

    def write_zeroes(self, offset: int, n: int, unmap: bool = False) -> None:
        """Make a range read as zeros; whole clusters become zero clusters on v3."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._check(n, offset)
        self._prepare_header()
        self._mark(offset, n)
        cs = self.cluster_size
        pos, end = offset, offset + n
        while pos < end:
            cstart = pos - pos % cs
            cend = min(end, cstart + cs)
            whole = pos == cstart and (cend == cstart + cs or cend == self.size)
            if whole and self.head.version >= 3:
                self._zero_cluster(cstart, unmap)
            else:
                self._write(bytes(cend - pos), pos)
            pos = cend

    def discard(self, offset: int, n: int) -> None:
        """Drop whole clusters (partial ones are left as they are, as qemu does)."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._check(n, offset)
        head = self.head
        if head.version < 3 and head.backing_file is not None:
            raise UsageError(f"{self.path}: discard on a v2 image with a backing file would "
                             "expose the backing file's data")
        self._prepare_header()
        self._mark(offset, n)
        cs = self.cluster_size
        pos = offset + (-offset) % cs
        end = offset + n
        while pos < end:
            cend = pos + cs
            if cend <= end or end == self.size:
                if head.version >= 3:
                    self._zero_cluster(pos, unmap=True, discard=True)
                else:
                    self._set_entry(pos, 0, 0)
            pos = cend

    def _zero_cluster(self, cstart: int, unmap: bool, discard: bool = False) -> None:
        head = self.head
        if head.data_file_raw and self._data is not None:
            # the data file must stay a valid raw image of the guest
            n = min(self.cluster_size, self.size - cstart)
            self._host_write(cstart, bytes(n))
        l1_index = cstart >> head.l1_shift
        index = (cstart >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
        l1e = self._l1[l1_index] & L1_OFFSET
        table = self._table(l1e) if l1e else None
        ext = head.extended_l2
        entry = table[2 * index if ext else index] if table is not None else 0
        if ext:
            if discard and head.backing_file is None and not entry & L2_OFFSET:
                self._set_entry(cstart, 0, SUB_ZERO)
                return
            keep = entry & L2_OFFSET and entry & L2_COPIED and not unmap
            self._set_entry(cstart, entry if keep else 0, SUB_ZERO)
            return
        if discard and head.backing_file is None and not entry & (L2_OFFSET | L2_COMPRESSED):
            if entry:
                self._set_entry(cstart, 0, 0)
            return
        if not unmap and entry & L2_COPIED and entry & L2_OFFSET and not entry & L2_COMPRESSED:
            self._set_entry(cstart, entry | L2_ZERO, 0)  # keep the preallocated cluster
        else:
            self._set_entry(cstart, L2_ZERO, 0)

    def _set_entry(self, cstart: int, entry: int, bitmap: int) -> None:
        head = self.head
        l1_index = cstart >> head.l1_shift
        index = (cstart >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
        if not self._l1[l1_index] & L1_OFFSET and entry == 0 and bitmap == 0:
            return  # unallocated already
        _, table = self._writable_table(l1_index)
        slot = 2 * index if head.extended_l2 else index
        old = table[slot]
        table[slot] = entry
        if head.extended_l2:
            table[slot + 1] = bitmap
        if (old & L2_OFFSET) != (entry & L2_OFFSET) or old & L2_COMPRESSED:
            self._release(old)

    def _check(self, n: int, offset: int) -> None:
        if n < 0 or offset < 0 or offset + n > self.size:
            raise UsageError(f"{self.path}: range {offset:#x}+{n:#x} is outside the image")

    # flush ----------------------------------------------------------------------------------------

    def _write_tables(self) -> None:
        fd = self._f.fileno()
        for offset, table in sorted(self._l2_dirty.items()):
            os.pwrite(fd, words_to_bytes(table, True), offset)
            self._l2_cache.put(offset, table)
        self._l2_dirty.clear()
        if self._l1_dirty:
            lo, hi = min(self._l1_dirty), max(self._l1_dirty) + 1
            os.pwrite(fd, words_to_bytes(self._l1[lo:hi], True), self.head.l1_offset + 8 * lo)
            self._l1_dirty.clear()

    def _switch_refcount_table(self, rc: Refcounts) -> None:
        raw = self.head.raw.header
        raw.ofs_refcount_table = rc.table_offset
        per_cluster = self.cluster_size // 8
        raw.num_refcount_table_clusters = len(rc.table) // per_cluster
        self.head.refcount_table_offset = rc.table_offset
        self.head.refcount_table_clusters = raw.num_refcount_table_clusters
        self._write_header_range(H.OFS_REFCOUNT_TABLE_AT, H.NUM_SNAPSHOTS_AT)

    def _flush_metadata(self) -> None:
        fd = self._f.fileno()
        rc = self._rc
        if rc is not None:
            if rc.write_dirty():
                os.fsync(fd)
            rc.table_dirty = False
            self._refcount_table_switch_if_moved()
        if self._l2_dirty or self._l1_dirty:
            self._write_tables()
            os.fsync(fd)
        if self._pending_free:
            rc = self._refcounts()
            for cluster in self._pending_free:
                rc.change(cluster, -1)
            self._pending_free.clear()
            if rc.write_dirty():
                os.fsync(fd)
            rc.table_dirty = False

    def _refcount_table_switch_if_moved(self) -> None:
        """After a moved refcount table is on disk: point the header at it, free the old."""
        rc = self._rc
        if rc is None or not rc.on_table_moved:
            return
        self._switch_refcount_table(rc)
        for old_offset, old_clusters in rc.on_table_moved:
            first = old_offset // self.cluster_size
            self._pending_free.extend(range(first, first + old_clusters))
        rc.on_table_moved.clear()

    def flush(self) -> None:
        if not self.writable:
            return
        try:
            self._flush_metadata()
        except OSError as exc:
            raise ImageError(f"{self.path}: writing metadata failed: {exc}") from exc
        if self._data is not None:
            os.fsync(self._data.fileno())
        os.fsync(self._f.fileno())

    def _close_writer(self) -> None:
        """Flush everything, then clear the dirty bit this writer set."""
        if not self.writable:
            return
        self.flush()
        if self._bitmaps is not None:
            self._bitmaps.finish()
            self.flush()
        if self._set_dirty_bit:
            incompatible = int(self.head.incompatible) & ~int(q.IncompatibleFeature.DIRTY)
            self._write_features(incompatible, int(self.head.autoclear))
            self._set_dirty_bit = False

    # preallocation -------------------------------------------------------------------------------

    def preallocate(self, mode: str) -> None:
        """Allocate every L2 table and data cluster (qemu-img's preallocation=metadata), and
        with "falloc" or "full" also reserve or write the space."""
        self._prepare_header()
        head = self.head
        cs = self.cluster_size
        ext = head.extended_l2
        end = 0
        for cstart in range(0, self.size, cs):
            l1_index = cstart >> head.l1_shift
            index = (cstart >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
            _, table = self._writable_table(l1_index)
            slot = 2 * index if ext else index
            if table[slot] & (L2_OFFSET | L2_COMPRESSED):
                continue
            host = cstart if self._data is not None else self._refcounts().allocate(1) * cs
            table[slot] = host | L2_COPIED  # with extended L2, subclusters stay unallocated
            end = max(end, host + cs)
        self.flush()
        target = self._data if self._data is not None else self._f
        fd = target.fileno()
        if os.fstat(fd).st_size < end:
            os.ftruncate(fd, end)
        if mode == "falloc":
            os.posix_fallocate(fd, 0, end)
        elif mode == "full":
            self._write_zero_data()
        os.fsync(fd)

    def _write_zero_data(self) -> None:
        """preallocation=full: write real zeros into every data cluster."""
        head = self.head
        cs = self.cluster_size
        zeros = bytes(cs)
        for cstart in range(0, self.size, cs):
            l1_index = cstart >> head.l1_shift
            index = (cstart >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
            table = self._table(self._l1[l1_index] & L1_OFFSET)
            host = table[2 * index if head.extended_l2 else index] & L2_OFFSET
            self._host_write(host, zeros)

    # compressed writes ---------------------------------------------------------------------------

    def write_compressed(self, data: bytes, offset: int) -> None:
        """Write one whole cluster compressed (``qemu-io write -c``, ``convert -c``).

        The cluster must be unallocated, as qemu requires; data that does not compress below
        one cluster is written as a normal cluster, as qemu does.
        """
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        head = self.head
        cs = self.cluster_size
        last = offset + cs > self.size and offset + len(data) == self.size
        if offset % cs or (len(data) != cs and not last):
            raise UsageError(f"{self.path}: compressed writes cover exactly one cluster")
        self._check(len(data), offset)
        if self._data is not None:
            raise UsageError(f"{self.path}: compression is not allowed with an external data file")
        if head.crypt_method != q.CryptMethod.NONE:
            raise UsageError(f"{self.path}: compression and encryption cannot be combined")
        self._prepare_header()
        cluster = bytes(data) + bytes(cs - len(data))
        if head.compression_type == q.CompressionType.ZSTD:
            packed = compress_zstd(cluster)
        else:
            packed = compress_deflate(cluster)
        if len(packed) >= cs:
            self._write(bytes(data), offset)
            return
        l1_index = offset >> head.l1_shift
        index = (offset >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
        slot = 2 * index if head.extended_l2 else index
        l1e = self._l1[l1_index] & L1_OFFSET
        current = self._table(l1e)[slot] if l1e else 0
        if current & (L2_OFFSET | L2_COMPRESSED):
            raise ImageError(f"{self.path}: compressed write to an allocated cluster "
                             f"(offset {offset:#x}): Input/output error")
        self._mark(offset, len(data))
        self._zcache.clear()  # a decompressed cluster is cached by its entry: keep none stale
        host = self._alloc_bytes(len(packed))
        os.pwrite(self._f.fileno(), packed, host)
        x = q.CompressedDescriptor(cluster_bits=head.cluster_bits, raw=0).num_offset_bits
        sectors = (host + len(packed) - 1) // 512 - host // 512
        _, table = self._writable_table(l1_index)
        table[slot] = L2_COMPRESSED | (sectors << x) | host
        if head.extended_l2:
            table[slot + 1] = 0

    def _alloc_bytes(self, n: int) -> int:
        """Space for compressed data, packed after the previous compressed cluster's data;
        every host cluster a range touches gets one more reference (qcow.md C.1)."""
        cs = self.cluster_size
        rc = self._refcounts()
        pos = self._zpos
        if self._zfrees != rc.frees:
            pos = None  # clusters were freed since: the partly used one may not be ours now
        if pos is not None and pos % cs and rc.get(pos // cs) < rc.max:
            room = cs - pos % cs
            if n <= room:
                rc.change(pos // cs, 1)
                self._zpos, self._zfrees = pos + n, rc.frees
                return pos
            nxt = pos // cs + 1
            extra = -(-(n - room) // cs)
            if rc.find_free(extra) == nxt:
                rc.change(pos // cs, 1)
                rc.allocate(extra)
                self._zpos, self._zfrees = pos + n, rc.frees
                return pos
        start = rc.allocate(-(-n // cs)) * cs
        self._zpos, self._zfrees = start + n, rc.frees
        return start

    # the header cluster -------------------------------------------------------------------------

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point the image at another backing file (``rebase -u``): cluster 0 is rewritten with
        the backing format extension and the name, as qemu rewrites it."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        if name is not None and fmt is None:
            raise UsageError("Backing file specified without backing format")
        self._prepare_header()
        self.flush()
        self._rewrite_cluster0(self.head.raw.header, name, fmt)

    def _rewrite_cluster0(
        self, header: q.Header, name: str | None, fmt: str | None, keep_bitmaps: bool = True
    ) -> None:
        """Write cluster 0 anew: header, extensions in qemu's order, then the backing name."""
        cs = self.cluster_size
        v3 = header.version >= 3
        skip = {q.HeaderExtensionType.BACKING_FILE_FORMAT, q.HeaderExtensionType.END,
                q.HeaderExtensionType.FEATURE_NAME_TABLE}
        if not keep_bitmaps:
            skip.add(q.HeaderExtensionType.BITMAPS)
        keep = [e for e in self.head.raw.extension_area.extensions if e.ext_type not in skip]
        exts: list[q.HeaderExtension] = []
        if name is not None and fmt is not None:
            fmt_b = fmt.encode("ascii")
            exts.append(_extension(q.HeaderExtensionType.BACKING_FILE_FORMAT,
                                   q.ExtBackingFileFormat(name=fmt_b), fmt_b))
        exts += keep
        if v3 and cs > FEATURE_TABLE_MIN_CLUSTER:
            table = feature_name_table()
            exts.append(_extension(q.HeaderExtensionType.FEATURE_NAME_TABLE, table,
                                   table.build()))
        exts.append(_extension(q.HeaderExtensionType.END, b"", b""))
        name_b = os.fsencode(name) if name is not None else b""
        ext_len = sum(len(e.build()) for e in exts)
        start = header.len_header_effective
        header.ofs_backing_file_name = start + ext_len if name_b else 0
        header.len_backing_file_name = len(name_b)
        if start + ext_len + len(name_b) > cs:
            raise UsageError("Backing file name too long for the header cluster")
        end = header.ofs_backing_file_name if name_b else cs
        area = q.HeaderExtensionArea(extensions=exts, rest=bytes(end - start - ext_len))
        cluster = q.Qcow2(header=header, extension_area=area).build() + name_b
        os.pwrite(self._f.fileno(), cluster, 0)
        os.fsync(self._f.fileno())
        from .header import load_header

        self.head = load_header(self._f)

    def amend(self, **options: str) -> None:
        """``qemu-img amend -o``: compat, refcount_bits, lazy_refcounts, backing_file,
        backing_fmt, applied in qemu's order (upgrade, refcount width, downgrade last)."""
        from .amend import change_refcount_order, refcount_order_of

        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        known = {"compat", "refcount_bits", "lazy_refcounts", "backing_file", "backing_fmt"}
        unknown = set(options) - known
        if unknown:
            raise UsageError(f"Changing the option '{sorted(unknown)[0]}' is not supported yet")
        compat = options.get("compat")
        if compat not in (None, "1.1", "v3", "0.10", "v2"):
            raise UsageError(f"Invalid compatibility level: '{compat}'")
        target = 3 if compat in ("1.1", "v3") else 2 if compat else self.head.version
        order = self.head.refcount_order
        if "refcount_bits" in options:
            order = refcount_order_of(options["refcount_bits"])
            if order != 4 and target < 3:
                raise UsageError("Refcount widths other than 16 bits require compatibility "
                                 "level 1.1 or above (use compat=1.1 or greater)")
        self._prepare_header()
        self.flush()
        head = self.head
        header = head.raw.header
        if target >= 3 and header.version < 3:
            header.version = 3
            header.incompatible_features = q.IncompatibleFeature(0)
            header.compatible_features = q.CompatibleFeature(0)
            header.autoclear_features = q.AutoclearFeature(0)
            header.refcount_order = 4
            header.len_header = V3_HEADER_LENGTH
            header.compression_type = q.CompressionType.ZLIB
            header.padding = bytes(7)
            self._rewrite_cluster0(header, _text(head.backing_file), head.backing_format)
        change_refcount_order(self, order)
        if target < 3 and self.head.version >= 3:
            self._downgrade()
        if "lazy_refcounts" in options:
            on = _bool(options["lazy_refcounts"], "lazy_refcounts")
            if on and self.head.version < 3:
                raise UsageError("Lazy refcounts only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)")
            if self.head.version >= 3:
                raw = self.head.raw.header
                bits = int(raw.compatible_features or 0)
                bit = int(q.CompatibleFeature.LAZY_REFCOUNTS)
                raw.compatible_features = q.CompatibleFeature(bits | bit if on else bits & ~bit)
                self.head.compatible = raw.compatible_features
                self._write_header_range(H.COMPATIBLE_FEATURES_AT, H.AUTOCLEAR_FEATURES_AT)
        if "backing_file" in options or "backing_fmt" in options:
            name = options.get("backing_file", _text(self.head.backing_file))
            fmt = options.get("backing_fmt", self.head.backing_format)
            self.set_backing(name or None, fmt if name else None)

    def _downgrade(self) -> None:
        """compat=0.10 (qemu's qcow2_downgrade): zero clusters expanded, feature bits and
        bitmaps dropped, the header rewritten as version 2."""
        from .amend import drop_bitmaps, expand_zero_clusters

        head = self.head
        header = head.raw.header
        allowed = int(q.IncompatibleFeature.DIRTY) | int(q.IncompatibleFeature.COMPRESSION_TYPE)
        if int(head.incompatible) & ~allowed:
            raise UsageError("Cannot downgrade an image with incompatible features "
                             f"{int(head.incompatible) & ~int(q.IncompatibleFeature.DIRTY):#x} set")
        if head.refcount_order != 4:
            raise UsageError("compat=0.10 requires refcount_bits=16")
        if head.compression_type != q.CompressionType.ZLIB:
            if any(e & L2_COMPRESSED for e in self._all_l2_entries()):
                raise UsageError("Cannot downgrade an image with zstd compression type and "
                                 "existing compressed clusters")
        expand_zero_clusters(self)
        freed = drop_bitmaps(self)
        self._set_dirty_bit = False  # the version 2 header has no feature bits
        header.version = 2
        for name in ("incompatible_features", "compatible_features", "autoclear_features",
                     "refcount_order", "len_header", "compression_type", "padding",
                     "unknown_header_fields"):
            setattr(header, name, None)
        self._rewrite_cluster0(header, _text(head.backing_file), head.backing_format,
                               keep_bitmaps=False)
        self._pending_free.extend(freed)
        self.flush()

    def _all_l2_entries(self) -> list[int]:
        """Every L2 entry of the active and the snapshot L1 tables."""
        tables: set[int] = {e & L1_OFFSET for e in self._l1 if e & L1_OFFSET}
        if self.head.nb_snapshots:
            for snap in self.head.raw.read_snapshot_table(self._f):
                tables |= {e & L1_OFFSET for e in snap.read_l1_table(self._f) if e & L1_OFFSET}
        stride = 2 if self.head.extended_l2 else 1
        out: list[int] = []
        for offset in sorted(tables):
            out.extend(self._table(offset)[::stride])
        return out

    def make_empty(self) -> None:
        """Drop every cluster so the image reads its backing file again (after a commit)."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._prepare_header()
        cs = self.cluster_size
        for cstart in range(0, self.size, cs):
            self._set_entry(cstart, 0, 0)
        self.flush()


def _text(name: bytes | None) -> str | None:
    return os.fsdecode(name) if name is not None else None
