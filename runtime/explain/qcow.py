"""``diskspec explain`` for qcow version 1, straight from the generated classes."""

from __future__ import annotations

from typing import BinaryIO

from ..generated import qcow as q1
from .qcow2 import SHOWN_ENTRIES, SHOWN_TABLES, ranges
from .tree import Item, Read, Walker, human_size, show

__all__ = ["STRUCTURES", "explain_qcow", "translate_qcow"]

STRUCTURES = ("header", "backing_file", "l1", "l2")

_COMPRESSED = q1.L2Entry.COMPRESSED_MASK
_OFFSET = q1.L2Entry.OFS_CLUSTER_MASK


class _Qcow:
    def __init__(self, f: BinaryIO, read: Read) -> None:
        self.f = f
        self.read = read
        f.seek(0)
        self.image = q1.Qcow.read(f)
        self.h = self.image.header
        self.walker = Walker("qcow", q1, read)
        h = self.h
        covers = h.num_l2_entries * h.cluster_size
        self.walker.notes.update({
            ("header", "cluster_bits"): lambda _o, v: (
                f"-> {human_size(h.cluster_size)} clusters; with l2_bits {h.l2_bits} one L2 "
                f"table covers {human_size(covers)}"
            ),
            ("header", "l2_bits"): lambda _o, v: (
                f"{h.num_l2_entries} entries per L2 table ({human_size(h.len_l2_table)})"
            ),
            ("header", "len_virtual_disk"): lambda _o, v: (
                f"{human_size(v)} guest disk, {h.num_l1_entries} L1 entries (derived)"
            ),
            ("header", "ofs_l1_table"): lambda _o, v: f"{h.num_l1_entries} entries at {v:#x}",
        })

    def l1(self) -> list[q1.L1Entry]:
        return self.image.read_l1_table(self.f)

    def l2_entries(self, offset: int) -> list[int]:
        table = q1.L2Table.parse(self.read(offset, self.h.len_l2_table), l2_bits=self.h.l2_bits)
        return list(table.entries)

    def sections(self) -> list[Item]:
        h = self.h
        header = self.walker.structure("header", h, 0)
        header.note = (f"qcow version 1, {human_size(h.len_virtual_disk)} guest, "
                       f"{human_size(h.cluster_size)} clusters")
        out = [header]
        name = self.image.read_backing_file_name(self.f)
        if name is not None:
            out.append(Item("backing_file", h.ofs_backing_file_name, len(name), name, "bytes",
                            "Name of the backing file.", note=f"backing file {show(name)}",
                            spec_path="/instances/backing_file_name",
                            raw=self.read(h.ofs_backing_file_name, min(len(name), 16))))
        l1 = self.l1()
        size = q1.L1Entry.SIZE
        used = [i for i, e in enumerate(l1) if e.ofs_l2_table]
        table = Item("l1", h.ofs_l1_table, len(l1) * size, None, "qcow.L1Entry list",
                     "The L1 table, one entry per L2 table.", spec_path="/instances/l1_table",
                     attr="diskspec.generated.qcow.Qcow.read_l1_table",
                     raw=self.read(h.ofs_l1_table, 16),
                     note=f"{len(l1)} entries, {len(used)} used: {ranges(used)}")
        for i in used[:SHOWN_ENTRIES]:
            sub = self.walker.structure("l1_entry", l1[i], h.ofs_l1_table + size * i, f"l1[{i}]")
            sub.note = f"-> L2 table at {l1[i].ofs_l2_table:#x}"
            table.children.append(sub)
        out.append(table)
        for i in used[:SHOWN_TABLES]:
            offset = l1[i].ofs_l2_table
            entries = self.l2_entries(offset)
            compressed = sum(1 for e in entries if e & _COMPRESSED)
            normal = sum(1 for e in entries if e & _OFFSET and not e & _COMPRESSED)
            item = Item(f"l2[{i}]", offset, h.len_l2_table, None, "qcow.L2Table",
                        "One L2 table.", spec_path="/types/l2_table",
                        attr="diskspec.generated.qcow.L2Table", raw=self.read(offset, 16),
                        note=(f"for L1 index {i}: {normal} data clusters, {compressed} "
                              f"compressed, {len(entries) - normal - compressed} unallocated"))
            for k in [k for k, e in enumerate(entries) if e][:SHOWN_ENTRIES]:
                child = self.walker.word("l2_entry", entries[k],
                                         offset + q1.L2Entry.SIZE * k, f"l2[{i}][{k}]")
                child.note = self.entry_note(entries[k])
                item.children.append(child)
            out.append(item)
        return out

    def entry_note(self, entry: int) -> str:
        if entry & _COMPRESSED:
            raw = entry.to_bytes(q1.CompressedDescriptor.SIZE, "big")
            d = q1.CompressedDescriptor.parse(raw, cluster_bits=self.h.cluster_bits)
            return f"compressed: {d.len_compressed} bytes at {d.ofs_compressed:#x}"
        return f"data at host {entry & _OFFSET:#x}"

    def translate(self, guest: int) -> Item:
        h = self.h
        cs = h.cluster_size
        l1_index = guest // (h.num_l2_entries * cs)
        l2_index = guest // cs % h.num_l2_entries
        item = Item("translation", 0, 0, guest, note=(
            f"guest offset {guest:#x}: L1 index {l1_index}, L2 index {l2_index}, "
            f"offset {guest % cs:#x} in the cluster"))
        if guest >= h.len_virtual_disk:
            item.note += f"; beyond the virtual size {h.len_virtual_disk:#x}"
            return item
        l1 = self.l1()
        at = h.ofs_l1_table + q1.L1Entry.SIZE * l1_index
        l1e = self.walker.structure("l1_entry", l1[l1_index], at, f"l1[{l1_index}]")
        item.children.append(l1e)
        l2_offset = l1[l1_index].ofs_l2_table
        if not l2_offset:
            l1e.note = "unallocated: reads from the backing file, or zeros"
            return item
        l1e.note = f"-> L2 table at {l2_offset:#x}"
        at = l2_offset + q1.L2Entry.SIZE * l2_index
        entry = q1.L2Entry.parse(self.read(at, q1.L2Entry.SIZE)).to_raw()
        l2e = self.walker.word("l2_entry", entry, at, f"l2[{l1_index}][{l2_index}]")
        item.children.append(l2e)
        if not entry:
            l2e.note = "unallocated: reads from the backing file, or zeros"
        elif entry & _COMPRESSED:
            l2e.note = self.entry_note(entry)
        else:
            host = (entry & _OFFSET) + guest % cs
            l2e.note = f"{self.entry_note(entry)}; guest byte -> host {host:#x}"
            item.children.append(Item("host", host, 0, host, note=f"host offset {host:#x}"))
        return item


def explain_qcow(f: BinaryIO, read: Read) -> list[Item]:
    return _Qcow(f, read).sections()


def translate_qcow(f: BinaryIO, read: Read, guest: int) -> Item:
    return _Qcow(f, read).translate(guest)
