"""``qemu-img map`` for qcow2 images and their backing chains, as qemu 7.2 prints it.

qemu asks each layer of the chain for the block status of a guest range and walks down to the
backing image only where a layer has neither data nor zeros. This module models that per
layer and merges the results like ``qemu-img map`` does. Only metadata is read (L1, L2,
refcounts) plus the allocation of host files through SEEK_DATA / SEEK_HOLE; data clusters
never are, so encrypted images map without their key.

The qemu 7.2 behaviours reproduced here (qcow.md C.7 and what qemu-img 7.2 prints):

* a layer reports *data* (normal or compressed clusters), *zeros* (zero clusters) or neither
  (unallocated); ``present`` is "this layer answered with data or zeros";
* unallocated bytes go to the backing layer with ``depth`` + 1; with no backing layer, or at
  or past the end of the backing layer (its length rounded up to 512 bytes), they read as
  zeros of the upper layer with ``present`` false;
* ``offset`` is given for normal, zero-allocated and unallocated-but-allocated (extended L2)
  clusters, never for compressed clusters nor for anything in an encrypted image; the offset
  of an unallocated subcluster is lost when the backing layer answers instead;
* a raw layer reports the allocation of its file: data extents and holes (``zero``), both
  ``present`` with an offset, and zeros past the end of the file;
* when a qcow2 layer looks metadata-preallocated (at least max(n * 10 / 9, n + 2) clusters
  have a refcount, n being the clusters the file really occupies), normal clusters are refined
  by the allocation of the host file, and holes there report ``"zero": true, "data": true``;
* adjacent entries merge when all flags, the depth and the file are equal and the offsets
  (if any) are contiguous.
"""

from __future__ import annotations

import errno
import os
from array import array
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

from ..generated import qcow2 as q
from ..image import Extent, Image, ImageError, RawImage, UsageError
from .image import Qcow2Image
from .masks import (
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET,
    L2_ZERO,
    REFT_OFFSET,
    SUB_ALLOC,
    SUB_ZERO_SHIFT,
    SUBCLUSTERS,
)

__all__ = [
    "MapFormatError",
    "format_map_human",
    "format_map_json",
    "image_map",
    "qcow2_map",
]

SECTOR = 512

# the subcluster types of qemu (QCow2SubclusterType)
_NORMAL, _COMPRESSED, _ZERO_PLAIN, _ZERO_ALLOC, _UNALLOC_PLAIN, _UNALLOC_ALLOC = range(6)
_HAS_HOST = (_NORMAL, _ZERO_ALLOC, _UNALLOC_ALLOC)

HUMAN_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"


class MapFormatError(UsageError):
    """The human layout cannot show these extents (compressed or encrypted data).

    ``output`` is what ``qemu-img map`` prints on stdout before it fails.
    """

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True, slots=True)
class _Run:
    """What one layer says about guest bytes [start, end)."""

    start: int
    end: int
    data: bool
    zero: bool
    offset: int | None  # host offset of ``start`` when qemu reports one
    filename: str | None  # the file the offset points into


class _Layer(Protocol):
    length: int  # bdrv_getlength: what the upper layer compares offsets with
    backing: _Layer | None

    def status(self, start: int, end: int) -> list[_Run]:
        """Runs covering exactly [start, end), in order."""
        ...


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


# host files ----------------------------------------------------------------------------------


