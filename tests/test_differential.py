"""Three-way differential test of the qcow2, qcow and FVD parsers.

The generated classes (``ours``), the construct schemas (``construct``) and the official Kaitai
Struct compiler's output (``ksc``) must agree field by field on every image qemu-img 7.2
writes for the corpus (tests/corpus.py) and on hand-built FVD images: headers, header
extensions, tables, refcount blocks, L2 tables, snapshot records, bitmap directories and the
LUKS header. Where the test can decode the bytes itself (``struct.unpack`` and the constants
of qcow2.rst, qcow.c, the LUKS1 format and shared/formats/fvd.md) that is a fourth
implementation, ``raw``, compared on every table entry.

A disagreement names the image, the structure path and the field, and gives every
implementation's value (see diff_support.Differ). The last test checks that a large number
of fields was compared, so the module cannot pass by comparing nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import pytest
from construct import Struct
from kaitaistruct import KaitaiStream

from diskspec.generated import fvd as gfvd
from diskspec.generated import fvd_construct as cfvd
from diskspec.generated import qcow as gqcow
from diskspec.generated import qcow2 as gq2
from diskspec.generated import qcow2_construct as cq2
from diskspec.generated import qcow_construct as cqcow
from diskspec.tests.corpus import RECIPES, CorpusImage
from diskspec.tests.diff_support import (
    NA,
    PLAIN,
    SAMPLE_LIMIT,
    Differ,
    Layout,
    Part,
    Sampled,
    Trees,
    compare_packed,
    compare_values,
    parse_with_params,
    sample_indices,
    shape_of,
)
from diskspec.tests.ksc_support import compile_ksy, load_compiled

SPECS = Path(__file__).resolve().parent.parent / "specs"

QCOW2_NAMES = [recipe.name for recipe in RECIPES if recipe.fmt == "qcow2"]
QCOW1_NAMES = [recipe.name for recipe in RECIPES if recipe.fmt == "qcow"]

#: Every Differ of this session, by image name (read by test_compared_field_total).
TALLY: dict[str, Differ] = {}

#: construct parses byte-aligned integer arrays at ~0.4 us per entry (measured with construct
#: 2.10: a 32768-entry refcount block in 13 ms), so those are compared whole up to this size;
#: its BitStructs (~15 us per entry: the 262144-entry refcount table of a 2 MiB-cluster image
#: takes 3-5 s) and its sub-byte refcounts (BitsSwapped, ~1-2 us per entry) are compared whole
#: only up to SAMPLE_LIMIT entries, like every KSC table, and on the sample above that.
CONSTRUCT_WORD_LIMIT = 1 << 17


# --------------------------------------------------------------------------------------------
# Constants of the format documents, for the independent ``raw`` decoding

L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # qemu block/qcow2.h
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # qemu block/qcow2-bitmap.c
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW1_OFLAG_COMPRESSED = 1 << 63  # qemu block/qcow.c
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
FVD_MAGIC = 0x5143F5A9
FVD_EMPTY_ENTRY = 0xFFFF_FFFF
FVD_DIRTY = 0x8000_0000
FVD_BITMAP_JRECORD = 0x3F2AB8ED
FVD_TABLE_JRECORD = 0xB4E6F7AC
FVD_EMPTY_JRECORD = 0

_L2_STANDARD: dict[str, Callable[[int], int]] = {
    "copied": lambda w: int(bool(w & QCOW_OFLAG_COPIED)),
    "compressed": lambda w: int(bool(w & QCOW_OFLAG_COMPRESSED)),
    "reserved_high": lambda w: (w >> 56) & 0x3F,
    "ofs_cluster_div512": lambda w: (w & L2E_OFFSET_MASK) >> 9,
    "reserved_low": lambda w: (w >> 1) & 0xFF,
    "zero": lambda w: w & QCOW_OFLAG_ZERO,
    "ofs_cluster": lambda w: w & L2E_OFFSET_MASK,
}
Q2_L1 = Layout(
    (
        Part(
            gq2.L1Entry,
            {
                "copied": lambda w: w >> 63,
                "reserved_high": lambda w: (w >> 56) & 0x7F,
                "ofs_l2_table_div512": lambda w: (w & L1E_OFFSET_MASK) >> 9,
                "reserved_low": lambda w: w & 0x1FF,
                "ofs_l2_table": lambda w: w & L1E_OFFSET_MASK,
            },
        ),
    )
)
Q2_L2 = Layout((Part(gq2.L2Entry, _L2_STANDARD),))
Q2_L2_EXTENDED = Layout(
    (
        Part(gq2.L2Entry, _L2_STANDARD, "entry"),
        # qcow2.rst: bits 0-31 allocation status, bits 32-63 "reads as zeros", per subcluster
        Part(
            gq2.SubclusterBitmap,
            {"reads_as_zero": lambda w: w >> 32, "allocated": lambda w: w & 0xFFFF_FFFF},
            "subclusters",
        ),
    )
)
Q2_REFCOUNT_TABLE = Layout(
    (
        Part(
            gq2.RefcountTableEntry,
            {
                "ofs_refcount_block_div512": lambda w: (w & REFT_OFFSET_MASK) >> 9,
                "reserved": lambda w: w & 0x1FF,
                "ofs_refcount_block": lambda w: w & REFT_OFFSET_MASK,
            },
        ),
    )
)
Q2_BITMAP_TABLE = Layout(
    (
        Part(
            gq2.BitmapTableEntry,
            {
                "reserved_high": lambda w: w >> 56,
                "ofs_data_div512": lambda w: (w & BME_TABLE_ENTRY_OFFSET_MASK) >> 9,
                "reserved_low": lambda w: (w >> 1) & 0xFF,
                "all_ones": lambda w: w & 1,
                "ofs_data": lambda w: w & BME_TABLE_ENTRY_OFFSET_MASK,
            },
        ),
    )
)
Q2_LAYOUTS: dict[tuple[str, str], Layout] = {
    ("Qcow2", "l1_table"): Q2_L1,
    ("Qcow2", "refcount_table"): Q2_REFCOUNT_TABLE,
    ("SnapshotEntry", "l1_table"): Q2_L1,
    ("BitmapDirectoryEntry", "bitmap_table"): Q2_BITMAP_TABLE,
    ("L2Table", "entries"): Q2_L2,
    ("L2Table", "entries_extended"): Q2_L2_EXTENDED,
    **{("RefcountBlock", f"refcounts_{1 << order}"): PLAIN for order in range(7)},
}
Q1_L2 = Layout(
    (
        Part(
            gqcow.L2Entry,
            {
                "compressed": lambda w: w >> 63,
                "ofs_cluster": lambda w: w & (QCOW1_OFLAG_COMPRESSED - 1),
            },
        ),
    )
)
Q1_LAYOUTS: dict[tuple[str, str], Layout] = {("L2Table", "entries"): Q1_L2}
FVD_TABLE = Layout(
    (
        Part(
            gfvd.TableEntry,
            {"chunk_index": lambda w: w & (FVD_DIRTY - 1), "dirty": lambda w: w >> 31},
        ),
    )
)
FVD_LAYOUTS: dict[tuple[str, str], Layout] = {
    ("Fvd", "table"): FVD_TABLE,
    ("TableRecord", "entries"): FVD_TABLE,
}


# --------------------------------------------------------------------------------------------
# Fixtures and small helpers


@dataclass(frozen=True)
class KscModules:
    qcow2: ModuleType
    qcow: ModuleType
    fvd: ModuleType


@pytest.fixture(scope="session")
def ksc(tmp_path_factory: pytest.TempPathFactory) -> KscModules:
    """The three specs compiled once by the official Kaitai Struct compiler, loaded."""
    out = tmp_path_factory.mktemp("ksc_differential")
    specs = [SPECS / "qcow2.ksy", SPECS / "qcow.ksy", SPECS / "fvd.ksy"]
    written = compile_ksy(specs, out)
    assert sorted(path.name for path in written) == ["fvd.py", "qcow.py", "qcow2.py"]
    return KscModules(
        qcow2=load_compiled(out, "qcow2"),
        qcow=load_compiled(out, "qcow"),
        fvd=load_compiled(out, "fvd"),
    )


def _image(corpus: list[CorpusImage], name: str) -> CorpusImage:
    matches = [image for image in corpus if image.name == name]
    assert len(matches) == 1, f"corpus has {len(matches)} images named {name}"
    assert matches[0].path.is_file(), matches[0]
    return matches[0]


def _differ(name: str) -> Differ:
    d = Differ(name)
    TALLY[name] = d
    return d


@contextmanager
def _guard(d: Differ, where: str) -> Iterator[None]:
    """Record an exception of one part of the comparison as a problem and go on."""
    try:
        yield
    except Exception as exc:
        d.problem(where, f"raised {type(exc).__name__}: {exc}")


def _read_at(f: BinaryIO, pos: int, n: int) -> bytes:
    f.seek(pos)
    data = f.read(n)
    if len(data) != n:
        raise AssertionError(f"short read at {pos:#x}: {len(data)} of {n} bytes")
    return data


def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f">{len(data) // 8}Q", data))


def _ksc_at(stream: Any, pos: int, cls: Any) -> Any:
    stream.seek(pos)
    return cls(stream)


def _without(schema: Any, name: str) -> Any:
    """The construct struct without one of its fields (a positioned table compared apart)."""
    return Struct(*[sub for sub in schema.subcons if sub.name != name])


# --------------------------------------------------------------------------------------------
# qcow2


@dataclass(frozen=True)
class _Q2Geometry:
    """What the rest of the comparison needs, read from the raw header (not from a parser)."""

    cluster_bits: int
    refcount_order: int
    extended: bool
    ofs_l1_table: int
    num_l1_entries: int
    ofs_refcount_table: int
    num_refcount_table_entries: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _q2_geometry(first: bytes) -> _Q2Geometry:
    version, cluster_bits = struct.unpack_from(">I12xI", first, 4)
    l1_size, l1_ofs, rt_ofs, rt_clusters = struct.unpack_from(">IQQI", first, 36)
    order, extended = 4, False
    if version >= 3:
        incompatible, order = struct.unpack_from(">Q16xI", first, 72)
        extended = bool(incompatible & QCOW2_INCOMPAT_EXTL2)
    return _Q2Geometry(
        cluster_bits=cluster_bits,
        refcount_order=order,
        extended=extended,
        ofs_l1_table=l1_ofs,
        num_l1_entries=l1_size,
        ofs_refcount_table=rt_ofs,
        num_refcount_table_entries=rt_clusters * (1 << cluster_bits) // 8,
    )


def _q2_header_reference(first: bytes) -> dict[str, object]:
    """Every seq field and value instance of the header, decoded as qcow2.rst says."""
    (
        magic,
        version,
        backing_ofs,
        backing_len,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_ofs,
        rt_ofs,
        rt_clusters,
        nb_snapshots,
        snapshots_ofs,
    ) = struct.unpack_from(">4sIQIIQIIQQIIQ", first)
    v3 = version >= 3
    incompatible: int | None = None
    compatible: int | None = None
    autoclear: int | None = None
    order: int | None = None
    length: int | None = None
    compression: int | None = None
    padding: bytes | None = None
    unknown: bytes | None = None
    if v3:
        incompatible, compatible, autoclear, order, length = struct.unpack_from(">QQQII", first, 72)
        if length > 104:
            compression, padding = first[104], first[105:112]
        if length > 112:
            unknown = first[112:length]
    order_effective = order if order is not None else 4
    extended = incompatible is not None and bool(incompatible & QCOW2_INCOMPAT_EXTL2)
    return {
        "magic": magic,
        "version": version,
        "ofs_backing_file_name": backing_ofs,
        "len_backing_file_name": backing_len,
        "cluster_bits": cluster_bits,
        "len_virtual_disk": size,
        "crypt_method": crypt,
        "num_l1_entries": l1_size,
        "ofs_l1_table": l1_ofs,
        "ofs_refcount_table": rt_ofs,
        "num_refcount_table_clusters": rt_clusters,
        "num_snapshots": nb_snapshots,
        "ofs_snapshot_table": snapshots_ofs,
        "incompatible_features": incompatible,
        "compatible_features": compatible,
        "autoclear_features": autoclear,
        "refcount_order": order,
        "len_header": length,
        "compression_type": compression,
        "padding": padding,
        "unknown_header_fields": unknown,
        "cluster_size": 1 << cluster_bits,
        "len_header_effective": length if length is not None else 72,
        "ofs_extension_area_end": backing_ofs if backing_ofs else 1 << cluster_bits,
        "refcount_order_effective": order_effective,
        "refcount_bits": 1 << order_effective,
        "has_extended_l2": extended,
        "num_l2_entries": (1 << cluster_bits) // (16 if extended else 8),
        "num_refcount_block_entries": (1 << cluster_bits) * 8 >> order_effective,
    }


def _q2_luks_reference(refs: dict[str, object], where: str, header: bytes) -> None:
    """The LUKS1 phdr (cryptsetup's on-disk format document): 208 bytes, then 8 key slots."""
    names = (
        "magic",
        "version",
        "cipher_name",
        "cipher_mode",
        "hash_spec",
        "ofs_payload_sectors",
        "len_key",
        "mk_digest",
        "mk_digest_salt",
        "mk_digest_iterations",
        "uuid",
    )
    values = struct.unpack_from(">6sH32s32s32sII20s32sI40s", header)
    refs.update({f"{where}.{n}": v for n, v in zip(names, values, strict=True)})
    refs[f"{where}.key_slots (length)"] = 8
    slot_names = ("active", "iterations", "salt", "ofs_key_material_sectors", "num_stripes")
    for j in range(8):
        slot = struct.unpack_from(">II32sII", header, 208 + 48 * j)
        refs.update(
            {f"{where}.key_slots[{j}].{n}": v for n, v in zip(slot_names, slot, strict=True)}
        )


def _q2_bitmaps_reference(
    refs: dict[str, object],
    tables: dict[str, Sequence[int]],
    where: str,
    raw: BinaryIO,
    data: bytes,
) -> None:
    count, reserved, dir_len, dir_ofs = struct.unpack_from(">IIQQ", data)
    refs.update(
        {
            f"{where}.num_bitmaps": count,
            f"{where}.reserved": reserved,
            f"{where}.len_bitmap_directory": dir_len,
            f"{where}.ofs_bitmap_directory": dir_ofs,
        }
    )
    directory = _read_at(raw, dir_ofs, dir_len)
    pos = j = 0
    names = (
        "ofs_bitmap_table",
        "num_bitmap_table_entries",
        "flags",
        "bitmap_type",
        "granularity_bits",
        "len_name",
        "len_extra_data",
    )
    while pos < len(directory):
        e = f"{where}.bitmap_directory.entries[{j}]"
        values = struct.unpack_from(">QIIBBHI", directory, pos)
        refs.update({f"{e}.{n}": v for n, v in zip(names, values, strict=True)})
        table_ofs, table_len, name_len, extra_len = values[0], values[1], values[5], values[6]
        extra_at = pos + 24
        name_at = extra_at + extra_len
        pad = (8 - (24 + extra_len + name_len) % 8) % 8
        refs[f"{e}.extra_data"] = directory[extra_at:name_at]
        refs[f"{e}.name"] = directory[name_at : name_at + name_len]
        refs[f"{e}.padding"] = directory[name_at + name_len : name_at + name_len + pad]
        tables[f"{e}.bitmap_table"] = _words(_read_at(raw, table_ofs, 8 * table_len))
        pos = name_at + name_len + pad
        j += 1
    refs[f"{where}.bitmap_directory.entries (length)"] = j


def _q2_snapshots_reference(
    refs: dict[str, object], tables: dict[str, Sequence[int]], raw: BinaryIO, first: bytes
) -> None:
    count, pos = struct.unpack_from(">IQ", first, 60)
    refs["Qcow2.snapshot_table (length)"] = count
    names = (
        "ofs_l1_table",
        "num_l1_entries",
        "len_id",
        "len_name",
        "date_sec",
        "date_nsec",
        "vm_clock_nsec",
        "len_vm_state_32",
        "len_extra_data",
    )
    for i in range(count):
        s = f"Qcow2.snapshot_table[{i}]"
        values = struct.unpack(">QIHHIIQII", _read_at(raw, pos, 40))
        refs.update({f"{s}.{n}": v for n, v in zip(names, values, strict=True)})
        l1_ofs, l1_size, id_len, name_len, extra_len = (
            values[0],
            values[1],
            values[2],
            values[3],
            values[8],
        )
        extra = _read_at(raw, pos + 40, extra_len)
        # qcow2.rst: vm_state_size_large (8), disk_size (8), icount (8, signed), then unknown
        refs[f"{s}.extra_data.len_vm_state"] = (
            struct.unpack_from(">Q", extra)[0] if extra_len >= 8 else None
        )
        refs[f"{s}.extra_data.len_virtual_disk"] = (
            struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else None
        )
        refs[f"{s}.extra_data.icount"] = (
            struct.unpack_from(">q", extra, 16)[0] if extra_len >= 24 else None
        )
        refs[f"{s}.extra_data.unknown"] = extra[min(extra_len // 8, 3) * 8 :]
        at = pos + 40 + extra_len
        refs[f"{s}.id_str"] = _read_at(raw, at, id_len)
        refs[f"{s}.name"] = _read_at(raw, at + id_len, name_len)
        pad = (8 - (40 + extra_len + id_len + name_len) % 8) % 8
        refs[f"{s}.padding"] = _read_at(raw, at + id_len + name_len, pad)
        tables[f"{s}.l1_table"] = _words(_read_at(raw, l1_ofs, 8 * l1_size))
        pos = at + id_len + name_len + pad


def _q2_references(
    first: bytes, raw: BinaryIO
) -> tuple[dict[str, object], dict[str, Sequence[int]]]:
    """Reference values (by path) and raw table words of the whole qcow2 parse tree."""
    header = _q2_header_reference(first)
    expected_names = set(shape_of(gq2.Header).seq) | set(shape_of(gq2.Header).values)
    assert set(header) == expected_names, "test reference misses header fields"
    refs: dict[str, object] = {f"Qcow2.header.{n}": v for n, v in header.items()}
    tables: dict[str, Sequence[int]] = {}
    start = header["len_header_effective"]
    end = header["ofs_extension_area_end"]
    assert isinstance(start, int)
    assert isinstance(end, int)
    pos, i = start, 0
    while pos < end:
        e = f"Qcow2.extension_area.extensions[{i}]"
        ext_type, length = struct.unpack_from(">II", first, pos)
        data = first[pos + 8 : pos + 8 + length]
        pad = (8 - length % 8) % 8
        refs[f"{e}.ext_type"] = ext_type
        refs[f"{e}.len_data"] = length
        refs[f"{e}.padding"] = first[pos + 8 + length : pos + 8 + length + pad]
        if ext_type in (EXT_BACKING_FORMAT, EXT_DATA_FILE):
            refs[f"{e}.data.name"] = data
        elif ext_type == EXT_FEATURE_TABLE:
            refs[f"{e}.data.entries (length)"] = length // 48
            for j in range(length // 48):
                kind, bit, name = struct.unpack_from(">BB46s", data, 48 * j)
                refs[f"{e}.data.entries[{j}].feature_type"] = kind
                refs[f"{e}.data.entries[{j}].bit"] = bit
                refs[f"{e}.data.entries[{j}].name"] = name
        elif ext_type == EXT_CRYPTO_HEADER:
            ofs, size = struct.unpack_from(">QQ", data)
            refs[f"{e}.data.ofs_encryption_header"] = ofs
            refs[f"{e}.data.len_encryption_header"] = size
            _q2_luks_reference(refs, f"{e}.data.encryption_header", _read_at(raw, ofs, 592))
        elif ext_type == EXT_BITMAPS:
            _q2_bitmaps_reference(refs, tables, f"{e}.data", raw, data)
        else:  # the end marker, and unknown extensions: kept as bytes
            refs[f"{e}.data"] = data
        pos += 8 + length + pad
        i += 1
        if ext_type == 0:
            break
    refs["Qcow2.extension_area.extensions (length)"] = i
    refs["Qcow2.extension_area.rest"] = first[pos:end]
    backing_ofs, backing_len = header["ofs_backing_file_name"], header["len_backing_file_name"]
    assert isinstance(backing_ofs, int)
    assert isinstance(backing_len, int)
    refs["Qcow2.backing_file_name"] = (
        _read_at(raw, backing_ofs, backing_len) if backing_ofs else None
    )
    l1_size, l1_ofs = header["num_l1_entries"], header["ofs_l1_table"]
    assert isinstance(l1_size, int)
    assert isinstance(l1_ofs, int)
    tables["Qcow2.l1_table"] = _words(_read_at(raw, l1_ofs, 8 * l1_size))
    _q2_snapshots_reference(refs, tables, raw, first)
    return refs, tables


def _refcounts_reference(data: bytes, order: int) -> list[int]:
    """qcow2.rst / qemu get_refcount_ro*: below 8 bits least significant bits first."""
    bits = 1 << order
    if bits >= 8:
        code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
        return list(struct.unpack(f">{len(data) * 8 // bits}{code}", data))
    mask = (1 << bits) - 1
    per = 8 // bits
    return [(byte >> (k * bits)) & mask for byte in data for k in range(per)]


def _compare_refcount_block(d: Differ, k2: Any, where: str, data: bytes, g: _Q2Geometry) -> None:
    cb, order = g.cluster_bits, g.refcount_order
    n = (1 << cb) * 8 >> order
    name = f"refcounts_{1 << order}"
    raw = _refcounts_reference(data, order)
    ours = gq2.RefcountBlock.parse(data, cluster_bits=cb, refcount_order=order)
    refs: dict[str, object] = {
        f"{where}.cluster_bits": cb,
        f"{where}.refcount_order": order,
        f"{where}.num_entries": n,
        **{f"{where}.refcounts_{1 << o}": None for o in range(7) if o != order},
    }
    construct_whole = n <= (CONSTRUCT_WORD_LIMIT if order >= 3 else SAMPLE_LIMIT)
    ksc_whole = n <= SAMPLE_LIMIT
    cons: Any = NA
    kobj: Any = NA
    if construct_whole:
        cons = parse_with_params(cq2.RefcountBlock, data, cluster_bits=cb, refcount_order=order)
    if ksc_whole:
        kobj = k2.Qcow2.RefcountBlock(cb, order, KaitaiStream(BytesIO(data)))
    trees = Trees(d, layouts=Q2_LAYOUTS, reference=refs, raw_tables={f"{where}.{name}": raw})
    trees.compare(where, ours, cons, kobj)
    trees.leftovers()
    if construct_whole and ksc_whole:
        return
    # The rest of the block for construct and KSC: their parse of 512-byte windows (the type
    # with cluster_bits 9) holding the first 4096 refcounts and every nonzero one.
    values = getattr(ours, name)
    indices = sample_indices(values)

    def window_construct(window: bytes) -> tuple[Any, Any]:
        block = parse_with_params(cq2.RefcountBlock, window, cluster_bits=9, refcount_order=order)
        return block["num_entries"], block[name]

    def window_ksc(window: bytes) -> tuple[Any, Any]:
        block = k2.Qcow2.RefcountBlock(9, order, KaitaiStream(BytesIO(window)))
        return block.num_entries, getattr(block, name)

    cons_sample: Any = NA
    ksc_sample: Any = NA
    if not construct_whole:
        cons_sample = _refcount_windows(
            d, where, "construct", window_construct, data, order, indices
        )
    if not ksc_whole:
        ksc_sample = _refcount_windows(d, where, "ksc", window_ksc, data, order, indices)
    compare_values(d, f"{where}.{name}", values, construct=cons_sample, ksc=ksc_sample, raw=None)


def _refcount_windows(
    d: Differ,
    where: str,
    impl: str,
    parse: Callable[[bytes], tuple[Any, Any]],
    data: bytes,
    order: int,
    indices: Sequence[int],
) -> Sampled:
    per = 4096 >> order
    idx: list[int] = []
    items: list[Any] = []
    for w in sorted({i // per for i in indices}):
        num_entries, values = parse(data[w * 512 : (w + 1) * 512])
        if not idx:
            d.same(f"{where} (512-byte window).num_entries", **{impl: num_entries}, raw=per)
        idx.extend(range(w * per, w * per + len(values)))
        items.extend(values)
    return Sampled(idx, items)


def _compare_q2_descriptor(d: Differ, k2: Any, where: str, word: int, cb: int) -> None:
    data = struct.pack(">Q", word)
    ours = gq2.CompressedDescriptor.parse(data, cluster_bits=cb)
    cons = parse_with_params(cq2.CompressedDescriptor, data, cluster_bits=cb)
    kobj = k2.Qcow2.CompressedDescriptor(cb, KaitaiStream(BytesIO(data)))
    x = 62 - (cb - 8)  # qcow2.rst, "Compressed Clusters Descriptor"
    ofs = word & ((1 << x) - 1)
    sectors = (word >> x) & ((1 << (cb - 8)) - 1)
    refs: dict[str, object] = {
        f"{where}.cluster_bits": cb,
        f"{where}.raw": word,
        f"{where}.num_offset_bits": x,
        f"{where}.ofs_compressed": ofs,
        f"{where}.num_additional_sectors": sectors,
        f"{where}.len_compressed_max": (sectors + 1) * 512 - (ofs & 511),
    }
    trees = Trees(d, reference=refs)
    trees.compare(where, ours, cons, kobj)
    trees.leftovers()


def _compare_l2_table(d: Differ, k2: Any, where: str, data: bytes, g: _Q2Geometry) -> None:
    cb, extended = g.cluster_bits, g.extended
    per = 2 if extended else 1
    n = g.cluster_size // (8 * per)
    active, inactive = (
        ("entries_extended", "entries") if extended else ("entries", "entries_extended")
    )
    layout = Q2_L2_EXTENDED if extended else Q2_L2
    raw = _words(data)
    ours = gq2.L2Table.parse(data, cluster_bits=cb, extended=extended)
    if n <= SAMPLE_LIMIT:
        cons = parse_with_params(cq2.L2Table, data, cluster_bits=cb, extended=extended)
        kobj = k2.Qcow2.L2Table(cb, extended, KaitaiStream(BytesIO(data)))
        refs: dict[str, object] = {
            f"{where}.cluster_bits": cb,
            f"{where}.extended": extended,
            f"{where}.{inactive}": None,
        }
        trees = Trees(d, layouts=Q2_LAYOUTS, reference=refs, raw_tables={f"{where}.{active}": raw})
        trees.compare(where, ours, cons, kobj)
        trees.leftovers()
    else:
        # Too large for construct's BitStructs and KSC: every entry of ours against raw, and
        # construct's and KSC's entry types parsed at the sampled entries.
        d.same(f"{where}.cluster_bits", ours=ours.cluster_bits, raw=cb)
        d.same(f"{where}.extended", ours=ours.extended, raw=extended)
        d.same(f"{where}.{inactive}", ours=getattr(ours, inactive), raw=None)
        words = getattr(ours, active)
        if words is None:
            d.problem(f"{where}.{active}", "ours has no entries")
            return
        size = 8 * per
        indices = sample_indices(words, per)
        cons_entry = cq2.L2EntryExtended if extended else cq2.L2Entry
        ksc_entry = k2.Qcow2.L2EntryExtended if extended else k2.Qcow2.L2Entry
        stream = KaitaiStream(BytesIO(data))
        compare_packed(
            d,
            f"{where}.{active}",
            words,
            layout,
            construct=Sampled(
                indices, [cons_entry.parse(data[size * i : size * (i + 1)]) for i in indices]
            ),
            ksc=Sampled(indices, [_ksc_at(stream, size * i, ksc_entry) for i in indices]),
            raw=raw,
        )
    for i, word in enumerate(raw[::per]):
        if word & QCOW_OFLAG_COMPRESSED:
            with _guard(d, f"{where}.{active}[{i}] (compressed)"):
                _compare_q2_descriptor(d, k2, f"{where}.{active}[{i}] (compressed)", word, cb)


def _compare_qcow2(d: Differ, k2: Any, path: Path) -> None:
    with ExitStack() as stack:
        raw, f_ours, f_cons, f_ksc = (stack.enter_context(path.open("rb")) for _ in range(4))
        cluster_bits = struct.unpack_from(">I", _read_at(raw, 0, 72), 20)[0]
        first = _read_at(raw, 0, 1 << cluster_bits)
        g = _q2_geometry(first)
        large_refcount_table = g.num_refcount_table_entries > SAMPLE_LIMIT
        cons: Any = NA
        kroot: Any = NA
        with _guard(d, "Qcow2 (construct parse)"):
            schema = _without(cq2.Qcow2, "refcount_table") if large_refcount_table else cq2.Qcow2
            cons = schema.parse_stream(f_cons)
        with _guard(d, "Qcow2 (ksc parse)"):
            kroot = k2.Qcow2(KaitaiStream(f_ksc))
        ours = gq2.Qcow2.parse(first)
        refs, tables = _q2_references(first, raw)
        with _guard(d, "Qcow2"):
            trees = Trees(
                d,
                ours_file=f_ours,
                deferred=frozenset({("Qcow2", "refcount_table")}),
                layouts=Q2_LAYOUTS,
                reference=refs,
                raw_tables=tables,
            )
            trees.compare("Qcow2", ours, cons, kroot)
            trees.leftovers()

        rt_bytes = _read_at(raw, g.ofs_refcount_table, 8 * g.num_refcount_table_entries)
        rt_raw = _words(rt_bytes)
        with _guard(d, "Qcow2.refcount_table"):
            rt_ours = ours.read_refcount_table(f_ours)
            cons_rt: Any = NA if cons is NA else cons.get("refcount_table", NA)
            ksc_rt: Any = NA
            if large_refcount_table:
                # 2 MiB clusters: 262144 entries. Ours against raw on every entry; construct's
                # and KSC's entry type on the sample (the first 4096 and every nonzero entry).
                indices = sample_indices(rt_ours)
                stream = KaitaiStream(BytesIO(rt_bytes))
                entry = cq2.RefcountTableEntry
                cons_rt = Sampled(
                    indices, [entry.parse(rt_bytes[8 * i : 8 * i + 8]) for i in indices]
                )
                ksc_entry = k2.Qcow2.RefcountTableEntry
                ksc_rt = Sampled(indices, [_ksc_at(stream, 8 * i, ksc_entry) for i in indices])
            elif kroot is not NA:
                ksc_rt = kroot.refcount_table
            compare_packed(
                d,
                "Qcow2.refcount_table",
                rt_ours,
                Q2_REFCOUNT_TABLE,
                construct=cons_rt,
                ksc=ksc_rt,
                raw=rt_raw,
            )

        block0 = rt_raw[0] & REFT_OFFSET_MASK if rt_raw else 0
        if block0 == 0:
            d.problem("Qcow2.refcount_table[0]", "no refcount block 0")
        else:
            where = f"RefcountBlock[0]@{block0:#x}"
            with _guard(d, where):
                _compare_refcount_block(d, k2, where, _read_at(raw, block0, g.cluster_size), g)

        l1 = _words(_read_at(raw, g.ofs_l1_table, 8 * g.num_l1_entries))
        for i, word in enumerate(l1):
            offset = word & L1E_OFFSET_MASK
            if offset:
                where = f"L2Table[{i}]@{offset:#x}"
                with _guard(d, where):
                    _compare_l2_table(d, k2, where, _read_at(raw, offset, g.cluster_size), g)


@pytest.mark.parametrize("name", QCOW2_NAMES, ids=QCOW2_NAMES)
def test_qcow2_image(name: str, corpus: list[CorpusImage], ksc: KscModules) -> None:
    """Header, extensions, L1, refcount table and block 0, L2 tables, snapshots, bitmaps, LUKS."""
    image = _image(corpus, name)
    d = _differ(name)
    _compare_qcow2(d, ksc.qcow2, image.path)
    d.check(minimum_fields=200)


# --------------------------------------------------------------------------------------------
# qcow version 1


def _compare_q1_descriptor(d: Differ, k1: Any, where: str, word: int, cb: int) -> None:
    data = struct.pack(">Q", word)
    ours = gqcow.CompressedDescriptor.parse(data, cluster_bits=cb)
    cons = parse_with_params(cqcow.CompressedDescriptor, data, cluster_bits=cb)
    kobj = k1.Qcow.CompressedDescriptor(cb, KaitaiStream(BytesIO(data)))
    bits = 63 - cb  # qemu block/qcow.c: cluster_offset_mask, csize
    refs: dict[str, object] = {
        f"{where}.cluster_bits": cb,
        f"{where}.raw": word,
        f"{where}.num_offset_bits": bits,
        f"{where}.ofs_compressed": word & ((1 << bits) - 1),
        f"{where}.len_compressed": (word >> bits) & ((1 << cb) - 1),
    }
    trees = Trees(d, reference=refs)
    trees.compare(where, ours, cons, kobj)
    trees.leftovers()


def _compare_qcow1(d: Differ, k1: Any, path: Path) -> None:
    with ExitStack() as stack:
        raw, f_ours, f_cons, f_ksc = (stack.enter_context(path.open("rb")) for _ in range(4))
        head = _read_at(raw, 0, 48)
        names = (
            "magic",
            "version",
            "ofs_backing_file_name",
            "len_backing_file_name",
            "mtime",
            "len_virtual_disk",
            "cluster_bits",
            "l2_bits",
            "padding",
            "crypt_method",
            "ofs_l1_table",
        )
        values = struct.unpack(">4sIQIIQBB2sIQ", head)
        header = dict(zip(names, values, strict=True))
        cb, l2_bits, size = values[6], values[7], values[5]
        backing_ofs, backing_len, l1_ofs = values[2], values[3], values[10]
        shift = cb + l2_bits
        l1_size = (size + (1 << shift) - 1) >> shift  # qemu qcow_open
        header |= {
            "cluster_size": 1 << cb,
            "num_l2_entries": 1 << l2_bits,
            "len_l2_table": 8 << l2_bits,
            "num_l1_entries": l1_size,
        }
        assert set(header) == set(shape_of(gqcow.Header).seq) | set(shape_of(gqcow.Header).values)
        refs: dict[str, object] = {f"Qcow.header.{n}": v for n, v in header.items()}
        refs["Qcow.backing_file_name"] = (
            _read_at(raw, backing_ofs, backing_len) if backing_ofs else None
        )
        l1 = _words(_read_at(raw, l1_ofs, 8 * l1_size))
        refs["Qcow.l1_table (length)"] = l1_size
        refs.update({f"Qcow.l1_table[{i}].ofs_l2_table": w for i, w in enumerate(l1)})

        cons: Any = NA
        kroot: Any = NA
        with _guard(d, "Qcow (construct parse)"):
            cons = cqcow.Qcow.parse_stream(f_cons)
        with _guard(d, "Qcow (ksc parse)"):
            kroot = k1.Qcow(KaitaiStream(f_ksc))
        with _guard(d, "Qcow"):
            trees = Trees(d, ours_file=f_ours, layouts=Q1_LAYOUTS, reference=refs)
            trees.compare("Qcow", gqcow.Qcow.parse(head), cons, kroot)
            trees.leftovers()

        for i, offset in enumerate(l1):
            if not offset:
                continue
            where = f"L2Table[{i}]@{offset:#x}"
            with _guard(d, where):
                data = _read_at(raw, offset, 8 << l2_bits)
                table = _words(data)
                ours = gqcow.L2Table.parse(data, l2_bits=l2_bits)
                tcons = parse_with_params(cqcow.L2Table, data, l2_bits=l2_bits)
                tksc = k1.Qcow.L2Table(l2_bits, KaitaiStream(BytesIO(data)))
                trees = Trees(
                    d,
                    layouts=Q1_LAYOUTS,
                    reference={f"{where}.l2_bits": l2_bits},
                    raw_tables={f"{where}.entries": table},
                )
                trees.compare(where, ours, tcons, tksc)
                trees.leftovers()
                for j, word in enumerate(table):
                    if word & QCOW1_OFLAG_COMPRESSED:
                        _compare_q1_descriptor(
                            d, k1, f"{where}.entries[{j}] (compressed)", word, cb
                        )


@pytest.mark.parametrize("name", QCOW1_NAMES, ids=QCOW1_NAMES)
def test_qcow1_image(name: str, corpus: list[CorpusImage], ksc: KscModules) -> None:
    """Header and its value instances, backing name, L1 table, L2 tables, compressed entries."""
    image = _image(corpus, name)
    d = _differ(name)
    _compare_qcow1(d, ksc.qcow, image.path)
    d.check(minimum_fields=100)


# --------------------------------------------------------------------------------------------
# FVD: qemu cannot write it, so the images are built here (fvd.md sections 2, 3.1 and 3.4)

#: (offset, struct code, spec id) of every FvdHeader field, as in the table of fvd.md
#: section 2 (all little-endian, packed, 4336 bytes; the header region is 8192 bytes).
FVD_HEADER_FIELDS: tuple[tuple[int, str, str], ...] = (
    (0, "I", "magic"),
    (4, "I", "version"),
    (8, "i", "all_data_in_fvd_img"),
    (12, "q", "len_virtual_disk"),
    (20, "q", "len_metadata"),
    (28, "1024s", "base_img"),
    (1052, "16s", "base_img_fmt"),
    (1068, "q", "len_base_img"),
    (1076, "q", "ofs_bitmap"),
    (1084, "q", "len_bitmap"),
    (1092, "i", "block_size"),
    (1096, "i", "copy_on_read"),
    (1100, "q", "max_outstanding_copy_on_read_data"),
    (1108, "1024s", "data_file"),
    (2132, "16s", "data_file_fmt"),
    (2148, "i", "prefetch_start_delay"),
    (2152, "q", "ofs_prefetch_profile"),
    (2160, "q", "num_prefetch_profile_entries"),
    (2168, "i", "num_prefetch_slots"),
    (2172, "i", "bytes_per_prefetch"),
    (2176, "i", "prefetch_read_throughput_measure_time"),
    (2180, "i", "prefetch_write_throughput_measure_time"),
    (2184, "i", "prefetch_perf_calc_alpha"),
    (2188, "i", "prefetch_min_read_throughput"),
    (2192, "i", "prefetch_min_write_throughput"),
    (2196, "i", "prefetch_max_read_throughput"),
    (2200, "i", "prefetch_max_write_throughput"),
    (2204, "i", "prefetch_throttle_time"),
    (2208, "i", "compact_image"),
    (2212, "q", "ofs_table"),
    (2220, "q", "chunk_size"),
    (2228, "q", "storage_grow_unit"),
    (2236, "2048s", "add_storage_cmd"),
    (4284, "q", "ofs_journal"),
    (4292, "q", "len_journal"),
    (4300, "i", "clean_shutdown"),
    (4304, "i", "need_zero_init"),
    (4308, "i", "generate_prefetch_profile"),
    (4312, "i", "unit_of_prefetch_profile_entry_len"),
    (4316, "i", "profile_directed_prefetch_start_delay"),
    (4320, "16s", "write_updates_base_img"),
)
FVD_HEADER_SIZE = 4336
FVD_HEADER_REGION = 8192
MiB = 1 << 20


@dataclass(frozen=True)
class TableRec:
    """TABLE_JRECORD: u32 type, u32 first_chunk, u32 n, u32 entry[n]."""

    first_chunk: int
    entries: tuple[int, ...]

    def pack(self) -> bytes:
        n = len(self.entries)
        return struct.pack(f"<III{n}I", FVD_TABLE_JRECORD, self.first_chunk, n, *self.entries)


@dataclass(frozen=True)
class BitmapRec:
    """BITMAP_JRECORD: u32 type, u32 nb_sectors, i64 first_sector (maybe only 4-aligned)."""

    num_sectors: int
    first_sector: int

    def pack(self) -> bytes:
        return struct.pack("<IIq", FVD_BITMAP_JRECORD, self.num_sectors, self.first_sector)


@dataclass(frozen=True)
class EndRec:
    """A record that ends a sector: EMPTY_JRECORD (0) or any other type word."""

    record_type: int = FVD_EMPTY_JRECORD

    def pack(self) -> bytes:
        return struct.pack("<I", self.record_type)


Record = TableRec | BitmapRec | EndRec


@dataclass(frozen=True)
class Sector:
    """One 512-byte journal sector: records, then ``tail`` bytes, then zeros."""

    records: tuple[Record, ...] = ()
    tail: bytes = b""

    def pack(self) -> bytes:
        data = b"".join(r.pack() for r in self.records) + self.tail
        assert len(data) <= 512, f"journal sector of {len(data)} bytes"
        return data.ljust(512, b"\0")

    def parsed(self) -> tuple[tuple[Record, ...], int]:
        """The records a reader sees (an implicit EMPTY in the zero padding) and where they end."""
        records = list(self.records)
        used = sum(len(r.pack()) for r in records)
        if (not records or not isinstance(records[-1], EndRec)) and used < 512:
            records.append(EndRec())
            used += 4
        return tuple(records), used


@dataclass(frozen=True)
class FvdLayout:
    name: str
    header: Mapping[str, int | bytes]
    bitmap: bytes = b""
    table: tuple[int, ...] = ()
    journal: tuple[Sector, ...] = ()
    total_size: int = FVD_HEADER_REGION

    def header_values(self) -> dict[str, int | bytes]:
        values: dict[str, int | bytes] = {
            spec_id: (b"" if code.endswith("s") else 0) for _, code, spec_id in FVD_HEADER_FIELDS
        }
        values |= {"magic": FVD_MAGIC, "version": 1}
        values |= self.header
        return values

    def build(self) -> bytes:
        h = self.header_values()
        image = bytearray(self.total_size)
        for offset, code, spec_id in FVD_HEADER_FIELDS:
            struct.pack_into(f"<{code}", image, offset, h[spec_id])
        for offset, blob in self._regions(h):
            image[offset : offset + len(blob)] = blob
        return bytes(image)

    def _regions(self, h: Mapping[str, int | bytes]) -> list[tuple[int, bytes]]:
        regions: list[tuple[int, bytes]] = []
        if self.bitmap:
            regions.append((int(h["ofs_bitmap"]), self.bitmap))
        if self.table:
            regions.append((int(h["ofs_table"]), struct.pack(f"<{len(self.table)}I", *self.table)))
        if self.journal:
            regions.append((int(h["ofs_journal"]), b"".join(s.pack() for s in self.journal)))
        return regions


def _fvd_prefetch_defaults() -> dict[str, int]:
    """fvd_create's defaults when there is a base image (fvd.md section 2)."""
    return {
        "copy_on_read": 1,
        "max_outstanding_copy_on_read_data": 2_000_000,
        "prefetch_start_delay": -1,
        "num_prefetch_slots": 2,
        "bytes_per_prefetch": 1 * MiB,
        "prefetch_read_throughput_measure_time": 100,
        "prefetch_write_throughput_measure_time": 100,
        "prefetch_perf_calc_alpha": 80,
        "prefetch_min_read_throughput": 5120,
        "prefetch_min_write_throughput": 5120,
        "prefetch_max_read_throughput": 1_000_000_000,
        "prefetch_max_write_throughput": 1_000_000_000,
        "prefetch_throttle_time": 30_000,
        "unit_of_prefetch_profile_entry_len": 4096,
        "profile_directed_prefetch_start_delay": -1,
    }


def _fvd_layouts() -> list[FvdLayout]:
    empty = FVD_EMPTY_ENTRY
    # 1. No base, compact (64 chunks of 1 MiB), 8-sector journal: table records only, one
    #    sector exactly full (125 entries, no EMPTY), a stale sector ended by an unknown type.
    compact_table = (0, 1, 2, empty, 3, FVD_DIRTY | 4, *([empty] * 57), 0x7FFF_FFFE)
    compact = FvdLayout(
        "fvd-compact-journal",
        {
            "all_data_in_fvd_img": 1,
            "len_virtual_disk": 64 * MiB,
            "len_metadata": 16384,
            "compact_image": 1,
            "ofs_table": 8192,
            "chunk_size": 1 * MiB,
            "storage_grow_unit": 100 * MiB,
            "ofs_journal": 12288,
            "len_journal": 4096,
            "clean_shutdown": 1,
            "profile_directed_prefetch_start_delay": -1,
        },
        table=compact_table,
        journal=(
            Sector((TableRec(0, (0, 1, FVD_DIRTY | 2)),)),
            Sector((TableRec(4, tuple((k * 7919) & 0xFFFF_FFFF for k in range(125))),)),
            Sector(),
            Sector(
                (TableRec(60, (FVD_DIRTY | 16, 17, empty, 0x7FFF_FFFE)), EndRec(0x0BADF00D)),
                b"stale bytes after an unknown record type",
            ),
            *([Sector()] * 4),
        ),
        total_size=16384,
    )
    # 2. A 16 MiB base with a 512-byte-block bitmap, compact, 16-sector journal in which a
    #    table record is followed by a bitmap record (its i64 only 4-aligned), one sector
    #    exactly full (121 entries + a bitmap record), negative and > 4 GiB sector numbers.
    base_bitmap = bytes([0xFF] * 16) + bytes(range(256)) * 15 + bytes(240)
    both = FvdLayout(
        "fvd-base-bitmap-table",
        {
            **_fvd_prefetch_defaults(),
            "len_virtual_disk": 32 * MiB,
            "len_metadata": 24576,
            "base_img": b"base.raw",
            "base_img_fmt": b"raw",
            "len_base_img": 16 * MiB,
            "ofs_bitmap": 8192,
            "len_bitmap": 4096,
            "block_size": 512,
            "compact_image": 1,
            "ofs_table": 12288,
            "chunk_size": 1 * MiB,
            "storage_grow_unit": 100 * MiB,
            "ofs_journal": 16384,
            "len_journal": 8192,
            "clean_shutdown": 0,
        },
        bitmap=base_bitmap,
        table=(*range(10), *([empty] * 20), FVD_DIRTY | 10, 11),
        journal=(
            Sector((TableRec(2, (7, 8)), BitmapRec(4096, 4096))),
            Sector((TableRec(0, tuple(range(121))), BitmapRec(0xFFFF_FFFF, 0x1_2345_6789))),
            Sector((BitmapRec(8, -512), BitmapRec(1, 0x7FFF_FFFF_FFFF_FFFF))),
            Sector((TableRec(31, (FVD_DIRTY | 11,)), EndRec()), b"\x01stale journal bytes\xff"),
            *([Sector()] * 12),
        ),
        total_size=24576,
    )
    # 3. Not compact, bitmap only, a separate data file, the longest base name (1023 bytes),
    #    a raw chunk_size / storage_grow_unit stored although not compact (fvd.md section 2),
    #    64 KiB blocks over a base that is not a whole number of blocks.
    long_base = b"/images/" + b"b" * 1011 + b".raw"
    data_file = FvdLayout(
        "fvd-bitmap-data-file",
        {
            **_fvd_prefetch_defaults(),
            "len_virtual_disk": 20 * MiB,
            "len_metadata": 16384,
            "base_img": long_base,
            "base_img_fmt": b"qcow2",
            "len_base_img": 10 * MiB + 512,
            "ofs_bitmap": 8192,
            "len_bitmap": 4096,
            "block_size": 65536,
            "copy_on_read": 0,
            "data_file": b"data.raw",
            "data_file_fmt": b"raw",
            "chunk_size": 123_456,
            "storage_grow_unit": 1 * MiB,
            "add_storage_cmd": b"builtin:lvextend",
            "ofs_journal": 12288,
            "len_journal": 4096,
            "need_zero_init": 1,
            "write_updates_base_img": b"no",
        },
        bitmap=bytes([0b1010_0101, 0xFF, 0x01]) + bytes(4093),
        journal=(
            Sector((BitmapRec(128, 0),)),
            Sector((BitmapRec(256, 20480), BitmapRec(1, 1), BitmapRec(0, 0))),
            *([Sector()] * 6),
        ),
        total_size=16384,
    )
    # 4. Raw-like: no base, not compact, no journal; every region absent.
    raw_like = FvdLayout(
        "fvd-raw-like",
        {
            "all_data_in_fvd_img": 1,
            "len_virtual_disk": 1 << 30,
            "len_metadata": FVD_HEADER_REGION,
            "clean_shutdown": 1,
        },
    )
    return [compact, both, data_file, raw_like]


FVD_LAYOUTS_BUILT = _fvd_layouts()
FVD_NAMES = [layout.name for layout in FVD_LAYOUTS_BUILT]


def _fvd_references(
    layout: FvdLayout,
) -> tuple[dict[str, object], dict[str, Sequence[int]]]:
    """What each parser must report for a built FVD image: the values it was built from."""
    h = layout.header_values()
    refs: dict[str, object] = {}
    for _, code, spec_id in FVD_HEADER_FIELDS:
        value = h[spec_id]
        if spec_id == "magic":
            value = struct.pack("<I", FVD_MAGIC)
        elif code.endswith("s"):
            assert isinstance(value, bytes)
            value = value.ljust(int(code[:-1]), b"\0")
        refs[f"Fvd.header.{spec_id}"] = value
    size, chunk = int(h["len_virtual_disk"]), int(h["chunk_size"])
    base, block = int(h["len_base_img"]), int(h["block_size"])
    refs["Fvd.header.num_table_entries"] = -(-size // chunk) if chunk > 0 else 0
    refs["Fvd.header.num_bitmap_blocks"] = -(-base // block) if block > 0 else 0
    tables: dict[str, Sequence[int]] = {}
    refs["Fvd.bitmap"] = layout.bitmap if int(h["len_bitmap"]) > 0 else None
    if int(h["compact_image"]):
        tables["Fvd.table"] = list(layout.table)
    else:
        refs["Fvd.table"] = None
    if int(h["len_journal"]) <= 0:
        refs["Fvd.journal"] = None
        return refs, tables
    refs["Fvd.journal (length)"] = len(layout.journal)
    for s, sector in enumerate(layout.journal):
        where = f"Fvd.journal[{s}]"
        records, used = sector.parsed()
        refs[f"{where}.records (length)"] = len(records)
        for r, record in enumerate(records):
            rec = f"{where}.records[{r}]"
            if isinstance(record, TableRec):
                refs[f"{rec}.record_type"] = FVD_TABLE_JRECORD
                refs[f"{rec}.body.first_chunk"] = record.first_chunk
                refs[f"{rec}.body.num_entries"] = len(record.entries)
                tables[f"{rec}.body.entries"] = list(record.entries)
            elif isinstance(record, BitmapRec):
                refs[f"{rec}.record_type"] = FVD_BITMAP_JRECORD
                refs[f"{rec}.body.num_sectors"] = record.num_sectors
                refs[f"{rec}.body.first_sector"] = record.first_sector
            else:
                refs[f"{rec}.record_type"] = record.record_type
                refs[f"{rec}.body"] = None
        refs[f"{where}.rest"] = sector.pack()[used:]
    return refs, tables


def test_fvd_header_table_matches_the_format_document() -> None:
    """The hand-made FvdHeader layout is packed and 4336 bytes, as fvd.md section 2 says."""
    offset = 0
    for field_offset, code, spec_id in FVD_HEADER_FIELDS:
        assert field_offset == offset, f"{spec_id} at {field_offset}, expected {offset}"
        offset += struct.calcsize(f"<{code}")
    assert offset == FVD_HEADER_SIZE == gfvd.Fvd.SIZE
    ids = [spec_id for _, _, spec_id in FVD_HEADER_FIELDS]
    assert ids == list(shape_of(gfvd.Header).seq)


@pytest.mark.parametrize("layout", FVD_LAYOUTS_BUILT, ids=FVD_NAMES)
def test_fvd_image(layout: FvdLayout, ksc: KscModules) -> None:
    """Header and value instances, bitmap, lookup table and every journal record."""
    d = _differ(layout.name)
    image = layout.build()
    refs, tables = _fvd_references(layout)
    cons: Any = NA
    kroot: Any = NA
    with _guard(d, "Fvd (construct parse)"):
        cons = cfvd.Fvd.parse_stream(BytesIO(image))
    with _guard(d, "Fvd (ksc parse)"):
        kroot = ksc.fvd.Fvd(KaitaiStream(BytesIO(image)))
    with _guard(d, "Fvd"):
        trees = Trees(
            d,
            ours_file=BytesIO(image),
            layouts=FVD_LAYOUTS,
            reference=refs,
            raw_tables=tables,
        )
        trees.compare("Fvd", gfvd.Fvd.parse(image), cons, kroot)
        trees.leftovers()
    d.check(minimum_fields=40)


# --------------------------------------------------------------------------------------------
# construct schemas of parameterised types, parsed on their own


_PARAMETERISED: list[tuple[str, Any, dict[str, int | bool], int]] = [
    ("qcow2.L2Table", cq2.L2Table, {"cluster_bits": 9, "extended": False}, 512),
    ("qcow2.L2Table-extended", cq2.L2Table, {"cluster_bits": 9, "extended": True}, 512),
    ("qcow2.RefcountBlock", cq2.RefcountBlock, {"cluster_bits": 9, "refcount_order": 4}, 512),
    ("qcow2.CompressedDescriptor", cq2.CompressedDescriptor, {"cluster_bits": 16}, 8),
    ("qcow.L2Table", cqcow.L2Table, {"l2_bits": 6}, 512),
    ("qcow.CompressedDescriptor", cqcow.CompressedDescriptor, {"cluster_bits": 12}, 8),
]


@pytest.mark.parametrize(
    ("schema", "params", "size"),
    [case[1:] for case in _PARAMETERISED],
    ids=[case[0] for case in _PARAMETERISED],
)
def test_construct_parameterised_types_parse_standalone(
    schema: Any, params: dict[str, int | bool], size: int
) -> None:
    """``schema.parse(data, **params)``, construct's way to pass a Kaitai type its params.

    The differential tests above parse these types through diff_support.parse_with_params,
    which also works for a schema that reads its params from its own context, so that they
    compare the values even when this fails.
    """
    data = (bytes(range(1, 256)) * 3)[:size]
    expected = parse_with_params(schema, data, **params)
    try:
        got = schema.parse(data, **params)
    except Exception as exc:
        pytest.fail(
            f"{type(exc).__name__}: {exc} -- the schema reads its params as ctx.<param>, but "
            "construct keeps parse() keyword arguments in the outer context (ctx._params)",
            pytrace=False,
        )
    keys = [key for key in expected if not key.startswith("_") and key not in params]
    assert {key: got[key] for key in keys} == {key: expected[key] for key in keys}


# --------------------------------------------------------------------------------------------
# Must stay last: pytest runs a module's tests in file order.


def test_compared_field_total() -> None:
    """The differential tests above compared every image and a large number of fields."""
    expected = {*QCOW2_NAMES, *QCOW1_NAMES, *FVD_NAMES}
    missing = sorted(expected - TALLY.keys())
    assert not missing, f"not compared (run this module whole): {missing}"
    total = sum(d.fields for d in TALLY.values())
    values = sum(d.values for d in TALLY.values())
    assert total > 10_000, f"only {total} fields ({values} values) compared"
    for name in sorted(expected):
        assert TALLY[name].fields > 0, f"{name}: nothing compared"
