"""Creating FVD images with the reference driver's option names and layout (fvd.md 3.1).

Regions in order header (8192 bytes), bitmap (only with a base), table (only compact),
journal (only when a bitmap or a table exists), then data; every offset is written in the
header. The bitmap and journal are zeros (a sparse truncate), the table all EMPTY.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..generated import fvd as fv
from ..image import UsageError
from ..qcow2.create import _bool, parse_size
from .consts import (
    BITMAP_RECORD_BYTES,
    EMPTY,
    ENTRY_BYTES,
    HEADER_REGION,
    REGION_ALIGN,
    SECTOR,
    TABLE_RECORD_HEAD,
    VERSION,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_GROW_UNIT",
    "DEFAULT_JOURNAL",
    "MODERATE_BITMAP",
    "bitmap_bytes",
    "create_fvd",
    "default_block_size",
    "round_up",
]

#: reference defaults (fvd.md 2, 3.2, 3.3, 3.4)
DEFAULT_CHUNK = 1 << 20
DEFAULT_JOURNAL = 16 << 20
DEFAULT_GROW_UNIT = 100 << 20
MODERATE_BITMAP = 4 << 20
MAX_NAME = 1023
#: formats a data file may have: resized as the data region grows (qcow v1 cannot resize)
GROWABLE_DATA_FORMATS = ("raw", "qcow2")
MAX_FMT = 15
MAX_CMD = 2047
#: the create-time prefetch and copy-on-read knobs the reference fills in with a base image
PREFETCH_DEFAULTS = {
    "max_outstanding_copy_on_read_data": 2_000_000,
    "prefetch_start_delay": -1,
    "num_prefetch_slots": 2,
    "prefetch_read_throughput_measure_time": 100,
    "prefetch_write_throughput_measure_time": 100,
    "prefetch_perf_calc_alpha": 80,
    "prefetch_min_read_throughput": 5120,
    "prefetch_min_write_throughput": 5120,
    "prefetch_max_read_throughput": 1_000_000_000,
    "prefetch_max_write_throughput": 1_000_000_000,
    "prefetch_throttle_time": 30_000,
}
PREFETCH_BYTES = 1 << 20
#: entries of a table record in a journal sector that also holds a bitmap record (121)
TABLE_ENTRIES_WITH_BITMAP = (SECTOR - TABLE_RECORD_HEAD - BITMAP_RECORD_BYTES) // ENTRY_BYTES


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def bitmap_bytes(base_size: int, block_size: int) -> int:
    """Bytes of bits for the blocks of a base range (before rounding to a region)."""
    blocks = -(-base_size // block_size)
    return -(-blocks // 8)


def default_block_size(base_size: int) -> int:
    """The smallest power of two >= 512 whose bitmap over the base is at most 4 MiB."""
    bs = SECTOR
    while bitmap_bytes(base_size, bs) > MODERATE_BITMAP:
        bs *= 2
    return bs


def _name(value: Any, what: str, limit: int) -> bytes:
    """A name for a char array of ``limit + 1`` bytes, NUL-padded to that size."""
    raw = os.fsencode(str(value))
    if len(raw) > limit:
        raise UsageError(f"{what} is longer than {limit} bytes")
    if b"\0" in raw:
        raise UsageError(f"{what} contains a NUL byte")
    return raw.ljust(limit + 1, b"\0")


def create_fvd(path: Path, size: int | str, **options: Any) -> None:
    """``qemu-img create -f fvd`` with the reference's options: backing_file, backing_fmt,
    block_size, compact_image, chunk_size, journal_size, data_file, data_file_fmt,
    copy_on_read, storage_grow_unit, add_storage_cmd (stored, never run)."""
    opts = dict(options)
    known = {
        "backing_file", "backing_fmt", "block_size", "compact_image", "chunk_size",
        "journal_size", "data_file", "data_file_fmt", "copy_on_read", "storage_grow_unit",
        "add_storage_cmd",
    }
    for key in opts:
        if key not in known:
            raise UsageError(f"Invalid parameter '{key}'")
    vsize = round_up(parse_size(size), SECTOR)
    compact = _bool(opts.get("compact_image", False), "compact_image")
    base_name = opts.get("backing_file") or None
    base_fmt = str(opts.get("backing_fmt") or "raw") if base_name else ""
    data_name = opts.get("data_file") or None
    data_fmt = str(opts.get("data_file_fmt") or "raw") if data_name else ""
    if data_fmt and data_fmt not in GROWABLE_DATA_FORMATS:
        raise UsageError(f"data_file_fmt '{data_fmt}' cannot hold FVD data: the data file "
                         f"must grow and shrink ({', '.join(GROWABLE_DATA_FORMATS)})")
    fields: dict[str, Any] = {name: 0 for name in _INT_FIELDS}
    fields |= {
        "version": VERSION,
        "len_virtual_disk": vsize,
        "base_img": bytes(MAX_NAME + 1), "base_img_fmt": bytes(MAX_FMT + 1),
        "data_file": bytes(MAX_NAME + 1), "data_file_fmt": bytes(MAX_FMT + 1),
        "add_storage_cmd": _name(opts.get("add_storage_cmd", ""), "add_storage_cmd", MAX_CMD),
        "write_updates_base_img": bytes(MAX_FMT + 1),
        "clean_shutdown": 1,
        "all_data_in_fvd_img": 1,
        "unit_of_prefetch_profile_entry_len": 4096,
        "profile_directed_prefetch_start_delay": -1,
    }
    base_size = 0
    block_size = 0
    if base_name:
        fields["base_img"] = _name(base_name, "backing_file", MAX_NAME)
        fields["base_img_fmt"] = _name(base_fmt, "backing_fmt", MAX_FMT)
        from ..opener import open_image

        where = Path(os.fsdecode(fields["base_img"].rstrip(b"\0")))
        with open_image(where if where.is_absolute() else path.parent / where, "r",
                        base_fmt) as base:
            base_size = round_up(min(vsize, base.size), SECTOR)
        if "block_size" in opts:
            block_size = round_up(parse_size(opts["block_size"]), SECTOR)
            if block_size <= 0:
                raise UsageError("block_size must be positive")
        else:
            block_size = default_block_size(base_size)
        fields |= PREFETCH_DEFAULTS
        fields |= {
            "all_data_in_fvd_img": 0,
            "len_base_img": base_size,
            "block_size": block_size,
            "copy_on_read": int(_bool(opts.get("copy_on_read", True), "copy_on_read")),
            "bytes_per_prefetch": round_up(PREFETCH_BYTES, block_size),
        }
    bitmap_size = 0
    if base_name:
        bitmap_size = round_up(bitmap_bytes(base_size, block_size), REGION_ALIGN)
        fields |= {"ofs_bitmap": HEADER_REGION, "len_bitmap": bitmap_size}
    at = HEADER_REGION + bitmap_size
    table_size = entries = 0
    chunk_raw = parse_size(opts["chunk_size"]) if "chunk_size" in opts else 0
    grow_raw = parse_size(opts["storage_grow_unit"]) if "storage_grow_unit" in opts else 0
    if compact:
        chunk = round_up(chunk_raw or DEFAULT_CHUNK, REGION_ALIGN)
        entries = -(-vsize // chunk)
        table_size = round_up(ENTRY_BYTES * entries, REGION_ALIGN)
        fields |= {
            "compact_image": 1, "ofs_table": at, "chunk_size": chunk,
            "storage_grow_unit": max(grow_raw or DEFAULT_GROW_UNIT, chunk),
        }
        at += table_size
    else:
        # stored raw although unused (fvd.md 2)
        fields |= {"chunk_size": chunk_raw, "storage_grow_unit": grow_raw}
    journal_opt = parse_size(opts["journal_size"]) if "journal_size" in opts else None
    extra = 0
    if bitmap_size or compact:
        if journal_opt is None or journal_opt > 0:
            journal = journal_opt or DEFAULT_JOURNAL
            if compact:
                journal = max(journal, -(-entries // TABLE_ENTRIES_WITH_BITMAP) * SECTOR)
            journal = round_up(journal, REGION_ALIGN)
            fields |= {"ofs_journal": at, "len_journal": journal}
            at += journal
    elif journal_opt:
        extra = journal_opt  # the reference's quirk: zeros counted, no journal (fvd.md 3.1)
    fields["len_metadata"] = at + extra
    if data_name:
        fields["data_file"] = _name(data_name, "data_file", MAX_NAME)
        fields["data_file_fmt"] = _name(data_fmt, "data_file_fmt", MAX_FMT)
    header = fv.Header(**fields)
    header.validate()
    table = fv.TableEntry.from_raw(EMPTY).build() * (table_size // ENTRY_BYTES)
    with path.open("wb") as f:
        f.write(header.build())
        if table:
            f.seek(fields["ofs_table"])
            f.write(table)
        f.truncate(fields["len_metadata"])
        f.flush()
        os.fsync(f.fileno())
    if data_name:
        where = Path(os.fsdecode(fields["data_file"].rstrip(b"\0")))
        target = where if where.is_absolute() else path.parent / where
        if data_fmt == "raw":
            with target.open("wb") as d:
                os.fsync(d.fileno())
        else:  # an empty image of that format; it grows by resize as data arrives
            from ..creator import create_image

            create_image(str(target), data_fmt, 0, {})


_INT_FIELDS = (
    "all_data_in_fvd_img", "len_virtual_disk", "len_metadata", "len_base_img", "ofs_bitmap",
    "len_bitmap", "block_size", "copy_on_read", "max_outstanding_copy_on_read_data",
    "prefetch_start_delay", "ofs_prefetch_profile", "num_prefetch_profile_entries",
    "num_prefetch_slots", "bytes_per_prefetch", "prefetch_read_throughput_measure_time",
    "prefetch_write_throughput_measure_time", "prefetch_perf_calc_alpha",
    "prefetch_min_read_throughput", "prefetch_min_write_throughput",
    "prefetch_max_read_throughput", "prefetch_max_write_throughput",
    "prefetch_throttle_time", "compact_image", "ofs_table", "chunk_size",
    "storage_grow_unit", "ofs_journal", "len_journal", "clean_shutdown", "need_zero_init",
    "generate_prefetch_profile", "unit_of_prefetch_profile_entry_len",
    "profile_directed_prefetch_start_delay",
)
