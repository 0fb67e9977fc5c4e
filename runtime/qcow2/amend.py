"""``qemu-img amend`` operations that restructure an image: a new refcount width and the
expansion of zero clusters before a downgrade to version 2.

Both keep qemu's crash rule: what the old metadata references is never overwritten until the
header (or the L2 entry) points elsewhere, so a crash leaves at worst leaked clusters.
"""

from __future__ import annotations

import os
from array import array
from typing import TYPE_CHECKING

from ..generated import qcow2 as q
from ..image import UsageError
from ..structbase import words_to_bytes
from .bitmaps import bitmap_clusters
from .masks import L1_OFFSET, L2_COMPRESSED, L2_COPIED, L2_OFFSET, L2_ZERO, H
from .refcount import MAX_REFCOUNT_TABLE, itemsize, typecode

if TYPE_CHECKING:
    from .write import Qcow2Writer

__all__ = [
    "change_refcount_order",
    "drop_bitmaps",
    "expand_zero_clusters",
    "refcount_order_of",
]

WORD = q.RefcountTableEntry.SIZE  # bytes of one refcount table entry


def refcount_order_of(text: str) -> int:
    """The refcount_order of a ``refcount_bits=`` value, with qemu's message when invalid."""
    try:
        bits = int(text)
    except ValueError:
        bits = 0
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
    return bits.bit_length() - 1


def change_refcount_order(img: Qcow2Writer, order: int) -> None:
    """Rewrite every refcount with ``1 << order`` bits (qemu's qcow2_change_refcount_order).

    The new table and blocks go past the end of the file; once they are on disk one header
    write switches to them, and the clusters of the old structure become free.
    """
    head = img.head
    if order == head.refcount_order:
        return
    img.flush()
    rc = img._refcounts()
    cb = head.cluster_bits
    cs = 1 << cb
    counts = dict(rc.clusters())
    limit = (1 << (1 << order)) - 1
    for cluster in sorted(counts):
        if counts[cluster] > limit:
            raise UsageError(
                f"Cannot decrease refcount entry width to {1 << order} bits: Cluster at "
                f"offset {cluster << cb:#x} has a refcount of {counts[cluster]}"
            )
    first_table = rc.table_offset >> cb
    old = set(range(first_table, first_table + -(-len(rc.table) * WORD // cs)))
    old |= {rc.block_offset(i) >> cb for i in range(len(rc.table)) if rc.block_offset(i)}
    for cluster in old:
        counts.pop(cluster, None)
    file_clusters = -(-os.fstat(img._f.fileno()).st_size // cs)
    end = max(file_clusters, max(counts, default=0) + 1)
    per_block_bits = cb + 3 - order
    n_blocks = n_table = 0
    while True:
        mine = range(end, end + n_blocks + n_table)
        indices = sorted({c >> per_block_bits for c in counts}
                         | {c >> per_block_bits for c in mine})
        table_clusters = -(-(indices[-1] + 1) * WORD // cs)
        if len(indices) == n_blocks and table_clusters == n_table:
            break
        n_blocks, n_table = len(indices), table_clusters
    if n_table * cs > MAX_REFCOUNT_TABLE:
        raise UsageError("Reference count table would exceed 8 MiB")
    for cluster in range(end, end + n_blocks + n_table):
        counts[cluster] = 1
    per_block = 1 << per_block_bits
    table = array("Q", bytes(n_table * cs))
    blocks: dict[int, array[int]] = {}
    for pos, index in enumerate(indices):
        table[index] = (end + pos) << cb
        blocks[index] = array(typecode(order), bytes(per_block * itemsize(order)))
    for cluster, value in counts.items():
        blocks[cluster >> per_block_bits][cluster & (per_block - 1)] = value
    fd = img._f.fileno()
    field = f"refcounts_{1 << order}"
    for index, block in blocks.items():
        data = q.RefcountBlock(cluster_bits=cb, refcount_order=order, **{field: block}).build()
        os.pwrite(fd, data, table[index])
    table_offset = (end + n_blocks) << cb
    os.pwrite(fd, words_to_bytes(table, True), table_offset)
    os.fsync(fd)
    raw = head.raw.header
    raw.refcount_order = order
    raw.ofs_refcount_table = table_offset
    raw.num_refcount_table_clusters = n_table
    img._write_header_range(H.OFS_REFCOUNT_TABLE_AT, H.LEN_HEADER_AT)
    _reload(img)


def _reload(img: Qcow2Writer) -> None:
    """Read the header again and drop every cached refcount."""
    from .header import load_header

    img.head = load_header(img._f)
    img._rc = None
    img._meta_gen += 1


def expand_zero_clusters(img: Qcow2Writer) -> None:
    """Turn every zero cluster into what a version 2 image can say (qemu's
    qcow2_expand_zero_clusters): unallocated when nothing shows through, otherwise a data
    cluster written with zeros. Snapshot tables are expanded too.

    Zeros go into a cluster only when every reference to it is an entry of this same L2
    table; a cluster another table still reads as data gets a fresh cluster instead.
    """
    cs = img.cluster_size
    backed = img.head.backing_file is not None
    rc = img._refcounts()
    fd = img._f.fileno()
    zeros = bytes(cs)
    for l2_offset in _l2_tables(img):
        table = img._table(l2_offset)
        shared = rc.get(l2_offset // cs)
        changed = False
        for i, entry in enumerate(table):
            if entry & L2_COMPRESSED or not entry & L2_ZERO:
                continue
            host = entry & L2_OFFSET
            if not host and not backed:
                table[i] = 0
            else:
                if not host or rc.get(host // cs) != shared:
                    if host:
                        img._pending_free.extend([host // cs] * shared)
                    host = rc.allocate(1) * cs
                    for _ in range(shared - 1):
                        rc.change(host // cs, 1)
                os.pwrite(fd, zeros, host)
                table[i] = host | (L2_COPIED if shared == 1 else 0)
            changed = True
        if changed:
            img._l2_dirty[l2_offset] = table
            img._l2_cache.drop(l2_offset)
    img.flush()


def _l2_tables(img: Qcow2Writer) -> list[int]:
    offsets = {e & L1_OFFSET for e in img._l1 if e & L1_OFFSET}
    if img.head.nb_snapshots:
        for snap in img.head.raw.read_snapshot_table(img._f):
            offsets |= {e & L1_OFFSET for e in snap.read_l1_table(img._f) if e & L1_OFFSET}
    return sorted(offsets)


def drop_bitmaps(img: Qcow2Writer) -> list[int]:
    """Forget the persistent bitmaps (a version 2 image cannot keep them): the clusters of
    their directory, tables and data, to free once the header no longer names them."""
    img._bitmaps = None
    ext = img.head.bitmaps
    if ext is None or not ext.num_bitmaps:
        return []
    return bitmap_clusters(img._f, ext, img.cluster_size)
