"""qemu-img check conformance: diskspec.qcow2.check against qemu-img check 7.2.

1. Every qcow2 image of the corpus: our report equals ``qemu-img check --output=json`` field
   by field (the file name aside) and our exit code equals qemu-img's.
2. Copies of small qemu-made images damaged as in qcow.md D.2 to D.4 (pokes at offsets found
   through the generated structures): the same comparison on each damaged file.
3. For the repairable damage, our repair on one copy and ``qemu-img check -r`` on another:
   qemu-img then finds both clean, and both read the same guest data (qemu-img compare).

qemu-img and qemu-io are required: without them these tests fail, they never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import diskspec
import diskspec.qcow2.check as check_module
from diskspec.generated import qcow2 as q
from diskspec.qcow2.check import CheckResult, check, check_image, rebuild_refcounts
from diskspec.qcow2.image import Qcow2Image
from diskspec.tests.corpus import CorpusImage, image_opts, require_tool

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
TIMEOUT = 60.0
SECRET = "diskspec-check-secret"
SECRET_OBJECT = f"secret,id=sec0,data={SECRET}"

L1 = q.L1Entry
L2 = q.L2Entry
E = q.SnapshotEntry
H = q.Header


# --------------------------------------------------------------------------------------------
# qemu


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=TIMEOUT,
        env={**os.environ, "LC_ALL": "C"},
    )


def _opts(path: Path) -> list[str]:
    """Open without probing; LUKS bases (named luks*) also get their secret."""
    spec = f"driver=qcow2,file.filename={path.name}"
    if path.name.startswith("luks"):
        return ["--object", SECRET_OBJECT, "--image-opts", spec + ",encrypt.key-secret=sec0"]
    return ["--image-opts", spec]


def qemu_check(
    path: Path, *extra: str, opts: list[str] | None = None
) -> tuple[dict[str, Any] | None, int, str]:
    """qemu-img check's JSON (None when it prints none), exit code and stderr."""
    done = _run(
        [require_tool("qemu-img"), "check", *extra, "--output=json", *(opts or _opts(path))],
        path.parent,
    )
    report = json.loads(done.stdout) if done.stdout.strip() else None
    return report, done.returncode, done.stderr


def qemu_io(path: Path, *commands: str) -> None:
    args = [arg for c in commands for arg in ("-c", c)]
    done = _run([require_tool("qemu-io"), *args, *_opts(path)], path.parent)
    assert done.returncode == 0 and "failed" not in done.stdout, done