def _file_extents(fd: int, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(start, end, is_data) covering [start, end) of a file, as qemu's file driver sees them.

    Like qemu's find_allocation: SEEK_DATA then SEEK_HOLE; a trailing hole or anything past
    the end of the file is a hole; when the file system tells nothing, everything is data.
    """
    out: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            out.append((pos, end, exc.errno != errno.ENXIO))
            break
        if data > pos:
            stop = min(data, end)
            out.append((pos, stop, False))
            pos = stop
            continue
        if data < pos:
            out.append((pos, end, True))
            break
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            out.append((pos, end, exc.errno != errno.ENXIO))
            break
        if hole <= pos:
            out.append((pos, end, True))
            break
        stop = min(hole, end)
        out.append((pos, stop, True))
        pos = stop
    return out


def _append(runs: list[_Run], run: _Run) -> None:
    """Append, merging with the previous run of the same kind and contiguous offset."""
    if runs:
        last = runs[-1]
        if (
            last.end == run.start
            and last.data == run.data
            and last.zero == run.zero
            and last.filename == run.filename
            and (last.offset is None) == (run.offset is None)
            and (last.offset is None or last.offset + (last.end - last.start) == run.offset)
        ):
            runs[-1] = replace(last, end=run.end)
            return
    runs.append(run)


# layers ----------------------------------------------------------------------------------------


class _RawLayer:
    """A raw image: its file's data extents and holes, at the same offsets."""

    def __init__(self, img: RawImage) -> None:
        self.fd = img._f.fileno()
        self.filename = str(img.path)
        self.length = _round_up(img.size, SECTOR)
        self.backing: _Layer | None = None

    def status(self, start: int, end: int) -> list[_Run]:
        return [
            _Run(s, e, data, not data, s, self.filename)
            for s, e, data in _file_extents(self.fd, start, end)
        ]


class _OtherLayer:
    """Any other image: its own map, or all data (qemu's rule for drivers without status)."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.length = _round_up(img.size, SECTOR)
        self.backing: _Layer | None = None
        self._extents: list[Extent] | None = None

    def status(self, start: int, end: int) -> list[_Run]:
        if self._extents is None:
            try:
                self._extents = self.img.map()
            except NotImplementedError:
                self._extents = [Extent(0, self.img.size, 0, True, False, True)]
        runs: list[_Run] = []
        pos = start
        for e in self._extents:
            s, t = max(start, e.start), min(end, e.start + e.length)
            if s >= t:
                continue
            if s > pos:
                runs.append(_Run(pos, s, False, True, None, None))
            offset = None if e.offset is None else e.offset + (s - e.start)
            runs.append(_Run(s, t, e.data, e.zero or not e.data, offset, e.filename))
            pos = t
        if pos < end:
            runs.append(_Run(pos, end, False, True, None, None))
        return runs


class _Qcow2Layer:
    """A qcow2 image: L1 -> L2 entries -> qemu's subcluster types."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        head = img.head
        self.length = img.size
        self.backing = _layer(img.backing) if img.backing is not None else None
        self.encrypted = head.crypt_method != q.CryptMethod.NONE
        self.host: BinaryIO | None
        if head.has_data_file:
            self.host = img._data
            if img._data is not None:
                self.filename = str(img._data.name)
            else:  # opened with backing=False: the data file is named but not open
                name = os.fsdecode(head.data_file or b"")
                self.filename = name if name.startswith("/") else str(img.path.parent / name)
        else:
            self.host = img._f
            self.filename = str(img.path)
        self._preallocated: bool | None = None

    # the qcow2 types of one L2 table ------------------------------------------------------------

    def _fail(self, message: str) -> ImageError:
        return ImageError(f"{self.img.path}: {message}")

    def _host_of(self, entry: int, l1_index: int, index: int) -> int:
        host = entry & L2_OFFSET
        if host & (self.img.cluster_size - 1):
            raise self._fail(
                f"Cluster allocation offset {host:#x} unaligned (L1 index: {l1_index}, "
                f"L2 index: {index:#x})"
            )
        return host

    def _cluster_allocated(self, entry: int) -> bool:
        """qemu's NORMAL cluster type test (offset, or COPIED at offset 0 of a data file)."""
        return bool(entry & L2_OFFSET) or (self.img.head.has_data_file and bool(entry & L2_COPIED))

    def _standard(self, entry: int, l1_index: int, index: int) -> tuple[int, int]:
        """(type, host cluster offset) of a standard (64-bit) L2 entry."""
        head = self.img.head
        if entry & L2_COMPRESSED:
            if head.has_data_file:
                raise self._fail(
                    f"Compressed cluster entry found in image with external data file "
                    f"(L2 index: {index:#x})"
                )
            return _COMPRESSED, 0
        if entry & L2_ZERO:
            if head.version < 3:
                raise self._fail(
                    f"Zero cluster entry found in pre-v3 image (L1 index: {l1_index}, "
                    f"L2 index: {index:#x})"
                )
            if entry & L2_OFFSET:
                return _ZERO_ALLOC, self._host_of(entry, l1_index, index)
            return _ZERO_PLAIN, 0
        if self._cluster_allocated(entry):
            return _NORMAL, self._host_of(entry, l1_index, index)
        return _UNALLOC_PLAIN, 0

    def _types(
        self, entries: array[int], l1_index: int, pos: int, stop: int
    ) -> list[tuple[int, int, int, int]]:
        """(guest start, guest end, type, host offset of start) for [pos, stop) of one table."""
        cb = self.img.head.cluster_bits
        cs = self.img.cluster_size
        l2_mask = (1 << self.img.head.l2_bits) - 1
        extended = self.img.head.extended_l2
        sub = cs // SUBCLUSTERS
        out: list[tuple[int, int, int, int]] = []
        while pos < stop:
            index = (pos >> cb) & l2_mask
            cluster = pos - (pos & (cs - 1))
            cend = min(stop, cluster + cs)
            if not extended:
                entry = entries[index]
                kind, host = self._standard(entry, l1_index, index)
                out.append((pos, cend, kind, host + (pos - cluster)))
                pos = cend
                continue
            entry, bitmap = entries[2 * index], entries[2 * index + 1]
            if entry & L2_COMPRESSED:
                self._standard(entry, l1_index, index)  # the data file check
                out.append((pos, cend, _COMPRESSED, 0))
                pos = cend
                continue
            alloc = bitmap & SUB_ALLOC
            zero = bitmap >> SUB_ZERO_SHIFT
            allocated = self._cluster_allocated(entry)
            if (allocated and alloc & zero) or (not allocated and alloc):
                raise self._fail(
                    f"Invalid cluster entry found (L1 index: {l1_index}, L2 index: {index:#x})"
                )
            host = self._host_of(entry, l1_index, index) if allocated else 0
            while pos < cend:
                s = (pos - cluster) // sub
                send = min(cend, cluster + (s + 1) * sub)
                if zero >> s & 1:
                    kind = _ZERO_ALLOC if allocated else _ZERO_PLAIN
                elif alloc >> s & 1:
                    kind = _NORMAL
                else:
                    kind = _UNALLOC_ALLOC if allocated else _UNALLOC_PLAIN
                out.append((pos, send, kind, host + (pos - cluster)))
                pos = send
        return out

    # block status ---------------------------------------------------------------------------------

    def status(self, start: int, end: int) -> list[_Run]:
        runs: list[_Run] = []
        shift = self.img.head.l1_shift
        pos = start
        while pos < end:
            l1_index = pos >> shift
            stop = min(end, (l1_index + 1) << shift)
            table = self.img._l2(l1_index)
            if table is None:
                _append(runs, _Run(pos, stop, False, False, None, None))
            else:
                for s, e, kind, host in self._types(table, l1_index, pos, stop):
                    self._add(runs, s, e, kind, host)
            pos = stop
        return runs

    def _add(self, runs: list[_Run], s: int, e: int, kind: int, host: int) -> None:
        with_offset = kind in _HAS_HOST and not self.encrypted
        offset = host if with_offset else None
        filename = self.filename if with_offset else None
        zero = kind in (_ZERO_PLAIN, _ZERO_ALLOC)
        data = kind in (_NORMAL, _COMPRESSED)
        if kind == _NORMAL and with_offset and self.host is not None and self._recurse():
            # metadata preallocation: holes of the host file read as zeros (still "data")
            fd = self.host.fileno()
            for hs, he, is_data in _file_extents(fd, host, host + (e - s)):
                g = s + (hs - host)
                _append(runs, _Run(g, g + (he - hs), True, not is_data, hs, filename))
            return
        _append(runs, _Run(s, e, data, zero, offset, filename))

    def _recurse(self) -> bool:
        if self._preallocated is None:
            try:
                self._preallocated = _metadata_preallocated(self.img)
            except (OSError, ImageError, ValueError):
                self._preallocated = False  # qemu ignores errors of this check
        return self._preallocated


def _metadata_preallocated(img: Qcow2Image) -> bool:
    """qemu's qcow2_detect_metadata_preallocation: clusters with a refcount >= the threshold.

    The threshold is max(n * 10 / 9, n + 2) for n = the clusters the file really occupies.
    """
    head = img.head
    f = img._f
    st = os.fstat(f.fileno())
    cs = img.cluster_size
    real_clusters = st.st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-_round_up(st.st_size, SECTOR) // cs)
    per_block = 1 << (head.cluster_bits + 3 - head.refcount_order)
    table = head.raw.read_refcount_table(f)
    field = f"refcounts_{1 << head.refcount_order}"
    count = 0
    for index in range(-(-end_cluster // per_block)):
        if count >= threshold or index >= len(table):
            break
        offset = table[index] & REFT_OFFSET
        if offset == 0:
            continue
        if offset & (cs - 1):
            raise ImageError(f"{img.path}: Refblock offset {offset:#x} unaligned")
        block = q.RefcountBlock.parse(
            img._host_read(f, cs, offset),
            cluster_bits=head.cluster_bits,
            refcount_order=head.refcount_order,
        )
        counts = getattr(block, field)
        n = min(per_block, end_cluster - index * per_block)
        count += n - counts[:n].count(0)
    return count >= threshold


def _layer(img: Image) -> _Layer:
    from ..qcow.image import QcowImage

    if isinstance(img, Qcow2Image):
        return _Qcow2Layer(img)
    if isinstance(img, QcowImage):
        from ..qcow.mapping import QcowLayer

        return QcowLayer(img)
    if isinstance(img, RawImage):
        return _RawLayer(img)
    return _OtherLayer(img)


# the chain and qemu-img's merging ---------------------------------------------------------------


def _mergeable(a: Extent, b: Extent) -> bool:
    """qemu-img's entry_mergeable (7.2)."""
    return (
        a.length > 0
        and a.zero == b.zero
        and a.data == b.data
        and a.depth == b.depth
        and a.present == b.present
        and a.filename == b.filename
        and (a.offset is None) == (b.offset is None)
        and (a.offset is None or b.offset == a.offset + a.length)
    )


def _emit(out: list[Extent], e: Extent) -> None:
    if out and _mergeable(out[-1], e):
        out[-1] = replace(out[-1], length=out[-1].length + e.length)
    else:
        out.append(e)


def _resolve(layer: _Layer, start: int, end: int, depth: int, out: list[Extent]) -> None:
    for run in layer.status(start, end):
        if run.data or run.zero:
            _emit(
                out,
                Extent(
                    run.start,
                    run.end - run.start,
                    depth,
                    True,
                    run.zero,
                    run.data,
                    run.offset,
                    filename=run.filename if run.offset is not None else None,
                ),
            )
            continue
        pos = run.start
        below = layer.backing
        if below is not None and pos < below.length:
            stop = min(run.end, below.length)
            _resolve(below, pos, stop, depth + 1, out)
            pos = stop
        if pos < run.end:
            offset = None if run.offset is None else run.offset + (pos - run.start)
            filename = run.filename if offset is not None else None
            _emit(
                out,
                Extent(pos, run.end - pos, depth, False, True, False, offset, filename=filename),
            )


def image_map(img: Image) -> list[Extent]:
    """The map of any image qemu 7.2 would print; an empty image has no extents."""
    layer = _layer(img)
    out: list[Extent] = []
    length = img.size if isinstance(img, Qcow2Image) else layer.length
    if length:
        _resolve(layer, 0, length, 0, out)
    return out


def qcow2_map(img: Qcow2Image) -> list[Extent]:
    """``qemu-img map --output=json`` of a qcow2 image, as qemu 7.2 computes it.

    Reads only metadata (L1, L2, refcount blocks) and the allocation of host files. An empty
    image gives [] (qemu prints one bogus zero-length entry for it; see format_map_json).
    """
    return image_map(img)


# text layouts ---------------------------------------------------------------------------------


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _json_entry(e: Extent) -> str:
    text = (
        f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
        f'"present": {_bool(e.present)}, "zero": {_bool(e.zero)}, "data": {_bool(e.data)}'
    )
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    return text + "}"


def format_map_json(extents: list[Extent]) -> str:
    """The exact text of ``qemu-img map --output=json`` (7.2), final newline included.

    For no extents qemu 7.2 prints its initial, empty entry; so does this.
    """
    items = extents or [Extent(0, 0, 0, False, False, False)]
    return "[" + ",\n".join(_json_entry(e) for e in items) + "]\n"


def _hex(value: int) -> str:
    """C's %#x: 0 has no prefix."""
    return f"{value:#x}" if value else "0"


def format_map_human(extents: list[Extent]) -> str:
    """The exact text of ``qemu-img map`` (human, 7.2): the data ranges and their files.

    Raises MapFormatError, as qemu fails, when data has no host offset (compressed or
    encrypted clusters); its ``output`` is what qemu printed before failing.
    """
    lines = [HUMAN_HEADER]
    loose = False  # the previous entry was neither data nor nonzero: qemu coalesces it
    for i, e in enumerate(extents):
        data, zero = e.data, e.zero
        if i and loose and (not data or zero):
            data, zero = False, True
        if data and e.offset is None:
            raise MapFormatError(
                "File contains external, encrypted or compressed clusters.", "".join(lines)
            )
        if data and not zero:
            lines.append(
                f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
                f"{e.filename or ''}\n"
            )
        loose = not data or zero
    return "".join(lines)
