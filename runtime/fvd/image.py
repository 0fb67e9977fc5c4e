"""FVD v1 images: open (with cross-field validation), read, write, journal, close.

Reads are planned as qcow2's are, in (kind, guest, host, length) runs: the bitmap decides
base or FVD per block of the base range, blocks past it always read from FVD, a compact
image maps chunks through its table (EMPTY reads as zeros). Writes copy the partial head and
tail of a base-resident block from the base, allocate chunks in order, and queue journal
records; flush makes them durable in the order of fvd.md's boxed rule 4 (data, fsync,
journal sectors, fsync). Close writes bitmap and table, fsyncs, then sets clean_shutdown.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import StructError
from ..generated import fvd as fv
from ..image import Extent, Image, ImageError, UsageError
from ..qcow2.image import _BACKING, _DATA, _ZERO, _add
from ..structbase import unpack_words, words_to_bytes
from .consts import (
    CHUNK_INDEX,
    EMPTY,
    ENTRY_BYTES,
    HEADER_REGION,
    MAGIC,
    REGION_ALIGN,
    SECTOR,
    VERSION,
)
from .create import bitmap_bytes, round_up
from .journal import bitmap_record, pack_sectors, replay, set_bits, table_records
from .storage import FileStorage, ImageStorage, Storage

if TYPE_CHECKING:
    from ..qcow2.check import CheckResult

__all__ = ["FvdImage", "open_fvd", "text_field"]

_ANY_SET = re.compile(b"[^\x00]")
_ANY_CLEAR = re.compile(b"[^\xff]")
#: pending journal records after which a write flushes by itself (bounds memory)
MAX_PENDING_RECORDS = 4096
COPY_STEP = 1 << 20


def text_field(raw: bytes) -> str:
    """A NUL-padded char array as text."""
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _resolve(name: str, image: Path) -> Path:
    """fvd.md 6.8: relative names resolve against the image's folder, then the current one."""
    path = Path(name)
    if path.is_absolute():
        return path
    beside = image.parent / path
    return beside if beside.exists() or not path.exists() else path


def _table_capacity(h: fv.Header) -> int:
    """Bytes of the table region: up to the next region, at least what the size needs."""
    need = round_up(ENTRY_BYTES * h.num_table_entries, REGION_ALIGN)
    ends = [h.len_metadata]
    for ofs, length in ((h.ofs_bitmap, h.len_bitmap), (h.ofs_journal, h.len_journal)):
        if length > 0 and ofs >= h.ofs_table:
            ends.append(ofs)
    return max(need, min(ends) - h.ofs_table)


def load_header(p: Path, f: BinaryIO) -> fv.Header:
    head = os.pread(f.fileno(), fv.Header.SIZE, 0)
    if len(head) < 8 or head[:4] != MAGIC:
        raise ImageError(f"{p}: not an FVD v1 image (bad magic {head[:4].hex()})")
    version = int.from_bytes(head[fv.Header.VERSION_AT : fv.Header.VERSION_AT + 4], "little")
    if version != VERSION:
        raise ImageError(f"{p}: not an FVD v1 image (version {version})")
    try:
        return fv.Header.parse(head)
    except StructError as exc:
        raise ImageError(f"{p}: {exc}") from exc


