"""Internal snapshots (create, apply, delete) and resize, with refcounts kept exact.

Every operation first flushes, then changes refcounts and tables in the order that leaves at
worst leaks after a crash (qcow.md C.2, C.3): increments reach the disk before the references
that need them; references are dropped before the decrements; COPIED flags are recomputed
only once the refcounts they summarize are on disk. Snapshot table and L1 switches are single
small synced header writes.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..generated import qcow2 as q
from ..image import ImageError, UsageError
from ..structbase import words_to_bytes
from .masks import L1_COPIED, L1_OFFSET, L2_COMPRESSED, L2_COPIED, L2_OFFSET, H
from .refcount import RefcountError

if TYPE_CHECKING:
    from .image import Qcow2Image

__all__ = ["MAX_SNAPSHOTS", "apply_snapshot", "create_snapshot", "delete_snapshot", "resize"]

MAX_SNAPSHOTS = 65536
EXTRA_DATA = 24  # what qemu writes: vm_state_size_large, disk_size, icount


# walking --------------------------------------------------------------------------------


def _references(img: Qcow2Image, l1: array[int]) -> Iterator[int]:
    """Every host cluster reachable from an L1 table, once per reference."""
    cs = img.cluster_size
    stride = 2 if img.head.extended_l2 else 1
    for l1_entry in l1:
        l2_offset = l1_entry & L1_OFFSET
        if not l2_offset:
            continue
        yield l2_offset // cs
        table = img._table(l2_offset)
        for i in range(0, len(table), stride):
            entry = table[i]
            if entry & L2_COMPRESSED:
                desc = q.CompressedDescriptor(cluster_bits=img.head.cluster_bits, raw=entry)
                first = desc.ofs_compressed // cs
                last = (desc.ofs_compressed + desc.len_compressed_max - 1) // cs
                yield from range(first, last + 1)
            elif entry & L2_OFFSET and img._data is None:
                yield (entry & L2_OFFSET) // cs


def _change_all(img: Qcow2Image, clusters: list[int], delta: int) -> None:
    rc = img._refcounts()
    if delta > 0:
        counts: dict[int, int] = {}
        for c in clusters:
            counts[c] = counts.get(c, 0) + 1
        for c, k in counts.items():
            if rc.get(c) + k * delta > rc.max:
                raise RefcountError(
                    f"refcount of cluster {c} would overflow {1 << rc.order}-bit refcounts"
                )
    for c in clusters:
        rc.change(c, delta)
    _sync_refcounts(img)


def _sync_refcounts(img: Qcow2Image) -> None:
    rc = img._refcounts()
    if rc.write_dirty():
        os.fsync(img._f.fileno())
    rc.table_dirty = False
    img._refcount_table_switch_if_moved()
    if img._pending_free:
        for c in img._pending_free:
            rc.change(c, -1)
        img._pending_free.clear()
        if rc.write_dirty():
            os.fsync(img._f.fileno())
        rc.table_dirty = False


def _update_copied(img: Qcow2Image) -> None:
    """Recompute COPIED on the active L1 and its L2 tables (refcount == 1)."""
    rc = img._refcounts()
    cs = img.cluster_size
    stride = 2 if img.head.extended_l2 else 1
    for i, l1_entry in enumerate(img._l1):
        l2_offset = l1_entry & L1_OFFSET
        if not l2_offset:
            continue
        want = l2_offset | (L1_COPIED if rc.get(l2_offset // cs) == 1 else 0)
        if want != l1_entry:
            img._l1[i] = want
            img._l1_dirty.add(i)
        table = img._table(l2_offset)
        changed = False
        for j in range(0, len(table), stride):
            entry = table[j]
            host = entry & L2_OFFSET
            if entry & L2_COMPRESSED or not host or img._data is not None:
                continue
            new = (entry | L2_COPIED) if rc.get(host // cs) == 1 else (entry & ~L2_COPIED)
            if new != entry:
                table[j] = new
                changed = True
        if changed:
            img._l2_dirty[l2_offset] = table
            img._l2_cache.drop(l2_offset)
    img._write_tables()
    os.fsync(img._f.fileno())


# the snapshot table -------------------------------------------------------------------------


def _write_snapshot_table(img: Qcow2Image, entries: list[q.SnapshotEntry]) -> None:
    """Write a new table, switch the header to it, free the old one."""
    cs = img.cluster_size
    rc = img._refcounts()
    data = b"".join(e.build() for e in entries)
    if entries:  # qemu writes no padding after the last entry
        data = data[: len(data) - len(entries[-1].padding)]
    old_offset, old_size = img.head.snapshots_offset, _snapshot_table_size(img)
    new_offset = 0
    if entries:
        clusters = -(-len(data) // cs)
        new_offset = rc.allocate(clusters) * cs
        _sync_refcounts(img)
        os.pwrite(img._f.fileno(), data, new_offset)
        os.fsync(img._f.fileno())
    raw = img.head.raw.header
    raw.num_snapshots = len(entries)
    raw.ofs_snapshot_table = new_offset
    img.head.nb_snapshots = len(entries)
    img.head.snapshots_offset = new_offset
    img._write_header_range(H.NUM_SNAPSHOTS_AT, H.OFS_SNAPSHOT_TABLE_AT + 8)
    if old_size:
        first = old_offset // cs
        _change_all(img, list(range(first, first + -(-old_size // cs))), -1)


def _snapshot_table_size(img: Qcow2Image) -> int:
    if img.head.nb_snapshots == 0:
        return 0
    entries = img.head.raw.read_snapshot_table(img._f)
    return sum(len(e.build()) for e in entries) - len(entries[-1].padding)


def _raw_snapshots(img: Qcow2Image) -> list[q.SnapshotEntry]:
    if img.head.nb_snapshots == 0:
        return []
    return img.head.raw.read_snapshot_table(img._f)


def _writable(img: Qcow2Image) -> None:
    if not img.writable:
        raise UsageError(f"{img.path}: image is open read-only")
    if img._snapshot is not None:
        raise UsageError(f"{img.path}: a snapshot view cannot be changed")
    img._prepare_header()
    img.flush()


# operations ---------------------------------------------------------------------------------


def create_snapshot(img: Qcow2Image, name: str) -> str:
    """``qemu-img snapshot -c NAME``; returns the new snapshot's id."""
    _writable(img)
    if img.head.has_data_file:
        raise UsageError(f"Could not create snapshot '{name}': Operation not supported")
    entries = _raw_snapshots(img)
    if len(entries) >= MAX_SNAPSHOTS:
        raise UsageError(f"Could not create snapshot '{name}': too many snapshots")
    if any(e.name.decode("utf-8", "replace") == name for e in entries):
        raise UsageError(f"Could not create snapshot '{name}': name already exists")
    cs = img.cluster_size
    rc = img._refcounts()
    refs = list(_references(img, img._l1))
    try:
        _change_all(img, refs, +1)
    except RefcountError as exc:
        raise UsageError(f"Could not create snapshot '{name}': Invalid argument") from exc
    l1_bytes = words_to_bytes(img._l1, True)
    l1_offset = rc.allocate(max(1, -(-len(l1_bytes) // cs))) * cs
    _sync_refcounts(img)
    os.pwrite(img._f.fileno(), l1_bytes, l1_offset)
    os.fsync(img._f.fileno())
    _update_copied(img)
    ids = [int(e.id_str) for e in entries if e.id_str.isdigit()]
    snap_id = str(max(ids, default=0) + 1)
    now = time.time_ns()
    name_b = name.encode("utf-8")
    id_b = snap_id.encode("ascii")
    entry = q.SnapshotEntry(
        ofs_l1_table=l1_offset,
        num_l1_entries=len(img._l1),
        len_id=len(id_b),
        len_name=len(name_b),
        date_sec=now // 1_000_000_000,
        date_nsec=now % 1_000_000_000,
        vm_clock_nsec=0,
        len_vm_state_32=0,
        len_extra_data=EXTRA_DATA,
        extra_data=q.SnapshotExtraData(
            len_vm_state=0, len_virtual_disk=img.size, icount=0, unknown=b""
        ),
        id_str=id_b,
        name=name_b,
        padding=bytes(-(40 + EXTRA_DATA + len(id_b) + len(name_b)) % 8),
    )
    _write_snapshot_table(img, [*entries, entry])
    return snap_id


def _find_raw(img: Qcow2Image, name: str) -> tuple[int, q.SnapshotEntry]:
    entries = _raw_snapshots(img)
    for key in ("name", "id_str"):
        for i, e in enumerate(entries):
            if getattr(e, key).decode("utf-8", "replace") == name:
                return i, e
    raise UsageError(f"Could not find snapshot '{name}'")


def _snapshot_l1(img: Qcow2Image, entry: q.SnapshotEntry) -> array[int]:
    if entry.ofs_l1_table % img.cluster_size:
        raise ImageError(f"{img.path}: Snapshot L1 table offset invalid")
    return entry.read_l1_table(img._f)


def delete_snapshot(img: Qcow2Image, name: str) -> None:
    """``qemu-img snapshot -d NAME``."""
    _writable(img)
    index, entry = _find_raw(img, name)
    l1 = _snapshot_l1(img, entry)
    entries = _raw_snapshots(img)
    del entries[index]
    _write_snapshot_table(img, entries)  # the references go first ...
    cs = img.cluster_size
    refs = list(_references(img, l1))
    first = entry.ofs_l1_table // cs
    refs += range(first, first + max(1, -(-8 * entry.num_l1_entries // cs)))
    _change_all(img, refs, -1)  # ... then the refcounts
    _update_copied(img)


def apply_snapshot(img: Qcow2Image, name: str) -> None:
    """``qemu-img snapshot -a NAME``: the active disk becomes the snapshot's content."""
    _writable(img)
    _, entry = _find_raw(img, name)
    snap_l1 = _snapshot_l1(img, entry)
    extra = entry.extra_data
    disk_size = extra.len_virtual_disk if extra.len_virtual_disk is not None else img.size
    if len(snap_l1) > len(img._l1):
        _grow_l1(img, len(snap_l1), exact=True)
    try:
        _change_all(img, list(_references(img, snap_l1)), +1)
    except RefcountError as exc:
        raise UsageError(f"Could not apply snapshot '{name}': Invalid argument") from exc
    old = array("Q", img._l1)
    new = array("Q", snap_l1)
    new.extend(array("Q", bytes(8 * (len(img._l1) - len(new)))))
    img._l1[:] = new
    img._l1_dirty.update(range(len(img._l1)))
    img._l2_cache.clear()
    img._write_tables()
    os.fsync(img._f.fileno())
    _change_all(img, list(_references(img, old)), -1)
    _update_copied(img)
    if disk_size != img.size:
        _set_size(img, disk_size)
    img._zcache.clear()


# resize ---------------------------------------------------------------------------------------


def _grow_l1(img: Qcow2Image, entries: int, exact: bool = False) -> None:
    """Move the L1 table to a larger place (header switch in one 12-byte write)."""
    if not exact:
        entries = max(entries, len(img._l1) * 3 // 2)
    if entries > 4194304:
        raise UsageError(f"{img.path}: Active L1 table too large")
    cs = img.cluster_size
    rc = img._refcounts()
    new = array("Q", img._l1)
    new.extend(array("Q", bytes(8 * (entries - len(new)))))
    old_offset, old_entries = img.head.l1_offset, len(img._l1)
    offset = rc.allocate(-(-8 * entries // cs)) * cs
    _sync_refcounts(img)
    os.pwrite(img._f.fileno(), words_to_bytes(new, True), offset)
    os.fsync(img._f.fileno())
    raw = img.head.raw.header
    raw.num_l1_entries = entries
    raw.ofs_l1_table = offset
    img._write_header_range(H.NUM_L1_ENTRIES_AT, H.OFS_L1_TABLE_AT + 8)
    img.head.l1_offset, img.head.l1_size = offset, entries
    img._l1 = new
    if old_entries:
        first = old_offset // cs
        _change_all(img, list(range(first, first + -(-8 * old_entries // cs))), -1)


def _set_size(img: Qcow2Image, size: int) -> None:
    raw = img.head.raw.header
    raw.len_virtual_disk = size
    img._write_header_range(H.LEN_VIRTUAL_DISK_AT, H.LEN_VIRTUAL_DISK_AT + 8)
    img.head.size = img.size = size


def resize(img: Qcow2Image, new_size: int, shrink: bool = False) -> None:
    """``qemu-img resize``: grow (the L1 grows as needed); shrinking needs ``shrink``
    and drops the data past the new end, as ``qemu-img resize --shrink`` does."""
    _writable(img)
    if new_size % 512:
        raise UsageError(f"{img.path}: the size must be a multiple of 512 bytes")
    if img.head.nb_snapshots:
        raise UsageError("Can't resize an image which has snapshots")
    if new_size < img.size and not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation.")
    shift = img.head.l1_shift
    needed = (new_size + (1 << shift) - 1) >> shift
    if new_size >= img.size:
        old_size = img.size
        if needed > len(img._l1):
            _grow_l1(img, needed)
        _set_size(img, new_size)
        backing = img.backing
        if backing is not None and backing.size > old_size:
            # the new space must read as zeros, not as the longer backing file (as qemu)
            img.write_zeroes(old_size, min(new_size, backing.size) - old_size)
            img.flush()
        return
    # shrink: drop whole clusters past the end, then the L2 tables no longer needed
    cs = img.cluster_size
    first = -(-new_size // cs) * cs
    tail = min(first, img.size) - new_size
    from .image import _BACKING, _ZERO

    if tail and any(kind not in (_ZERO, _BACKING) for kind, *_ in img._plan(new_size, tail)):
        # the last cluster stays: its bytes past the new end must not come back if the
        # image grows again (qemu 7.2 lets them; zeros are what a guest expects)
        img._write(bytes(tail), new_size)
    for cstart in range(first, img.size, cs):
        img._set_entry(cstart, 0, 0)
    _set_size(img, new_size)
    img.flush()
    freed = []
    for i in range(needed, len(img._l1)):
        if img._l1[i] & L1_OFFSET:
            freed.append((img._l1[i] & L1_OFFSET) // cs)
            img._l1[i] = 0
            img._l1_dirty.add(i)
    img._write_tables()
    os.fsync(img._f.fileno())
    _change_all(img, freed, -1)
