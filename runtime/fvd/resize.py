"""Resizing FVD images (fvd.md rule 7 and 6.7).

Growing: non-compact images always (the data region is raw-like), compact ones while the
table region has room for the new entries. Shrinking needs ``shrink``: base_img_size is
clamped (bits past it cleared), table entries past the end dropped (set EMPTY on disk, so a
later grow reads zeros there), the raw-like data region truncated. The virtual size stays a
multiple of 512. Metadata is persisted and the journal zeroed before the header changes.
"""

from __future__ import annotations

import os
from array import array
from typing import TYPE_CHECKING

from ..generated import fvd as fv
from ..image import UsageError
from .consts import EMPTY, ENTRY_BYTES, SECTOR
from .create import round_up
from .image import _table_capacity

if TYPE_CHECKING:
    from .image import FvdImage

__all__ = ["resize"]


def resize(img: FvdImage, new_size: int, shrink: bool = False) -> None:
    if not img.writable:
        raise UsageError(f"{img.path}: image is open read-only")
    new = round_up(new_size, SECTOR)
    old = img.size
    if new < old and not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation.")
    h = img.h
    if img.table is not None:
        entries = -(-new // img.chunk_size)
        capacity = _table_capacity(h) // ENTRY_BYTES
        if entries > capacity:
            raise UsageError(
                f"{img.path}: the lookup table holds {capacity} chunks of {img.chunk_size} "
                f"bytes, {entries} needed: a compact image cannot grow this far"
            )
    if new == old:
        return
    img._begin_write()
    img.flush()
    if new < old and img.base_size > new:
        bs = img.block_size
        keep = -(-new // bs)
        bits = bytearray(img.bitmap)
        for b in range(keep, min(len(bits) * 8, -(-img.base_size // bs))):
            bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF
        img.bitmap[:] = bits
        h.len_base_img = new
        img.base_size = new
    if img.table is not None:
        table = img.table
        cs = img.chunk_size
        entries = -(-new // cs)
        if new < old and new % cs and table[new // cs] != EMPTY:
            # the kept part of the last chunk: what lies past the new end must read as zeros
            # if the image grows again
            host = img.data_start + table[new // cs] * cs
            img._storage().write(bytes(cs - new % cs), host + new % cs)
        if entries < len(table):
            dropped = len(table) - entries
            os.pwrite(img._f.fileno(), fv.TableEntry.from_raw(EMPTY).build() * dropped,
                      h.ofs_table + ENTRY_BYTES * entries)
            img.table = table[:entries]
        else:
            img.table = table + array(fv.TableEntry.WORD, [EMPTY]) * (entries - len(table))
    img._persist_metadata(zero_all=True)
    if img.table is None:
        storage = img._storage()
        storage.truncate(img.data_start + min(old, new))  # the grown part reads as zeros
        storage.truncate(img.data_start + new)
    h.len_virtual_disk = new
    img._write_header()
    os.fsync(img._f.fileno())
    img.size = new
    img._scan_table()
    if img.table is not None and not img.bad_entries and not img.shared_entries:
        # chunks dropped at the top would be handed out again: they must read as zeros
        end = img.data_start + img.used_chunks * img.chunk_size
        if img._storage().length() > end:
            img._storage().truncate(end)
