"""Short names for the qcow v1 entry masks and header offsets, all from diskspec.generated.qcow.

One place for the aliases the read path, the writer and map share; none of them is a
number of its own.
"""

from __future__ import annotations

from ..generated import qcow as qv

__all__ = [
    "L2_COMPRESSED",
    "L2_OFFSET",
    "H",
    "compressed_entry",
    "compressed_extent",
]

H = qv.Header
L2_COMPRESSED = qv.L2Entry.COMPRESSED_MASK
L2_OFFSET = qv.L2Entry.OFS_CLUSTER_MASK


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, compressed length in bytes) of a compressed L2 entry."""
    desc = qv.CompressedDescriptor(cluster_bits=cluster_bits, raw=entry)
    return desc.ofs_compressed, desc.len_compressed


def compressed_entry(host: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of ``length`` compressed bytes at ``host``; both fields must fit."""
    shift = qv.CompressedDescriptor(cluster_bits=cluster_bits, raw=0).num_offset_bits
    entry = L2_COMPRESSED | (length << shift) | host
    if compressed_extent(entry, cluster_bits) != (host, length) or entry >> 64:
        raise ValueError(f"compressed cluster {length} bytes at {host:#x} does not fit an entry")
    return entry
