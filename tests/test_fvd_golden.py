"""Golden bytes for FVD: a header built by hand from the table in fvd.md section 2, and the
journal records of section 3.4, parse to the documented values; what diskspec builds puts each
field at its documented offset."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from diskspec import create
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


# what diskspec create writes -----------------------------------------------------------------

MiB = 1 << 20
GiB = 1 << 30


def test_create_writes_the_documented_header_byte_for_byte(tmp_path: Path) -> None:
    """The 10 GiB compact image on a 10 GiB base of the worked examples (fvd.md 3.1) is
    exactly the hand-packed header above, and its regions are where the doc puts them."""
    with (tmp_path / "base.raw").open("wb") as f:
        f.truncate(10 * GiB)
    create(tmp_path / "x.fvd", "fvd", "10G", backing_file="base.raw", backing_fmt="raw",
           compact_image="on", copy_on_read="off", add_storage_cmd="builtin:lvextend")
    raw = (tmp_path / "x.fvd").read_bytes()
    assert raw[:4336] == _hand_header()
    assert raw[4336:8192] == bytes(8192 - 4336)
    assert len(raw) == 19_447_808
    assert raw[8192 : 8192 + 2_621_440].count(0) == 2_621_440  # bitmap: zeros
    assert raw[2_629_632 : 2_629_632 + 40960] == b"\xff" * 40960  # table: all EMPTY
    assert raw[2_670_592:].count(0) == 16 * MiB  # journal: zeros


# (case, size, base size, create options) -> documented (block size, bitmap off/size,
# table off/size, journal off/size, metadata size) of the worked examples in fvd.md 3.1
WORKED = [
    ("10G plain", 10 * GiB, None, {}, (0, 0, 0, 0, 0, 0, 0, 8192)),
    ("10G compact", 10 * GiB, None, {"compact_image": True},
     (0, 0, 0, 8192, 40960, 49152, 16 * MiB, 16_826_368)),
    ("10G on 10G", 10 * GiB, 10 * GiB, {},
     (512, 8192, 2_621_440, 0, 0, 2_629_632, 16 * MiB, 19_406_848)),
    ("10G on 10G compact", 10 * GiB, 10 * GiB, {"compact_image": True},
     (512, 8192, 2_621_440, 2_629_632, 40960, 2_670_592, 16 * MiB, 19_447_808)),
    ("1T on 1T", 1 << 40, 1 << 40, {},
     (32768, 8192, 4_194_304, 0, 0, 4_202_496, 16 * MiB, 20_979_712)),
]


@pytest.mark.parametrize(("case", "size", "base", "options", "want"), WORKED,
                         ids=[w[0] for w in WORKED])
def test_create_lays_out_the_worked_examples(
    tmp_path: Path, case: str, size: int, base: int | None, options: dict[str, object],
    want: tuple[int, ...],
) -> None:
    del case
    if base is not None:
        with (tmp_path / "base.raw").open("wb") as f:
            f.truncate(base)
        options = {**options, "backing_file": "base.raw", "backing_fmt": "raw"}
    create(tmp_path / "x.fvd", "fvd", size, **options)
    raw = (tmp_path / "x.fvd").read_bytes()[:4336]

    def at(off: int, fmt: str) -> int:
        return int(struct.unpack_from(fmt, raw, off)[0])

    got = (at(1092, "<i"), at(1076, "<q"), at(1084, "<q"), at(2212, "<q"), 0,
           at(4284, "<q"), at(4292, "<q"), at(20, "<q"))
    table_size = 0
    if at(2208, "<i"):
        entries = -(-at(12, "<q") // at(2220, "<q"))
        table_size = -(-4 * entries // 4096) * 4096
    assert (*got[:4], table_size, *got[5:]) == want
    assert at(0, "<I") == 0x5143F5A9 and at(4, "<I") == 1 and at(4300, "<i") == 1
    assert at(12, "<q") == size
    assert raw[1052:1068].rstrip(b"\0") == (b"raw" if base is not None else b"")
    assert at(8, "<i") == (0 if base is not None else 1)


def test_create_quirks_and_rounding(tmp_path: Path) -> None:
    # a journal_size with neither bitmap nor table: zeros counted, no journal (fvd.md 3.1);
    # a chunk_size for a non-compact image is stored raw; the size rounds up to 512
    create(tmp_path / "q.fvd", "fvd", 1000, journal_size=5000, chunk_size=123456,
           storage_grow_unit=777)
    raw = (tmp_path / "q.fvd").read_bytes()
    assert struct.unpack_from("<q", raw, 12)[0] == 1024
    assert struct.unpack_from("<q", raw, 20)[0] == 8192 + 5000
    assert struct.unpack_from("<qq", raw, 4284) == (0, 0)
    assert struct.unpack_from("<qq", raw, 2220) == (123456, 777)
    assert len(raw) == 8192 + 5000
    # data_file and data_file_fmt are always set when a data file is named
    create(tmp_path / "d.fvd", "fvd", "1M", data_file="d.raw")
    raw = (tmp_path / "d.fvd").read_bytes()
    assert raw[1108:1113] == b"d.raw\0"[:5] and raw[2132:2136] == b"raw\0"
    assert (tmp_path / "d.raw").exists()
    # user block sizes round up to 512; chunk sizes to 4096; the grow unit is >= a chunk
    (tmp_path / "b.raw").write_bytes(bytes(4096))
    create(tmp_path / "c.fvd", "fvd", "1M", backing_file="b.raw", block_size=1000,
           compact_image=True, chunk_size=5000, storage_grow_unit=1)
    raw = (tmp_path / "c.fvd").read_bytes()
    assert struct.unpack_from("<i", raw, 1092)[0] == 1024
    assert struct.unpack_from("<qq", raw, 2220) == (8192, 8192)
    assert raw[1052:1056] == b"raw\0"  # base_img_fmt is always written