def validate(p: Path, h: fv.Header, file_size: int) -> None:
    """The cross-field rules of fvd.md 6.11 that reading depends on; one-line errors."""

    def bad(field: str, at: int, problem: str) -> ImageError:
        return ImageError(f"{p}: FvdHeader.{field} at offset {at:#x}: {problem}")

    H = fv.Header
    if h.len_metadata > file_size:
        raise bad("len_metadata", H.LEN_METADATA_AT,
                  f"{h.len_metadata:#x} is past the end of the file ({file_size:#x})")
    regions: list[tuple[str, int, int, int]] = []
    has_bitmap = h.len_bitmap > 0 and h.all_data_in_fvd_img == 0
    if h.base_img[:1] != b"\0" and h.all_data_in_fvd_img == 0:
        if h.block_size <= 0:
            raise bad("block_size", H.BLOCK_SIZE_AT, "must be positive with a base image")
        if h.len_base_img > h.len_virtual_disk or h.len_base_img % SECTOR:
            raise bad("len_base_img", H.LEN_BASE_IMG_AT,
                      f"{h.len_base_img:#x} is not a sector multiple within the virtual size")
        need = bitmap_bytes(h.len_base_img, h.block_size)
        if h.len_bitmap < need:
            raise bad("len_bitmap", H.LEN_BITMAP_AT,
                      f"{h.len_bitmap:#x} bytes cannot hold {need:#x} bytes of bits")
    if has_bitmap:
        regions.append(("ofs_bitmap", H.OFS_BITMAP_AT, h.ofs_bitmap, h.len_bitmap))
    if h.compact_image:
        if h.chunk_size <= 0 or h.chunk_size % REGION_ALIGN:
            raise bad("chunk_size", H.CHUNK_SIZE_AT,
                      f"{h.chunk_size:#x} is not a positive multiple of {REGION_ALIGN:#x}")
        if h.num_table_entries > CHUNK_INDEX:
            raise bad("len_virtual_disk", H.LEN_VIRTUAL_DISK_AT, "needs too many chunks")
        regions.append(("ofs_table", H.OFS_TABLE_AT, h.ofs_table,
                        round_up(ENTRY_BYTES * h.num_table_entries, REGION_ALIGN)))
    if h.len_journal > 0:
        regions.append(("ofs_journal", H.OFS_JOURNAL_AT, h.ofs_journal, h.len_journal))
    for name, at, ofs, length in regions:
        if ofs % REGION_ALIGN or ofs < HEADER_REGION:
            raise bad(name, at, f"{ofs:#x} is not a {REGION_ALIGN:#x}-aligned offset past "
                      "the header region")
        if ofs + length > h.len_metadata:
            raise bad(name, at, f"region {ofs:#x}+{length:#x} ends past the metadata "
                      f"({h.len_metadata:#x})")
    ordered = sorted(regions, key=lambda r: r[2])
    for (_, _, o1, l1), (name, at, o2, _) in pairwise(ordered):
        if o1 + l1 > o2:
            raise bad(name, at, f"region at {o2:#x} overlaps the one at {o1:#x}+{l1:#x}")


def open_fvd(
    p: Path, f: BinaryIO, mode: str, backing: bool, seen: tuple[tuple[int, int], ...]
) -> FvdImage:
    """Open an FVD image (called by diskspec.open); the base is opened read-only through
    open_image with base_img_fmt, raw when the field is empty (never probed)."""
    from ..opener import FORMATS, open_image

    h = load_header(p, f)
    validate(p, h, os.fstat(f.fileno()).st_size)
    base: Image | None = None
    data: Storage | None = None
    try:
        name = text_field(h.base_img)
        if backing and name and h.all_data_in_fvd_img == 0:
            base = open_image(_resolve(name, p), "r", text_field(h.base_img_fmt) or "raw",
                              _seen=seen)
        dname = text_field(h.data_file)
        if dname and backing:  # backing=False: the image alone, no file it names
            dfmt = text_field(h.data_file_fmt) or "raw"
            if dfmt not in FORMATS:
                raise ImageError(f"{p}: data file: Unknown driver '{dfmt}'")
            if dfmt == "raw":
                kind = "r+b" if mode == "r+" else "rb"
                data = FileStorage(cast(BinaryIO, _resolve(dname, p).open(kind, buffering=0)),
                                   owned=True)
            else:  # honoured as the header says (fvd.md rule 6), never probed
                data = ImageStorage(open_image(_resolve(dname, p), mode, dfmt, _seen=seen))
        return FvdImage(p, f, mode == "r+", h, base, data, base_name=name, data_name=dname)
    except BaseException:
        if base is not None:
            base.close()
        if data is not None:
            data.close()
        raise


def _bit(bitmap: bytearray, block: int) -> bool:
    return bool(bitmap[block >> 3] >> (block & 7) & 1)


