"""qcow v1 images: the read path (L1 -> L2 -> clusters, backing file, compression, AES).

Address math and entry decoding use only the generated classes of specs/qcow.ksy. Reads are
planned with the run kinds of the qcow2 read path (`_DATA`, `_BACKING`, `_COMPRESSED`; qcow v1
has no zero clusters), so the CLI's rebase and commit work on both formats.

Hostile images are bounded: the L1 table is read only as far as the file holds it (entries
past the end of the file read as 0, as qemu's zero-filled reads give), L2 tables are at most
64 KiB and cached 128 at a time, compressed clusters inflate to exactly one cluster.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Any, BinaryIO

from ..cache import LruCache
from ..compress import inflate_cluster
from ..crypto import SECTOR_SIZE, SectorCipher
from ..generated import qcow as qv
from ..image import Extent, Image, ImageError, UsageError
from ..qcow2.image import _BACKING, _COMPRESSED, _DATA, _add
from ..structbase import unpack_words
from .header import QcowHeader, load_header
from .masks import L2_COMPRESSED, L2_OFFSET, compressed_extent
from .write import QcowWriter

__all__ = ["QcowImage"]

L2_CACHE_TABLES = 128  # at most 8 MiB of 64 KiB tables
COMPRESSED_CACHE_BYTES = 4 << 20

Runs = list[tuple[int, int, int, int]]


class QcowImage(QcowWriter, Image):
    """A qcow (version 1) image."""

    fmt = "qcow"

    def __init__(
        self,
        path: Path,
        f: BinaryIO,
        writable: bool,
        head: QcowHeader,
        backing: Image | None,
        backing_format: str | None = None,
    ) -> None:
        super().__init__(path, f, writable)
        self.head = head
        self.backing = backing
        self.backing_format = backing_format
        self.size = head.size
        self.cluster_size = head.cluster_size
        file_size = os.fstat(f.fileno()).st_size
        l1_end = head.l1_offset + 8 * head.l1_size
        if writable and l1_end > file_size:
            raise ImageError(
                f"{path}: L1 table at {head.l1_offset:#x} ({8 * head.l1_size} bytes) ends past "
                f"the end of the file ({file_size:#x}); refusing to write"
            )
        # only the part the file holds: the rest reads as 0 (unallocated), like qemu
        held = max(0, min(head.l1_size, -(-(file_size - head.l1_offset) // 8)))
        data = self._host_read(f, 8 * held, head.l1_offset)
        self._l1: array[int] = unpack_words(data, 0, held, "Q", True)
        self._l2_cache: LruCache[int, array[int]] = LruCache(L2_CACHE_TABLES)
        self._zcache: LruCache[int, bytes] = LruCache(
            max(1, COMPRESSED_CACHE_BYTES // head.cluster_size)
        )
        self._cipher: SectorCipher | None = None
        self._writer_init(file_size)

    @classmethod
    def load_header(cls, f: BinaryIO, path: Path) -> QcowHeader:
        return load_header(f, path)

    @property
    def encrypted(self) -> bool:
        """Whether guest data is encrypted (open it with a passphrase, or :meth:`unlock`)."""
        return bool(self.head.encrypted)

    def unlock(self, passphrase: bytes) -> None:
        """Give the key of an AES-encrypted image (the first 16 bytes of the passphrase)."""
        from ..crypto import qcow_aes_cipher

        if not self.head.encrypted:
            raise UsageError(f"{self.path}: the image is not encrypted")
        self._cipher = qcow_aes_cipher(passphrase)

    # tables -------------------------------------------------------------------------------

    def _l2(self, l1_index: int) -> array[int] | None:
        offset = self._l1[l1_index] if l1_index < len(self._l1) else 0
        if offset == 0:
            return None
        return self._table(offset)

    def _read_l2(self, offset: int) -> array[int]:
        data = self._host_read(self._f, self.head.l2_bytes, offset)
        return qv.L2Table.parse(data, l2_bits=self.head.l2_bits).entries

    # reading ------------------------------------------------------------------------------

    def _read(self, n: int, offset: int) -> bytes:
        runs = self._plan(offset, n)
        out = bytearray(n)
        view = memoryview(out)
        for kind, guest, host, length in runs:
            at = guest - offset
            if kind == _DATA:
                self._read_data(view[at : at + length], host, guest)
            elif kind == _BACKING:
                backing = self.backing
                if backing is not None and guest < backing.size:
                    k = min(length, backing.size - guest)
                    out[at : at + k] = backing._read(k, guest)
            else:
                cluster = self._compressed(host)
                start = guest & (self.cluster_size - 1)
                out[at : at + length] = cluster[start : start + length]
        return bytes(out)

    def _read_data(self, target: memoryview, host: int, guest: int) -> None:
        """Host bytes into ``target`` (zeros past the end of the file), decrypted if needed."""
        if not self.head.encrypted:
            target[:] = self._host_read(self._f, len(target), host)
            return
        if self._cipher is None:
            raise ImageError(f"{self.path}: the image is encrypted; open it with its passphrase")
        lead = guest % SECTOR_SIZE
        span = -(-(lead + len(target)) // SECTOR_SIZE) * SECTOR_SIZE
        sealed = self._host_read(self._f, span, host - lead)
        plain = self._cipher.decrypt(sealed, (guest - lead) // SECTOR_SIZE)
        target[:] = plain[lead : lead + len(target)]

    def _plan(self, offset: int, n: int) -> Runs:
        """Where guest bytes [offset, offset + n) come from: (kind, guest, host, length) runs,
        merged when contiguous (a compressed run's host is its L2 entry)."""
        runs: Runs = []
        head = self.head
        cb, cs = head.cluster_bits, head.cluster_size
        index_mask = head.raw.header.num_l2_entries - 1
        pos, end = offset, offset + n
        while pos < end:
            l1_index = pos >> head.l1_shift
            table = self._l2(l1_index)
            if table is None:
                stop = min(end, (l1_index + 1) << head.l1_shift)
                _add(runs, _BACKING, pos, 0, stop - pos)
                pos = stop
                continue
            index = (pos >> cb) & index_mask
            cend = min(end, ((pos >> cb) + 1) << cb)
            entry = table[index]
            if entry & L2_COMPRESSED:
                runs.append((_COMPRESSED, pos, entry, cend - pos))
            elif entry:
                host = entry & L2_OFFSET
                if host % SECTOR_SIZE:
                    raise ImageError(
                        f"{self.path}: cluster offset {host:#x} is not sector-aligned (L1 "
                        f"index {l1_index}, L2 index {index:#x}): Input/output error"
                    )
                _add(runs, _DATA, pos, host + (pos & (cs - 1)), cend - pos)
            else:
                _add(runs, _BACKING, pos, 0, cend - pos)
            pos = cend
        return runs

    def _compressed(self, entry: int) -> bytes:
        cached = self._zcache.peek(entry)
        if cached is not None:
            return cached
        offset, length = compressed_extent(entry, self.head.cluster_bits)
        data = self._host_read(self._f, length, offset)
        where = f"{self.path}: compressed cluster at {offset:#x} ({length} bytes)"
        cluster = inflate_cluster(data, self.cluster_size, where)
        self._zcache.put(entry, cluster)
        return cluster

    # what qemu-img reports ----------------------------------------------------------------

    def snapshots(self) -> list[Any]:
        """qcow v1 has no internal snapshots."""
        return []

    def create_snapshot(self, name: str) -> str:
        raise UsageError(f"Could not create snapshot '{name}': -95 (Operation not supported)")

    def map(self) -> list[Extent]:
        """The guest ranges and where they come from, as ``qemu-img map`` reports them."""
        from ..qcow2.mapping import image_map

        return image_map(self)

    def info(self) -> dict[str, Any]:
        """What ``qemu-img info --output=json`` reports, same keys, values and order."""
        from .info import qcow_layer

        return qcow_layer(self, str(self.path))

    def info_chain(self) -> list[dict[str, Any]]:
        """``qemu-img info --backing-chain --output=json``."""
        from .info import qcow_info_chain

        return qcow_info_chain(self)

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()  # flushes the writer's tables first
            finally:
                if self.backing is not None:
                    self.backing.close()
