"""``diskspec explain`` for FVD, straight from the generated classes."""

from __future__ import annotations

from typing import BinaryIO

from ..fvd.consts import CHUNK_INDEX, EMPTY
from ..generated import fvd
from .qcow2 import ranges
from .tree import Item, Read, Walker, human_size, show

__all__ = ["STRUCTURES", "explain_fvd", "translate_fvd"]

STRUCTURES = ("header", "bitmap", "table", "journal")

SHOWN_SECTORS = 8


def _text(value: bytes) -> str:
    return value.rstrip(b"\0").decode("utf-8", "replace")


class _Fvd:
    def __init__(self, f: BinaryIO, read: Read) -> None:
        self.f = f
        self.read = read
        f.seek(0)
        self.image = fvd.Fvd.read(f)
        self.h = self.image.header
        self.walker = Walker("fvd", fvd, read)
        h = self.h
        self.walker.notes.update({
            ("header", "len_virtual_disk"): lambda _o, v: f"{human_size(v)} guest disk",
            ("header", "len_metadata"): lambda _o, v: (
                f"guest data starts at {v:#x}" if not _text(h.data_file)
                else "data lives in the data file"
            ),
            ("header", "block_size"): lambda _o, v: (
                f"one bitmap bit covers {human_size(v)}; {h.num_bitmap_blocks} blocks"
                if v else "no base image: no bitmap"
            ),
            ("header", "chunk_size"): lambda _o, v: (
                f"compact image: {h.num_table_entries} chunks of {human_size(v)}"
                if h.compact_image else "not compact: guest offset = data offset"
            ),
            ("header", "clean_shutdown"): lambda _o, v: (
                "closed cleanly" if v else "not closed cleanly: the journal must be replayed"
            ),
            ("header", "base_img"): lambda _o, v: (
                f"base image {_text(v)!r}" if _text(v) else "no base image"
            ),
        })

    def sections(self) -> list[Item]:
        h = self.h
        header = self.walker.structure("header", h, 0)
        header.note = (f"FVD version {h.version}, {human_size(h.len_virtual_disk)} guest"
                       f"{', compact' if h.compact_image else ''}")
        out = [header]
        bitmap = self.image.read_bitmap(self.f)
        if bitmap is not None:
            blocks = h.num_bitmap_blocks
            in_fvd = [b for b in range(blocks) if bitmap[b // 8] >> (b % 8) & 1]
            out.append(Item("bitmap", h.ofs_bitmap, len(bitmap), bitmap, "bytes",
                            "One bit per block of the base image's range.",
                            spec_path="/instances/bitmap",
                            attr="diskspec.generated.fvd.Fvd.read_bitmap",
                            raw=bitmap[:16],
                            note=(f"{blocks} blocks, {len(in_fvd)} already in the FVD image: "
                                  f"{ranges(in_fvd)}")))
        table = self.image.read_table(self.f)
        if table is not None:
            used = [i for i, e in enumerate(table) if e != EMPTY]
            item = Item("table", h.ofs_table, len(table) * fvd.TableEntry.SIZE, table,
                        "fvd.TableEntry list", "The lookup table of a compact image.",
                        spec_path="/instances/table", attr="diskspec.generated.fvd.Fvd.read_table",
                        raw=self.read(h.ofs_table, 16),
                        note=f"{len(table)} chunks, {len(used)} allocated: {ranges(used)}")
            for i in used[:4]:
                child = self.walker.word("table_entry", table[i],
                                         h.ofs_table + fvd.TableEntry.SIZE * i, f"table[{i}]")
                child.note = f"virtual chunk {i} -> physical chunk {table[i] & CHUNK_INDEX}"
                item.children.append(child)
            out.append(item)
        journal = self.image.read_journal(self.f)
        if journal is not None:
            size = h.len_journal // max(len(journal), 1)
            item = Item("journal", h.ofs_journal, h.len_journal, None, "fvd.JournalSector list",
                        "The metadata journal, in self-contained 512-byte sectors.",
                        spec_path="/instances/journal",
                        attr="diskspec.generated.fvd.Fvd.read_journal",
                        raw=self.read(h.ofs_journal, 16))
            records = 0
            for i, sector in enumerate(journal):
                live = [r for r in sector.records if r.body is not None]
                records += len(live)
                if live and len(item.children) < SHOWN_SECTORS:
                    sub = self.walker.structure("journal_sector", sector,
                                                h.ofs_journal + i * size, f"journal[{i}]")
                    sub.note = f"{len(live)} records"
                    item.children.append(sub)
            item.note = f"{len(journal)} sectors, {records} records"
            out.append(item)
        return out

    def translate(self, guest: int) -> Item:
        h = self.h
        item = Item("translation", 0, 0, guest, note=f"guest offset {guest:#x}")
        if guest >= h.len_virtual_disk:
            item.note += f"; beyond the virtual size {h.len_virtual_disk:#x}"
            return item
        bitmap = self.image.read_bitmap(self.f)
        if bitmap is not None and h.block_size and guest < h.len_base_img:
            block = guest // h.block_size
            bit = bitmap[block // 8] >> (block % 8) & 1
            item.children.append(Item(
                f"bitmap bit {block}", h.ofs_bitmap + block // 8, 1, bit, "bit",
                "1: the block's data is in the FVD image, 0: in the base image.",
                raw=bitmap[block // 8: block // 8 + 1],
                note=f"block {block} ({human_size(h.block_size)}): "
                     + ("in the FVD image" if bit else f"read from the base {show(h.base_img)}")))
        data = h.len_metadata
        table = self.image.read_table(self.f)
        if table is not None:
            chunk = guest // h.chunk_size
            at = h.ofs_table + fvd.TableEntry.SIZE * chunk
            entry = table[chunk]
            child = self.walker.word("table_entry", entry, at, f"table[{chunk}]")
            item.children.append(child)
            if entry == EMPTY:
                child.note = "EMPTY: the chunk is not allocated"
                return item
            host = data + (entry & CHUNK_INDEX) * h.chunk_size + guest % h.chunk_size
            child.note = f"physical chunk {entry & CHUNK_INDEX}; guest byte -> host {host:#x}"
            item.children.append(Item("host", host, 0, host, note=f"host offset {host:#x}"))
        else:
            host = data + guest
            item.children.append(Item("host", host, 0, host, note=(
                f"not compact: guest byte -> host {host:#x} (data offset {data:#x} + guest)")))
        return item


def explain_fvd(f: BinaryIO, read: Read) -> list[Item]:
    return _Fvd(f, read).sections()


def translate_fvd(f: BinaryIO, read: Read, guest: int) -> Item:
    return _Fvd(f, read).translate(guest)
