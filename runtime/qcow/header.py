"""The qcow v1 header: parsed by the generated class, checked with qemu's limits and words.

The spec (specs/qcow.ksy) holds the ranges qemu accepts (cluster_bits 9..16, l2_bits 6..13,
size >= 2, backing name <= 1023 bytes); a violation is reported with qemu's message followed
by the generated parser's field, offset and value. The limits that are qemu's and not the
format's (the derived L1 size, offsets within int64) are checked here (qcow.md A.1, D.5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..crypto import SECTOR_SIZE
from ..errors import StructError
from ..generated import qcow as qv
from ..image import ImageError
from .masks import H

__all__ = ["INT64_MAX", "MAX_L1_ENTRIES", "QcowHeader", "load_header"]

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
MAX_L1_ENTRIES = ((1 << 31) - 1) // 8  # qemu: l1_size <= INT_MAX / sizeof(uint64_t)

# qemu's words for a value the spec's `valid` refuses, by field
_QEMU_WORDS = {
    "magic": "Image not in qcow format",
    "len_virtual_disk": "Image size is too small (must be at least 2 bytes)",
    "cluster_bits": "Cluster size must be between 512 and 64k",
    "l2_bits": "L2 table size must be between 512 and 64k",
    "len_backing_file_name": "Backing file name too long",
}


@dataclass(slots=True)
class QcowHeader:
    """The header of a qcow v1 image, with the values derived from it."""

    raw: qv.Qcow
    size: int  # the virtual size qemu uses: whole 512-byte sectors
    cluster_bits: int
    l2_bits: int
    l1_offset: int
    l1_size: int
    crypt_method: int
    backing_file: bytes | None

    @property
    def cluster_size(self) -> int:
        return self.raw.header.cluster_size

    @property
    def l2_bytes(self) -> int:
        return self.raw.header.len_l2_table

    @property
    def l1_shift(self) -> int:
        return self.cluster_bits + self.l2_bits

    @property
    def encrypted(self) -> bool:
        return self.crypt_method != qv.CryptMethod.NONE

    @property
    def metadata_end(self) -> int:
        """The end of the header, the backing name and the L1 table in the file."""
        h = self.raw.header
        name_end = h.ofs_backing_file_name + h.len_backing_file_name if self.backing_file else 0
        return max(H.SIZE, name_end, self.l1_offset + 8 * self.l1_size)


def load_header(f: BinaryIO, path: Path) -> QcowHeader:
    """Read and check the header at offset 0 (one-line ImageError naming the field)."""
    data = os.pread(f.fileno(), H.SIZE, 0)
    try:
        raw = qv.Qcow.parse(data)
    except StructError as exc:
        words = _QEMU_WORDS.get(exc.field)
        if exc.field == "version":
            version = int.from_bytes(data[H.VERSION_AT : H.VERSION_AT + 4], "big")
            words = f"qcow (v1) does not support qcow version {version}"
            if version in (2, 3):
                words += "; try the 'qcow2' driver instead"
        raise ImageError(f"{path}: {words + ': ' if words else ''}{exc}") from exc
    h = raw.header
    shift = h.cluster_bits + h.l2_bits
    if h.len_virtual_disk > UINT64_MAX - (1 << shift) or h.num_l1_entries > MAX_L1_ENTRIES:
        raise ImageError(
            f"{path}: Image too large (Header.len_virtual_disk at offset "
            f"{H.LEN_VIRTUAL_DISK_AT:#x}: {h.len_virtual_disk:#x} needs {h.num_l1_entries} L1 "
            f"entries, qemu allows {MAX_L1_ENTRIES})"
        )
    if h.crypt_method not in tuple(qv.CryptMethod):
        raise ImageError(
            f"{path}: invalid encryption method in qcow header (Header.crypt_method at offset "
            f"{H.CRYPT_METHOD_AT:#x}: {int(h.crypt_method)})"
        )
    l1_size = h.num_l1_entries
    if h.ofs_l1_table + 8 * l1_size > INT64_MAX:
        raise ImageError(
            f"{path}: Could not read L1 table (Header.ofs_l1_table at offset "
            f"{H.OFS_L1_TABLE_AT:#x}: {h.ofs_l1_table:#x} + {8 * l1_size} bytes is past int64)"
        )
    backing: bytes | None = None
    if h.ofs_backing_file_name:
        if h.ofs_backing_file_name + h.len_backing_file_name > INT64_MAX:
            raise ImageError(
                f"{path}: Could not read backing file name (Header.ofs_backing_file_name at "
                f"offset {H.OFS_BACKING_FILE_NAME_AT:#x}: {h.ofs_backing_file_name:#x})"
            )
        name = raw.read_backing_file_name(f)
        backing = name.split(b"\0", 1)[0] if name is not None else None  # a C string in qemu
    return QcowHeader(
        raw=raw,
        size=h.len_virtual_disk // SECTOR_SIZE * SECTOR_SIZE,
        cluster_bits=h.cluster_bits,
        l2_bits=h.l2_bits,
        l1_offset=h.ofs_l1_table,
        l1_size=l1_size,
        crypt_method=int(h.crypt_method),
        backing_file=backing or None,
    )
