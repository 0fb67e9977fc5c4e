"""qemu-img check for qcow2: classification, counts, repair and exit codes as qemu 7.2 has them.

The check rebuilds every cluster's reference count by walking what the image references
(qcow.md C.7): the header cluster, the active L1 table with its L2 tables and data clusters,
every snapshot's L1 table and what it reaches, the snapshot table, the refcount table, the
refcount blocks, the LUKS header and, while the autoclear bitmaps bit is set, the bitmap
directory, tables and data. It then compares those counts with the stored ones:

* stored > references is a leak ("Leaked cluster N refcount=R reference=F");
* stored < references is a corruption ("ERROR cluster N refcount=R reference=F"),

and counts the other corruptions qemu counts (reserved bits, unaligned offsets, references
past the end of the file, refcount overflow, wrong COPIED flags, extended-L2 bitmaps, broken
snapshot entries). The result has the fields of qemu's ``ImageCheck`` JSON, computed the way
qemu computes them, the lines qemu prints, and qemu-img's exit code.

Repair follows qemu's modes. ``"leaks"`` decrements leaked refcounts (and fixes COPIED flags
when nothing else is wrong). ``"all"`` also raises refcounts that are too low, fixes COPIED
flags, zeroes unaligned preallocated zero clusters, grows the file under a refcount block past
its end, rewrites a snapshot table with incomplete entries, and rebuilds the whole refcount
structure when a referenced cluster has refcount 0 or the refcount table itself is broken.
The rebuild is crash-safe: the new blocks and table go to clusters nothing references (nor
the old structure or any other metadata occupies), they are synced, and only then one 12-byte
synced header write switches to them; after that the old structure's clusters are freed (as
the leaks they have become). Refcount changes reach the disk before any COPIED flag that
relies on them. Like qemu, a repair never writes over other metadata: a write that would
(an "L2 table" that is really the L1 table, ...) marks the image corrupt and fails the check.

Every table read is bounded by qemu's limits. What an L2 table contributes is worked out once
and replayed for each further reference (snapshots share L2 tables, hostile L1 tables repeat
one), so counts stay exact at the cost of distinct tables only; a work budget bounds that too.
A hostile image gives a counted check error or a failed check, never a hang or unbounded
memory.

Entry points: :func:`check` (a file), :func:`check_image` (an open image) and
:func:`rebuild_refcounts` (the automatic repair of a dirty image opened read-write).
"""

from __future__ import annotations

import errno
import io
import os
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ..cache import LruCache
from ..errors import FormatError
from ..generated import qcow2 as q
from ..image import UsageError
from ..structbase import unpack_words, words_to_bytes
from .header import KNOWN_AUTOCLEAR, Qcow2Header, load_header
from .masks import (
    BME_ALL_ONES,
    BME_OFFSET,
    BME_RESERVED,
    L1_COPIED,
    L1_OFFSET,
    L1_RESERVED,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET,
    L2_RESERVED,
    L2_ZERO,
    REFT_OFFSET,
    REFT_RESERVED,
    SUB_ALLOC,
    SUB_ZERO,
    SUB_ZERO_SHIFT,
    H,
)
from .refcount import MAX_REFCOUNT_TABLE, RefcountError, Refcounts

if TYPE_CHECKING:
    from .image import Qcow2Image

__all__ = [
    "CheckOpenError",
    "CheckResult",
    "Repair",
    "check",
    "check_image",
    "rebuild_refcounts",
]

Repair = Literal["leaks", "all"] | None

BME_FLAGS = int(q.BitmapFlag.IN_USE | q.BitmapFlag.AUTO)  # qemu treats the others as reserved
WORD = q.L1Entry.SIZE  # bytes of one L1, L2, refcount table or bitmap table word
SNAPSHOT_FIXED = q.SnapshotEntry.EXTRA_DATA_AT  # the fixed part of a snapshot entry
SNAPSHOT_EXTRA_KNOWN = q.SnapshotExtraData.UNKNOWN_AT  # extra data fields qemu knows
SNAPSHOT_EXTRA_V3 = q.SnapshotExtraData.ICOUNT_AT  # v3 needs vm_state_size_large, disk_size
BITMAP_ENTRY_FIXED = q.BitmapDirectoryEntry.EXTRA_DATA_AT
SNAPSHOT_ALIGN = 8  # snapshot entries start 8-aligned (qcow.md B.8)

# qemu's limits (qcow.md B.1, B.8, B.9, E.3) that the generated parsers do not apply here
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
UINT32_MAX = (1 << 32) - 1
MAX_L1_ENTRIES = (32 << 20) // WORD
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE = 1024 * 65536
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * 65535
MAX_BITMAP_TABLE = 0x8000000
MAX_BITMAP_PHYS = 512 << 20
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_BITMAP_NAME = 1023

# this implementation's own bounds
L2_CACHE_BYTES = 32 << 20
MAX_ENTRIES_SCANNED = 1 << 27  # L1 and L2 entries looked at, zero or not, over the whole check
MAX_ENTRIES_COUNTED = 1 << 25  # nonzero L1 and L2 entries processed
MAX_MESSAGES = 100_000  # lines kept; the counts stay exact beyond
READ_WINDOW = 1 << 20
DIFF_WINDOW = 256  # refcounts compared at once before looking at single ones
ALLOC_WINDOW = 64 << 20  # bytes a rebuild may search past the end of the file
EFFECT_CACHE_BYTES = 64 << 20  # remembered per-L2-table effects (replayed for shared tables)
EVENT_BYTES = 128  # what one remembered message costs, roughly

