"""qcow2 images: the read path (L1 -> L2 -> clusters, backing chain, compression, subclusters).

Address math and entry decoding use only the masks of diskspec.generated.qcow2. Reads are
planned per L2 table and coalesced: contiguous host clusters become one pread, runs of
unallocated clusters one read of the backing image, zero runs no I/O at all.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

from ..cache import LruCache
from ..compress import inflate_cluster, unzstd_cluster
from ..generated import qcow2 as q
from ..image import Extent, Image, ImageError, UsageError
from .header import Qcow2Header, load_header
from .write import Qcow2Writer

__all__ = ["Qcow2Image", "SnapshotInfo"]

L1_OFFSET = q.L1Entry.OFS_L2_TABLE_DIV512_MASK
L2_COPIED = q.L2Entry.COPIED_MASK
L2_COMPRESSED = q.L2Entry.COMPRESSED_MASK
L2_OFFSET = q.L2Entry.OFS_CLUSTER_DIV512_MASK
L2_ZERO = q.L2Entry.ZERO_MASK
SUB_ALLOC = q.SubclusterBitmap.ALLOCATED_MASK
SUB_ZERO_SHIFT = q.SubclusterBitmap.READS_AS_ZERO_SHIFT
SUBCLUSTERS = SUB_ZERO_SHIFT  # one allocation bit per subcluster

L2_CACHE_BYTES = 32 << 20
COMPRESSED_CACHE_BYTES = 8 << 20

# what a guest range reads from
_DATA, _ZERO, _BACKING = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot, in the terms of ``qemu-img snapshot -l``."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None
    disk_size: int
    l1_offset: int
    l1_size: int


class Qcow2Image(Qcow2Writer, Image):
    """A qcow2 image, or a read-only view of one of its snapshots."""

    fmt = "qcow2"

    def __init__(
        self,
        path: Path,
        f: BinaryIO,
        writable: bool,
        head: Qcow2Header,
        backing: Image | None,
        data_file: BinaryIO | None,
    ) -> None:
        super().__init__(path, f, writable)
        self.head = head
        self.backing = backing
        self._data = data_file
        self.size = head.size
        self.cluster_size = head.cluster_size
        f.seek(0)
        self._l1 = head.raw.read_l1_table(f)
        self._l2_cache: LruCache[int, array[int]] = LruCache(L2_CACHE_BYTES // head.cluster_size)
        self._zcache: LruCache[int, bytes] = LruCache(COMPRESSED_CACHE_BYTES // head.cluster_size)
        self._snapshot: SnapshotInfo | None = None
        self._writer_init()

    @classmethod
    def load_header(cls, f: BinaryIO) -> Qcow2Header:
        return load_header(f)

    # tables ---------------------------------------------------------------------------------

    def _l2(self, l1_index: int) -> array[int] | None:
        if l1_index >= len(self._l1):
            return None
        offset = self._l1[l1_index] & L1_OFFSET
        if offset == 0:
            return None
        if offset % self.cluster_size:
            raise ImageError(
                f"{self.path}: L2 table offset {offset:#x} unaligned (L1 index: {l1_index})"
            )
        return self._table(offset)

    def _read_l2(self, offset: int) -> array[int]:
        data = self._host_read(self._f, self.cluster_size, offset)
        table = q.L2Table.parse(
            data, cluster_bits=self.head.cluster_bits, extended=self.head.extended_l2
        )
        entries = table.entries_extended if self.head.extended_l2 else table.entries
        assert entries is not None
        return entries

    # reading --------------------------------------------------------------------------------

    def _read(self, n: int, offset: int) -> bytes:
        out = bytearray(n)
        pos, end = offset, offset + n
        shift = self.head.l1_shift
        while pos < end:
            l1_index = pos >> shift
            stop = min(end, (l1_index + 1) << shift)
            table = self._l2(l1_index)
            if table is None:
                self._fill_backing(out, pos - offset, pos, stop - pos)
            else:
                self._read_table_span(out, offset, pos, stop, table, l1_index)
            pos = stop
        return bytes(out)

    def _read_table_span(
        self, out: bytearray, base: int, pos: int, stop: int, table: array[int], l1_index: int
    ) -> None:
        """Fill ``out`` for guest bytes [pos, stop), all mapped by one L2 table."""
        cb = self.head.cluster_bits
        cs = self.cluster_size
        mask = cs - 1
        extended = self.head.extended_l2
        v2 = self.head.version < 3
        data_file = self.head.has_data_file
        # the current run: kind, guest start, host start (for data), length
        run_kind, run_guest, run_host, run_len = -1, pos, 0, 0
        while pos < stop:
            index = (pos >> cb) & ((1 << self.head.l2_bits) - 1)
            cend = min(stop, ((pos >> cb) + 1) << cb)
            entry = table[2 * index] if extended else table[index]
            pieces: list[tuple[int, int, int]]  # (kind, guest, host) per contiguous piece
            if entry & L2_COMPRESSED:
                if data_file:
                    raise ImageError(
                        f"{self.path}: Compressed cluster entry found in image with external "
                        f"data file (L2 index {index:#x})"
                    )
                if run_len:
                    self._flush(out, base, run_kind, run_guest, run_host, run_len)
                    run_kind, run_len = -1, 0
                cluster = self._compressed(entry)
                start = pos & mask
                out[pos - base : cend - base] = cluster[start : start + cend - pos]
                pos = cend
                run_guest = pos
                continue
            host = entry & L2_OFFSET
            if extended:
                pieces = self._subcluster_pieces(
                    entry, table[2 * index + 1], pos, cend, index, l1_index
                )
            else:
                if entry & L2_ZERO:
                    if v2:
                        raise ImageError(
                            f"{self.path}: Zero cluster entry found in pre-v3 image (L2 index: "
                            f"{index:#x}, L1 index: {l1_index})"
                        )
                    kind = _ZERO
                elif host or (data_file and entry & L2_COPIED):
                    if host & mask:
                        raise ImageError(
                            f"{self.path}: Cluster allocation offset {host:#x} unaligned "
                            f"(L1 index: {l1_index}, L2 index: {index:#x})"
                        )
                    kind = _DATA
                else:
                    kind = _BACKING
                pieces = [(kind, pos, host + (pos & mask))]
            pieces.append((-1, cend, 0))
            for (kind, g, h), (_, g_next, _) in pairwise(pieces):
                length = g_next - g
                contiguous = run_kind == kind and (kind != _DATA or run_host + run_len == h)
                if contiguous and run_guest + run_len == g:
                    run_len += length
                    continue
                if run_len:
                    self._flush(out, base, run_kind, run_guest, run_host, run_len)
                run_kind, run_guest, run_host, run_len = kind, g, h, length
            pos = cend
        if run_len:
            self._flush(out, base, run_kind, run_guest, run_host, run_len)

    def _subcluster_pieces(
        self, entry: int, bitmap: int, pos: int, cend: int, index: int, l1_index: int
    ) -> list[tuple[int, int, int]]:
        cs = self.cluster_size
        sub = cs // SUBCLUSTERS
        host = entry & L2_OFFSET
        alloc = bitmap & SUB_ALLOC
        zero = bitmap >> SUB_ZERO_SHIFT
        if alloc & zero or (not host and alloc and not self.head.has_data_file):
            raise ImageError(
                f"{self.path}: Invalid cluster entry found (L1 index: {l1_index}, L2 index: "
                f"{index:#x})"
            )
        if host & (cs - 1):
            raise ImageError(
                f"{self.path}: Cluster allocation offset {host:#x} unaligned "
                f"(L1 index: {l1_index}, L2 index: {index:#x})"
            )
        cluster_start = pos - (pos & (cs - 1))
        pieces: list[tuple[int, int, int]] = []
        first = (pos - cluster_start) // sub
        last = (cend - 1 - cluster_start) // sub
        for s in range(first, last + 1):
            g = max(pos, cluster_start + s * sub)
            if alloc >> s & 1:
                kind = _DATA
            elif zero >> s & 1:
                kind = _ZERO
            else:
                kind = _BACKING
            if pieces and pieces[-1][0] == kind:
                continue
            pieces.append((kind, g, host + (g - cluster_start)))
        return pieces

    def _flush(
        self, out: bytearray, base: int, kind: int, guest: int, host: int, length: int
    ) -> None:
        at = guest - base
        if kind == _DATA:
            f = self._data if self._data is not None else self._f
            self._check_encryption()
            out[at : at + length] = self._host_read(f, length, host)
        elif kind == _BACKING:
            self._fill_backing(out, at, guest, length)

    def _fill_backing(self, out: bytearray, at: int, guest: int, length: int) -> None:
        backing = self.backing
        if backing is None or guest >= backing.size:
            return
        n = min(length, backing.size - guest)
        out[at : at + n] = backing._read(n, guest)

    def _check_encryption(self) -> None:
        if self.head.crypt_method != q.CryptMethod.NONE:
            raise ImageError(f"{self.path}: reading encrypted qcow2 images is not supported yet")

    def _compressed(self, entry: int) -> bytes:
        cached = self._zcache.peek(entry)
        if cached is not None:
            return cached
        self._check_encryption()
        desc = q.CompressedDescriptor(cluster_bits=self.head.cluster_bits, raw=entry)
        offset = desc.ofs_compressed
        data = self._host_read(self._f, desc.len_compressed_max, offset)
        where = f"{self.path}: compressed cluster at {offset:#x}"
        if self.head.compression_type == q.CompressionType.ZSTD:
            cluster = unzstd_cluster(data, self.cluster_size, where)
        else:
            cluster = inflate_cluster(data, self.cluster_size, where)
        self._zcache.put(entry, cluster)
        return cluster

    # snapshots --------------------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        """The internal snapshots, in table order."""
        if self.head.nb_snapshots == 0:
            return []
        return [info for info, _ in self._snapshot_entries()]

    def _snapshot_entries(self) -> list[tuple[SnapshotInfo, q.SnapshotEntry]]:
        if self.head.nb_snapshots == 0:
            return []
        entries = self.head.raw.read_snapshot_table(self._f)
        out = []
        for e in entries:
            extra = e.extra_data
            vm_state = extra.len_vm_state if extra.len_vm_state is not None else e.len_vm_state_32
            out.append(
                (
                    SnapshotInfo(
                        id=e.id_str.decode("utf-8", "replace"),
                        name=e.name.decode("utf-8", "replace"),
                        vm_state_size=vm_state,
                        date_sec=e.date_sec,
                        date_nsec=e.date_nsec,
                        vm_clock_nsec=e.vm_clock_nsec,
                        icount=extra.icount if extra.icount not in (None, -1) else None,
                        disk_size=extra.len_virtual_disk
                        if extra.len_virtual_disk is not None
                        else self.head.size,
                        l1_offset=e.ofs_l1_table,
                        l1_size=e.num_l1_entries,
                    ),
                    e,
                )
            )
        return out

    def _find_snapshot(self, name: str) -> tuple[SnapshotInfo, q.SnapshotEntry]:
        """A snapshot by name, or by id as qemu also accepts."""
        snaps = self._snapshot_entries()
        for snap in snaps:
            if snap[0].name == name:
                return snap
        for snap in snaps:
            if snap[0].id == name:
                return snap
        raise UsageError(f"{self.path}: no snapshot named {name!r}")

    def open_snapshot(self, name: str) -> Qcow2Image:
        """A read-only view of the guest content as the snapshot recorded it."""
        snap, entry = self._find_snapshot(name)
        if snap.l1_offset % self.cluster_size:
            raise ImageError(f"{self.path}: Snapshot L1 table offset invalid ({snap.l1_offset:#x})")
        view = object.__new__(Qcow2Image)
        view.__dict__.update(self.__dict__)
        view.writable = False
        view.closed = False
        view.size = snap.disk_size & ~511
        view._snapshot = snap
        view._l1 = entry.read_l1_table(self._f)
        view._owner = self
        return view

    def close(self) -> None:
        if getattr(self, "_owner", None) is not None:
            self.closed = True  # a snapshot view shares its image's files
            return
        if not self.closed:
            try:
                self._close_writer()
            finally:
                super().close()
            if self._data is not None:
                self._data.close()
            if self.backing is not None:
                self.backing.close()

    def create_snapshot(self, name: str) -> str:
        """``qemu-img snapshot -c NAME``; returns the new snapshot's id."""
        from . import snapshot

        return snapshot.create_snapshot(self, name)

    def apply_snapshot(self, name: str) -> None:
        """``qemu-img snapshot -a NAME``."""
        from . import snapshot

        snapshot.apply_snapshot(self, name)

    def delete_snapshot(self, name: str) -> None:
        """``qemu-img snapshot -d NAME``."""
        from . import snapshot

        snapshot.delete_snapshot(self, name)

    def resize(self, new_size: int, shrink: bool = False) -> None:
        """``qemu-img resize [--shrink]``."""
        from . import snapshot

        snapshot.resize(self, new_size, shrink)

    def map(self) -> list[Extent]:
        """The guest ranges and where they come from, as ``qemu-img map`` reports them."""
        from .mapping import qcow2_map

        self.flush()  # the metadata-preallocation guess reads refcounts from disk
        return qcow2_map(self)

    def info(self) -> dict[str, Any]:
        """What ``qemu-img info --output=json`` reports, same keys and values."""
        from .info import qcow2_info

        return qcow2_info(self)

    def info_chain(self) -> list[dict[str, Any]]:
        """``qemu-img info --backing-chain --output=json``."""
        from .info import qcow2_info

        return qcow2_info(self, backing_chain=True)
