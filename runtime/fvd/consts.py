"""Short names for the FVD constants, all taken from diskspec.generated.fvd (the spec).

The read path, the writer, the journal, create and check share these; none of them is a
number of its own.
"""

from __future__ import annotations

from ..generated import fvd as fv

__all__ = [
    "BITMAP_RECORD_BYTES",
    "CHUNK_INDEX",
    "DIRTY",
    "EMPTY",
    "ENTRY_BYTES",
    "HEADER_REGION",
    "MAGIC",
    "RECORD_HEAD",
    "REGION_ALIGN",
    "SECTOR",
    "TABLE_RECORD_HEAD",
    "VERSION",
    "H",
]

H = fv.Header
MAGIC = fv.Header.MAGIC_CONTENTS
VERSION = int(fv.Version.V1)
SECTOR = int(fv.LayoutUnit.SECTOR)
REGION_ALIGN = int(fv.LayoutUnit.REGION_ALIGN)
HEADER_REGION = int(fv.LayoutUnit.HEADER_REGION)
EMPTY = int(fv.TableEntryValue.EMPTY)
DIRTY = fv.TableEntry.DIRTY_MASK
CHUNK_INDEX = fv.TableEntry.CHUNK_INDEX_MASK
ENTRY_BYTES = fv.TableEntry.SIZE
#: bytes of a record's type word, then of a whole bitmap record and of a table record's head
RECORD_HEAD = fv.JournalRecord.BODY_AT
BITMAP_RECORD_BYTES = RECORD_HEAD + fv.BitmapRecord.SIZE
TABLE_RECORD_HEAD = RECORD_HEAD + fv.TableRecord.ENTRIES_AT
