"""``diskspec explain`` for qcow2: header, extensions, tables, snapshots, bitmaps, translation."""

from __future__ import annotations

from array import array
from typing import Any, BinaryIO

from ..generated import qcow2 as q
from ..qcow2.masks import (
    BME_OFFSET,
    L1_COPIED,
    L1_OFFSET,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET,
    L2_ZERO,
    REFT_OFFSET,
)
from .tree import Item, Read, Walker, human_size, show

__all__ = ["STRUCTURES", "explain_qcow2", "translate_qcow2"]

STRUCTURES = (
    "header", "extensions", "backing_file", "l1", "l2", "refcount_table", "refcount_blocks",
    "snapshots", "bitmaps", "encryption",
)
SHOWN_TABLES = 16  # L2 tables and refcount blocks detailed one by one
SHOWN_ENTRIES = 4  # entries of one table shown decoded



def ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 7]`` -> ``"0-2, 7"`` (at most eight runs, then a count)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [f"{a}-{b}" if a != b else str(a) for a, b in runs[:8]]
    if len(runs) > 8:
        text.append(f"… ({len(runs) - 8} more runs)")
    return ", ".join(text) or "none"


class _Qcow2:
    def __init__(self, f: BinaryIO, read: Read) -> None:
        self.f = f
        self.read = read
        f.seek(0)
        self.image = q.Qcow2.read(f)
        self.h = self.image.header
        self.cs = self.h.cluster_size
        self.walker = Walker("qcow2", q, read)
        self.feature_names: dict[tuple[int, int], str] = {}
        for ext in self.image.extension_area.extensions:
            if isinstance(ext.data, q.ExtFeatureNameTable):
                for e in ext.data.entries:
                    name = e.name.rstrip(b"\0").decode("utf-8", "replace")
                    self.feature_names[(int(e.feature_type), e.bit)] = name
        self._notes()

    # conclusions ---------------------------------------------------------------------------

    def _notes(self) -> None:
        h, cs = self.h, self.cs
        n_l2 = h.num_l2_entries
        covers = n_l2 * cs

        # names: the image's feature name table first, then the spec's labels
        labels: dict[q.FeatureType, dict[Any, str]] = {
            q.FeatureType.INCOMPATIBLE: dict(q.INCOMPATIBLE_FEATURE_LABELS),
            q.FeatureType.COMPATIBLE: dict(q.COMPATIBLE_FEATURE_LABELS),
            q.FeatureType.AUTOCLEAR: dict(q.AUTOCLEAR_FEATURE_LABELS),
        }

        def features(kind: q.FeatureType) -> Any:
            by_bit = {int(flag).bit_length() - 1: label for flag, label in labels[kind].items()}

            def note(_obj: Any, value: Any) -> str:
                bits = [b for b in range(64) if int(value) >> b & 1]
                named = [self.feature_names.get((int(kind), b)) or by_bit.get(b, f"unknown bit {b}")
                         for b in bits]
                return "set: " + ", ".join(named) if named else "none set"
            return note

        notes = {
            ("header", "version"): lambda _o, v: (
                "compat=1.1 (version 3)" if v == 3 else "compat=0.10 (version 2)"
            ),
            ("header", "cluster_bits"): lambda _o, v: (
                f"{human_size(cs)} clusters, L2 holds {n_l2} entries, one L2 table covers "
                f"{human_size(covers)}"
            ),
            ("header", "len_virtual_disk"): lambda _o, v: (
                f"{human_size(v)} guest disk = {-(-v // cs)} clusters, needs "
                f"{-(-v // covers)} L1 entries"
            ),
            ("header", "num_l1_entries"): lambda _o, v: (
                f"{v} L1 entries map {human_size(v * covers)} of guest space"
            ),
            ("header", "ofs_l1_table"): lambda _o, v: f"cluster {v // cs}",
            ("header", "ofs_refcount_table"): lambda _o, v: f"cluster {v // cs}",
            ("header", "ofs_snapshot_table"): lambda _o, v: (
                f"cluster {v // cs}" if v else "no snapshot table"
            ),
            ("header", "num_refcount_table_clusters"): lambda _o, v: (
                f"{v * cs // q.RefcountTableEntry.SIZE} refcount table entries, each a block of "
                f"{h.num_refcount_block_entries} refcounts"
            ),
            ("header", "refcount_order"): lambda _o, v: (
                f"{h.refcount_bits}-bit refcounts, one refcount block covers "
                f"{human_size(h.num_refcount_block_entries * cs)} of the file"
            ),
            ("header", "len_header"): lambda _o, v: f"header extensions start at {v}",
            ("header", "incompatible_features"): features(q.FeatureType.INCOMPATIBLE),
            ("header", "compatible_features"): features(q.FeatureType.COMPATIBLE),
            ("header", "autoclear_features"): features(q.FeatureType.AUTOCLEAR),
            ("header_extension", "len_data"): lambda o, v: (
                f"{v} bytes of data + {(8 - v % 8) % 8} of padding"
            ),
            ("snapshot_entry", "ofs_l1_table"): lambda o, v: f"cluster {v // cs}",
            ("bitmap_directory_entry", "granularity_bits"): lambda o, v: (
                f"one bit covers {human_size(1 << v)}"
            ),
        }
        self.walker.notes.update(notes)

    # sections ------------------------------------------------------------------------------

    def sections(self) -> list[Item]:
        root = self.walker.structure("qcow2", self.image, 0)
        header = root.find("header")
        area = root.find("extension_area")
        assert header is not None and area is not None
        area.name = "extensions"
        header.note = (
            f"qcow2 version {self.h.version}, {human_size(self.h.len_virtual_disk)} guest, "
            f"{human_size(self.cs)} clusters"
        )
        out = [header, area]
        out += self.backing()
        out += [self.l1(), *self.l2(), self.refcount_table(), *self.refcount_blocks()]
        out += self.snapshots() + self.bitmaps() + self.encryption()
        return out

    def backing(self) -> list[Item]:
        name = self.image.read_backing_file_name(self.f)
        if name is None:
            return []
        return [Item("backing_file", self.h.ofs_backing_file_name, len(name), name, "bytes",
                     "Name of the backing file.", note=f"backing file {show(name)}",
                     spec_path="/instances/backing_file_name",
                     attr="diskspec.generated.qcow2.Qcow2.read_backing_file_name",
                     raw=self.read(self.h.ofs_backing_file_name, min(len(name), 16)))]

    def table_item(self, name: str, what: str, entries: array[int], offset: int,
                   entry_type: str, used_mask: int) -> Item:
        used = [i for i, e in enumerate(entries) if e & used_mask]
        size = self.walker.word_size(entry_type)
        item = Item(name, offset, len(entries) * size, entries,
                    f"qcow2.{self.walker.class_of(entry_type)} array",
                    raw=self.read(offset, 16), spec_path="/instances/" + what,
                    attr=f"diskspec.generated.qcow2.Qcow2.read_{what}")
        item.note = f"{len(entries)} entries, {len(used)} used: {ranges(used)}"
        for i in used[:SHOWN_ENTRIES]:
            item.children.append(
                self.walker.word(entry_type, entries[i], offset + size * i, f"{name}[{i}]")
            )
        return item

    def l1(self) -> Item:
        entries = self.image.read_l1_table(self.f)
        item = self.table_item("l1", "l1_table", entries, self.h.ofs_l1_table, "l1_entry",
                               L1_OFFSET)
        item.doc = "The active L1 table, one entry per L2 table."
        copied = sum(1 for e in entries if e & L1_COPIED)
        item.note += f"; {copied} with COPIED (refcount 1)"
        span = self.h.num_l2_entries * self.cs
        for child in item.children:
            index = int(child.name[3:-1])
            child.note = (
                f"-> L2 table at {child.value & L1_OFFSET:#x} maps guest "
                f"{index * span:#x}..{(index + 1) * span - 1:#x}"
            )
        return item

    def l2(self) -> list[Item]:
        out: list[Item] = []
        extended = self.h.has_extended_l2
        for i, e in enumerate(self.image.read_l1_table(self.f)):
            offset = e & L1_OFFSET
            if not offset:
                continue
            if len(out) == SHOWN_TABLES:
                break
            table = q.L2Table.parse(self.read(offset, self.cs), cluster_bits=self.h.cluster_bits,
                                    extended=extended)
            words = table.entries_extended if extended else table.entries
            assert words is not None
            step = 2 if extended else 1
            width = self.walker.word_size("l2_entry_extended" if extended else "l2_entry")
            entries = words[::step]
            normal = sum(1 for w in entries if w & L2_OFFSET and not w & L2_COMPRESSED)
            compressed = sum(1 for w in entries if w & L2_COMPRESSED)
            zero = sum(1 for w in entries if w & L2_ZERO and not w & L2_COMPRESSED)
            item = Item(f"l2[{i}]", offset, self.cs, None, "qcow2.L2Table",
                        "One L2 table, one cluster long.", raw=self.read(offset, 16),
                        spec_path="/types/l2_table", attr="diskspec.generated.qcow2.L2Table")
            item.note = (
                f"for L1 index {i}: {normal} data clusters, {compressed} compressed, "
                f"{zero} zero, {len(entries) - normal - compressed} unallocated"
            )
            used = [k for k, w in enumerate(entries) if w & (L2_OFFSET | L2_COMPRESSED)]
            kind = "l2_entry_extended" if extended else "l2_entry"
            for k in used[:SHOWN_ENTRIES]:
                child = self.walker.word("l2_entry", entries[k], offset + width * k,
                                         f"l2[{i}][{k}]")
                child.note = self.l2_note(entries[k], kind)
                item.children.append(child)
            out.append(item)
        return out

    def l2_note(self, entry: int, kind: str) -> str:
        if entry & L2_COMPRESSED:
            d = q.CompressedDescriptor.parse(entry.to_bytes(q.CompressedDescriptor.SIZE, "big"),
                                             cluster_bits=self.h.cluster_bits)
            return (f"compressed: {d.len_compressed_max} bytes at most from "
                    f"{d.ofs_compressed:#x}")
        flags = [n for n, m in (("copied", L2_COPIED), ("zero", L2_ZERO)) if entry & m]
        extra = f" ({', '.join(flags)})" if flags else ""
        return f"data at host {entry & L2_OFFSET:#x}{extra}" + (
            "; subclusters in the second word" if kind == "l2_entry_extended" else ""
        )

    def refcount_table(self) -> Item:
        entries = self.image.read_refcount_table(self.f)
        item = self.table_item("refcount_table", "refcount_table", entries,
                               self.h.ofs_refcount_table, "refcount_table_entry", REFT_OFFSET)
        item.doc = "The refcount table, one entry per refcount block."
        per = self.h.num_refcount_block_entries
        for child in item.children:
            index = int(child.name[15:-1])
            child.note = (
                f"-> refcount block at {child.value & REFT_OFFSET:#x} for clusters "
                f"{index * per}..{(index + 1) * per - 1}"
            )
        return item

    def block(self, offset: int) -> array[int]:
        block = q.RefcountBlock.parse(
            self.read(offset, self.cs).ljust(self.cs, b"\0"),
            cluster_bits=self.h.cluster_bits, refcount_order=self.h.refcount_order_effective,
        )
        counts = getattr(block, f"refcounts_{self.h.refcount_bits}")
        assert isinstance(counts, array)
        return counts

    def refcount_blocks(self) -> list[Item]:
        out: list[Item] = []
        for i, e in enumerate(self.image.read_refcount_table(self.f)):
            offset = e & REFT_OFFSET
            if not offset:
                continue
            if len(out) == SHOWN_TABLES:
                break
            counts = self.block(offset)
            used = [k for k, c in enumerate(counts) if c]
            item = Item(f"refcount_block[{i}]", offset, self.cs, None, "qcow2.RefcountBlock",
                        "One refcount block.", raw=self.read(offset, 16),
                        spec_path="/types/refcount_block",
                        attr="diskspec.generated.qcow2.RefcountBlock")
            base = i * len(counts)
            item.note = (
                f"{len(used)} clusters in use (max refcount {max(counts, default=0)}): "
                f"{ranges([base + k for k in used])}"
            )
            out.append(item)
        return out

    def refcount(self, cluster: int) -> int:
        per = self.h.num_refcount_block_entries
        table = self.image.read_refcount_table(self.f)
        index = cluster // per
        if index >= len(table) or not table[index] & REFT_OFFSET:
            return 0
        return int(self.block(table[index] & REFT_OFFSET)[cluster % per])

    def snapshots(self) -> list[Item]:
        if not self.h.num_snapshots:
            return []
        at = self.h.ofs_snapshot_table
        item = Item("snapshots", at, 0, None, "qcow2.SnapshotEntry list",
                    "The internal snapshots, each entry 8-aligned.",
                    spec_path="/instances/snapshot_table",
                    attr="diskspec.generated.qcow2.Qcow2.read_snapshot_table")
        for i, s in enumerate(self.image.read_snapshot_table(self.f)):
            sub = self.walker.structure("snapshot_entry", s, at, f"snapshot[{i}]")
            l1 = s.read_l1_table(self.f)
            sub.note = (
                f"id {s.id_str.decode(errors='replace')!r}, name "
                f"{s.name.decode(errors='replace')!r}: L1 of {len(l1)} entries, "
                f"{sum(1 for e in l1 if e & L1_OFFSET)} used"
            )
            item.children.append(sub)
            at += sub.size
        item.size = at - item.offset
        item.raw = self.read(item.offset, 16)
        item.note = f"{len(item.children)} snapshots"
        return [item]

    def _extension(self, kind: type) -> Any:
        return next((e.data for e in self.image.extension_area.extensions
                     if isinstance(e.data, kind)), None)

    def bitmaps(self) -> list[Item]:
        ext = self._extension(q.ExtBitmaps)
        if ext is None:
            return []
        directory = ext.read_bitmap_directory(self.f)
        at = ext.ofs_bitmap_directory
        item = Item("bitmaps", at, ext.len_bitmap_directory, directory, "qcow2.BitmapDirectory",
                    "The persistent bitmap directory.", spec_path="/types/bitmap_directory",
                    attr="diskspec.generated.qcow2.BitmapDirectory", raw=self.read(at, 16))
        for i, e in enumerate(directory.entries):
            sub = self.walker.structure("bitmap_directory_entry", e, at, f"bitmap[{i}]")
            table = e.read_bitmap_table(self.f)
            used = sum(1 for t in table if t & BME_OFFSET)
            sub.note = (
                f"{e.name.decode(errors='replace')!r}: table of {len(table)} entries at "
                f"{e.ofs_bitmap_table:#x}, {used} data clusters"
            )
            item.children.append(sub)
            at += sub.size
        item.note = f"{len(directory.entries)} bitmaps"
        return [item]

    def encryption(self) -> list[Item]:
        ext = self._extension(q.ExtFullDiskEncryption)
        if ext is None:
            return []
        luks = ext.read_encryption_header(self.f)
        item = self.walker.structure("luks_header", luks, ext.ofs_encryption_header,
                                     "encryption")
        active = sum(1 for s in luks.key_slots if s.active == q.LuksKeySlotState.ACTIVE)
        cipher = show(luks.cipher_name).strip("'")
        mode = show(luks.cipher_mode).strip("'")
        item.note = f"LUKS1 {cipher}-{mode}, {active} active key slots"
        return [item]

    # translation ---------------------------------------------------------------------------

    def translate(self, guest: int) -> Item:
        h, cs = self.h, self.cs
        n_l2 = h.num_l2_entries
        l1_index = guest // (n_l2 * cs)
        l2_index = guest // cs % n_l2
        inside = guest % cs
        item = Item("translation", 0, 0, guest, "", note=(
            f"guest offset {guest:#x}: L1 index {l1_index}, L2 index {l2_index}, "
            f"offset {inside:#x} in the cluster"))
        if guest >= h.len_virtual_disk:
            item.note += f"; beyond the virtual size {h.len_virtual_disk:#x}"
            return item
        l1 = self.image.read_l1_table(self.f)
        at = h.ofs_l1_table + q.L1Entry.SIZE * l1_index
        l1e = self.walker.word("l1_entry", l1[l1_index], at, f"l1[{l1_index}]")
        item.children.append(l1e)
        l2_offset = l1[l1_index] & L1_OFFSET
        if not l2_offset:
            l1e.note = "unallocated: the whole range reads from the backing file, or zeros"
            return item
        l1e.note = f"-> L2 table at {l2_offset:#x}"
        extended = h.has_extended_l2
        step = q.L2EntryExtended.SIZE if extended else q.L2Entry.SIZE
        at = l2_offset + step * l2_index
        entry = q.L2Entry.parse(self.read(at, q.L2Entry.SIZE)).to_raw()
        kind = "l2_entry_extended" if extended else "l2_entry"
        l2e = self.walker.word("l2_entry", entry, at, f"l2[{l1_index}][{l2_index}]")
        item.children.append(l2e)
        if extended:
            at += q.L2Entry.SIZE
            sub = q.SubclusterBitmap.parse(self.read(at, q.SubclusterBitmap.SIZE)).to_raw()
            bitmap = self.walker.word("subcluster_bitmap", sub, at, "subclusters")
            nsub = q.SubclusterBitmap.READS_AS_ZERO_SHIFT
            index = inside * nsub // cs
            alloc = sub >> index & 1
            zero = sub >> (index + nsub) & 1
            bitmap.note = (f"subcluster {index}: {'allocated' if alloc else 'not allocated'}"
                           f"{', reads as zero' if zero else ''}")
            item.children.append(bitmap)
        if entry & L2_COMPRESSED:
            l2e.note = self.l2_note(entry, kind)
            d = q.CompressedDescriptor.parse(entry.to_bytes(q.CompressedDescriptor.SIZE, "big"),
                                             cluster_bits=h.cluster_bits)
            host_cluster = d.ofs_compressed // cs
        elif entry & L2_OFFSET:
            host = (entry & L2_OFFSET) + inside
            l2e.note = self.l2_note(entry, kind) + f"; guest byte -> host {host:#x}"
            host_cluster = (entry & L2_OFFSET) // cs
        else:
            l2e.note = ("reads as zeros" if entry & L2_ZERO
                        else "unallocated: reads from the backing file, or zeros")
            return item
        if not entry & L2_COMPRESSED:
            item.children.append(Item("host", host, 0, host, note=f"host offset {host:#x}"))
        count = self.refcount(host_cluster)
        item.children.append(Item("refcount", 0, 0, count, f"u{h.refcount_bits}",
                                  note=f"host cluster {host_cluster} has refcount {count}"))
        return item


def explain_qcow2(f: BinaryIO, read: Read) -> list[Item]:
    return _Qcow2(f, read).sections()


def translate_qcow2(f: BinaryIO, read: Read, guest: int) -> Item:
    return _Qcow2(f, read).translate(guest)
