"""qcow2 images: the read path (L1 -> L2 -> clusters, backing chain, compression, subclusters).

Address math and entry decoding use only the masks of diskspec.generated.qcow2. Reads are
planned per L2 table and coalesced: contiguous host clusters become one pread, runs of
unallocated clusters one read of the backing image, zero runs no I/O at all.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..cache import LruCache
from ..compress import inflate_cluster, unzstd_cluster
from ..crypto import SectorCipher
from ..generated import qcow2 as q
from ..image import Extent, Image, ImageError, UsageError
from .header import Qcow2Header, load_header
from .masks import (
    L1_OFFSET,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET,
    L2_ZERO,
    SUB_ALLOC,
    SUB_ZERO_SHIFT,
    SUBCLUSTERS,
)
from .write import Qcow2Writer

if TYPE_CHECKING:
    from .check import CheckResult, Repair

__all__ = ["Qcow2Image", "SnapshotInfo"]


L2_CACHE_BYTES = 32 << 20
COMPRESSED_CACHE_BYTES = 8 << 20

# what a guest range reads from
_DATA, _ZERO, _BACKING, _COMPRESSED = 0, 1, 2, 3


def _add(runs: list[tuple[int, int, int, int]], kind: int, guest: int, host: int, n: int) -> None:
    """Append a run, merging it into the previous one when it continues it."""
    if runs:
        k, g, h, length = runs[-1]
        if k == kind and g + length == guest and (kind != _DATA or h + length == host):
            runs[-1] = (k, g, h, length + n)
            return
    runs.append((kind, guest, host, n))


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
        self._cipher: SectorCipher | None = None
        self._writer_init()

    @classmethod
    def load_header(cls, f: BinaryIO) -> Qcow2Header:
        return load_header(f)

    @property
    def encrypted(self) -> bool:
        """Whether guest data is encrypted (open it with a passphrase, or :meth:`unlock`)."""
        return self.head.crypt_method != q.CryptMethod.NONE

    def unlock(self, passphrase: bytes) -> None:
        """Give the key of an encrypted image (LUKS or the legacy AES method)."""
        from ..crypto import luks_unlock, qcow_aes_cipher

        head = self.head
        if head.crypt_method == q.CryptMethod.AES:
            self._cipher = qcow_aes_cipher(passphrase)
        elif head.crypt_method == q.CryptMethod.LUKS:
            assert head.encryption is not None
            fde = head.encryption
            header = fde.read_encryption_header(self._f)
            base = fde.ofs_encryption_header

            def read(offset: int, n: int) -> bytes:
                return self._host_read(self._f, n, base + offset)

            self._cipher = luks_unlock(header, read, passphrase)
        else:
            raise UsageError(f"{self.path}: the image is not encrypted")

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
        runs = self._plan(offset, n)
        if len(runs) == 1 and runs[0][0] == _DATA and self._cipher is None:
            # the common sequential case: one contiguous host range, no copies
            _, _, host, length = runs[0]
            return self._host_read(self._data_fd(), length, host)
        out = bytearray(n)
        view = memoryview(out)
        for kind, guest, host, length in runs:
            at = guest - offset
            if kind == _DATA:
                self._read_data(view[at : at + length], host, guest)
            elif kind == _BACKING:
                self._fill_backing(out, at, guest, length)
            elif kind == _COMPRESSED:
                cluster = self._compressed(host)
                start = guest & (self.cluster_size - 1)
                out[at : at + length] = cluster[start : start + length]
        return bytes(out)

    def _data_fd(self) -> BinaryIO:
        return self._data if self._data is not None else self._f

    def _read_data(self, target: memoryview, host: int, guest: int) -> None:
        """Host bytes into ``target`` (zeros past the end of the file), decrypted if needed."""
        fd = self._data_fd().fileno()
        if self._cipher is None:
            if self.head.crypt_method != q.CryptMethod.NONE:
                raise ImageError(
                    f"{self.path}: the image is encrypted; open it with its passphrase"
                )
            got = os.preadv(fd, [target], host)
            if got < len(target):
                target[got:] = bytes(len(target) - got)
            return
        # whole sectors are the cipher's unit: widen, decrypt, cut
        lead = host % 512
        span = -(-(lead + len(target)) // 512) * 512
        sealed = self._host_read(self._data_fd(), span, host - lead)
        luks = self.head.crypt_method == q.CryptMethod.LUKS
        sector = ((host if luks else guest) - lead) // 512
        plain = self._cipher.decrypt(sealed, sector)
        target[:] = plain[lead : lead + len(target)]

    def _plan(self, offset: int, n: int) -> list[tuple[int, int, int, int]]:
        """Where guest bytes [offset, offset + n) come from: (kind, guest, host, length) runs,
        merged when contiguous (a compressed run's host is its L2 entry)."""
        runs: list[tuple[int, int, int, int]] = []
        pos, end = offset, offset + n
        shift = self.head.l1_shift
        while pos < end:
            l1_index = pos >> shift
            stop = min(end, (l1_index + 1) << shift)
            table = self._l2(l1_index)
            if table is None:
                _add(runs, _BACKING, pos, 0, stop - pos)
            else:
                self._plan_table(runs, pos, stop, table, l1_index)
            pos = stop
        return runs

    def _plan_table(
        self,
        runs: list[tuple[int, int, int, int]],
        pos: int,
        stop: int,
        table: array[int],
        l1_index: int,
    ) -> None:
        """Plan guest bytes [pos, stop), all mapped by one L2 table."""
        cb = self.head.cluster_bits
        cs = self.cluster_size
        mask = cs - 1
        extended = self.head.extended_l2
        v2 = self.head.version < 3
        data_file = self._data is not None or self.head.has_data_file
        index_mask = (1 << self.head.l2_bits) - 1
        while pos < stop:
            index = (pos >> cb) & index_mask
            cend = min(stop, ((pos >> cb) + 1) << cb)
            entry = table[2 * index] if extended else table[index]
            if entry & L2_COMPRESSED:
                if data_file:
                    raise ImageError(
                        f"{self.path}: Compressed cluster entry found in image with external "
                        f"data file (L2 index {index:#x})"
                    )
                runs.append((_COMPRESSED, pos, entry, cend - pos))
                pos = cend
                continue
            host = entry & L2_OFFSET
            if extended:
                pieces = self._subcluster_pieces(
                    entry, table[2 * index + 1], pos, cend, index, l1_index
                )
                pieces.append((-1, cend, 0))
                for (kind, g, h), (_, g_next, _) in pairwise(pieces):
                    _add(runs, kind, g, h, g_next - g)
            else:
                if entry & L2_ZERO:
                    if v2:
                        raise ImageError(
                            f"{self.path}: Zero cluster entry found in pre-v3 image (L2 index: "
                            f"{index:#x}, L1 index: {l1_index})"
                        )
                    _add(runs, _ZERO, pos, 0, cend - pos)
                elif host or (data_file and entry & L2_COPIED):
                    if host & mask:
                        raise ImageError(
                            f"{self.path}: Cluster allocation offset {host:#x} unaligned "
                            f"(L1 index: {l1_index}, L2 index: {index:#x})"
                        )
                    _add(runs, _DATA, pos, host + (pos & mask), cend - pos)
                else:
                    _add(runs, _BACKING, pos, 0, cend - pos)
            pos = cend

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

    def _fill_backing(self, out: bytearray, at: int, guest: int, length: int) -> None:
        backing = self.backing
        if backing is None or guest >= backing.size:
            return
        n = min(length, backing.size - guest)
        out[at : at + n] = backing._read(n, guest)


    def _compressed(self, entry: int) -> bytes:
        cached = self._zcache.peek(entry)
        if cached is not None:
            return cached
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

    @property
    def backing_format(self) -> str | None:
        """The format the header records for the backing file (None: read as raw)."""
        return self.head.backing_format

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

    def check(self, repair: Repair = None) -> CheckResult:
        """``qemu-img check [-r leaks|all]`` of this image (see diskspec.qcow2.check)."""
        from .check import check_image

        return check_image(self, repair)

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
