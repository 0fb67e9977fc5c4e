"""The FVD metadata journal (fvd.md 3.4): records built and parsed with the generated classes.

Every 512-byte sector is self-contained; records sit back to back and an EMPTY record (a zero
type word) ends the list, so a zero-padded sector is always well formed. Replay is idempotent:
bits are only set and table entries only assigned. Every record is bounds-checked; a record
that does not fit, an unknown type or an entry past the table is an error naming the sector.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from ..errors import StructError
from ..generated import fvd as fv
from ..image import ImageError
from .consts import (
    BITMAP_RECORD_BYTES,
    CHUNK_INDEX,
    ENTRY_BYTES,
    SECTOR,
    TABLE_RECORD_HEAD,
)

__all__ = [
    "MAX_BITMAP_SECTORS",
    "TABLE_ENTRIES_PER_SECTOR",
    "bitmap_record",
    "pack_sectors",
    "replay",
    "set_bits",
    "table_records",
]

#: entries of a table record alone in a sector (125)
TABLE_ENTRIES_PER_SECTOR = (SECTOR - TABLE_RECORD_HEAD) // ENTRY_BYTES
#: the largest sector count a bitmap record's u4 holds
MAX_BITMAP_SECTORS = (1 << 32) - 1


def set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits [first, last) of an LSB-first bitmap."""
    if first >= last:
        return
    a, b = first >> 3, (last - 1) >> 3
    if a == b:
        bitmap[a] |= ((1 << (last - first)) - 1) << (first & 7)
        return
    bitmap[a] |= (0xFF << (first & 7)) & 0xFF
    if b > a + 1:
        bitmap[a + 1 : b] = b"\xff" * (b - a - 1)
    bitmap[b] |= (1 << (((last - 1) & 7) + 1)) - 1


def bitmap_record(first_sector: int, nb_sectors: int) -> list[bytes]:
    """BITMAP records for a range of virtual sectors."""
    out = []
    while nb_sectors > 0:
        n = min(nb_sectors, MAX_BITMAP_SECTORS)
        body = fv.BitmapRecord(num_sectors=n, first_sector=first_sector)
        out.append(fv.JournalRecord(record_type=fv.JournalRecordType.BITMAP, body=body).build())
        first_sector += n
        nb_sectors -= n
    return out


def table_records(first_chunk: int, entries: Iterable[int]) -> list[bytes]:
    """TABLE records for consecutive entries, each small enough for one sector."""
    values = list(entries)
    out = []
    step = TABLE_ENTRIES_PER_SECTOR
    for i in range(0, len(values), step):
        part = array(fv.TableEntry.WORD, values[i : i + step])
        body = fv.TableRecord(first_chunk=first_chunk + i, num_entries=len(part), entries=part)
        out.append(fv.JournalRecord(record_type=fv.JournalRecordType.TABLE, body=body).build())
    return out


def pack_sectors(records: list[bytes]) -> list[bytes]:
    """Records packed into 512-byte sectors; the zero padding is the EMPTY record."""
    sectors: list[bytes] = []
    cur = b""
    for rec in records:
        if len(cur) + len(rec) > SECTOR:
            sectors.append(cur.ljust(SECTOR, b"\0"))
            cur = b""
        cur += rec
    if cur:
        sectors.append(cur.ljust(SECTOR, b"\0"))
    return sectors


def replay(
    where: str,
    journal: bytes,
    journal_offset: int,
    bitmap: bytearray | None,
    block_size: int,
    base_size: int,
    table: array[int] | None,
    disk_size: int,
) -> int:
    """Apply every record of ``journal`` to ``bitmap`` and ``table`` in place; returns the
    number of records applied. Raises ImageError on the first bad record."""
    applied = 0
    sectors_on_disk = disk_size // SECTOR
    zero = bytes(SECTOR)
    for index in range(len(journal) // SECTOR):
        raw = journal[index * SECTOR : (index + 1) * SECTOR]
        if raw == zero:
            continue
        at = journal_offset + index * SECTOR
        try:
            sector = fv.JournalSector.parse(raw)
        except StructError as exc:
            raise ImageError(f"{where}: journal sector {index} at offset {at:#x}: {exc}") from exc
        pos = 0
        for rec in sector.records:
            kind = rec.record_type
            body = rec.body
            if kind == fv.JournalRecordType.EMPTY:
                break
            if isinstance(body, fv.BitmapRecord):
                first, n = body.first_sector, body.num_sectors
                if first < 0 or first + n > sectors_on_disk:
                    raise ImageError(
                        f"{where}: journal sector {index} at offset {at:#x}: bitmap record "
                        f"at byte {pos} covers sectors {first}+{n}, past the disk "
                        f"({sectors_on_disk} sectors)"
                    )
                if bitmap is not None and block_size > 0 and n > 0:
                    lo = first * SECTOR
                    hi = min((first + n) * SECTOR, base_size)
                    if lo < hi:
                        set_bits(bitmap, lo // block_size, -(-hi // block_size))
                pos += BITMAP_RECORD_BYTES
            elif isinstance(body, fv.TableRecord):
                count = len(table) if table is not None else 0
                if table is None or body.first_chunk + body.num_entries > count:
                    raise ImageError(
                        f"{where}: journal sector {index} at offset {at:#x}: table record at "
                        f"byte {pos} sets entries {body.first_chunk}+{body.num_entries}, past "
                        f"the table ({count} entries)"
                    )
                for i, entry in enumerate(body.entries):
                    chunk = entry & CHUNK_INDEX
                    if chunk == CHUNK_INDEX:
                        raise ImageError(
                            f"{where}: journal sector {index} at offset {at:#x}: table record "
                            f"at byte {pos} entry {i} ({entry:#x}) is not a chunk index"
                        )
                    table[body.first_chunk + i] = chunk
                pos += TABLE_RECORD_HEAD + ENTRY_BYTES * body.num_entries
            else:
                raise ImageError(
                    f"{where}: journal sector {index} at offset {at:#x}: unknown record type "
                    f"{int(kind):#010x} at byte {pos}"
                )
            applied += 1
    return applied
