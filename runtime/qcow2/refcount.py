"""qcow2 refcounts of every width: the refcount table, cached blocks, allocation and growth.

Blocks are decoded and encoded by the generated RefcountBlock, so the packing of every
refcount_order (LSB-first sub-byte widths, big-endian words) comes from the spec. The cache is
write-back: increments stay in memory until :meth:`Refcounts.write_dirty`, which the image calls
before any table that references the new clusters reaches the disk (qcow.md C.2).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import FormatError
from ..generated import qcow2 as q
from ..structbase import words_to_bytes
from .masks import REFT_OFFSET

__all__ = ["RefcountError", "Refcounts"]

MAX_REFCOUNT_TABLE = 8 << 20  # bytes, qemu's limit


class RefcountError(FormatError):
    """Refcounts that contradict the image (overflow, a freed free cluster, ...)."""


class Refcounts:
    """The refcounts of one image, with first-fit allocation of free clusters."""

    def __init__(
        self,
        f: BinaryIO,
        cluster_bits: int,
        refcount_order: int,
        table: array[int],
        table_offset: int,
    ) -> None:
        self.f = f
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.max = (1 << (1 << refcount_order)) - 1
        self.per_block_bits = cluster_bits + 3 - refcount_order
        self.per_block = 1 << self.per_block_bits
        self.table = table
        self.table_offset = table_offset
        self.blocks: dict[int, array[int]] = {}
        self.dirty: set[int] = set()
        self.free_hint = 1
        self.table_dirty = False
        self.on_table_moved: list[tuple[int, int]] = []  # (old offset, old clusters) to free
        self.generation = 0  # bumped when the table moves (allocation scans restart)
        self.frees = 0  # bumped whenever a cluster becomes free
        self.created = 0  # refcount blocks created

    # blocks ---------------------------------------------------------------------------------

    def _field(self) -> str:
        return f"refcounts_{1 << self.order}"

    def _load(self, index: int) -> array[int] | None:
        block = self.blocks.get(index)
        if block is not None:
            return block
        if index >= len(self.table):
            return None
        offset = self.table[index] & REFT_OFFSET
        if offset == 0:
            return None
        if offset % self.cluster_size:
            raise RefcountError(
                f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})"
            )
        data = os.pread(self.f.fileno(), self.cluster_size, offset)
        data += bytes(self.cluster_size - len(data))
        parsed = q.RefcountBlock.parse(
            data, cluster_bits=self.cluster_bits, refcount_order=self.order
        )
        block = getattr(parsed, self._field())
        assert isinstance(block, array)
        self.blocks[index] = block
        return block

    def get(self, cluster: int) -> int:
        block = self._load(cluster >> self.per_block_bits)
        return 0 if block is None else block[cluster & (self.per_block - 1)]

    def block_offset(self, index: int) -> int:
        return self.table[index] & REFT_OFFSET if index < len(self.table) else 0

    # changes --------------------------------------------------------------------------------

    def change(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to a cluster's refcount; returns the new count."""
        index = cluster >> self.per_block_bits
        block = self._load(index)
        if block is None:
            if delta < 0:
                raise RefcountError(f"cluster {cluster} has refcount 0 and cannot be freed")
            block = self._ensure_block(index)
        slot = cluster & (self.per_block - 1)
        value = block[slot] + delta
        if value < 0:
            raise RefcountError(f"cluster {cluster} has refcount 0 and cannot be freed")
        if value > self.max:
            raise RefcountError(
                f"refcount of cluster {cluster} would overflow {1 << self.order}-bit refcounts"
            )
        block[slot] = value
        self.dirty.add(index)
        if value == 0:
            self.frees += 1
            if cluster < self.free_hint:
                self.free_hint = cluster
        return value

    def _ensure_block(self, index: int) -> array[int]:
        """The block of ``index``, created (self-describing, in its own range) when missing."""
        block = self._load(index)
        if block is not None:
            return block
        if index >= len(self.table):
            self._grow_table(index + 1)
        block = array(typecode(self.order), bytes(self.per_block * itemsize(self.order)))
        home = max(index << self.per_block_bits, 1)  # every cluster of the range is free
        block[home & (self.per_block - 1)] = 1
        self.blocks[index] = block
        self.created += 1
        self.table[index] = home << self.cluster_bits
        self.table_dirty = True
        self.dirty.add(index)
        return block

    def _grow_table(self, needed: int) -> None:
        """Move the refcount table to a larger place; the old one is freed after the switch."""
        per_cluster = self.cluster_size // 8
        entries = max(needed + 8, len(self.table) * 3 // 2)
        clusters = -(-entries // per_cluster)
        if clusters * self.cluster_size > MAX_REFCOUNT_TABLE:
            raise RefcountError("Reference count table would exceed 8 MiB")
        old = (self.table_offset, -(-len(self.table) // per_cluster))
        self.table.extend(array("Q", bytes(8 * (clusters * per_cluster - len(self.table)))))
        start = self.allocate(clusters)
        self.table_offset = start << self.cluster_bits
        self.table_dirty = True
        self.on_table_moved.append(old)
        self.generation += 1

    # allocation -----------------------------------------------------------------------------

    def find_free(self, count: int) -> int:
        """First cluster of the first run of ``count`` free clusters at or after the hint."""
        start = cluster = self.free_hint
        run = 0
        mask = self.per_block - 1
        generation = self.generation
        while run < count:
            index = cluster >> self.per_block_bits
            block = self._ensure_block(index)
            if generation != self.generation:  # the table moved under the scan: rescan
                generation = self.generation
                start = cluster = self.free_hint
                run = 0
                continue
            if block[cluster & mask] == 0:
                if run == 0:
                    start = cluster
                run += 1
            else:
                run = 0
            cluster += 1
        return start

    def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1); returns the first index."""
        start = self.find_free(count)
        for c in range(start, start + count):
            self.change(c, 1)
        if start == self.free_hint:
            self.free_hint = start + count
        return start

    # writing --------------------------------------------------------------------------------

    def dirty_blocks(self) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of every changed block, encoded by the generated class."""
        for index in sorted(self.dirty):
            block = self.blocks[index]
            fields = {f"refcounts_{1 << o}": block if o == self.order else None for o in range(7)}
            encoded = q.RefcountBlock(
                cluster_bits=self.cluster_bits, refcount_order=self.order, **fields
            ).build()
            yield self.block_offset(index), encoded

    def write_dirty(self) -> bool:
        """Write changed blocks (and a moved table); True when anything was written."""
        wrote = False
        fd = self.f.fileno()
        for offset, data in self.dirty_blocks():
            os.pwrite(fd, data, offset)
            wrote = True
        self.dirty.clear()
        if self.table_dirty:
            os.pwrite(fd, words_to_bytes(self.table, True), self.table_offset)
            wrote = True
        return wrote

    def clusters(self) -> Iterator[tuple[int, int]]:
        """Every (cluster, refcount) with a nonzero count."""
        for index in range(len(self.table)):
            block = self._load(index)
            if block is None:
                continue
            base = index << self.per_block_bits
            for slot, value in enumerate(block):
                if value:
                    yield base + slot, value


def typecode(order: int) -> str:
    return {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: "I", 6: "Q"}[order]


def itemsize(order: int) -> int:
    return array(typecode(order)).itemsize
