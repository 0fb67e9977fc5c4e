"""Short names for the qcow2 entry masks, all taken from diskspec.generated.qcow2 (the spec).

One place for the aliases the read path, the writer, snapshots, check and map share; none
of them is a number of its own.
"""

from __future__ import annotations

from ..generated import qcow2 as q

__all__ = [
    "BME_ALL_ONES",
    "BME_OFFSET",
    "BME_RESERVED",
    "L1_COPIED",
    "L1_OFFSET",
    "L1_RESERVED",
    "L2_COMPRESSED",
    "L2_COPIED",
    "L2_OFFSET",
    "L2_RESERVED",
    "L2_ZERO",
    "REFT_OFFSET",
    "REFT_RESERVED",
    "SUBCLUSTERS",
    "SUB_ALLOC",
    "SUB_ZERO",
    "SUB_ZERO_SHIFT",
    "H",
]

H = q.Header
L1_OFFSET = q.L1Entry.OFS_L2_TABLE_DIV512_MASK
L1_COPIED = q.L1Entry.COPIED_MASK
L1_RESERVED = q.L1Entry.RESERVED_HIGH_MASK | q.L1Entry.RESERVED_LOW_MASK
L2_COPIED = q.L2Entry.COPIED_MASK
L2_COMPRESSED = q.L2Entry.COMPRESSED_MASK
L2_OFFSET = q.L2Entry.OFS_CLUSTER_DIV512_MASK
L2_ZERO = q.L2Entry.ZERO_MASK
L2_RESERVED = q.L2Entry.RESERVED_HIGH_MASK | q.L2Entry.RESERVED_LOW_MASK
SUB_ALLOC = q.SubclusterBitmap.ALLOCATED_MASK
SUB_ZERO = q.SubclusterBitmap.READS_AS_ZERO_MASK
SUB_ZERO_SHIFT = q.SubclusterBitmap.READS_AS_ZERO_SHIFT
SUBCLUSTERS = SUB_ZERO_SHIFT  # one allocation bit per subcluster
REFT_OFFSET = q.RefcountTableEntry.OFS_REFCOUNT_BLOCK_DIV512_MASK
REFT_RESERVED = q.RefcountTableEntry.RESERVED_MASK
BME_OFFSET = q.BitmapTableEntry.OFS_DATA_DIV512_MASK
BME_ALL_ONES = q.BitmapTableEntry.ALL_ONES_MASK
BME_RESERVED = q.BitmapTableEntry.RESERVED_HIGH_MASK | q.BitmapTableEntry.RESERVED_LOW_MASK
