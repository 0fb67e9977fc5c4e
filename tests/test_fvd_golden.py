"""Golden bytes for FVD: a header built by hand from the table in fvd.md section 2, and the
journal records of section 3.4, parse to the documented values; what diskspec builds puts each
field at its documented offset."""

from __future__ import annotations

import struct

from diskspec.generated import fvd

# (offset, struct format, field name, value) from ../shared/formats/fvd.md section 2
FIELDS = [
    (0, "<I", "magic", 0x5143F5A9),
    (4, "<I", "version", 1),
    (8, "<i", "all_data_in_fvd_img", 0),
    (12, "<q", "len_virtual_disk", 10 << 30),
    (20, "<q", "len_metadata", 19_447_808),
    (1068, "<q", "len_base_img", 10 << 30),
    (1076, "<q", "ofs_bitmap", 8192),
    (1084, "<q", "len_bitmap", 2_621_440),
    (1092, "<i", "block_size", 512),
    (1096, "<i", "copy_on_read", 0),
    (1100, "<q", "max_outstanding_copy_on_read_data", 2_000_000),
    (2148, "<i", "prefetch_start_delay", -1),
    (2152, "<q", "ofs_prefetch_profile", 0),
    (2160, "<q", "num_prefetch_profile_entries", 0),
    (2168, "<i", "num_prefetch_slots", 2),
    (2172, "<i", "bytes_per_prefetch", 1 << 20),
    (2176, "<i", "prefetch_read_throughput_measure_time", 100),
    (2180, "<i", "prefetch_write_throughput_measure_time", 100),
    (2184, "<i", "prefetch_perf_calc_alpha", 80),
    (2188, "<i", "prefetch_min_read_throughput", 5120),
    (2192, "<i", "prefetch_min_write_throughput", 5120),
    (2196, "<i", "prefetch_max_read_throughput", 1_000_000_000),
    (2200, "<i", "prefetch_max_write_throughput", 1_000_000_000),
    (2204, "<i", "prefetch_throttle_time", 30000),
    (2208, "<i", "compact_image", 1),
    (2212, "<q", "ofs_table", 2_629_632),
    (2220, "<q", "chunk_size", 1 << 20),
    (2228, "<q", "storage_grow_unit", 100 << 20),
    (4284, "<q", "ofs_journal", 2_670_592),
    (4292, "<q", "len_journal", 16 << 20),
    (4300, "<i", "clean_shutdown", 1),
    (4304, "<i", "need_zero_init", 0),
    (4308, "<i", "generate_prefetch_profile", 0),
    (4312, "<i", "unit_of_prefetch_profile_entry_len", 4096),
    (4316, "<i", "profile_directed_prefetch_start_delay", -1),
]
STRINGS = [
    (28, 1024, "base_img", b"base.raw"),
    (1052, 16, "base_img_fmt", b"raw"),
    (1108, 1024, "data_file", b""),
    (2132, 16, "data_file_fmt", b""),
    (2236, 2048, "add_storage_cmd", b"builtin:lvextend"),
    (4320, 16, "write_updates_base_img", b""),
]


def _hand_header() -> bytes:
    buf = bytearray(4336)
    for off, fmt, _, value in FIELDS:
        struct.pack_into(fmt, buf, off, value)
    for off, size, _, text in STRINGS:
        buf[off : off + size] = text.ljust(size, b"\0")
    return bytes(buf)


def test_header_size_and_magic_bytes() -> None:
    assert fvd.Header.SIZE == 4336
    assert _hand_header()[:4] == bytes.fromhex("a9f54351")


def test_hand_built_header_parses_to_documented_values() -> None:
    head = fvd.Header.parse(_hand_header())
    for _, _, name, value in FIELDS:
        if name != "magic":
            assert getattr(head, name) == value, name
    for _, size, name, text in STRINGS:
        assert getattr(head, name) == text.ljust(size, b"\0"), name
    assert head.num_table_entries == 10 * 1024
    assert head.num_bitmap_blocks == (10 << 30) // 512


def test_what_diskspec_builds_puts_each_field_at_its_offset() -> None:
    values = {name: value for _, _, name, value in FIELDS if name != "magic"}
    values |= {name: text.ljust(size, b"\0") for _, size, name, text in STRINGS}
    built = fvd.Header(**values).build()
    assert len(built) == 4336
    for off, fmt, name, value in FIELDS:
        assert struct.unpack_from(fmt, built, off)[0] == value, name
    for off, size, name, text in STRINGS:
        assert built[off : off + size] == text.ljust(size, b"\0"), name
    assert built == _hand_header()


def test_journal_sector_records() -> None:
    sector = bytearray(512)
    # a table record (2 entries, the second with the dirty bit) then a bitmap record, then EMPTY
    struct.pack_into("<IIIII", sector, 0, 0xB4E6F7AC, 7, 2, 5, 0x80000006)
    struct.pack_into("<IIq", sector, 20, 0x3F2AB8ED, 128, 1 << 33)
    parsed = fvd.JournalSector.parse(bytes(sector))
    table, bitmap, empty = parsed.records
    assert table.record_type == fvd.JournalRecordType.TABLE
    assert isinstance(table.body, fvd.TableRecord)
    assert table.body.first_chunk == 7 and table.body.num_entries == 2
    entries = table.body.entries
    assert [e & fvd.TableEntry.CHUNK_INDEX_MASK for e in entries] == [5, 6]
    assert [bool(e & fvd.TableEntry.DIRTY_MASK) for e in entries] == [False, True]
    assert fvd.TableEntry.DIRTY_MASK == 0x80000000
    assert isinstance(bitmap.body, fvd.BitmapRecord)
    assert bitmap.body.num_sectors == 128 and bitmap.body.first_sector == 1 << 33
    assert empty.record_type == fvd.JournalRecordType.EMPTY and empty.body is None
    assert len(parsed.rest) == 512 - 40
    assert parsed.build() == bytes(sector)


def test_full_journal_sector_has_no_empty_record() -> None:
    # 125 table entries fill a sector exactly: 12 + 4 * 125 = 512
    sector = struct.pack("<III", 0xB4E6F7AC, 0, 125) + struct.pack("<125I", *range(125))
    parsed = fvd.JournalSector.parse(sector)
    assert len(parsed.records) == 1 and parsed.rest == b""
    assert list(parsed.records[0].body.entries) == list(range(125))