def _run_end(bitmap: bytearray, block: int, last: int) -> int:
    """The first block after ``block`` (at most ``last``) whose bit differs."""
    value = _bit(bitmap, block)
    b = block + 1
    while b < last and b & 7:
        if _bit(bitmap, b) != value:
            return b
        b += 1
    if b >= last:
        return last
    found = (_ANY_CLEAR if value else _ANY_SET).search(bitmap, b >> 3, -(-last // 8))
    b = found.start() * 8 if found else last
    while b < last and _bit(bitmap, b) == value:
        b += 1
    return min(b, last)


class FvdImage(Image):
    """An FVD v1 image opened with mode "r" or "r+"."""

    fmt = "fvd"

    def __init__(
        self,
        path: Path,
        f: BinaryIO,
        writable: bool,
        head: fv.Header,
        base: Image | None,
        data: Storage | None,
        base_name: str = "",
        data_name: str = "",
    ) -> None:
        super().__init__(path, f, writable)
        self.h = head
        self.backing = base
        self.backing_format = text_field(head.base_img_fmt) or ("raw" if base_name else None)
        self.base_name = base_name
        self.data_name = data_name
        self._data = data
        self._own = FileStorage(f, owned=False)
        self.size = head.len_virtual_disk
        #: test hook: called with "data", "journal" or "recycle" after those steps of a flush
        self.crash_hook: Callable[[str], None] | None = None
        self._cor = False
        self._load_metadata()
        self._session_dirty = False  # clean_shutdown was set to 0 by this open
        self._unsynced = False
        self._pending: list[bytes] = []
        self._fresh_chunks: set[int] = set()
        self._next_sector = 0
        # journal sectors this session may have written; stale ones from earlier sessions are
        # harmless (bits only set, chunks never moved), so recycle and close zero only these,
        # and the few changes that are not monotonic zero all (make_empty, shrink, repair)
        self._journal_high = 0
        self._storage_ready = False
        self.replayed = 0
        if head.clean_shutdown == 0 and head.len_journal > 0:
            journal = self._host_read(self._f, head.len_journal, head.ofs_journal)
            self.replayed = replay(
                str(path), journal, head.ofs_journal,
                self.bitmap if self.base_size else None, self.block_size, self.base_size,
                self.table, self.size,
            )
            self._scan_table()
            if writable:  # persist the replay, then the image is clean again
                self._persist_metadata(zero_all=True)
                self._set_clean(1)
        #: bits on disk or journaled; the fresh ``bitmap`` adds copy-on-read's soft bits
        self.stale = bytearray(self.bitmap)

    # metadata ---------------------------------------------------------------------------------

    def _load_metadata(self) -> None:
        h = self.h
        self.block_size = h.block_size
        has_bitmap = h.len_bitmap > 0 and h.all_data_in_fvd_img == 0
        self.base_size = h.len_base_img if has_bitmap and self.base_name else 0
        self.bitmap = bytearray(
            self._host_read(self._f, h.len_bitmap, h.ofs_bitmap) if has_bitmap else b""
        )
        self.compact = bool(h.compact_image)
        self.chunk_size = h.chunk_size if self.compact else 0
        self.data_start = 0 if self.data_name else h.len_metadata
        self.table: array[int] | None = None
        if self.compact:
            n = h.num_table_entries
            raw = self._host_read(self._f, ENTRY_BYTES * n, h.ofs_table)
            self.table = unpack_words(raw, 0, n, fv.TableEntry.WORD, False)
        self._scan_table()

    def _scan_table(self) -> None:
        """Find the highest chunk in use, and the entries that cannot be read (not an index,
        past the storage: ``bad_entries``) or written (a chunk of another entry too:
        ``shared_entries``), each with its message."""
        self.bad_entries: dict[int, str] = {}
        self.shared_entries: dict[int, str] = {}
        self.used_chunks = 0
        if self.table is None:
            return
        storage = self._storage_len() if self._data is not None or not self.data_name else None
        seen: dict[int, int] = {}
        top = -1
        for v, entry in enumerate(self.table):
            if entry == EMPTY:
                continue
            if entry & ~CHUNK_INDEX or entry == CHUNK_INDEX:
                self.bad_entries[v] = f"table entry {v} ({entry:#x}) is not a chunk index"
                continue
            if storage is not None and self.data_start + entry * self.chunk_size >= storage:
                self.bad_entries[v] = (
                    f"table entry {v} (chunk {entry}) points past the end of the data "
                    f"storage ({storage:#x})"
                )
            elif entry in seen:
                self.shared_entries[v] = (
                    f"table entry {v} (chunk {entry}) is also used by entry {seen[entry]}"
                )
            else:
                seen[entry] = v
            top = max(top, entry)
        self.used_chunks = top + 1

    def _storage(self) -> Storage:
        if self._data is not None:
            return self._data
        if self.data_name:
            raise ImageError(
                f"{self.path}: the data file {self.data_name} is not open (backing=False)"
            )
        return self._own

    def _storage_len(self) -> int:
        return self._storage().length()

    def _table_bytes(self) -> bytes:
        assert self.table is not None
        return words_to_bytes(self.table, False)

    def bit(self, block: int) -> bool:
        """The fresh bit of a block: 1 when its data is in the image."""
        return _bit(self.bitmap, block)

    def _bit_run_end(self, block: int, last: int) -> int:
        return _run_end(self.bitmap, block, last)

    # reading ----------------------------------------------------------------------------------

    def _plan(self, offset: int, n: int) -> list[tuple[int, int, int, int]]:
        """Where guest bytes [offset, offset + n) come from: (kind, guest, host, length) runs
        with qcow2's kinds; _BACKING reads the base, _DATA host offsets are in the data
        storage (the data file when there is one)."""
        runs: list[tuple[int, int, int, int]] = []
        pos, end = offset, offset + n
        bs = self.block_size
        while pos < end:
            if pos < self.base_size:
                block = pos // bs
                last = -(-self.base_size // bs)
                stop = min(end, self.base_size, self._bit_run_end(block, last) * bs)
                if self.bit(block):
                    self._plan_fvd(runs, pos, stop)
                else:
                    _add(runs, _BACKING, pos, 0, stop - pos)
                pos = stop
            else:
                self._plan_fvd(runs, pos, end)
                pos = end
        return runs

    def _plan_fvd(self, runs: list[tuple[int, int, int, int]], pos: int, stop: int) -> None:
        if self.table is None:
            _add(runs, _DATA, pos, self.data_start + pos, stop - pos)
            return
        cs = self.chunk_size
        while pos < stop:
            v = pos // cs
            cend = min(stop, (v + 1) * cs)
            entry = self.table[v]
            if entry == EMPTY:
                _add(runs, _ZERO, pos, 0, cend - pos)
            else:
                problem = self.bad_entries.get(v)
                if problem is not None:
                    raise ImageError(f"{self.path}: {problem}")
                _add(runs, _DATA, pos, self.data_start + entry * cs + pos % cs, cend - pos)
            pos = cend

    def _base_read(self, n: int, offset: int) -> bytes:
        base = self.backing
        if base is None or offset >= base.size or n <= 0:
            return bytes(max(n, 0))
        got = base._read(min(n, base.size - offset), offset)
        return got + bytes(n - len(got))

    def _read(self, n: int, offset: int) -> bytes:
        runs = self._plan(offset, n)
        storage = self._storage()
        if len(runs) == 1 and runs[0][0] == _DATA:
            return storage.read(n, runs[0][2])
        out = bytearray(n)
        view = memoryview(out)
        for kind, guest, host, length in runs:
            at = guest - offset
            if kind == _DATA:
                storage.read_into(view[at : at + length], host)
            elif kind == _BACKING:
                out[at : at + length] = self._base_read(length, guest)
                if self._cor:
                    self._copy_blocks(guest, guest + length)
        return bytes(out)

    # copy-on-read and prefetch --------------------------------------------------------------------

    @property
    def copy_on_read(self) -> bool:
        """Copy-on-read: reads of base blocks also store them in the image (mode "r+" only).

        Off by default, as in every qemu tool; the header's copy_on_read flag is shown by
        info() but only this switch turns the policy on."""
        return self._cor

    @copy_on_read.setter
    def copy_on_read(self, value: bool) -> None:
        if value and not self.writable:
            raise UsageError(f"{self.path}: copy-on-read needs an image open read-write")
        self._cor = bool(value) and self.backing is not None and self.base_size > 0

    def _copy_blocks(self, lo: int, hi: int) -> int:
        """Store the base-resident blocks overlapping [lo, hi) in the image (a soft write:
        the bits are set in memory only and reach the disk at recycle or close). Returns the
        bytes copied."""
        bs = self.block_size
        lo = max(0, lo - lo % bs)
        hi = min(self.base_size, round_up(hi, bs))
        copied = 0
        pos = lo
        while pos < hi:
            block = pos // bs
            last = -(-hi // bs)
            run_end = min(hi, self._bit_run_end(block, last) * bs)
            if not self.bit(block):
                for at in range(pos, run_end, COPY_STEP):
                    n = min(COPY_STEP, run_end - at)
                    data = self._base_read(n, at)
                    self._begin_write()
                    if data.count(0) != n or self._fvd_nonzero(at, n):
                        self._store(data, at)
                    set_bits(self.bitmap, at // bs, -(-(at + n) // bs))
                    copied += n
            pos = run_end
        return copied

    def _fvd_nonzero(self, at: int, n: int) -> bool:
        """Whether FVD storage already holds nonzero bytes for [at, at+n) (then zeros of the
        base must be written, not skipped)."""
        out = bytearray(n)
        view = memoryview(out)
        storage = self._storage()
        for kind, guest, host, length in self._plan_fvd_only(at, n):
            if kind == _DATA:
                storage.read_into(view[guest - at : guest - at + length], host)
        return out.count(0) != n

    def _plan_fvd_only(self, at: int, n: int) -> list[tuple[int, int, int, int]]:
        runs: list[tuple[int, int, int, int]] = []
        self._plan_fvd(runs, at, at + n)
        return runs

    def prefetch(self, progress: Callable[[int], None] | None = None) -> int:
        """Pull every base-resident block into the image, then set all_data_in_fvd_img so the
        base is never needed again (fvd.md 4.4). Returns the bytes copied."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        if self.h.all_data_in_fvd_img:
            return 0
        if self.base_size and self.backing is None:
            raise UsageError(f"{self.path}: the base image is not open")
        copied = 0
        for at in range(0, self.base_size, 64 * COPY_STEP):
            n = min(64 * COPY_STEP, self.base_size - at)
            got = self._copy_blocks(at, at + n)
            copied += got
            if progress is not None:
                progress(n)
        self._begin_write()
        self.flush()
        if self.bitmap:
            self.bitmap[:] = b"\xff" * len(self.bitmap)
        self._persist_metadata()
        self.h.all_data_in_fvd_img = 1
        self.h.copy_on_read = 0
        self._write_header()
        os.fsync(self._f.fileno())
        self._cor = False
        self.base_size = 0
        self.bitmap = bytearray()
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        return copied

    # writing --------------------------------------------------------------------------------

    def _write_header(self) -> None:
        os.pwrite(self._f.fileno(), self.h.build(), 0)

    def _set_clean(self, value: int) -> None:
        self.h.clean_shutdown = value
        self._write_header()
        os.fsync(self._f.fileno())

    def _begin_write(self) -> None:
        """The first write of a session: mark the image dirty (durably), ready the storage."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        if not self._session_dirty:
            self._set_clean(0)
            self._session_dirty = True
        if not self._storage_ready:
            storage = self._storage()
            length = storage.length()
            if self.table is None:
                if length < self.data_start + self.size:
                    storage.truncate(self.data_start + self.size)  # sparse (init_data_region)
            else:
                # chunks past the highest persisted one may hold data of a write lost in a
                # crash: drop them, so a reused chunk reads as zeros where it is not written
                end = self.data_start + self.used_chunks * self.chunk_size
                if length > end and not self.bad_entries and not self.shared_entries:
                    storage.truncate(end)
            self._storage_ready = True

    def _alloc(self) -> int:
        k = self.used_chunks
        if k >= CHUNK_INDEX:
            raise ImageError(f"{self.path}: no chunk index left")
        self.used_chunks += 1
        need = self.data_start + self.used_chunks * self.chunk_size
        if self._storage_len() < need:
            grow = max(self.h.storage_grow_unit, self.chunk_size)
            self._storage().truncate(need - self.chunk_size + grow)
        return k

    def _store(self, data: bytes, at: int) -> tuple[int, int] | None:
        """Write guest bytes into FVD storage (allocating chunks); returns the chunk range
        touched in a compact image, if any chunk in it is not yet on disk."""
        storage = self._storage()
        self._unsynced = True
        if self.table is None:
            storage.write(data, self.data_start + at)
            return None
        cs = self.chunk_size
        view = memoryview(data)
        pos, end = at, at + len(data)
        fresh = False
        while pos < end:
            v = pos // cs
            cend = min(end, (v + 1) * cs)
            problem = self.bad_entries.get(v) or self.shared_entries.get(v)
            if problem is not None:
                raise ImageError(f"{self.path}: {problem}; run check -r all")
            if self.table[v] == EMPTY:
                self.table[v] = self._alloc()
                self._fresh_chunks.add(v)
            fresh = fresh or v in self._fresh_chunks
            host = self.data_start + self.table[v] * cs + pos % cs
            storage.write(view[pos - at : cend - at], host)
            pos = cend
        return (at // cs, (end - 1) // cs + 1) if fresh else None

    def _write(self, data: bytes, offset: int) -> None:
        if not data:
            return
        self._begin_write()
        end = offset + len(data)
        lo, hi = offset, end
        bs = self.block_size
        if offset < self.base_size and not self.bit(offset // bs):
            lo = offset - offset % bs
        if end - 1 < self.base_size and not self.bit((end - 1) // bs):
            hi = max(end, min(self.base_size, round_up(end, bs)))
        if lo < offset or hi > end:
            data = self._base_read(offset - lo, lo) + data + self._base_read(hi - end, end)
        chunks = self._store(data, lo)
        records: list[bytes] = []
        if chunks is not None and self.table is not None:
            c0, c1 = chunks
            records += table_records(c0, self.table[c0:c1])
            self._fresh_chunks.difference_update(range(c0, c1))
        if lo < self.base_size:
            top = min(hi, self.base_size)
            first, last = lo // bs, -(-top // bs)
            # journaled when the stale bitmap (on disk + journal) lacks a bit, even if a
            # copy-on-read already set the fresh one
            set_bits(self.bitmap, first, last)
            if not (_bit(self.stale, first) and _run_end(self.stale, first, last) == last):
                set_bits(self.stale, first, last)
                s0 = first * bs // SECTOR
                s1 = min(last * bs, self.base_size) // SECTOR
                records += bitmap_record(s0, s1 - s0)
        if records and (self.h.len_journal > 0 or self.bitmap or self.table is not None):
            self._pending += records
            if len(self._pending) > MAX_PENDING_RECORDS:
                self.flush()

    def write_zeroes(self, offset: int, n: int, unmap: bool = False) -> None:
        """Zeros: FVD has no zero flag, so they are written (a compact image skips chunks
        that are EMPTY and past or copied from the base: they read as zeros already)."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._check_range(n, offset)
        for at in range(offset, offset + n, COPY_STEP):
            step = min(COPY_STEP, offset + n - at)
            if self.table is not None and not self._base_resident(at, step):
                runs = self._plan_fvd_only(at, step)
                if all(kind == _ZERO for kind, *_ in runs):
                    continue
            self._write(bytes(step), at)

    def _base_resident(self, at: int, n: int) -> bool:
        return any(kind == _BACKING for kind, *_ in self._plan(at, n))

    def discard(self, offset: int, n: int) -> None:
        """Discarded ranges read as zeros afterwards (FVD cannot free chunks)."""
        self.write_zeroes(offset, n, unmap=True)

    def flush(self) -> None:
        """Make every write so far durable: data, fsync, journal sectors, fsync (or, when the
        journal is full, bitmap and table in place, fsync, and the journal reused)."""
        if not self.writable or self.closed or not self._session_dirty:
            return
        if self._unsynced:
            self._storage().sync()
            self._unsynced = False
            self._hook("data")
        if not self._pending:
            return
        sectors = pack_sectors(self._pending)
        total = self.h.len_journal // SECTOR
        if self._next_sector + len(sectors) > total:
            self._persist_metadata()
            self._hook("recycle")
            if len(sectors) > total:
                return
        os.pwrite(self._f.fileno(), b"".join(sectors),
                  self.h.ofs_journal + self._next_sector * SECTOR)
        self._next_sector += len(sectors)
        self._journal_high = max(self._journal_high, self._next_sector)
        self._pending.clear()
        os.fsync(self._f.fileno())
        self._hook("journal")

    def _hook(self, point: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(point)

    def _persist_metadata(self, zero_all: bool = False) -> None:
        """Journal recycle: data synced, bitmap and table in place, fsync, the journal zeroed
        (all of it with ``zero_all``, after a change that is not monotonic) and reused."""
        fd = self._f.fileno()
        if self._unsynced:
            self._storage().sync()
            self._unsynced = False
        if self.bitmap and self.h.all_data_in_fvd_img == 0:
            os.pwrite(fd, bytes(self.bitmap), self.h.ofs_bitmap)
        self.stale = bytearray(self.bitmap)
        if self.table is not None:
            os.pwrite(fd, self._table_bytes(), self.h.ofs_table)
        os.fsync(fd)
        high = self.h.len_journal // SECTOR if zero_all else self._journal_high
        if high and self.h.len_journal:
            zeros = bytes(min(high * SECTOR, COPY_STEP))
            for at in range(0, high * SECTOR, len(zeros)):
                os.pwrite(fd, zeros[: min(len(zeros), high * SECTOR - at)],
                          self.h.ofs_journal + at)
            os.fsync(fd)
        self._journal_high = 0
        self._next_sector = 0
        self._pending.clear()
        self._fresh_chunks.clear()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.writable and self._session_dirty:
                self.flush()
                self._persist_metadata()
                self._set_clean(1)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the files without flushing anything, as a killed process would leave the
        image (close() ends with this; tests call it alone to simulate a crash)."""
        self.closed = True
        self._f.close()
        if self._data is not None:
            self._data.close()
        if self.backing is not None:
            self.backing.close()

    # metadata operations --------------------------------------------------------------------------

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Name another base image (``rebase``): base_img and base_img_fmt are rewritten; the
        bitmap and base_img_size stay (what the new base lacks reads as zeros)."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        from .create import MAX_FMT, MAX_NAME, _name

        self.flush()
        if name:
            self.h.base_img = _name(name, "backing_file", MAX_NAME)
            self.h.base_img_fmt = _name(fmt or "raw", "backing_fmt", MAX_FMT)
        else:
            self.h.base_img = bytes(MAX_NAME + 1)
            self.h.base_img_fmt = bytes(MAX_FMT + 1)
        self._write_header()
        os.fsync(self._f.fileno())
        self.base_name = name or ""
        self.backing_format = (fmt or "raw") if name else None

    def make_empty(self) -> None:
        """Drop the image's own data (``commit`` without -d): bitmap cleared, table EMPTY,
        the data storage truncated; everything reads from the base again."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._begin_write()
        self.flush()
        if self.bitmap:
            self.bitmap[:] = bytes(len(self.bitmap))
        if self.table is not None:
            self.table = array(fv.TableEntry.WORD, [EMPTY]) * len(self.table)
        self._persist_metadata(zero_all=True)
        self._storage().truncate(self.data_start)
        if self.table is None:
            self._storage().truncate(self.data_start + self.size)
        self._scan_table()

    def resize(self, new_size: int, shrink: bool = False) -> None:
        """fvd.md rule 7: grow non-compact images, compact ones while the table has room;
        shrinking needs ``shrink`` and clamps base_img_size and the table."""
        from .resize import resize

        resize(self, new_size, shrink)

    def snapshots(self) -> list[Any]:
        """FVD has no internal snapshots."""
        return []

    def create_snapshot(self, name: str) -> str:
        raise UsageError(f"Could not create snapshot '{name}': Operation not supported")

    def check(self, repair: str | None = None) -> CheckResult:
        """``qemu-img check [-r leaks|all]`` for FVD (see diskspec.fvd.check)."""
        from .check import check_image

        return check_image(self, repair)

    def map(self) -> list[Extent]:
        from .info import fvd_map

        return fvd_map(self)

    def info(self) -> dict[str, Any]:
        from .info import fvd_info

        return fvd_info(self)

    def info_chain(self) -> list[dict[str, Any]]:
        from .info import fvd_info_chain

        return fvd_info_chain(self)
