"""``diskspec map --picture``: every host cluster of an image coloured by what it holds.

qcow2 roles come from walking the image the way ``qemu-img check`` does (header, L1 and L2
tables of the image and its snapshots, the refcount structures, snapshot table, bitmaps, LUKS
header, data); a cluster nobody references is *leaked* when its refcount is nonzero and *free*
otherwise. FVD roles come from the header's regions and the lookup table. The picture also
shows the guest clusters in guest order, coloured by where they lie in the file, and the
fragmentation count. qcow v1 has no refcounts: its unreferenced clusters are free. All
counts are in the SVG as ``data-*`` attributes.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import BinaryIO

from ..fvd.consts import CHUNK_INDEX, EMPTY
from ..generated import fvd as g_fvd
from ..generated import qcow as q1
from ..generated import qcow2 as q
from ..generator.docs import ROLE_COLORS
from ..qcow2.masks import (
    BME_OFFSET,
    L1_OFFSET,
    L2_COMPRESSED,
    L2_OFFSET,
    L2_ZERO,
    SUB_ALLOC,
    SUB_ZERO_SHIFT,
)
from ..qcow2.refcount import Refcounts
from . import ExplainError, detect

__all__ = ["ROLES", "ClusterMap", "cluster_map", "render_png", "render_svg"]

# legend order; the first role given to a cluster wins
ROLES = ("header", "l1", "l2", "refcount_table", "refcount_block", "snapshot", "bitmap",
         "encryption", "table", "journal", "data", "compressed", "leaked", "free")
LABELS = {
    "header": "header", "l1": "L1 table", "l2": "L2 table", "refcount_table": "refcount table",
    "refcount_block": "refcount block", "snapshot": "snapshot table", "bitmap": "bitmaps",
    "encryption": "LUKS header", "table": "lookup table", "journal": "journal",
    "data": "data", "compressed": "compressed data", "leaked": "leaked", "free": "free",
}

# FVD regions start on these boundaries and are multiples of them (fvd.md 3.1)
FVD_UNIT = int(g_fvd.LayoutUnit.REGION_ALIGN)


@dataclass(slots=True)
class ClusterMap:
    fmt: str
    unit: int  # bytes per cell (the cluster size for qcow2)
    roles: list[str]  # one per host cluster
    guest: list[int]  # host cluster of each allocated guest cluster, in guest order
    stats: dict[str, int] = field(default_factory=dict)  # guest-side counts, as qemu-img check

    def counts(self) -> dict[str, int]:
        found = Counter(self.roles)
        return {role: found[role] for role in ROLES if found[role]}


def _span(offset: int, length: int, unit: int) -> range:
    return range(offset // unit, (offset + max(length, 1) - 1) // unit + 1)


class _Roles:
    def __init__(self, n: int) -> None:
        self.roles: list[str | None] = [None] * n

    def mark(self, clusters: range | list[int], role: str) -> None:
        for k in clusters:
            if 0 <= k < len(self.roles) and self.roles[k] is None:
                self.roles[k] = role


def _qcow2(f: BinaryIO, size: int) -> ClusterMap:
    f.seek(0)
    image = q.Qcow2.read(f)
    h = image.header
    cs = h.cluster_size
    n = -(-size // cs)
    roles = _Roles(n)
    roles.mark([0], "header")
    extended = h.has_extended_l2
    external = bool(int(h.incompatible_features or 0) & q.IncompatibleFeature.EXTERNAL_DATA_FILE)
    entry_size = q.L1Entry.SIZE
    snapshots = image.read_snapshot_table(f) if h.num_snapshots else []
    l1s = [(image.read_l1_table(f), h.ofs_l1_table, True)]
    l1s += [(s.read_l1_table(f), s.ofs_l1_table, False) for s in snapshots]
    guest: list[int] = []
    stats = {"allocated": 0, "compressed": 0, "fragmented": 0, "guest_data": 0}
    data: list[int] = []
    compressed: list[int] = []
    for l1, offset, active in l1s:
        roles.mark(_span(offset, len(l1) * entry_size, cs), "l1")
        for e in l1:
            l2_offset = e & L1_OFFSET
            if not l2_offset:
                continue
            next_offset = 0  # qemu counts fragmentation within each L2 table
            roles.mark([l2_offset // cs], "l2")
            l2 = q.L2Table.parse(os.pread(f.fileno(), cs, l2_offset).ljust(cs, b"\0"),
                                 cluster_bits=h.cluster_bits, extended=extended)
            words = l2.entries_extended if extended else l2.entries
            assert words is not None
            step = 2 if extended else 1
            for i in range(0, len(words), step):
                w = words[i]
                if w & L2_COMPRESSED:
                    d = q.CompressedDescriptor.parse(
                        w.to_bytes(q.CompressedDescriptor.SIZE, "big"), cluster_bits=h.cluster_bits
                    )
                    compressed.extend(_span(d.ofs_compressed, d.len_compressed_max, cs))
                    if active:
                        stats["allocated"] += 1
                        stats["compressed"] += 1
                        stats["fragmented"] += 1
                        guest.append(d.ofs_compressed // cs)
                    continue
                host = w & L2_OFFSET
                if not host:
                    continue
                if not external:
                    data.append(host // cs)
                if active:
                    stats["allocated"] += 1
                    if next_offset and host != next_offset:
                        stats["fragmented"] += 1
                    next_offset = host + cs
                    guest.append(host // cs)
                    if extended:
                        sub = words[i + 1]
                        alloc = sub & SUB_ALLOC
                        reads_data = alloc & ~(sub >> SUB_ZERO_SHIFT)
                        stats["guest_data"] += 1 if reads_data else 0
                    elif not w & L2_ZERO:
                        stats["guest_data"] += 1
    table = image.read_refcount_table(f)
    roles.mark(_span(h.ofs_refcount_table, len(table) * q.RefcountTableEntry.SIZE, cs),
               "refcount_table")
    refcounts = Refcounts(f, h.cluster_bits, h.refcount_order_effective, table,
                          h.ofs_refcount_table)
    roles.mark([refcounts.block_offset(i) // cs for i in range(len(table))
                if refcounts.block_offset(i)], "refcount_block")
    if snapshots:
        at = h.ofs_snapshot_table
        length = sum(len(s.build()) for s in snapshots)
        roles.mark(_span(at, length, cs), "snapshot")
    for ext in image.extension_area.extensions:
        if isinstance(ext.data, q.ExtBitmaps):
            roles.mark(_span(ext.data.ofs_bitmap_directory, ext.data.len_bitmap_directory, cs),
                       "bitmap")
            for entry in ext.data.read_bitmap_directory(f).entries:
                bt = entry.read_bitmap_table(f)
                roles.mark(_span(entry.ofs_bitmap_table, len(bt) * q.BitmapTableEntry.SIZE, cs),
                           "bitmap")
                roles.mark([t // cs for t in (e & BME_OFFSET for e in bt) if t], "bitmap")
        elif isinstance(ext.data, q.ExtFullDiskEncryption):
            fde = ext.data
            roles.mark(_span(fde.ofs_encryption_header, fde.len_encryption_header, cs),
                       "encryption")
    roles.mark(data, "data")
    roles.mark(compressed, "compressed")
    final = []
    for k, role in enumerate(roles.roles):
        if role is None:
            role = "leaked" if refcounts.get(k) else "free"
        final.append(role)
    stats["leaks"] = final.count("leaked")
    return ClusterMap("qcow2", cs, final, guest, stats)


def _fvd(f: BinaryIO, size: int) -> ClusterMap:
    f.seek(0)
    image = g_fvd.Fvd.read(f)
    h = image.header
    table = image.read_table(f)
    unit = FVD_UNIT
    while -(-size // unit) > 1 << 16:
        unit *= 2
    n = -(-size // unit)
    roles = _Roles(n)
    region = max(h.len_metadata, g_fvd.Header.SIZE)
    roles.mark(_span(0, g_fvd.Header.SIZE, unit), "header")
    if h.len_bitmap:
        roles.mark(_span(h.ofs_bitmap, h.len_bitmap, unit), "bitmap")
    if table is not None:
        roles.mark(_span(h.ofs_table, len(table) * g_fvd.TableEntry.SIZE, unit), "table")
    if h.len_journal:
        roles.mark(_span(h.ofs_journal, h.len_journal, unit), "journal")
    roles.mark(_span(0, region, unit), "header")
    guest: list[int] = []
    if table is not None:
        for e in table:
            if e != EMPTY:
                host = h.len_metadata + (e & CHUNK_INDEX) * h.chunk_size
                roles.mark(_span(host, h.chunk_size, unit), "data")
                guest.append(host // unit)
    elif size > region:
        roles.mark(range(region // unit, n), "data")
        guest = list(range(region // unit, n))
    final = [r or "free" for r in roles.roles]
    return ClusterMap("fvd", unit, final, guest, {"allocated": len(guest)})


def _qcow(f: BinaryIO, size: int) -> ClusterMap:
    """qcow v1: no refcounts, so a cluster no table reaches is free (qemu never reuses it)."""
    f.seek(0)
    image = q1.Qcow.read(f)
    h = image.header
    cs = h.cluster_size
    roles = _Roles(-(-size // cs))
    roles.mark(_span(0, q1.Header.SIZE, cs), "header")
    if h.ofs_backing_file_name:
        roles.mark(_span(h.ofs_backing_file_name, h.len_backing_file_name, cs), "header")
    l1 = image.read_l1_table(f)
    roles.mark(_span(h.ofs_l1_table, len(l1) * q1.L1Entry.SIZE, cs), "l1")
    guest: list[int] = []
    data: list[int] = []
    compressed: list[int] = []
    stats = {"allocated": 0, "compressed": 0, "guest_data": 0}
    for e in l1:
        if not e.ofs_l2_table:
            continue
        roles.mark(_span(e.ofs_l2_table, h.len_l2_table, cs), "l2")
        raw = os.pread(f.fileno(), h.len_l2_table, e.ofs_l2_table).ljust(h.len_l2_table, b"\0")
        for w in q1.L2Table.parse(raw, l2_bits=h.l2_bits).entries:
            if w & q1.L2Entry.COMPRESSED_MASK:
                d = q1.CompressedDescriptor.parse(
                    w.to_bytes(q1.CompressedDescriptor.SIZE, "big"), cluster_bits=h.cluster_bits
                )
                compressed.extend(_span(d.ofs_compressed, d.len_compressed, cs))
                stats["compressed"] += 1
                guest.append(d.ofs_compressed // cs)
            elif w & q1.L2Entry.OFS_CLUSTER_MASK:
                host = w & q1.L2Entry.OFS_CLUSTER_MASK
                data.append(host // cs)
                stats["guest_data"] += 1
                guest.append(host // cs)
            else:
                continue
            stats["allocated"] += 1
    roles.mark(data, "data")
    roles.mark(compressed, "compressed")
    return ClusterMap("qcow", cs, [r or "free" for r in roles.roles], guest, stats)


def cluster_map(path: str | Path) -> ClusterMap:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        fmt = detect(os.pread(f.fileno(), 16, 0))
        walk = {"qcow2": _qcow2, "qcow": _qcow, "fvd": _fvd}[fmt]
        try:
            return walk(f, size)
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ExplainError(f"{path}: cannot map this {fmt} image ({exc})") from exc


# --------------------------------------------------------------------------------------------
# Drawing: one layout, written as SVG or rasterised into a PNG


CELL = 10
COLS = 64
SMALL = 1024  # images of at most this many clusters get bigger cells, 32 a row
MAX_CELLS = 8192


@dataclass(slots=True)
class _Rect:
    x: int
    y: int
    w: int
    h: int
    color: str
    title: str = ""
    attrs: str = ""


def _group(items: list[str], limit: int) -> tuple[int, list[str]]:
    """Cells of ``per`` clusters each, the most telling role of a group standing for it."""
    per = max(1, -(-len(items) // limit))
    if per == 1:
        return 1, items
    rank = {role: i for i, role in enumerate(ROLES)}
    return per, [min(items[i : i + per], key=lambda r: rank[r]) for i in range(0, len(items), per)]


def _hue(k: int, top: int) -> str:
    """Host position as a colour: blue at the start of the file, red at its end."""
    t = k / max(top, 1)
    r, g, b = int(40 + 200 * t), int(120 + 60 * (1 - abs(2 * t - 1))), int(230 - 200 * t)
    return f"#{r:02x}{g:02x}{b:02x}"


def _layout(m: ClusterMap, title: str) -> tuple[int, int, list[_Rect], list[tuple[int, int, str]]]:
    cell, cols = (18, 32) if len(m.roles) <= SMALL else (CELL, COLS)
    rects: list[_Rect] = []
    texts: list[tuple[int, int, str]] = [(10, 18, title)]
    per, cells = _group(m.roles, MAX_CELLS)
    y0 = 30
    grouped = f" ({per} per cell)" if per > 1 else ""
    texts.append((10, y0 + 10, f"host clusters of {m.unit} bytes, file order, "
                                f"{cols * per} per row{grouped}"))
    y0 += 18
    for i, role in enumerate(cells):
        rects.append(_Rect(10 + (i % cols) * cell, y0 + (i // cols) * cell, cell - 1, cell - 1,
                           ROLE_COLORS[role], f"cluster {i * per}: {LABELS[role]}"))
    y = y0 + -(-len(cells) // cols) * cell + 16
    # guest order strip: where each allocated guest cluster lies in the file
    gper, _ = _group([""] * len(m.guest), MAX_CELLS // 2) if m.guest else (1, [])
    strip = m.guest[::gper]
    top = max(len(m.roles) - 1, 1)
    frag = m.stats.get("fragmented")
    texts.append((10, y + 10, f"allocated guest clusters in guest order ({len(m.guest)}), "
                              "coloured by host position (blue: file start, red: end)"
                 + (f"; {frag} not host-contiguous with the previous one" if frag is not None
                    else "")))
    y += 18
    for i, host in enumerate(strip):
        rects.append(_Rect(10 + (i % cols) * cell, y + (i // cols) * cell, cell - 1, cell - 1,
                           _hue(host, top), f"guest cluster {i * gper} -> host cluster {host}"))
    y += -(-len(strip) // cols) * cell + 16
    counts = m.counts()
    for j, role in enumerate(counts):
        ly = y + j * 16
        rects.append(_Rect(10, ly, 12, 12, ROLE_COLORS[role], LABELS[role],
                           f' data-role="{role}" data-count="{counts[role]}"'))
        texts.append((28, ly + 10, f"{LABELS[role]}: {counts[role]}"))
    height = y + len(counts) * 16 + 10
    width = 20 + cols * cell + 200
    return width, height, rects, texts


def render_svg(m: ClusterMap, title: str) -> str:
    width, height, rects, texts = _layout(m, title)
    stats = "".join(f' data-{k.replace("_", "-")}="{v}"' for k, v in sorted(m.stats.items()))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" '
           f'data-format="{m.fmt}" data-unit="{m.unit}" data-clusters="{len(m.roles)}"'
           f' data-guest-clusters="{len(m.guest)}"{stats}>',
           f"<title>{escape(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    for r in rects:
        tip = f"<title>{escape(r.title)}</title>" if r.title else ""
        out.append(f'<rect x="{r.x}" y="{r.y}" width="{r.w}" height="{r.h}" fill="{r.color}"'
                   f'{r.attrs}>{tip}</rect>')
    for x, y, text in texts:
        out.append(f'<text x="{x}" y="{y}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_png(m: ClusterMap, title: str) -> bytes:
    """The same layout as pixels (no text: the legend counts go into tEXt chunks)."""
    from .png import encode_png

    width, height, rects, _ = _layout(m, title)
    pixels = bytearray(b"\xff" * (width * height * 3))
    for r in rects:
        rgb = bytes.fromhex(r.color[1:])
        line = rgb * r.w
        for yy in range(r.y, min(r.y + r.h, height)):
            at = (yy * width + r.x) * 3
            pixels[at : at + len(line)] = line
    text = {"Title": title, **{f"count:{k}": str(v) for k, v in m.counts().items()},
            **{f"stat:{k}": str(v) for k, v in sorted(m.stats.items())}}
    return encode_png(width, height, bytes(pixels), text)