# the cluster types of qemu's qcow2_get_cluster_type
_UNALLOCATED, _ZERO_PLAIN, _ZERO_ALLOC, _NORMAL, _COMPRESSED = range(5)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class CheckResult:
    """What ``qemu-img check`` reports: the ImageCheck fields, the lines, the exit code.

    ``messages`` are the lines qemu prints on stderr while checking (and repairing), in
    order. ``failed`` is set when the check could not run to its end (qemu-img then prints
    "Check failed: ..." or "Could not open ...", no report, and exits with 1). After a repair
    ``repaired`` holds the (leaks, corruptions) fixed, and the other counts are those of the
    second check, as qemu-img reports them.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    image_end_offset: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    failed: str | None = None
    repaired: tuple[int, int] | None = None

    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check errors, 2 corrupt, 3 only leaks."""
        if self.failed is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json_dict(self, filename: str | None = None) -> dict[str, Any]:
        """The object of ``qemu-img check --output=json``: filename, format and check-errors
        always, the other fields only when nonzero. qemu prints nothing when ``failed``.

        ``filename`` replaces the reported name (qemu-img reports the name it was given)."""
        out: dict[str, Any] = {
            "filename": self.filename if filename is None else filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        for key, value in (
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if value:
                out[key] = value
        return out

    def human(self, filename: str | None = None) -> str:
        """What ``qemu-img check`` prints on stdout in its human format (nothing when
        ``failed``: qemu-img then only prints the error). ``filename`` is accepted like
        :meth:`to_json_dict` takes it; the human report does not name the file."""
        del filename
        lines: list[str] = []
        if self.failed is not None:
            return ""
        if self.repaired is not None:
            leaks, corruptions = self.repaired
            lines += [
                "The following inconsistencies were found and repaired:",
                "",
                f"    {leaks} leaked clusters",
                f"    {corruptions} corruptions",
                "",
                "Double checking the fixed image now...",
            ]
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines += [
                "",
                f"{self.corruptions} errors were found on the image.",
                "Data may be corrupted, or further writes to the image may corrupt it.",
            ]
        if self.leaks:
            lines += [
                "",
                f"{self.leaks} leaked clusters were found on the image.",
                "This means waste of disk space, but no harm to data.",
            ]
        if self.check_errors:
            lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            lines.append(
                f"{self.allocated_clusters}/{self.total_clusters} = "
                f"{self.allocated_clusters * 100.0 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / self.allocated_clusters:.2f}% compressed "
                "clusters"
            )
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"


@dataclass(slots=True)
class _Counts:
    """qemu's BdrvCheckResult counters (the fragmentation info is kept apart)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0

    def copy(self) -> _Counts:
        return _Counts(**{f.name: getattr(self, f.name) for f in fields(self)})

    def set(self, other: _Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))

    def add(self, other: _Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _Failed(Exception):
    """A step returned -errno in qemu: the check ends without a report."""

    def __init__(self, err: int, why: str = "", hint: str = "") -> None:
        super().__init__(why or os.strerror(err))
        self.err = err
        self.why = why
        self.hint = hint


class _Log:
    """The stderr lines, bounded in number (the counters are not)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.dropped = 0

    def full(self) -> bool:
        return len(self.lines) >= MAX_MESSAGES

    def __call__(self, line: str) -> None:
        if len(self.lines) < MAX_MESSAGES:
            self.lines.append(line)
        else:
            self.dropped += 1

    def always(self, line: str) -> None:
        """A line that is kept even past the bound (the few that say why a check stopped)."""
        self.lines.append(line)

    def all(self) -> list[str]:
        if self.dropped:
            return [*self.lines, f"... {self.dropped} more lines not kept"]
        return list(self.lines)


@dataclass(slots=True)
class _Snapshot:
    """One entry of the snapshot table as qemu reads it in check mode."""

    l1_offset: int
    l1_size: int
    id_str: bytes
    name: bytes
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int
    extra_data_size: int
    unknown_extra: bytes


@dataclass(slots=True)
class _Effect:
    """What walking one L2 table adds: messages with their corruption counts (in entry
    order), increments per host cluster, fragmentation counts, and the work it stands for."""

    events: list[tuple[str, int]]
    clusters: array[int]
    times: array[int]
    top: int
    allocated: int
    fragmented: int
    compressed: int
    work: int

    def cost(self) -> int:
        """Rough bytes held."""
        return EVENT_BYTES * len(self.events) + 2 * WORD * len(self.clusters) + EVENT_BYTES


class _EffectCache:
    """Effects of L2 tables by (offset, with fragmentation info), bounded in bytes."""

    def __init__(self) -> None:
        self.items: OrderedDict[tuple[int, bool], _Effect] = OrderedDict()
        self.size = 0

    def get(self, key: tuple[int, bool]) -> _Effect | None:
        effect = self.items.get(key)
        if effect is not None:
            self.items.move_to_end(key)
        return effect

    def put(self, key: tuple[int, bool], effect: _Effect) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.size -= old.cost()
        self.items[key] = effect
        self.size += effect.cost()
        while self.size > EFFECT_CACHE_BYTES and len(self.items) > 1:
            _, dropped = self.items.popitem(last=False)
            self.size -= dropped.cost()

    def clear(self) -> None:
        self.items.clear()
        self.size = 0


@dataclass(slots=True)
class _OverlapMap:
    """The metadata qemu's default ("cached") overlap check protects (qcow.md C.5): byte
    ranges in the order qemu tests them, then single clusters (L2 tables, refblocks)."""

    ranges: list[tuple[str, int, int]]
    active_l2: set[int]
    refblocks: set[int]
    late: list[tuple[str, int, int]]  # tested after the clusters (the bitmap directory)


# --------------------------------------------------------------------------------------------
# Opening


class CheckOpenError(FormatError):
    """The image cannot be opened even in qemu's check mode."""


def _field(buf: bytes | bytearray, at: int, end: int) -> int:
    return int.from_bytes(buf[at:end], "big")


def _load_header(f: BinaryIO) -> Qcow2Header:
    """The header as qemu opens it for a check: a missing refcount table and a bad snapshot
    table pointer or count are left to the check to report (qcow.md C.7, D.1 11-13)."""
    fd = f.fileno()
    start = os.pread(fd, H.LEN_VIRTUAL_DISK_AT, 0)
    if len(start) < H.LEN_VIRTUAL_DISK_AT:
        return load_header(f)  # let the ordinary loader name what is wrong
    cluster_bits = _field(start, H.CLUSTER_BITS_AT, H.LEN_VIRTUAL_DISK_AT)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        cluster_bits = MAX_CLUSTER_BITS  # the header parser rejects the value itself
    cluster = bytearray(os.pread(fd, 1 << cluster_bits, 0))
    if len(cluster) < H.INCOMPATIBLE_FEATURES_AT:
        return load_header(f)
    rt_clusters = _field(cluster, H.NUM_REFCOUNT_TABLE_CLUSTERS_AT, H.NUM_SNAPSHOTS_AT)
    nb_snapshots = _field(cluster, H.NUM_SNAPSHOTS_AT, H.OFS_SNAPSHOT_TABLE_AT)
    snapshots_offset = _field(cluster, H.OFS_SNAPSHOT_TABLE_AT, H.INCOMPATIBLE_FEATURES_AT)

    def put(at: int, end: int, value: int) -> None:
        cluster[at:end] = value.to_bytes(end - at, "big")

    put(H.NUM_REFCOUNT_TABLE_CLUSTERS_AT, H.NUM_SNAPSHOTS_AT, max(rt_clusters, 1))
    put(H.NUM_SNAPSHOTS_AT, H.OFS_SNAPSHOT_TABLE_AT, 0)
    put(H.OFS_SNAPSHOT_TABLE_AT, H.INCOMPATIBLE_FEATURES_AT, 0)
    head = load_header(io.BytesIO(bytes(cluster)))
    raw = head.raw.header
    head.refcount_table_clusters = raw.num_refcount_table_clusters = rt_clusters
    head.nb_snapshots = raw.num_snapshots = nb_snapshots
    head.snapshots_offset = raw.ofs_snapshot_table = snapshots_offset
    _check_bitmaps_extension(head)
    return head


def _check_bitmaps_extension(head: Qcow2Header) -> None:
    """qemu refuses to open an image whose (valid, autoclear bit set) bitmaps extension
    breaks these rules (qcow.md D.3 68)."""
    ext = head.bitmaps
    if ext is None or not head.autoclear & q.AutoclearFeature.BITMAPS:
        return
    if ext.reserved:
        raise CheckOpenError("bitmaps_ext: Reserved field is not zero")
    if ext.num_bitmaps == 0:
        raise CheckOpenError("found bitmaps extension with zero bitmaps")
    if ext.num_bitmaps > MAX_BITMAPS:
        raise CheckOpenError(
            f"bitmaps_ext: Image has {ext.num_bitmaps} bitmaps, exceeding the QEMU supported "
            f"maximum of {MAX_BITMAPS}"
        )
    if ext.len_bitmap_directory > MAX_BITMAP_DIRECTORY:
        raise CheckOpenError(
            f"bitmaps_ext: Bitmap directory size ({ext.len_bitmap_directory}) exceeds the "
            f"maximum supported size ({MAX_BITMAP_DIRECTORY})"
        )
    if ext.ofs_bitmap_directory % head.cluster_size:
        raise CheckOpenError("bitmaps_ext: invalid bitmap directory offset")


# --------------------------------------------------------------------------------------------
# The checker


class _Checker:
    """One run of qemu's qcow2_co_check_locked over an open file."""

    def __init__(
        self, f: BinaryIO, head: Qcow2Header, fix_leaks: bool, fix_errors: bool, log: _Log
    ) -> None:
        self.f = f
        self.fd = f.fileno()
        self.head = head
        self.fix_leaks = fix_leaks
        self.fix_errors = fix_errors
        self.log = log
        self.cb = head.cluster_bits
        self.cs = head.cluster_size
        self.order = head.refcount_order
        self.pbb = self.cb + 3 - self.order  # log2 of the clusters one refblock covers
        self.per_block = 1 << self.pbb
        self.refmax = (1 << (1 << self.order)) - 1
        self.ext = head.extended_l2
        self.step = 2 if self.ext else 1
        self.entry_size = q.L2EntryExtended.SIZE if self.ext else q.L2Entry.SIZE
        self.l2_entries = 1 << head.l2_bits
        self.data_file = head.has_data_file
        empty = q.RefcountBlock.parse(
            bytes(self.cs), cluster_bits=self.cb, refcount_order=self.order
        )
        zero = getattr(empty, f"refcounts_{1 << self.order}")
        assert isinstance(zero, array)
        self.zero_block: array[int] = zero
        self.refs: dict[int, array[int]] = {}
        self.nb_clusters = 0
        self.file_size = 0
        self.rebuild = False
        self.highest = 0
        self.total_clusters = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        self.snapshots: list[_Snapshot] = []
        self.snapshots_size = 0
        self.scanned = 0
        self.counted = 0
        self.overlap_map: _OverlapMap | None = None
        self.effects = _EffectCache()
        self.copied_effects = _EffectCache()
        self.l2_cache: LruCache[int, array[int]] = LruCache(max(1, L2_CACHE_BYTES // self.cs))
        self.window: tuple[int, bytes] = (0, b"")
        _drop_buffer(f)  # every read below is a pread; nothing stale may be served later
        self._stat()
        self.rc = self._load_refcounts()
        self.l1 = self._words(head.l1_offset, head.l1_size)

    # I/O ------------------------------------------------------------------------------------

    def _load_refcounts(self) -> Refcounts:
        head = self.head
        table = array("Q")
        if head.refcount_table_clusters:
            table = self._words(head.refcount_table_offset, head.refcount_table_clusters
                                * self.cs // WORD)
        return Refcounts(self.f, self.cb, self.order, table, head.refcount_table_offset)

    def _stat(self) -> int:
        self.file_size = os.fstat(self.fd).st_size
        return self.file_size

    def _pread(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``; the file reads as zeros past its end."""
        if n <= 0:
            return b""
        if offset >= self.file_size:
            return bytes(n)
        data = os.pread(self.fd, n, offset)
        return data + bytes(n - len(data)) if len(data) < n else data

    def _read_at(self, offset: int, n: int) -> bytes:
        """Small reads through a window (the snapshot table and the bitmap directory)."""
        base, data = self.window
        if base <= offset and offset + n <= base + len(data):
            return data[offset - base : offset - base + n]
        if n >= READ_WINDOW:
            return self._pread(offset, n)
        self.window = (offset, self._pread(offset, READ_WINDOW))
        return self.window[1][:n]

    def _words(self, offset: int, count: int) -> array[int]:
        return unpack_words(self._pread(offset, count * WORD), 0, count, "Q", True)

    def _write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self.window = (0, b"")

    def _sync(self) -> None:
        os.fsync(self.fd)

    def _write_header(self, start: int, stop: int) -> None:
        """Rewrite header bytes [start, stop) from the header object, in one synced write."""
        data = self.head.raw.header.build()
        self._write(start, data[start:stop])
        self._sync()

    def _l2(self, offset: int) -> array[int]:
        def load(at: int) -> array[int]:
            return unpack_words(self._pread(at, self.cs), 0, self.cs // WORD, "Q", True)

        self._scan(self.l2_entries)
        return self.l2_cache.get(offset, load)

    def _scan(self, n: int) -> None:
        """The work budget: ``n`` more table entries to look at."""
        self.scanned += n
        if self.scanned > MAX_ENTRIES_SCANNED:
            raise self._over_budget()

    def _count(self, n: int) -> None:
        self.counted += n
        if self.counted > MAX_ENTRIES_COUNTED:
            raise self._over_budget()

    def _over_budget(self) -> _Failed:
        self.log.always(
            f"ERROR check aborted: the tables of this image name more than "
            f"{MAX_ENTRIES_COUNTED} clusters or need more than {MAX_ENTRIES_SCANNED} entries "
            "read"
        )
        return _Failed(errno.EFBIG)

    # the in-memory reference counts ---------------------------------------------------------

    def _ref(self, k: int) -> int:
        chunk = self.refs.get(k >> self.pbb)
        return 0 if chunk is None else chunk[k & (self.per_block - 1)]

    def _chunk(self, j: int) -> array[int]:
        chunk = self.refs.get(j)
        if chunk is None:
            chunk = self.refs[j] = array(self.zero_block.typecode, self.zero_block)
        return chunk

    def _inc(self, res: _Counts, offset: int, size: int) -> None:
        """qemu's qcow2_inc_refcounts_imrt: +1 on every cluster of [offset, offset + size)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.log(_eof_message(offset, size))
            res.corruptions += 1
            return
        mask = self.per_block - 1
        for k in range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1):
            if k >= self.nb_clusters:
                self.nb_clusters = k + 1
            chunk = self._chunk(k >> self.pbb)
            value = chunk[k & mask]
            if value == self.refmax:
                self._overflow(res, k)
                continue
            chunk[k & mask] = value + 1

    def _overflow(self, res: _Counts, k: int, times: int = 1) -> None:
        res.corruptions += times
        while times:
            if self.log.full():
                self.log.dropped += 2 * times
                return
            self.log(f"ERROR: overflow cluster offset={k << self.cb:#x}")
            self.log(
                "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                "to create a clean copy if the image cannot be opened for writing"
            )
            times -= 1

    # walking the tables -----------------------------------------------------------------------

    def _cluster_type(self, entry: int) -> int:
        if entry & L2_COMPRESSED:
            return _COMPRESSED
        if entry & L2_ZERO and not self.ext:
            return _ZERO_ALLOC if entry & L2_OFFSET else _ZERO_PLAIN
        if not entry & L2_OFFSET:
            return _NORMAL if self.data_file and entry & L2_COPIED else _UNALLOCATED
        return _NORMAL

    def _walk_l1(
        self, res: _Counts, offset: int, size: int, frag: bool, fix: bool, active: bool
    ) -> None:
        """qemu's check_refcounts_l1."""
        if not size:
            return
        self._inc(res, offset, size * WORD)
        self._scan(size)
        table = self.l1 if active else self._words(offset, size)
        for entry in table:
            if not entry:
                continue
            self._count(1)
            if entry & L1_RESERVED:
                self.log(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & L1_OFFSET
            self._inc(res, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.log(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry "
                    "corrupted"
                )
                res.corruptions += 1
            self._walk_l2(res, l2_offset, frag, fix, active)

    def _walk_l2(
        self, res: _Counts, l2_offset: int, frag: bool, fix: bool, active: bool
    ) -> None:
        """qemu's check_refcounts_l2. What one L2 table contributes is worked out once per
        pass and replayed for every further reference to it (snapshots share L2 tables;
        hostile L1 tables repeat one), with qemu's exact counts."""
        key = (l2_offset, frag)
        effect = self.effects.get(key)
        if effect is None:
            effect, reusable = self._l2_effect(res, l2_offset, frag, fix, active)
            if reusable:
                self.effects.put(key, effect)
        else:
            self._count(effect.work)
        self._apply(res, effect)

    def _l2_effect(
        self, res: _Counts, l2_offset: int, frag: bool, fix: bool, active: bool
    ) -> tuple[_Effect, bool]:
        table = self._l2(l2_offset)
        cs = self.cs
        cb = self.cb
        ext = self.ext
        step = self.step
        file_size = self.file_size
        count_data = not self.data_file
        # entries that need more than "a normal, aligned cluster inside the file"
        slow = L2_COMPRESSED | L2_RESERVED | (L2_OFFSET & (cs - 1)) | (0 if ext else L2_ZERO)
        events: list[tuple[str, int]] = []
        incs: dict[int, int] = {}
        allocated = fragmented = compressed = 0
        reusable = True
        next_contiguous = 0
        nonzero = 0

        def count(offset: int, size: int) -> None:
            if offset + size - file_size >= cs:
                events.append((_eof_message(offset, size), 1))
                return
            for k in range(offset >> cb, ((offset + size - 1) >> cb) + 1):
                incs[k] = incs.get(k, 0) + 1

        for i in range(self.l2_entries):
            entry = table[i * step]
            bitmap = table[i * step + 1] if ext else 0
            if not entry and not bitmap & SUB_ALLOC:
                continue
            nonzero += 1
            offset = entry & L2_OFFSET
            if offset and not entry & slow and not (bitmap >> SUB_ZERO_SHIFT) & bitmap:
                if frag:
                    allocated += 1
                    if next_contiguous and offset != next_contiguous:
                        fragmented += 1
                    next_contiguous = offset + cs
                if count_data:
                    if offset >= file_size:
                        events.append((_eof_message(offset, cs), 1))
                    else:
                        k = offset >> cb
                        incs[k] = incs.get(k, 0) + 1
                continue
            kind = self._cluster_type(entry)
            if kind != _COMPRESSED and entry & L2_RESERVED:
                events.append((f"ERROR found l2 entry with reserved bits set: {entry:x}", 1))
            if kind == _COMPRESSED:
                desc = q.CompressedDescriptor(cluster_bits=cb, raw=entry)
                if entry & L2_COPIED:
                    events.append((
                        f"ERROR: coffset={desc.ofs_compressed:#x}: copied flag must never be "
                        "set for compressed clusters", 1))
                    entry &= ~L2_COPIED
                if self.data_file:
                    events.append(
                        (f"ERROR compressed cluster {i} with data file, entry={entry:#x}", 1)
                    )
                    continue
                if bitmap:
                    events.append((
                        f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                        f"bitmap, entry={entry:#x}", 1))
                    continue
                count(desc.ofs_compressed, desc.len_compressed_max)
                if frag:
                    # compressed clusters count as fragmented, as qemu counts them
                    allocated += 1
                    compressed += 1
                    fragmented += 1
            elif kind in (_NORMAL, _ZERO_ALLOC):
                if (bitmap >> SUB_ZERO_SHIFT) & bitmap:
                    events.append((
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                        "allocation bitmap", 1))
                if offset & (cs - 1):
                    data = bitmap & SUB_ALLOC if ext else not entry & L2_ZERO
                    if data:
                        events.append((
                            f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                            "L2 entry corrupted.", 1))
                    else:
                        events.append((
                            f"{'Repairing' if fix else 'ERROR'} offset={offset:x}: "
                            "Preallocated cluster is not properly aligned; L2 entry corrupted.",
                            1))
                        if fix:
                            reusable = False
                            self._flush_events(res, events)
                            if self._zero_entry(res, l2_offset, table, i, active):
                                continue
                if frag:
                    allocated += 1
                    if next_contiguous and offset != next_contiguous:
                        fragmented += 1
                    next_contiguous = offset + cs
                if count_data:
                    count(offset, cs)
            elif kind == _UNALLOCATED and bitmap & SUB_ALLOC:
                events.append(
                    ("ERROR: Unallocated cluster has non-zero subcluster allocation map", 1)
                )
        self._count(nonzero)
        effect = _Effect(
            events=events,
            clusters=array("Q", incs.keys()),
            times=array("Q", incs.values()),
            top=max(incs, default=-1) + 1,
            allocated=allocated,
            fragmented=fragmented,
            compressed=compressed,
            work=len(events) + len(incs) + 1,
        )
        return effect, reusable

    def _flush_events(self, res: _Counts, events: list[tuple[str, int]]) -> None:
        """Emit pending events now (before a repair writes): they stay in qemu's order."""
        for message, n in events:
            self.log(message)
            res.corruptions += n
        events.clear()

    def _apply(self, res: _Counts, effect: _Effect) -> None:
        log = self.log
        if log.full():
            log.dropped += len(effect.events)
            for _, n in effect.events:
                res.corruptions += n
        else:
            for message, n in effect.events:
                log(message)
                res.corruptions += n
        refs = self.refs
        pbb = self.pbb
        mask = self.per_block - 1
        refmax = self.refmax
        for k, times in zip(effect.clusters, effect.times, strict=True):
            chunk = refs.get(k >> pbb)
            if chunk is None:
                chunk = self._chunk(k >> pbb)
            value = chunk[k & mask]
            room = refmax - value
            if times <= room:
                chunk[k & mask] = value + times
            else:
                chunk[k & mask] = refmax
                self._overflow(res, k, times - room)
        if effect.top > self.nb_clusters:
            self.nb_clusters = effect.top
        self.allocated += effect.allocated
        self.fragmented += effect.fragmented
        self.compressed += effect.compressed

    def _zero_entry(
        self, res: _Counts, l2_offset: int, table: array[int], i: int, active: bool
    ) -> bool:
        """qemu's fix_l2_entry_by_zero: an unaligned preallocated zero cluster becomes a plain
        zero cluster (its present subclusters zero ones)."""
        slot = i * self.step
        if self.ext:
            bitmap = table[slot + 1]
            table[slot + 1] = (bitmap | bitmap << SUB_ZERO_SHIFT) & SUB_ZERO
            table[slot] = 0
        else:
            table[slot] = L2_ZERO
        words = array("Q", table[slot : slot + self.step])
        at = l2_offset + i * self.entry_size
        if self._overlaps(at, self.entry_size, "active L2 table" if active else ""):
            self.log("ERROR: Overlap check failed")
            res.check_errors += 1
            raise _Failed(errno.EIO)
        try:
            self._write(at, words_to_bytes(words, True))
            self._sync()
        except OSError as exc:
            self.log(f"ERROR: Failed to overwrite L2 table entry: {exc.strerror}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    # refcount blocks ------------------------------------------------------------------------

    def _check_refblocks(self, res: _Counts, fix: bool) -> None:
        """qemu's check_refblocks: every refcount block is referenced exactly once."""
        cs = self.cs
        for i, entry in enumerate(self.rc.table):
            if not entry:
                continue
            offset = entry & REFT_OFFSET
            cluster = offset >> self.cb
            if entry & REFT_RESERVED:
                self.log(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.log(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                res.corruptions += 1
                self.log(f"{'Repairing' if fix else 'ERROR'} refcount block {i} is outside image")
                if fix:
                    err = self._grow(offset + cs)
                    if not err:
                        self.nb_clusters = max(self.nb_clusters, -(-self.file_size // cs))
                        if cluster < self.nb_clusters:
                            res.corruptions -= 1
                            res.corruptions_fixed += 1
                            self._inc(res, offset, cs)
                            continue
                        err = errno.EINVAL
                    self.rebuild = True
                    self.log(f"ERROR could not resize image: {os.strerror(err)}")
                continue
            if offset:
                self._inc(res, offset, cs)
                count = self._ref(cluster)
                if count != 1:
                    self.log(f"ERROR refcount block {i} refcount={count}")
                    res.corruptions += 1
                    self.rebuild = True

    def _grow(self, size: int) -> int:
        """Extend the file to ``size`` bytes; 0 or an errno."""
        if size > INT64_MAX or size >> self.cb > INT_MAX:
            return errno.EINVAL if size > INT64_MAX else errno.EFBIG
        try:
            if size > self._stat():
                os.ftruncate(self.fd, size)
            self._stat()
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    # bitmaps ----------------------------------------------------------------------------------

    def _check_bitmaps(self, res: _Counts) -> None:
        """qemu's qcow2_check_bitmaps_refcounts (only while the autoclear bit is set)."""
        ext = self.head.bitmaps
        if ext is None or not self.head.autoclear & q.AutoclearFeature.BITMAPS:
            return
        if not ext.num_bitmaps:
            return
        offset, size = ext.ofs_bitmap_directory, ext.len_bitmap_directory
        self._inc(res, offset, size)
        bitmaps = self._bitmap_directory(offset, size, ext.num_bitmaps)
        if bitmaps is None:
            res.corruptions += 1
            raise _Failed(errno.EINVAL)
        for table_offset, table_size in bitmaps:
            self._inc(res, table_offset, table_size * WORD)
            # entries past the end of the file read as zeros, which reference nothing
            inside = max(0, min(table_size, (self.file_size - table_offset) // WORD))
            self._scan(inside)
            table = self._words(table_offset, inside) if inside else array("Q")
            offsets: list[int] = []
            for entry in table:
                data = entry & BME_OFFSET
                bad = entry & BME_RESERVED or (data and (entry & BME_ALL_ONES or data % self.cs))
                if bad:
                    res.corruptions += 1
                    raise _Failed(errno.EINVAL)
                if data:
                    offsets.append(data)
            for data in offsets:
                self._inc(res, data, self.cs)

    def _bitmap_directory(
        self, offset: int, size: int, count: int
    ) -> list[tuple[int, int]] | None:
        """(table offset, table size) of every bitmap, or None where qemu's bitmap_list_load
        fails."""
        if size == 0 or size > MAX_BITMAP_DIRECTORY:
            return None
        buf = self._pread(offset, size)
        out: list[tuple[int, int]] = []
        pos = 0
        virtual = self.head.size
        while pos < size:
            if pos + BITMAP_ENTRY_FIXED > size or len(out) >= count:
                return None
            try:
                entry, end = q.BitmapDirectoryEntry.parse_prefix(buf, pos)
            except FormatError:
                return None
            if end > size or entry.len_extra_data:
                return None
            table_bytes = entry.num_bitmap_table_entries * self.cs
            in_use = int(entry.flags) & q.BitmapFlag.IN_USE
            if (
                not entry.num_bitmap_table_entries
                or not entry.ofs_bitmap_table
                or entry.ofs_bitmap_table % self.cs
                or entry.num_bitmap_table_entries > MAX_BITMAP_TABLE
                or not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS
                or int(entry.flags) & ~BME_FLAGS
                or entry.len_name > MAX_BITMAP_NAME
                or entry.bitmap_type != q.BitmapType.DIRTY_TRACKING
                or table_bytes > MAX_BITMAP_PHYS
                or (not in_use and virtual > (table_bytes * 8) << entry.granularity_bits)
            ):
                return None
            out.append((entry.ofs_bitmap_table, entry.num_bitmap_table_entries))
            pos = end
        if len(out) != count or pos != size:
            return None
        return out

    # the whole computation ------------------------------------------------------------------

    def _calculate(self, res: _Counts, fix: bool) -> None:
        """qemu's calculate_refcounts."""
        head = self.head
        self.refs = {}
        self.effects.clear()
        self._inc(res, 0, self.cs)
        self._walk_l1(res, head.l1_offset, head.l1_size, True, fix, True)
        if self.data_file and self.snapshots:
            self.log(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.snapshots:
            ident = f"{_text(sn.id_str)} ({_text(sn.name)})"
            if sn.l1_offset % self.cs:
                self.log(
                    f"ERROR snapshot {ident} l1_offset={sn.l1_offset:#x}: L1 table is not "
                    "cluster aligned; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_ENTRIES:
                self.log(
                    f"ERROR snapshot {ident} l1_size={sn.l1_size:#x}: L1 table is too large; "
                    "snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            self._walk_l1(res, sn.l1_offset, sn.l1_size, False, fix, False)
        self._inc(res, head.snapshots_offset, self.snapshots_size)
        self._inc(res, head.refcount_table_offset, len(self.rc.table) * WORD)
        crypto = head.encryption
        if crypto is not None and crypto.len_encryption_header:
            self._inc(res, crypto.ofs_encryption_header, crypto.len_encryption_header)
        self._check_bitmaps(res)
        self._check_refblocks(res, fix)

    def _stored_block(self, j: int) -> array[int] | int | None:
        """The stored refcounts of block ``j``: an array, None (no block) or an errno."""
        table = self.rc.table
        entry = table[j] if j < len(table) else 0
        offset = entry & REFT_OFFSET
        if not offset:
            return None
        if offset & (self.cs - 1):
            return errno.EIO
        try:
            self.rc.get(j << self.pbb)
        except (RefcountError, OSError, OverflowError):
            return errno.EIO
        block = self.rc.blocks.get(j)
        return block if block is not None else None

    def _compare(self, res: _Counts, fix_leaks: bool, fix_errors: bool) -> None:
        """qemu's compare_refcounts, over every cluster below nb_clusters."""
        nb = self.nb_clusters
        self.highest = 0
        chunks = -(-nb // self.per_block)
        table = self.rc.table
        candidates = {j for j in self.refs if j < chunks}
        candidates.update(j for j in range(min(len(table), chunks)) if table[j] & REFT_OFFSET)
        for j in sorted(candidates):
            base = j << self.pbb
            n = min(self.per_block, nb - base)
            stored = self._stored_block(j)
            if isinstance(stored, int):
                for k in range(base, base + n):
                    self.log(f"Can't get refcount for cluster {k}: {os.strerror(stored)}")
                    res.check_errors += 1
                continue
            computed = self.refs.get(j)
            a = (stored if stored is not None else self.zero_block)[:n]
            b = (computed if computed is not None else self.zero_block)[:n]
            top = max(_last_nonzero(a), _last_nonzero(b))
            if top >= 0:
                self.highest = base + top
            if a == b:
                continue
            for index in _differences(a, b):
                self._mismatch(res, base + index, a[index], b[index], fix_leaks, fix_errors)

    def _mismatch(
        self, res: _Counts, k: int, stored: int, refs: int, fix_leaks: bool, fix_errors: bool
    ) -> None:
        fixed: str | None = None
        if stored == 0:
            self.rebuild = True
        elif stored > refs and fix_leaks:
            fixed = "leaks_fixed"
        elif stored < refs and fix_errors:
            fixed = "corruptions_fixed"
        label = "Repairing" if fixed else "ERROR" if stored < refs else "Leaked"
        self.log(f"{label} cluster {k} refcount={stored} reference={refs}")
        if fixed is not None:
            try:
                self.rc.change(k, refs - stored)
            except RefcountError:
                pass
            else:
                setattr(res, fixed, getattr(res, fixed) + 1)
                return
        if stored < refs:
            res.corruptions += 1
        else:
            res.leaks += 1

    def _write_refcounts(self) -> None:
        """Refcount changes reach the disk before anything that relies on them."""
        if self.rc.write_dirty():
            self._sync()
        self.rc.table_dirty = False
        self._switch_if_table_moved()

    def _switch_if_table_moved(self) -> None:
        rc = self.rc
        if not rc.on_table_moved:
            return
        self._switch_refcount_table(rc.table_offset, len(rc.table) * WORD // self.cs)
        self.overlap_map = None
        old = list(rc.on_table_moved)
        rc.on_table_moved.clear()
        for offset, clusters in old:
            first = offset >> self.cb
            for c in range(first, first + clusters):
                rc.change(c, -1)
        if rc.write_dirty():
            self._sync()
        rc.table_dirty = False

    def _switch_refcount_table(self, offset: int, clusters: int) -> None:
        head = self.head
        raw = head.raw.header
        raw.ofs_refcount_table = head.refcount_table_offset = offset
        raw.num_refcount_table_clusters = head.refcount_table_clusters = clusters
        self._write_header(H.OFS_REFCOUNT_TABLE_AT, H.NUM_SNAPSHOTS_AT)

    # metadata overlap ---------------------------------------------------------------------

    def _overlap_regions(self) -> _OverlapMap:
        if self.overlap_map is not None:
            return self.overlap_map
        head = self.head
        cs = self.cs
        ranges: list[tuple[str, int, int]] = []
        if head.l1_size:
            ranges.append(("active L1 table", head.l1_offset, head.l1_size * WORD))
        if len(self.rc.table):
            ranges.append(("refcount table", head.refcount_table_offset, len(self.rc.table) * WORD))
        if self.snapshots_size:
            ranges.append(("snapshot table", head.snapshots_offset, self.snapshots_size))
        for sn in self.snapshots:
            if sn.l1_size:
                ranges.append(("inactive L1 table", sn.l1_offset, sn.l1_size * WORD))

        def clusters(offsets: Iterator[int]) -> set[int]:
            out: set[int] = set()
            for o in offsets:
                out.add(o >> self.cb)
                out.add((o + cs - 1) >> self.cb)
            return out

        late: list[tuple[str, int, int]] = []
        ext = head.bitmaps
        if ext is not None and head.autoclear & q.AutoclearFeature.BITMAPS:
            # qemu 7.2 also trips over a (0, 0) directory; an empty range overlaps nothing here
            late.append(("bitmap directory", ext.ofs_bitmap_directory, ext.len_bitmap_directory))
        self.overlap_map = _OverlapMap(
            ranges=ranges,
            active_l2=clusters(e & L1_OFFSET for e in self.l1 if e & L1_OFFSET),
            refblocks=clusters(e & REFT_OFFSET for e in self.rc.table if e & REFT_OFFSET),
            late=late,
        )
        return self.overlap_map

    def _overlap(self, offset: int, size: int, ignore: str = "") -> str | None:
        """The metadata a write of [offset, offset + size) would hit, as qemu names it."""
        if size <= 0:
            return None
        cb = self.cb
        if ignore != "qcow2_header" and offset < self.cs:
            return "qcow2_header"
        first, end = offset >> cb, (offset + size + self.cs - 1) >> cb
        lo, hi = first << cb, end << cb
        regions = self._overlap_regions()
        for name, o, n in regions.ranges:
            if name != ignore and n > 0 and o < hi and lo < o + n:
                return name
        for name, found in (("active L2 table", regions.active_l2),
                            ("refcount block", regions.refblocks)):
            if name == ignore or not found:
                continue
            if end - first <= len(found):
                if any(c in found for c in range(first, end)):
                    return name
            elif any(first <= c < end for c in found):
                return name
        for name, o, n in regions.late:
            if name != ignore and n > 0 and o < hi and lo < o + n:
                return name
        return None

    def _overlaps(self, offset: int, size: int, ignore: str = "") -> bool:
        """qemu's pre-write overlap check: on a hit the image is marked corrupt."""
        name = self._overlap(offset, size, ignore)
        if name is None:
            return False
        self._mark_corrupt(f"Preventing invalid write on metadata (overlaps with {name})")
        return True

    def _mark_corrupt(self, why: str) -> None:
        """qemu's qcow2_signal_corruption on a writable image: set the corrupt bit (v3)."""
        self.log(f"qcow2: Marking image as corrupt: {why}; further corruption events will be "
                 "suppressed")
        head = self.head
        if head.version < 3 or head.corrupt:
            return
        raw = head.raw.header
        raw.incompatible_features = q.IncompatibleFeature(
            int(head.incompatible) | int(q.IncompatibleFeature.CORRUPT)
        )
        head.incompatible = raw.incompatible_features
        self._write_header(H.INCOMPATIBLE_FEATURES_AT, H.COMPATIBLE_FEATURES_AT)

    def _metadata_spans(self) -> tuple[list[int], list[int], set[int]]:
        """Every cluster holding metadata the overlap check protects, as merged spans
        (parallel lists of starts and ends) plus single clusters."""
        regions = self._overlap_regions()
        spans = sorted(
            (o >> self.cb, (o + n + self.cs - 1) >> self.cb)
            for _, o, n in regions.ranges + regions.late
            if n > 0
        )
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in spans:
            if ends and lo <= ends[-1]:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        return starts, ends, regions.active_l2 | regions.refblocks

    # COPIED ---------------------------------------------------------------------------------

    def _stored(self, k: int) -> int | None:
        try:
            return self.rc.get(k)
        except (RefcountError, OSError, OverflowError):
            return None

    def _check_copied(self, res: _Counts) -> None:
        """qemu's check_oflag_copied over the active L1 table and its L2 tables."""
        if self.fix_errors:
            repair = True
        elif self.fix_leaks:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        self.copied_effects.clear()
        wrote = False
        for i, l1_entry in enumerate(self.l1):
            l2_offset = l1_entry & L1_OFFSET
            if not l2_offset:
                continue
            count = self._stored(l2_offset >> self.cb)
            if count is None:
                continue
            if (count == 1) != bool(l1_entry & L1_COPIED):
                res.corruptions += 1
                self.log(
                    f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: "
                    f"l1_index={i} l1_entry={l1_entry:x} refcount={count}"
                )
                if repair:
                    new = l1_entry | L1_COPIED if count == 1 else l1_entry & ~L1_COPIED
                    self.l1[i] = new
                    at = self.head.l1_offset + i * WORD
                    if self._overlaps(at, WORD, "active L1 table"):
                        res.check_errors += 1
                        raise _Failed(errno.EIO)
                    try:
                        self._write(at, new.to_bytes(WORD, "big"))
                        self._sync()
                    except OSError as exc:
                        res.check_errors += 1
                        raise _Failed(exc.errno or errno.EIO) from exc
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            key = (l2_offset, False)
            effect = self.copied_effects.get(key)
            if effect is not None:
                self._count(effect.work)
                self._apply(res, effect)
                continue
            effect, dirty = self._copied_effect(l2_offset, repair)
            if dirty:
                self._flush_events(res, effect.events)
                self._write_l2(res, l2_offset)
                wrote = True
                res.corruptions -= dirty
                res.corruptions_fixed += dirty
                effect.events = []  # the table on disk is right now
            else:
                self._apply(res, effect)
            self.copied_effects.put(key, effect)
        if wrote:
            self._sync()

    def _copied_effect(self, l2_offset: int, repair: bool) -> tuple[_Effect, int]:
        """The COPIED errors of one active L2 table (fixed in the cached table when
        ``repair``), and how many entries were fixed."""
        table = self._l2(l2_offset)
        step = self.step
        events: list[tuple[str, int]] = []
        dirty = 0
        nonzero = 0
        for j in range(self.l2_entries):
            entry = table[j * step]
            if not entry:
                continue
            nonzero += 1
            if self._cluster_type(entry) not in (_NORMAL, _ZERO_ALLOC):
                continue
            if self.data_file:
                count = 1
            else:
                stored = self._stored((entry & L2_OFFSET) >> self.cb)
                if stored is None:
                    continue
                count = stored
            if (count == 1) != bool(entry & L2_COPIED):
                events.append((
                    f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                    f"l2_entry={entry:x} refcount={count}", 1))
                if repair:
                    table[j * step] = entry | L2_COPIED if count == 1 else entry & ~L2_COPIED
                    dirty += 1
        self._count(nonzero)
        empty = array("Q")
        return _Effect(events, empty, empty, 0, 0, 0, 0, len(events) + 1), dirty

    def _write_l2(self, res: _Counts, l2_offset: int) -> None:
        if self._overlaps(l2_offset, self.cs, "active L2 table"):
            self.log(
                "ERROR: Could not write L2 table; metadata overlap check failed: "
                f"{os.strerror(errno.EIO)}"
            )
            res.check_errors += 1
            raise _Failed(errno.EIO)
        table = self._l2(l2_offset)
        try:
            self._write(l2_offset, words_to_bytes(table, True))
        except OSError as exc:
            self.log(f"ERROR: Could not write L2 table: {exc.strerror}")
            res.check_errors += 1
            raise _Failed(exc.errno or errno.EIO) from exc

    # rebuilding the refcount structure -----------------------------------------------------------

    def _rebuild(self, res: _Counts) -> None:
        """A new refcount table and blocks from the computed references (qcow.md C.7).

        Everything is placed in memory first: blocks for every range with a nonzero count
        (and for the ranges the new blocks land in), then a table big enough for them, again
        until nothing moves. Only clusters nothing references, and that the old structure does
        not occupy, are used, so until the header switches the old structure stays intact.
        """
        cs = self.cs
        # clusters of the old structure and of every other piece of metadata qemu protects,
        # counted or not (an unaligned refblock, a broken snapshot L1 ...), stay untouched
        starts, ends, singles = self._metadata_spans()

        def reserved(k: int) -> bool:
            i = bisect_right(starts, k) - 1
            return (i >= 0 and k < ends[i]) or k in singles

        window = self.nb_clusters + max(1, ALLOC_WINDOW >> self.cb)
        hint = [1]  # every cluster below is in use (qemu's first_free_cluster)

        def allocate(count: int) -> int:
            k = start = hint[0]
            first_gap = -1
            run = 0
            while run < count:
                if k - run >= window:
                    # metadata claimed far past the end of the file: do not grow the file
                    # towards it, give up before anything is written
                    self.log("ERROR allocating refblock: No space left on device")
                    res.check_errors += 1
                    raise _Failed(errno.ENOSPC)
                if self._ref(k) or reserved(k):
                    run = 0
                else:
                    if not run:
                        start = k
                    if first_gap < 0:
                        first_gap = k
                    run += 1
                k += 1
            for c in range(start, start + count):
                self._chunk(c >> self.pbb)[c & (self.per_block - 1)] = 1
                self.nb_clusters = max(self.nb_clusters, c + 1)
            hint[0] = start + count if first_gap == start else first_gap
            return start

        blocks: dict[int, int] = {}
        table_start, table_clusters = 0, 0
        per_table_cluster = cs // WORD
        while True:
            moved = False
            for j in sorted(self.refs):
                if j not in blocks and self.refs[j] != self.zero_block:
                    blocks[j] = allocate(1)
                    moved = True
            needed = -(-(max(blocks, default=0) + 1) // per_table_cluster)
            if needed * cs > MAX_REFCOUNT_TABLE:
                res.check_errors += 1
                self.log("ERROR allocating reftable: File too large")
                raise _Failed(errno.EFBIG)
            if needed != table_clusters:
                for c in range(table_start, table_start + table_clusters):
                    self._chunk(c >> self.pbb)[c & (self.per_block - 1)] = 0
                    hint[0] = min(hint[0], c)
                table_start, table_clusters = allocate(needed), needed
                moved = True
            if not moved:
                break
        table = array("Q", bytes(table_clusters * cs))
        for j, c in blocks.items():
            table[j] = c << self.cb
        field_name = f"refcounts_{1 << self.order}"
        try:
            for j, c in sorted(blocks.items()):
                chunk = self.refs.get(j, self.zero_block)
                block = q.RefcountBlock(
                    cluster_bits=self.cb, refcount_order=self.order, **{field_name: chunk}
                )
                if self._overlaps(c << self.cb, cs):
                    self.log("ERROR writing refblock: Input/output error")
                    res.check_errors += 1
                    raise _Failed(errno.EIO)
                self._write(c << self.cb, block.build())
            if self._overlaps(table_start << self.cb, table_clusters * cs):
                self.log("ERROR writing reftable: Input/output error")
                res.check_errors += 1
                raise _Failed(errno.EIO)
            self._write(table_start << self.cb, words_to_bytes(table, True))
            self._sync()
            self._switch_refcount_table(table_start << self.cb, table_clusters)
        except OSError as exc:
            res.check_errors += 1
            self.log(f"ERROR writing refcount structure: {exc.strerror}")
            raise _Failed(exc.errno or errno.EIO) from exc
        self._stat()
        self.rc = Refcounts(self.f, self.cb, self.order, table, table_start << self.cb)
        self.overlap_map = None

    # snapshots ----------------------------------------------------------------------------------

    def _read_snapshot_table(self, res: _Counts) -> None:
        """qemu's qcow2_check_read_snapshot_table."""
        head = self.head
        fix = self.fix_errors
        nb, offset = head.nb_snapshots, head.snapshots_offset
        reduced = 0
        if nb > MAX_SNAPSHOTS and fix:
            self.log(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb - MAX_SNAPSHOTS
            nb = MAX_SNAPSHOTS
        if nb > MAX_SNAPSHOTS:
            res.check_errors += 1
            self.log("qemu-img: ERROR snapshot table too large")
            self.log(
                f"You can force-remove all {nb - MAX_SNAPSHOTS} overhanging snapshots with "
                "qemu-img check -r all"
            )
            raise _Failed(errno.EFBIG)
        if INT64_MAX - nb * SNAPSHOT_FIXED < offset or offset % self.cs:
            res.check_errors += 1
            self.log("qemu-img: ERROR snapshot table offset invalid")
            raise _Failed(errno.EINVAL)
        try:
            dropped, more = self._read_snapshots(offset, nb, fix)
        except _Failed as exc:
            res.check_errors += 1
            self.log(f"qemu-img: ERROR failed to read the snapshot table: {exc.why}")
            if exc.hint:
                self.log(exc.hint)
            raise
        reduced += more
        res.corruptions += reduced + dropped
        if reduced:
            raw = head.raw.header
            head.nb_snapshots = raw.num_snapshots = len(self.snapshots)
            try:
                self._write_header(H.NUM_SNAPSHOTS_AT, H.OFS_SNAPSHOT_TABLE_AT)
            except OSError as exc:
                res.check_errors += 1
                self.log(
                    "ERROR failed to update the snapshot count in the image header: "
                    f"{exc.strerror}"
                )
                raise _Failed(exc.errno or errno.EIO) from exc
            res.corruptions_fixed += reduced
            res.corruptions -= reduced
        if head.version >= 3:
            for i, sn in enumerate(self.snapshots):
                if sn.extra_data_size < SNAPSHOT_EXTRA_V3:
                    res.corruptions += 1
                    self.log(
                        f"{'Repairing' if fix else 'ERROR'} snapshot table entry {i} is "
                        "incomplete"
                    )

    def _read_snapshots(self, start: int, nb: int, repair: bool) -> tuple[int, int]:
        """qemu's qcow2_do_read_snapshots; returns (extra data dropped, snapshots dropped)."""
        E = q.SnapshotEntry
        X = q.SnapshotExtraData
        self.snapshots = []
        self.snapshots_size = 0
        if not nb:
            return 0, 0
        dropped = reduced = 0
        offset = start
        table_length = 0
        for i in range(nb):
            before = offset
            table_length = _round_up(table_length, SNAPSHOT_ALIGN)
            offset = _round_up(offset, SNAPSHOT_ALIGN)
            h = self._read_at(offset, SNAPSHOT_FIXED)
            offset += SNAPSHOT_FIXED
            extra_size = _field(h, E.LEN_EXTRA_DATA_AT, E.EXTRA_DATA_AT)
            id_size = _field(h, E.LEN_ID_AT, E.LEN_NAME_AT)
            name_size = _field(h, E.LEN_NAME_AT, E.DATE_SEC_AT)
            truncate = False
            if extra_size > MAX_SNAPSHOT_EXTRA:
                if not repair:
                    raise _Failed(
                        errno.EFBIG,
                        f"Too much extra metadata in snapshot table entry {i}",
                        "You can force-remove this extra metadata with qemu-img check -r all",
                    )
                self.log(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra_size} > {MAX_SNAPSHOT_EXTRA})"
                )
                dropped += 1
                truncate = True
            known = min(SNAPSHOT_EXTRA_KNOWN, extra_size)
            extra = self._read_at(offset, known) + bytes(SNAPSHOT_EXTRA_KNOWN - known)
            offset += known
            vm_state = _field(h, E.LEN_VM_STATE_32_AT, E.LEN_EXTRA_DATA_AT)
            if extra_size >= X.LEN_VIRTUAL_DISK_AT:
                vm_state = _field(extra, X.LEN_VM_STATE_AT, X.LEN_VIRTUAL_DISK_AT)
            disk_size = self.head.size
            if extra_size >= X.ICOUNT_AT:
                disk_size = _field(extra, X.LEN_VIRTUAL_DISK_AT, X.ICOUNT_AT)
            icount = (1 << (WORD * 8)) - 1
            if extra_size >= X.UNKNOWN_AT:
                icount = _field(extra, X.ICOUNT_AT, X.UNKNOWN_AT)
            unknown = b""
            if extra_size > SNAPSHOT_EXTRA_KNOWN:
                extra_end = offset + extra_size - SNAPSHOT_EXTRA_KNOWN
                if truncate:
                    extra_size = MAX_SNAPSHOT_EXTRA
                unknown = self._read_at(offset, extra_size - SNAPSHOT_EXTRA_KNOWN)
                offset = extra_end
            id_str = self._read_at(offset, id_size)
            offset += id_size
            name = self._read_at(offset, name_size)
            offset += name_size
            table_length += SNAPSHOT_FIXED + extra_size + id_size + name_size
            if table_length > MAX_SNAPSHOT_TABLE or offset - start > INT_MAX:
                if not repair:
                    raise _Failed(
                        errno.EFBIG,
                        "Snapshot table is too big",
                        f"You can force-remove all {nb - i} overhanging snapshots with qemu-img "
                        "check -r all",
                    )
                self.log(
                    f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)"
                )
                reduced += nb - i
                offset = before
                break
            self.snapshots.append(
                _Snapshot(
                    l1_offset=_field(h, E.OFS_L1_TABLE_AT, E.NUM_L1_ENTRIES_AT),
                    l1_size=_field(h, E.NUM_L1_ENTRIES_AT, E.LEN_ID_AT),
                    id_str=id_str,
                    name=name,
                    date_sec=_field(h, E.DATE_SEC_AT, E.DATE_NSEC_AT),
                    date_nsec=_field(h, E.DATE_NSEC_AT, E.VM_CLOCK_NSEC_AT),
                    vm_clock_nsec=_field(h, E.VM_CLOCK_NSEC_AT, E.LEN_VM_STATE_32_AT),
                    vm_state_size=vm_state,
                    disk_size=disk_size,
                    icount=icount,
                    extra_data_size=extra_size,
                    unknown_extra=unknown,
                )
            )
        self.snapshots_size = offset - start
        return dropped, reduced

    def _fix_snapshot_table(self, res: _Counts) -> None:
        """qemu's qcow2_check_fix_snapshot_table: rewrite the table when entries were wrong."""
        if not (res.corruptions and self.fix_errors):
            return
        try:
            self._write_snapshots()
        except (OSError, RefcountError) as exc:
            res.check_errors += 1
            self.log(f"ERROR failed to update snapshot table: {exc}")
            raise _Failed(errno.EIO) from exc
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def _write_snapshots(self) -> None:
        """A new snapshot table (every entry with at least the known extra data), synced,
        then the 12-byte header switch, then the old table freed (qcow.md C.2)."""
        head = self.head
        parts: list[bytes] = []
        size = 0
        for sn in self.snapshots:
            extra_size = max(SNAPSHOT_EXTRA_KNOWN, sn.extra_data_size)
            unknown = sn.unknown_extra[: extra_size - SNAPSHOT_EXTRA_KNOWN]
            unknown += bytes(extra_size - SNAPSHOT_EXTRA_KNOWN - len(unknown))
            length = SNAPSHOT_FIXED + extra_size + len(sn.id_str) + len(sn.name)
            icount = sn.icount - (1 << (WORD * 8)) if sn.icount >> (WORD * 8 - 1) else sn.icount
            entry = q.SnapshotEntry(
                ofs_l1_table=sn.l1_offset,
                num_l1_entries=sn.l1_size,
                len_id=len(sn.id_str),
                len_name=len(sn.name),
                date_sec=sn.date_sec,
                date_nsec=sn.date_nsec,
                vm_clock_nsec=sn.vm_clock_nsec,
                len_vm_state_32=sn.vm_state_size if sn.vm_state_size <= UINT32_MAX else 0,
                len_extra_data=extra_size,
                extra_data=q.SnapshotExtraData(
                    len_vm_state=sn.vm_state_size,
                    len_virtual_disk=sn.disk_size,
                    icount=icount,
                    unknown=unknown,
                ),
                id_str=sn.id_str,
                name=sn.name,
                padding=bytes(-length % SNAPSHOT_ALIGN),
            )
            size = _round_up(size, SNAPSHOT_ALIGN) + length
            if size > MAX_SNAPSHOT_TABLE:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            parts.append(entry.build())
        data = b"".join(parts)[:size]
        rc = self.rc
        new_offset = 0
        if size:
            new_offset = rc.allocate(-(-size // self.cs)) << self.cb
            self._write_refcounts()
            if self._overlaps(new_offset, size):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            self._write(new_offset, data)
            self._sync()
        old_offset, old_size = head.snapshots_offset, self.snapshots_size
        raw = head.raw.header
        head.nb_snapshots = raw.num_snapshots = len(self.snapshots)
        head.snapshots_offset = raw.ofs_snapshot_table = new_offset
        self._write_header(H.NUM_SNAPSHOTS_AT, H.INCOMPATIBLE_FEATURES_AT)
        self.overlap_map = None
        if old_size > 0:
            for c in range(old_offset >> self.cb, ((old_offset + old_size - 1) >> self.cb) + 1):
                if self._stored(c):
                    rc.change(c, -1)
            self._write_refcounts()
        self.snapshots_size = size

    # the check ----------------------------------------------------------------------------------

    def _check_refcounts(self, res: _Counts) -> None:
        """qemu's qcow2_check_refcounts."""
        cs = self.cs
        nb = -(-self._stat() // cs)
        if nb > INT_MAX:
            res.check_errors += 1
            raise _Failed(errno.EFBIG)
        self.nb_clusters = nb
        self.total_clusters = -(-self.head.size // cs)
        fix = self.fix_leaks or self.fix_errors
        self._calculate(res, self.fix_errors)
        before = res.copy()
        self._compare(res, False, False)
        if self.rebuild and self.fix_errors:
            old = res.copy()
            self.log("Rebuilding refcount structure")
            self._rebuild(res)
            res.corruptions = 0
            res.leaks = 0
            self.rebuild = False
            self.nb_clusters = max(self.nb_clusters, -(-self.file_size // cs))
            self._calculate(res, False)
            fresh = 0
            if self.fix_leaks:
                saved = res.copy()
                res.set(_Counts())
                self._compare(res, True, False)
                if self.rebuild:
                    self.log("ERROR rebuilt refcount structure is still broken")
                fresh = res.leaks
                res.set(saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh
        elif fix:
            if self.rebuild:
                self.log("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Failed(errno.EIO)
            if res.leaks or res.corruptions:
                res.set(before)
                self._compare(res, self.fix_leaks, self.fix_errors)
        if fix:
            try:
                self._write_refcounts()
            except OSError as exc:
                res.check_errors += 1
                raise _Failed(exc.errno or errno.EIO) from exc
        self._check_copied(res)
        self.image_end = (self.highest + 1) * cs

    def run(self, result: CheckResult) -> None:
        """qemu's qcow2_co_check_locked; fills ``result`` (or sets ``failed``)."""
        snapshot_res = _Counts()
        refcount_res = _Counts()
        total = _Counts()
        self.image_end = 0
        try:
            if self.fix_leaks:
                self._clear_unknown_autoclear()
            try:
                self._read_snapshot_table(snapshot_res)
            except _Failed:
                total.add(snapshot_res)
                raise
            try:
                self._check_refcounts(refcount_res)
            except _Failed:
                total.add(refcount_res)
                total.add(snapshot_res)
                raise
            total.add(refcount_res)
            try:
                self._fix_snapshot_table(snapshot_res)
            finally:
                total.add(snapshot_res)
            if (self.fix_leaks or self.fix_errors) and not total.check_errors and not (
                total.corruptions
            ):
                self._mark_clean()
        except _Failed as exc:
            result.failed = f"Check failed: {os.strerror(exc.err)}"
        except (OSError, FormatError) as exc:
            total.check_errors += 1
            self.log.always(f"ERROR {exc}")
            result.failed = f"Check failed: {exc}"
        result.check_errors = total.check_errors
        result.corruptions = total.corruptions
        result.leaks = total.leaks
        result.corruptions_fixed = total.corruptions_fixed
        result.leaks_fixed = total.leaks_fixed
        result.image_end_offset = self.image_end
        result.total_clusters = self.total_clusters
        result.allocated_clusters = self.allocated
        result.fragmented_clusters = self.fragmented
        result.compressed_clusters = self.compressed

    def _clear_unknown_autoclear(self) -> None:
        """What qemu does when it opens an image read-write (so also for a repair): unknown
        autoclear bits are cleared (qcow.md B.2, D.1 22)."""
        head = self.head
        if head.version < 3 or not int(head.autoclear) & ~KNOWN_AUTOCLEAR:
            return
        raw = head.raw.header
        raw.autoclear_features = q.AutoclearFeature(int(head.autoclear) & KNOWN_AUTOCLEAR)
        head.autoclear = raw.autoclear_features
        self._write_header(H.AUTOCLEAR_FEATURES_AT, H.REFCOUNT_ORDER_AT)

    def _mark_clean(self) -> None:
        """After a repair that left no errors: clear the dirty and corrupt bits."""
        head = self.head
        if head.version < 3:
            return
        bits = int(q.IncompatibleFeature.DIRTY | q.IncompatibleFeature.CORRUPT)
        if not int(head.incompatible) & bits:
            return
        raw = head.raw.header
        raw.incompatible_features = q.IncompatibleFeature(int(head.incompatible) & ~bits)
        head.incompatible = raw.incompatible_features
        self._write_header(H.INCOMPATIBLE_FEATURES_AT, H.COMPATIBLE_FEATURES_AT)


def _eof_message(offset: int, size: int) -> str:
    return (
        "ERROR: counting reference for region exceeding the end of the file by one cluster or "
        f"more: offset {offset:#x} size {size:#x}"
    )


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _last_nonzero(a: array[int]) -> int:
    """Index of the last nonzero element, -1 when there is none."""
    used = len(a.tobytes().rstrip(b"\0"))
    return -(-used // a.itemsize) - 1 if used else -1


def _differences(a: array[int], b: array[int]) -> Iterator[int]:
    """Indexes where two equally long arrays differ, in order (whole windows at C speed)."""
    for lo in range(0, len(a), DIFF_WINDOW):
        hi = lo + DIFF_WINDOW
        if a[lo:hi] == b[lo:hi]:
            continue
        for i in range(lo, min(hi, len(a))):
            if a[i] != b[i]:
                yield i


# --------------------------------------------------------------------------------------------
# Entry points


def _flags(repair: Repair) -> tuple[bool, bool]:
    if repair is None:
        return False, False
    if repair == "leaks":
        return True, False
    if repair == "all":
        return True, True
    raise UsageError(f"repair must be None, 'leaks' or 'all', not {repair!r}")


def _single(f: BinaryIO, head: Qcow2Header, name: str, repair: Repair) -> CheckResult:
    fix_leaks, fix_errors = _flags(repair)
    log = _Log()
    result = CheckResult(filename=name)
    try:
        checker = _Checker(f, head, fix_leaks, fix_errors, log)
    except (FormatError, OSError) as exc:
        result.failed = f"Check failed: {exc}"
        result.messages = log.all()
        return result
    checker.run(result)
    result.messages = log.all()
    return result


def _with_double_check(f: BinaryIO, head: Qcow2Header, name: str, repair: Repair) -> CheckResult:
    """qemu-img check: with a repair that fixed something, a second check reports."""
    first = _single(f, head, name, repair)
    if first.failed is not None or not (first.corruptions_fixed or first.leaks_fixed):
        return first
    second = _single(f, head, name, None)
    second.messages = first.messages + second.messages
    second.corruptions_fixed = first.corruptions_fixed
    second.leaks_fixed = first.leaks_fixed
    second.repaired = (first.leaks_fixed, first.corruptions_fixed)
    return second


def check(
    path: str | os.PathLike[str], repair: Repair = None, *, filename: str | None = None
) -> CheckResult:
    """``qemu-img check [-r leaks|all]`` of a qcow2 file.

    ``filename`` is what the report names (qemu-img reports the name it was given).
    Opening problems give a result with ``failed`` set and exit code 1, as qemu-img does.
    """
    _flags(repair)
    name = filename if filename is not None else os.fspath(path)
    p = Path(path)
    try:
        f: BinaryIO = p.open("r+b" if repair else "rb")
    except OSError as exc:
        return CheckResult(filename=name, failed=f"Could not open '{p}': {exc.strerror}")
    with f:
        try:
            head = _load_header(f)
        except (FormatError, OSError) as exc:
            return CheckResult(filename=name, failed=f"Could not open '{p}': {exc}")
        return _with_double_check(f, head, name, repair)


def check_image(img: Qcow2Image, repair: Repair = None) -> CheckResult:
    """Check (and repair) an open qcow2 image; what ``Qcow2Image.check`` delegates to.

    Pending writes are flushed first. After a repair the image's cached tables and refcounts
    are dropped so that it continues from what is on disk.
    """
    fix_leaks, _ = _flags(repair)
    if fix_leaks and not img.writable:
        raise UsageError(f"{img.path}: repairing needs an image opened read-write")
    if getattr(img, "_snapshot", None) is not None:
        raise UsageError(f"{img.path}: a snapshot view cannot be checked")
    img.flush()
    try:
        return _with_double_check(img._f, img.head, str(img.path), repair)
    finally:
        if fix_leaks:
            _refresh(img)


def rebuild_refcounts(img: Qcow2Image) -> CheckResult:
    """What qemu does when it opens a dirty image read-write (qcow.md C.4): a check with
    ``-r all`` (no second check). The caller should refuse the image when the result has
    ``failed`` or check errors ("Could not repair dirty image: Input/output error")."""
    if not img.writable:
        raise UsageError(f"{img.path}: repairing needs an image opened read-write")
    img.flush()
    try:
        return _single(img._f, img.head, str(img.path), "all")
    finally:
        _refresh(img)


def _drop_buffer(f: BinaryIO) -> None:
    """Make a buffered file forget what it read: a seek to the end always resets it."""
    f.seek(0, os.SEEK_END)
    f.seek(0)


def _refresh(img: Qcow2Image) -> None:
    """Make an open image forget what the repair may have changed on disk."""
    _drop_buffer(img._f)
    img._rc = None
    img._meta_gen += 1  # the writer's overlap check recomputes where the metadata is
    img._l2_cache.clear()
    img._l1 = img.head.raw.read_l1_table(img._f) if img.head.l1_size else array("Q")
    if img.head.corrupt:
        img.writable = False  # as qemu makes the node unusable once it marks it corrupt
