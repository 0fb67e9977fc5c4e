"""``qemu-img measure``: the file size a new image needs, computed as qemu 7.2 computes it.

For qcow2 the estimate is the metadata of a fully allocated image (header, L2 and L1 tables,
and refcount structures found as a fixed point, since they count themselves) plus the data the
source really holds, rounded to clusters; with encrypt.format=luks, plus the LUKS header and
key material in whole clusters (qemu checks the LUKS options and the key secret, and ignores
every other encrypt.format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .image import Image, UsageError
from .qcow2.create import ENCRYPT_OPTIONS, Qcow2Options

__all__ = ["Measure", "measure"]

L2_ENTRY = 8  # bytes per standard entry; extended entries are twice that
L1_ENTRY = 8
REFTABLE_ENTRY = 8


@dataclass(frozen=True, slots=True)
class Measure:
    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        out["required"] = self.required
        out["fully-allocated"] = self.fully_allocated
        return out

    def human(self) -> str:
        text = f"required size: {self.required}\nfully allocated size: {self.fully_allocated}\n"
        if self.bitmaps is not None:
            text += f"bitmaps size: {self.bitmaps}\n"
        return text


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount blocks and table clusters for ``clusters`` clusters, themselves included."""
    per_table_cluster = cluster_size // REFTABLE_ENTRY
    per_block = cluster_size * 8 >> refcount_order
    blocks = table = 0
    total = -1
    while True:
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        if clusters + blocks + table == total:
            return (blocks + table) * cluster_size
        total = clusters + blocks + table


def prealloc_size(size: int, cluster_size: int, refcount_order: int, extended: bool) -> int:
    """The file size of a fully allocated qcow2 image of ``size`` bytes."""
    l2_entry = 2 * L2_ENTRY if extended else L2_ENTRY
    aligned = _round_up(size, cluster_size)
    meta = cluster_size
    l2_entries = _round_up(aligned // cluster_size, cluster_size // l2_entry)
    meta += l2_entries * l2_entry
    l1_entries = _round_up(l2_entries * l2_entry // cluster_size, cluster_size // L1_ENTRY)
    meta += l1_entries * L1_ENTRY
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def _data_bytes(img: Image, cluster_size: int) -> int:
    """Bytes of data the source holds, each data run widened to whole target clusters."""
    required = 0
    pos = 0
    for extent in img.map():
        end = extent.start + extent.length
        if end <= pos:
            continue
        if extent.zero or not extent.data:
            pos = end
            continue
        start = max(extent.start, pos)
        stop = _round_up(end, cluster_size)
        required += start % cluster_size + (stop - start)
        pos = stop
    return required


def _bitmaps_size(img: Image, cluster_size: int) -> int:
    """Space for the persistent bitmaps ``convert --bitmaps`` would copy."""
    from .generated import qcow2 as q
    from .qcow2.image import Qcow2Image

    if not isinstance(img, Qcow2Image) or img.head.bitmaps is None:
        return 0
    if not img.head.autoclear & q.AutoclearFeature.BITMAPS:
        return 0
    directory = img.head.bitmaps.read_bitmap_directory(img._f)
    total = 0
    names = 0
    for entry in directory.entries:
        if int(entry.flags) & q.BitmapFlag.IN_USE:
            continue
        bits = -(-img.size >> entry.granularity_bits)
        data = _round_up(-(-bits // 8), cluster_size)
        table = _round_up(8 * (data // cluster_size), cluster_size)
        total += data + table
        names += _round_up(24 + len(entry.name) + len(entry.extra_data), 8)
    return total + _round_up(names, cluster_size) if directory.entries else 0


def _has_bitmap_support(img: Image | None) -> bool:
    """qemu reports bitmaps only for sources that can hold persistent ones (qcow2 v3)."""
    from .qcow2.image import Qcow2Image

    return isinstance(img, Qcow2Image) and img.head.version >= 3


def measure(fmt: str, options: dict[str, Any], size: int | None, source: Image | None) -> Measure:
    """``qemu-img measure -O fmt [-o options] (--size N | source)``."""
    if (size is None) == (source is None):
        raise UsageError("Either --size N or one filename must be specified.")
    virtual = size if size is not None else source.size  # type: ignore[union-attr]
    if fmt == "raw":
        return Measure(virtual, virtual)  # a raw file is as large as the disk
    if fmt == "qcow":
        raise UsageError("Block driver 'qcow' does not support size measurement")
    if fmt == "fvd":
        return _measure_fvd(virtual, options, source)
    if fmt != "qcow2":
        raise UsageError(f"Block driver '{fmt}' does not support size measurement")
    opts = dict(options)
    if opts.get("encrypt.format") != "luks":
        for name in (*ENCRYPT_OPTIONS, "secrets", "passphrase"):
            opts.pop(name, None)
    try:
        o = Qcow2Options.from_qemu(virtual, opts)
    except UsageError as exc:
        if "too large" in str(exc):
            raise UsageError("The image size is too large (try using a larger cluster size)") \
                from exc
        raise
    cs = o.cluster_size
    full = prealloc_size(virtual, cs, o.refcount_order, o.extended_l2) + o.luks_clusters * cs
    if o.preallocation in ("falloc", "full"):
        data = _round_up(virtual, cs)
    elif source is None:
        data = 0
    else:
        data = _data_bytes(source, cs)
    bitmaps = (
        _bitmaps_size(source, cs)
        if source is not None and _has_bitmap_support(source)
        else None
    )
    return Measure(full - _round_up(virtual, cs) + data, full, bitmaps)


def _measure_fvd(virtual: int, options: dict[str, Any], source: Image | None) -> Measure:
    """FVD (which qemu-img never knew): the metadata regions an image made with these options
    has (laid out by the same create code, in a scratch folder), plus the data: the whole disk
    for a plain image, whose data region is addressed like a raw file, and for a compact image
    the chunks the source holds data in (all of them when fully allocated)."""
    import os
    import tempfile
    from pathlib import Path

    from .fvd.create import create_fvd
    from .generated import fvd as fv

    opts = {k: v for k, v in options.items() if k not in ("data_file", "data_file_fmt")}
    if opts.get("backing_file"):
        opts["backing_file"] = os.path.abspath(str(opts["backing_file"]))
    with tempfile.TemporaryDirectory(prefix="diskspec-measure-") as tmp:
        scratch = Path(tmp) / "measure.fvd"
        create_fvd(scratch, virtual, **opts)
        with scratch.open("rb") as f:
            head = fv.Header.read(f)
    metadata = head.len_metadata
    disk = _round_up(virtual, 512)
    if not head.compact_image:
        return Measure(metadata + disk, metadata + disk)
    chunk = head.chunk_size
    full = metadata + _round_up(disk, chunk)
    if source is None:
        return Measure(metadata, full)
    chunks: set[int] = set()
    for extent in source.map():
        if extent.data and not extent.zero and extent.length:
            first = extent.start // chunk
            chunks.update(range(first, (extent.start + extent.length - 1) // chunk + 1))
    return Measure(metadata + len(chunks) * chunk, full)