def qemu_img(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([require_tool("qemu-img"), *args], cwd)


def ours(result: CheckResult) -> dict[str, Any] | None:
    """Our report as qemu-img prints it: nothing when the check failed."""
    if result.failed is not None:
        return None
    report = result.to_json_dict()
    report.pop("filename")
    return report


def theirs(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    report = dict(report)
    report.pop("filename")
    return report


# --------------------------------------------------------------------------------------------
# 1. the corpus


def test_corpus_agrees_with_qemu(corpus: list[CorpusImage]) -> None:
    images = [i for i in corpus if i.fmt == "qcow2"]
    assert len(images) >= 30
    agreed = 0
    for image in images:
        report, rc, err = qemu_check(image.path, opts=image_opts(image))
        result = check(image.path)
        assert ours(result) == theirs(report), (image.name, result.messages, err)
        assert result.exit_code() == rc, image.name
        agreed += 1
    assert agreed == len(images)


def test_open_image_check_agrees(corpus: list[CorpusImage]) -> None:
    """Qcow2Image-level check (what Qcow2Image.check delegates to) on an open image."""
    for image in corpus:
        if image.fmt != "qcow2" or "snapshots" not in image.tags:
            continue
        report, rc, _ = qemu_check(image.path, opts=image_opts(image))
        with diskspec.open(image.path, backing=False) as img:
            assert isinstance(img, Qcow2Image)
            result = check_image(img)
        assert ours(result) == theirs(report) and result.exit_code() == rc, image.name


# --------------------------------------------------------------------------------------------
# Small images to damage


@dataclass(frozen=True)
class Base:
    name: str
    options: str
    writes: tuple[str, ...]
    snapshot: bool = False
    bitmap: bool = False
    luks: bool = False


WRITES = ("write -P 0x11 0 64k", "write -P 0x22 64k 64k", "write -P 0x33 1M 64k")
BASES = {
    b.name: b
    for b in (
        Base("plain", "compat=1.1", WRITES),
        Base("v2", "compat=0.10", WRITES),
        Base("r1", "compat=1.1,refcount_bits=1", WRITES),
        Base("snap", "compat=1.1", WRITES, snapshot=True),
        Base("comp", "compat=1.1", ("write -c -P 0x55 0 64k", "write -P 0x66 64k 64k")),
        Base("r64", "compat=1.1,refcount_bits=64", WRITES),
        Base(
            "el2",
            "compat=1.1,extended_l2=on",
            ("write -P 0x77 0 2k", "write -P 0x78 64k 64k", "write -c -P 0x79 128k 64k"),
        ),
        Base("bitmaps", "compat=1.1", WRITES, bitmap=True),
        Base("luks", "compat=1.1,encrypt.format=luks,encrypt.key-secret=sec0,"
             "encrypt.iter-time=10", WRITES, luks=True),
        Base("datafile", "compat=1.1,data_file=datafile.data", WRITES),
    )
}


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check-bases")
    out: dict[str, Path] = {}
    for base in BASES.values():
        path = root / f"{base.name}.qcow2"
        secret = ["--object", SECRET_OBJECT] if base.luks else []
        for _ in range(10):  # qemu-img 7.2's LUKS PBKDF benchmark fails now and then
            done = qemu_img(root, "create", "-q", "-f", "qcow2", *secret, "-o", base.options,
                            path.name, str(SIZE))
            if done.returncode == 0 or "CPU usage" not in done.stderr:
                break
        assert done.returncode == 0, done
        if base.bitmap:
            done = qemu_img(root, "bitmap", "--add", *_opts(path), "b0")
            assert done.returncode == 0, done
        qemu_io(path, *base.writes)
        if base.snapshot:
            done = qemu_img(root, "snapshot", "-q", "-c", "s1", *_opts(path))
            assert done.returncode == 0, done
            qemu_io(path, "write -P 0x44 0 4k", "write -P 0x45 2M 64k")
        report, rc, _ = qemu_check(path)
        assert rc == 0 and report is not None and not report.get("leaks"), (base, report)
        out[base.name] = path
    return out


@dataclass(frozen=True)
class Layout:
    """Where things are, read with the generated structures."""

    cs: int
    extended: bool
    refcount_order: int
    l1_offset: int
    l1: list[int]
    reftable_offset: int
    reftable: list[int]
    snapshots_offset: int
    snapshots: list[q.SnapshotEntry]

    def l2_slot(self, guest_cluster: int) -> int:
        """File offset of the L2 entry of a guest cluster."""
        entry = q.L2EntryExtended.SIZE if self.extended else L2.SIZE
        per_table = self.cs // entry
        l2 = self.l1[guest_cluster // per_table] & L1.OFS_L2_TABLE_DIV512_MASK
        return l2 + guest_cluster % per_table * entry

    def snapshot_at(self, index: int) -> int:
        return self.snapshots_offset + sum(len(e.build()) for e in self.snapshots[:index])


def layout(path: Path) -> Layout:
    with path.open("rb") as f:
        image = q.Qcow2.read(f)
        h = image.header
        return Layout(
            cs=h.cluster_size,
            extended=h.has_extended_l2,
            refcount_order=h.refcount_order_effective,
            l1_offset=h.ofs_l1_table,
            l1=list(image.read_l1_table(f)),
            reftable_offset=h.ofs_refcount_table,
            reftable=list(image.read_refcount_table(f)),
            snapshots_offset=h.ofs_snapshot_table,
            snapshots=image.read_snapshot_table(f) if h.num_snapshots else [],
        )


class Poker:
    """Small struct.pack_into pokes into a copy of an image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.at = layout(path)
        self.buf = bytearray(path.read_bytes())

    def u64(self, offset: int) -> int:
        value: int = struct.unpack_from(">Q", self.buf, offset)[0]
        return value

    def put64(self, offset: int, value: int) -> None:
        if offset + 8 > len(self.buf):  # qemu's files may end mid-cluster
            self.buf += bytes(offset + 8 - len(self.buf))
        struct.pack_into(">Q", self.buf, offset, value)

    def put32(self, offset: int, value: int) -> None:
        struct.pack_into(">I", self.buf, offset, value)

    def l2(self, guest_cluster: int) -> int:
        return self.at.l2_slot(guest_cluster)

    def set_refcount(self, cluster: int, value: int) -> None:
        """Through the generated RefcountBlock, so every refcount width works."""
        cs, order = self.at.cs, self.at.refcount_order
        per_block = cs * 8 >> order
        block = self.at.reftable[cluster // per_block] & (
            q.RefcountTableEntry.OFS_REFCOUNT_BLOCK_DIV512_MASK
        )
        cb = cs.bit_length() - 1
        parsed = q.RefcountBlock.parse(
            self.buf[block : block + cs], cluster_bits=cb, refcount_order=order
        )
        counts = getattr(parsed, f"refcounts_{1 << order}")
        counts[cluster % per_block] = value
        self.buf[block : block + cs] = parsed.build()

    def data_cluster(self, guest_cluster: int) -> int:
        return (self.u64(self.l2(guest_cluster)) & L2.OFS_CLUSTER_DIV512_MASK) // self.at.cs

    def save(self) -> None:
        self.path.write_bytes(bytes(self.buf))


Damage = Callable[[Poker], None]
LOW_RESERVED_L1 = L1.RESERVED_HIGH_MASK & -L1.RESERVED_HIGH_MASK  # lowest reserved bit
LOW_RESERVED_L2 = L2.RESERVED_LOW_MASK & -L2.RESERVED_LOW_MASK
UNALIGNED = 0x2A00


def _l1_at_itself(p: Poker) -> None:
    p.put64(p.at.l1_offset, p.at.l1_offset | L1.COPIED_MASK)


def _refcount(value: int, guest_cluster: int = 0) -> Damage:
    def damage(p: Poker) -> None:
        p.set_refcount(p.data_cluster(guest_cluster), value)

    return damage


def _clear_l2_copied(p: Poker, guest_cluster: int = 0) -> None:
    slot = p.l2(guest_cluster)
    p.put64(slot, p.u64(slot) & ~L2.COPIED_MASK)


def _l2_unaligned_at(guest_cluster: int) -> Damage:
    def damage(p: Poker) -> None:
        slot = p.l2(guest_cluster)
        p.put64(slot, p.u64(slot) + UNALIGNED)

    return damage


def _clear_l1_copied(p: Poker) -> None:
    p.put64(p.at.l1_offset, p.at.l1[0] & ~L1.COPIED_MASK)


def _two_entries_one_cluster(p: Poker) -> None:
    p.put64(p.l2(1), p.u64(p.l2(0)))


def _l1_reserved(p: Poker) -> None:
    p.put64(p.at.l1_offset, p.at.l1[0] | LOW_RESERVED_L1)


def _l2_reserved(p: Poker) -> None:
    p.put64(p.l2(0), p.u64(p.l2(0)) | LOW_RESERVED_L2)


def _reftable_reserved(p: Poker) -> None:
    p.put64(p.at.reftable_offset, p.at.reftable[0] | 1)


def _l1_unaligned(p: Poker) -> None:
    p.put64(p.at.l1_offset, (p.at.l1[0] + UNALIGNED) | L1.COPIED_MASK)


def _l2_unaligned(p: Poker) -> None:
    p.put64(p.l2(0), p.u64(p.l2(0)) + UNALIGNED)


def _prealloc_zero_unaligned(p: Poker) -> None:
    p.put64(p.l2(0), (p.u64(p.l2(0)) + UNALIGNED) | L2.ZERO_MASK)


def _reftable_unaligned(p: Poker) -> None:
    p.put64(p.at.reftable_offset, p.at.reftable[0] + UNALIGNED)


def _refblock_outside(p: Poker) -> None:
    p.put64(p.at.reftable_offset + q.RefcountTableEntry.SIZE, 16 * p.at.cs)


def _refblock_far_outside(p: Poker) -> None:
    p.put64(p.at.reftable_offset + q.RefcountTableEntry.SIZE, 0x7FFFFFFFFFFF0000)


def _l2_past_eof(p: Poker) -> None:
    p.put64(p.l2(0), 0x0000100000000000 | L2.COPIED_MASK)


def _reftable_zero(p: Poker) -> None:
    p.put64(p.at.reftable_offset, 0)


def _refblock_zeroed(p: Poker) -> None:
    block = p.at.reftable[0] & q.RefcountTableEntry.OFS_REFCOUNT_BLOCK_DIV512_MASK
    p.buf[block : block + p.at.cs] = bytes(p.at.cs)


def _no_refcount_table(p: Poker) -> None:
    p.put64(H.OFS_REFCOUNT_TABLE_AT, 0)
    p.put32(H.NUM_REFCOUNT_TABLE_CLUSTERS_AT, 0)


def _reftable_beyond_eof(p: Poker) -> None:
    p.put64(H.OFS_REFCOUNT_TABLE_AT, 256 * p.at.cs)


def _compressed_copied(p: Poker) -> None:
    p.put64(p.l2(0), p.u64(p.l2(0)) | L2.COPIED_MASK)


def _compressed_past_eof(p: Poker) -> None:
    entry = p.u64(p.l2(0))
    desc = q.CompressedDescriptor(cluster_bits=p.at.cs.bit_length() - 1, raw=entry)
    p.put64(p.l2(0), entry - desc.ofs_compressed + (1 << 40))


def _subcluster(bitmap: Callable[[int], int], guest_cluster: int = 0) -> Damage:
    def damage(p: Poker) -> None:
        slot = p.l2(guest_cluster) + q.L2EntryExtended.SUBCLUSTERS_AT
        p.put64(slot, bitmap(p.u64(slot)))

    return damage


def _snapshot_field(start: int, end: int, change: Callable[[int], int]) -> Damage:
    """Change the field [start, end) of the first snapshot entry (``*_AT`` bounds)."""

    def damage(p: Poker) -> None:
        at = p.at.snapshot_at(0)
        value = int.from_bytes(p.buf[at + start : at + end], "big")
        p.buf[at + start : at + end] = change(value).to_bytes(end - start, "big")

    return damage


def _snapshot_extra_8(p: Poker) -> None:
    """Rewrite the snapshot table with the first entry carrying only 8 bytes of extra data."""
    entries = p.at.snapshots
    first = entries[0]
    extra = q.SnapshotExtraData(len_vm_state=first.extra_data.len_vm_state, unknown=b"")
    first.len_extra_data = 8
    first.extra_data = extra
    length = E.EXTRA_DATA_AT + 8 + first.len_id + first.len_name
    first.padding = bytes(-length % 8)
    table = b"".join(e.build() for e in entries)
    at = p.at.snapshots_offset
    p.buf[at : at + len(table)] = table


def _snapshot_offset_unaligned(p: Poker) -> None:
    p.put64(H.OFS_SNAPSHOT_TABLE_AT, p.at.snapshots_offset + 512)


def _l2_points_at_refblock(p: Poker) -> None:
    block = p.at.reftable[0] & q.RefcountTableEntry.OFS_REFCOUNT_BLOCK_DIV512_MASK
    p.put64(p.l2(1), block | L2.COPIED_MASK)


def _l2_copied_no_offset(p: Poker) -> None:
    p.put64(p.l2(0), L2.COPIED_MASK)


def _l1_copied_no_offset(p: Poker) -> None:
    p.put64(p.at.l1_offset, L1.COPIED_MASK)


def _zero_flag(p: Poker) -> None:
    p.put64(p.l2(0), p.u64(p.l2(0)) | L2.ZERO_MASK)


def _feature(at: int, bit: int) -> Damage:
    def damage(p: Poker) -> None:
        p.put64(at, p.u64(at) | bit)

    return damage


def _dirty_and_refcount_zero(p: Poker) -> None:
    _feature(H.INCOMPATIBLE_FEATURES_AT, int(q.IncompatibleFeature.DIRTY))(p)
    _refcount(0)(p)


def _bitmap_tables(path: Path) -> list[tuple[int, int]]:
    """(table offset, first data cluster offset) of every bitmap."""
    out = []
    with path.open("rb") as f:
        image = q.Qcow2.read(f)
        for ext in image.extension_area.extensions:
            if isinstance(ext.data, q.ExtBitmaps):
                for entry in ext.data.read_bitmap_directory(f).entries:
                    table = entry.read_bitmap_table(f)
                    data = next((w & q.BitmapTableEntry.OFS_DATA_DIV512_MASK for w in table
                                 if w & q.BitmapTableEntry.OFS_DATA_DIV512_MASK), 0)
                    out.append((entry.ofs_bitmap_table, data))
    return out


def _bitmap_entry_reserved(p: Poker) -> None:
    table, _ = _bitmap_tables(p.path)[0]
    p.put64(table, p.u64(table) | q.BitmapTableEntry.RESERVED_LOW_MASK)


def _bitmap_data_refcount_zero(p: Poker) -> None:
    _, data = _bitmap_tables(p.path)[0]
    assert data
    p.set_refcount(data // p.at.cs, 0)


def _luks_header_refcount(value: int) -> Damage:
    def damage(p: Poker) -> None:
        with p.path.open("rb") as f:
            image = q.Qcow2.read(f)
        crypto = next(e.data for e in image.extension_area.extensions
                      if isinstance(e.data, q.ExtFullDiskEncryption))
        p.set_refcount(crypto.ofs_encryption_header // p.at.cs + 1, value)

    return damage


def _el2_unaligned_zero_subclusters(p: Poker) -> None:
    slot = p.l2(1)
    p.put64(slot, p.u64(slot) + UNALIGNED)
    p.put64(slot + q.L2EntryExtended.SUBCLUSTERS_AT, q.SubclusterBitmap.READS_AS_ZERO_MASK)


def _snapshot_extra_too_big(p: Poker) -> None:
    """The first snapshot entry with 2048 bytes of extra data (qemu allows 1024): a new table
    at the end of the file, its clusters refcounted, the old table left as a leak."""
    entries = p.at.snapshots
    first = entries[0]
    first.len_extra_data = 2048
    first.extra_data = q.SnapshotExtraData(
        len_vm_state=first.extra_data.len_vm_state,
        len_virtual_disk=first.extra_data.len_virtual_disk,
        icount=first.extra_data.icount,
        unknown=bytes(2048 - q.SnapshotExtraData.UNKNOWN_AT),
    )
    table = b"".join(e.build() for e in entries)
    at = len(p.buf) + (-len(p.buf)) % p.at.cs
    p.buf += bytes(at - len(p.buf)) + table
    for cluster in range(at // p.at.cs, -(-(at + len(table)) // p.at.cs)):
        p.set_refcount(cluster, 1)
    p.put64(H.OFS_SNAPSHOT_TABLE_AT, at)


def _copied_set_on_shared(p: Poker) -> None:
    slot = p.l2(1)  # shared with the snapshot: refcount 2
    p.put64(slot, p.u64(slot) | L2.COPIED_MASK)


def _active_l1_to_inactive_l2(p: Poker) -> None:
    """The active L1 entry names the snapshot's (old) L2 table."""
    with p.path.open("rb") as f:
        old_l2 = p.at.snapshots[0].read_l1_table(f)[0]
    p.put64(p.at.l1_offset, (old_l2 & L1.OFS_L2_TABLE_DIV512_MASK) | L1.COPIED_MASK)


def _compressed_sectors_enlarged(p: Poker) -> None:
    """The sector count of a compressed cluster at its maximum: the range now covers the
    following clusters too (qcow.md D.3 54)."""
    entry = p.u64(p.l2(0))
    cb = p.at.cs.bit_length() - 1
    desc = q.CompressedDescriptor(cluster_bits=cb, raw=entry)
    field = ((1 << (cb - 8)) - 1) << desc.num_offset_bits
    p.put64(p.l2(0), entry | field)


def _compressed_payload_garbage(p: Poker) -> None:
    entry = p.u64(p.l2(0))
    desc = q.CompressedDescriptor(cluster_bits=p.at.cs.bit_length() - 1, raw=entry)
    at = desc.ofs_compressed
    p.buf[at : at + 64] = b"\xff" * 64


def _data_file_with_snapshot(p: Poker) -> None:
    """A snapshot entry (of the active L1 table) in an image with an external data file."""
    entry = q.SnapshotEntry(
        ofs_l1_table=p.at.l1_offset, num_l1_entries=len(p.at.l1), len_id=1, len_name=2,
        date_sec=0, date_nsec=0, vm_clock_nsec=0, len_vm_state_32=0,
        len_extra_data=q.SnapshotExtraData.UNKNOWN_AT,
        extra_data=q.SnapshotExtraData(len_vm_state=0, len_virtual_disk=SIZE, icount=-1,
                                       unknown=b""),
        id_str=b"1", name=b"s1", padding=bytes(5),
    )
    at = len(p.buf) + (-len(p.buf)) % p.at.cs
    p.buf += bytes(at - len(p.buf)) + entry.build()
    p.set_refcount(at // p.at.cs, 1)
    p.put32(H.NUM_SNAPSHOTS_AT, 1)
    p.put64(H.OFS_SNAPSHOT_TABLE_AT, at)


def _too_many_snapshots(p: Poker) -> None:
    p.put32(H.NUM_SNAPSHOTS_AT, 65537)


# What a repair mode leads to:
#   QEMU  both repairs succeed with the same report, both files end clean, same guest data;
#   BASE  qemu 7.2's repair fails (its overlap check trips over the damaged refcount
#         structure) while ours ends clean with the guest data of the undamaged image;
#   FAIL  both refuse to write over metadata: the image is marked corrupt, exit code 1.
QEMU, BASE, FAIL = "qemu", "base", "fail"


@dataclass(frozen=True)
class Case:
    name: str
    base: str
    damage: Damage
    repairs: tuple[tuple[str, str], ...] = ()  # (mode, outcome)


BITMAP_ZERO = q.SubclusterBitmap.READS_AS_ZERO_SHIFT
CASES = [
    # qcow.md D.2
    Case("32-l1-points-at-itself", "plain", _l1_at_itself, (("all", FAIL),)),
    Case("33-l2-points-at-refblock", "plain", _l2_points_at_refblock, (("all", QEMU),)),
    Case("35-l1-unaligned", "plain", _l1_unaligned),
    Case("36-l2-data-unaligned", "plain", _l2_unaligned),
    Case("37-prealloc-zero-unaligned", "plain", _prealloc_zero_unaligned, (("all", QEMU),)),
    Case("38-reftable-unaligned", "plain", _reftable_unaligned, (("all", BASE),)),
    Case("39-reftable-entry-zero", "plain", _reftable_zero, (("all", QEMU),)),
    Case("40-refblock-zeroed", "plain", _refblock_zeroed, (("all", QEMU),)),
    Case("41-refblock-outside", "plain", _refblock_outside, (("all", QEMU),)),
    Case("41-refblock-far-outside", "plain", _refblock_far_outside, (("all", QEMU),)),
    Case("42-no-refcount-table", "plain", _no_refcount_table, (("all", QEMU),)),
    Case("42-reftable-beyond-eof", "plain", _reftable_beyond_eof, (("all", QEMU),)),
    Case("44-l1-reserved-bits", "plain", _l1_reserved),
    Case("44-l2-reserved-bits", "plain", _l2_reserved),
    Case("44-reftable-reserved-bits", "plain", _reftable_reserved, (("all", BASE),)),
    Case("45-l2-copied-cleared", "plain", _clear_l2_copied, (("leaks", QEMU), ("all", QEMU))),
    Case("45-l1-copied-cleared", "plain", _clear_l1_copied, (("leaks", QEMU), ("all", QEMU))),
    Case("45-copied-set-on-shared", "snap", _copied_set_on_shared, (("all", QEMU),)),
    Case("34-active-l1-to-inactive-l2", "snap", _active_l1_to_inactive_l2, (("all", QEMU),)),
    Case("46-two-entries-one-cluster", "plain", _two_entries_one_cluster, (("all", QEMU),)),
    Case("47-overflow-refcount-bits-1", "r1", _two_entries_one_cluster),
    Case("49-refcount-zero", "plain", _refcount(0), (("all", QEMU), ("leaks", FAIL))),
    Case("49-refcount-zero-r1", "r1", _refcount(0), (("all", QEMU),)),
    Case("49-refcount-zero-r64", "r64", _refcount(0), (("all", QEMU),)),
    Case("49-refcount-three-r64", "r64", _refcount(3), (("leaks", QEMU),)),
    Case("48-refcount-max-r64", "r64", _refcount((1 << 64) - 1), (("leaks", QEMU),)),
    Case("52-l2-copied-offset-zero-r1", "r1", _l2_copied_no_offset, (("leaks", QEMU),)),
    Case("49-refcount-three", "plain", _refcount(3), (("leaks", QEMU), ("all", QEMU))),
    Case("49-refcount-two-shared", "snap", _refcount(1, 1), (("all", QEMU),)),
    Case("50-l2-data-past-eof", "plain", _l2_past_eof),
    Case("52-l2-copied-offset-zero", "plain", _l2_copied_no_offset, (("leaks", QEMU),)),
    Case("52-l1-copied-offset-zero", "plain", _l1_copied_no_offset),
    Case("53-bitmaps-bit-without-extension", "plain",
         _feature(H.AUTOCLEAR_FEATURES_AT, int(q.AutoclearFeature.BITMAPS))),
    # qcow.md D.3
    Case("54-compressed-sectors-enlarged", "comp", _compressed_sectors_enlarged,
         (("all", QEMU),)),
    Case("55-compressed-copied", "comp", _compressed_copied),
    Case("56-compressed-payload-garbage", "comp", _compressed_payload_garbage),
    Case("57-compressed-past-eof", "comp", _compressed_past_eof),
    Case("60-el2-alloc-and-zero", "el2", _subcluster(lambda b: b | (b & 1) << BITMAP_ZERO)),
    Case("61-el2-unallocated-alloc-bit", "el2", _subcluster(lambda b: b | 1, 5)),
    Case("62-el2-compressed-bitmap", "el2", _subcluster(lambda b: b | 1 << 31, 2)),
    Case("64-el2-unaligned-zero-subclusters", "el2", _el2_unaligned_zero_subclusters,
         (("all", QEMU),)),
    Case("64-el2-unaligned-data", "el2", _l2_unaligned),
    Case("65-v2-zero-flag", "v2", _zero_flag),
    Case("66-data-file-copied-cleared", "datafile", lambda p: _clear_l2_copied(p, 1),
         (("all", QEMU),)),
    Case("66-data-file-l2-unaligned", "datafile", _l2_unaligned_at(1)),
    Case("66-data-file-with-snapshot", "datafile", _data_file_with_snapshot),
    Case("66-data-file-compressed-entry", "datafile",
         lambda p: p.put64(p.l2(1), p.u64(p.l2(1)) | L2.COMPRESSED_MASK)),
    # qcow.md B.9 / D.3 68: bitmaps
    Case("68-bitmap-table-reserved-bits", "bitmaps", _bitmap_entry_reserved),
    Case("68-bitmap-data-refcount-zero", "bitmaps", _bitmap_data_refcount_zero,
         (("all", QEMU),)),
    # the LUKS header clusters are refcounted too
    Case("luks-header-refcount-zero", "luks", _luks_header_refcount(0), (("all", QEMU),)),
    Case("luks-header-refcount-two", "luks", _luks_header_refcount(2), (("leaks", QEMU),)),
    # qcow.md D.4
    Case("69-snapshot-l1-unaligned", "snap",
         _snapshot_field(E.OFS_L1_TABLE_AT, E.NUM_L1_ENTRIES_AT, lambda v: v + 512)),
    Case("70-snapshot-l1-too-large", "snap",
         _snapshot_field(E.NUM_L1_ENTRIES_AT, E.LEN_ID_AT, lambda v: 0x10000000)),
    Case("71-snapshot-extra-data-too-big", "snap", _snapshot_extra_too_big,
         (("all", QEMU), ("leaks", FAIL))),
    Case("73-snapshot-extra-data-8", "snap", _snapshot_extra_8, (("all", QEMU),)),
    Case("74-snapshot-id-size-max", "snap",
         _snapshot_field(E.LEN_ID_AT, E.LEN_NAME_AT, lambda v: 0xFFFF)),
    Case("13-snapshot-offset-unaligned", "snap", _snapshot_offset_unaligned),
    Case("12-too-many-snapshots", "plain", _too_many_snapshots, (("all", FAIL),)),
    # header bits (qcow.md D.1 22, 24, 25)
    Case("22-unknown-autoclear-bit", "plain", _feature(H.AUTOCLEAR_FEATURES_AT, 1 << 63),
         (("leaks", QEMU), ("all", QEMU))),
    Case("24-corrupt-bit", "plain",
         _feature(H.INCOMPATIBLE_FEATURES_AT, int(q.IncompatibleFeature.CORRUPT)),
         (("all", QEMU),)),
    Case("25-dirty-bit-and-refcount-zero", "plain", _dirty_and_refcount_zero, (("all", QEMU),)),
]


def _sparse_copy(source: Path, dest: Path) -> None:
    """Copy a mostly empty file without writing its zeros."""
    with source.open("rb") as src, dest.open("wb") as out:
        while chunk := src.read(MiB):
            if chunk.strip(b"\0"):
                out.seek(src.tell() - len(chunk))
                out.write(chunk)
        out.truncate(src.tell())


def _damaged(bases: dict[str, Path], case: Case, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{case.name}.qcow2"
    source = bases[case.base]
    shutil.copyfile(source, path)
    for extra in source.parent.glob(f"{source.stem}.data"):  # an external data file
        _sparse_copy(extra, dest / extra.name)
    poker = Poker(path)
    case.damage(poker)
    poker.save()
    return path


def _comparable(lines: list[str]) -> list[str]:
    """The check's own lines, in order: without qemu-img's prefixed errors and corruption
    events, which are worded per tool (and without the notice of a kept-lines bound)."""
    skip = ("qemu-img:", "qcow2: ", "... ")
    return [line.strip() for line in lines if line.strip() and not line.startswith(skip)]


# --------------------------------------------------------------------------------------------
# 2. damage: the same report as qemu


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_damage_agrees_with_qemu(bases: dict[str, Path], tmp_path: Path, case: Case) -> None:
    path = _damaged(bases, case, tmp_path)
    report, rc, err = qemu_check(path)
    result = check(path)
    assert ours(result) == theirs(report), (result.messages, err)
    assert result.exit_code() == rc
    if rc != 0:
        assert result.messages or result.failed
    assert _comparable(result.messages) == _comparable(err.splitlines()), err
    human = _run([require_tool("qemu-img"), "check", *_opts(path)], path.parent)
    assert result.human() == human.stdout and human.returncode == rc


# --------------------------------------------------------------------------------------------
# 3. repair: ours and qemu's both end clean with the same guest data

REPAIRS = [(c, mode, outcome) for c in CASES for mode, outcome in c.repairs]


def _incompatible(path: Path) -> int:
    with path.open("rb") as f:
        features = q.Qcow2.read(f).header.incompatible_features
    return int(features) if features is not None else 0


def _features(path: Path) -> tuple[int, int]:
    """The incompatible and autoclear feature bits (0 for v2)."""
    with path.open("rb") as f:
        h = q.Qcow2.read(f).header
    return int(h.incompatible_features or 0), int(h.autoclear_features or 0)


def _same_guest_data(a: Path, b: Path) -> None:
    specs = [f"driver=qcow2,file.filename={p}" for p in (a, b)]
    secret: list[str] = []
    if a.name.startswith("luks") or b.name.startswith("luks"):
        secret = ["--object", SECRET_OBJECT]
        specs = [spec + ",encrypt.key-secret=sec0" for spec in specs]
    done = qemu_img(a.parent, "compare", *secret, "--image-opts", *specs)
    assert done.returncode == 0, done


@pytest.mark.parametrize(
    ("case", "mode", "outcome"), REPAIRS, ids=[f"{c.name}-{m}" for c, m, _ in REPAIRS]
)
def test_repair_like_qemu(
    bases: dict[str, Path], tmp_path: Path, case: Case, mode: str, outcome: str
) -> None:
    mine = _damaged(bases, case, tmp_path / "ours")
    qemus = _damaged(bases, case, tmp_path / "qemu")
    result = check(mine, "leaks" if mode == "leaks" else "all")
    report, rc, err = qemu_check(qemus, "-r", mode)
    corrupt = int(q.IncompatibleFeature.CORRUPT)
    if outcome == FAIL:
        assert result.exit_code() == rc == 1 and report is None and result.failed, (result, err)
        # we mark the image corrupt only where qemu does (we may give up before writing)
        if _incompatible(mine) & corrupt:
            assert _incompatible(qemus) & corrupt and "Marking image as corrupt" in err
        return
    if outcome == QEMU:
        assert result.exit_code() == rc == 0, (result.messages, err)
        assert ours(result) == theirs(report), (result.messages, err)
        assert _features(mine) == _features(qemus)
        third = _damaged(bases, case, tmp_path / "human")
        human = _run([require_tool("qemu-img"), "check", "-r", mode, *_opts(third)], third.parent)
        assert result.human() == human.stdout
    else:
        assert rc == 1 and report is None, err
        assert result.exit_code() == 0 and result.repaired, result.messages
    for path in (mine, qemus) if outcome == QEMU else (mine,):
        after, after_rc, after_err = qemu_check(path)
        assert after_rc == 0 and after is not None, (path, after, after_err)
        assert not after.get("leaks") and not after.get("corruptions"), after
    # our own check agrees with qemu's on our repaired file
    again = check(mine)
    assert again.exit_code() == 0 and ours(again) == theirs(qemu_check(mine)[0])
    _same_guest_data(mine, qemus if outcome == QEMU else bases[case.base])
    bits = int(q.IncompatibleFeature.DIRTY | q.IncompatibleFeature.CORRUPT)
    assert not _incompatible(mine) & bits


def test_repair_reports_like_qemu_img(bases: dict[str, Path], tmp_path: Path) -> None:
    """The human report after a repair, and the double check's JSON."""
    case = next(c for c in CASES if c.name == "49-refcount-three")
    path = _damaged(bases, case, tmp_path)
    result = check(path, "leaks")
    assert result.repaired == (1, 0)
    assert result.leaks_fixed == 1 and result.leaks == 0
    assert result.human().startswith(
        "The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n"
        "    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found"
    )
    assert any(line.startswith("Repairing cluster") for line in result.messages)


# --------------------------------------------------------------------------------------------
# dirty images (lazy refcounts): qemu repairs them when it opens them read-write


def _dirty(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "lazy.qcow2"
    done = qemu_img(dest, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path.name,
                    str(SIZE))
    assert done.returncode == 0, done
    args = ["-c", "write -P 0x5a 0 64k", "-c", "write -P 0x5b 1M 128k", "-c", "flush",
            "-c", "sigraise 9"]
    _run([require_tool("qemu-io"), *args, *_opts(path)], dest)  # killed on purpose
    with path.open("rb") as f:
        incompatible = q.Qcow2.read(f).header.incompatible_features
    assert incompatible is not None and incompatible & q.IncompatibleFeature.DIRTY
    return path


def test_dirty_image_check_and_rebuild(tmp_path: Path) -> None:
    mine, qemus = _dirty(tmp_path / "ours"), _dirty(tmp_path / "qemu")
    report, rc, err = qemu_check(qemus)
    result = check(mine)
    assert ours(result) == theirs(report) and result.exit_code() == rc == 2, (result, err)
    # qemu repairs the dirty image when qemu-io opens it read-write
    qemu_io(qemus, "read -P 0x5a 0 64k")
    with diskspec.open(mine, "r+", backing=False) as img:
        assert isinstance(img, Qcow2Image)
        repaired = rebuild_refcounts(img)
        assert repaired.failed is None and repaired.check_errors == 0, repaired
        assert not img.head.dirty
        img.pwrite(b"\x77" * 4096, 3 * MiB)  # the image keeps working after the repair
    qemu_io(qemus, "write -P 0x77 3M 4k")
    for path in (mine, qemus):
        after, after_rc, _ = qemu_check(path)
        assert after_rc == 0 and after is not None and not after.get("leaks"), after
    _same_guest_data(mine, qemus)


def test_check_image_repairs_an_open_image(bases: dict[str, Path], tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "46-two-entries-one-cluster")
    path = _damaged(bases, case, tmp_path)
    with diskspec.open(path, "r+", backing=False) as img:
        assert isinstance(img, Qcow2Image)
        assert check_image(img).exit_code() == 2
        result = check_image(img, "all")
        assert result.exit_code() == 0 and result.corruptions_fixed, result
        img.pwrite(b"\x99" * 100, 70 * KiB)  # copy-on-write now that the cluster is shared
    # the other entry keeps its cleared COPIED flag after the copy-on-write, as after qemu's
    # own write: both checks see the same thing
    report, rc, _ = qemu_check(path)
    assert ours(check(path)) == theirs(report) and rc == check(path).exit_code()
    twin = _damaged(bases, case, tmp_path / "qemu")
    assert qemu_check(twin, "-r", "all")[1] == 0
    qemu_io(twin, f"write -P 0x99 {70 * KiB} 100")
    assert theirs(qemu_check(twin)[0]) == theirs(report)
    _same_guest_data(path, twin)


# --------------------------------------------------------------------------------------------
# hostile images: bounded work


def _shared_l2(bases: dict[str, Path], path: Path, entries: int, distinct: bool = False) -> int:
    """An L1 table of ``entries`` entries that all name one full L2 table whose every entry
    is a data cluster (the same one, or one of three). Returns the L2 entries per table."""
    shutil.copyfile(bases["plain"], path)
    p = Poker(path)
    l1 = p.at.l1[0]
    table_at = len(p.buf) + (-len(p.buf)) % p.at.cs
    p.buf += bytes(table_at - len(p.buf))
    offsets = [l1 + (i * 512 if distinct else 0) for i in range(entries)]
    p.buf += struct.pack(f">{entries}Q", *offsets)
    l2 = l1 & L1.OFS_L2_TABLE_DIV512_MASK
    per_table = p.at.cs // L2.SIZE
    for i in range(per_table + (entries * 512 // L2.SIZE if distinct else 0)):
        p.put64(l2 + i * L2.SIZE, ((5 + i % 3) * p.at.cs) | L2.COPIED_MASK)
    p.put32(H.NUM_L1_ENTRIES_AT, entries)
    p.put64(H.OFS_L1_TABLE_AT, table_at)
    p.save()
    return per_table


def test_hostile_shared_l2_counts_like_qemu(bases: dict[str, Path], tmp_path: Path) -> None:
    """Every reference counts, overflows included, with qemu's exact numbers."""
    path = tmp_path / "shared.qcow2"
    _shared_l2(bases, path, 64)
    report, rc, _ = qemu_check(path)
    result = check(path)
    assert ours(result) == theirs(report) and result.exit_code() == rc == 2
    assert report is not None and report["corruptions"] > 64 * 8192 // 2


def test_hostile_shared_l2_is_fast(bases: dict[str, Path], tmp_path: Path) -> None:
    """65536 references to one L2 table: half a billion references, counted exactly (qemu
    prints a billion lines for it), in a second or so: each table is walked once."""
    path = tmp_path / "shared.qcow2"
    per_table = _shared_l2(bases, path, 65536)
    start = time.monotonic()
    result = check(path)
    assert time.monotonic() - start < 20
    assert result.failed is None and result.exit_code() == 2
    refmax = (1 << 16) - 1
    overflows = 3 * (65536 * per_table // 3 - refmax) + (65536 - refmax)
    assert result.corruptions >= overflows
    assert len(result.messages) <= 100_001


def test_hostile_distinct_tables_hit_the_budget(
    bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many distinct (unaligned) L2 tables: the work budget stops the check with a check
    error instead of walking on (the budget is lowered here to keep the test short)."""
    monkeypatch.setattr(check_module, "MAX_ENTRIES_COUNTED", 1 << 18)
    path = tmp_path / "distinct.qcow2"
    _shared_l2(bases, path, 256, distinct=True)
    start = time.monotonic()
    result = check(path)
    assert time.monotonic() - start < 20
    assert result.exit_code() == 1 and result.failed is not None
    assert any("check aborted" in line for line in result.messages)


def test_hostile_headers_fail_cleanly(bases: dict[str, Path], tmp_path: Path) -> None:
    for name, at, fmt, value in (
        ("version", H.VERSION_AT, ">I", 9),
        ("cluster-bits", H.CLUSTER_BITS_AT, ">I", 40),
        ("l1-size", H.NUM_L1_ENTRIES_AT, ">I", 0xFFFFFFFF),
        ("reftable-size", H.NUM_REFCOUNT_TABLE_CLUSTERS_AT, ">I", 0xFFFFFFFF),
    ):
        path = tmp_path / f"{name}.qcow2"
        buf = bytearray(bases["plain"].read_bytes())
        struct.pack_into(fmt, buf, at, value)
        path.write_bytes(bytes(buf))
        report, rc, _ = qemu_check(path)
        result = check(path)
        assert result.exit_code() == rc == 1 and report is None and result.failed, name
