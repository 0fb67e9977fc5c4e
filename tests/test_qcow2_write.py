"""Write conformance: what diskspec writes passes qemu-img check and reads the same in qemu.

A hypothesis state machine drives pwrite / write_zeroes / discard / flush / reopen against a
bytearray model over images of varied options, with and without a backing file; after every
run qemu-img check must report no corruption and no leak, and qemu-img must read the model.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import diskspec
from diskspec.tests.corpus import CorpusImage, require_tool

SIZE = 3 << 20
OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"cluster_size": 512},
    {"cluster_size": 512, "refcount_bits": 1},
    {"cluster_size": 1024, "refcount_bits": 4},
    {"cluster_size": 4096, "refcount_bits": 64},
    {"cluster_size": 4096, "compat": "0.10"},
    {"cluster_size": 16384, "extended_l2": "on"},
    {"cluster_size": "2M"},
    {"lazy_refcounts": "on", "cluster_size": 8192},
    {"cluster_size": 65536, "extended_l2": "on"},
]


def _target(path: Path, secret: str | None) -> list[str]:
    """How qemu opens the image: the path, or image options with its secret."""
    from diskspec.tests.corpus import _open_args

    return _open_args("qcow2", str(path), secret) if secret else [str(path)]


def qemu_check(path: Path, secret: str | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [require_tool("qemu-img"), "check", "--output=json", *_target(path, secret)],
        capture_output=True, text=True, check=False, cwd=path.parent,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    report["rc"] = done.returncode
    return report


def qemu_read(
    path: Path, out: Path, extra: tuple[str, ...] = (), secret: str | None = None
) -> bytes:
    subprocess.run(
        [require_tool("qemu-img"), "convert", *extra, "-O", "raw", *_target(path, secret),
         str(out)],
        check=True, capture_output=True, cwd=path.parent,
    )
    return out.read_bytes()


class WriteMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskspec-write-"))
        self.path = self.dir / "img.qcow2"
        self.model = bytearray()
        self.img: Any = None
        self.options: dict[str, Any] = {}
        self.snapshots: dict[str, bytes] = {}
        self.counter = 0

    @initialize(options=st.sampled_from(OPTION_SETS), backed=st.booleans(),
                seed=st.integers(0, 255))
    def create(self, options: dict[str, Any], backed: bool, seed: int) -> None:
        self.options = dict(options)
        if backed:
            base = self.dir / "base.raw"
            rng = random.Random(seed)
            content = bytearray(SIZE - (1 << 20))  # shorter than the overlay: tail reads zeros
            for _ in range(20):
                at = rng.randrange(0, len(content) - 5000)
                content[at : at + 5000] = bytes([rng.randrange(1, 256)]) * 5000
            base.write_bytes(bytes(content))
            self.options |= {"backing_file": "base.raw", "backing_fmt": "raw"}
            self.model = bytearray(content) + bytearray(SIZE - len(content))
        else:
            self.model = bytearray(SIZE)
        diskspec.create(self.path, "qcow2", SIZE, **self.options)
        self.img = diskspec.open(self.path, "r+")

    @rule(data=st.data(), n=st.sampled_from([1, 511, 512, 4096, 5000, 65536, 300_000]))
    def pwrite(self, data: st.DataObject, n: int) -> None:
        n = min(n, len(self.model))
        off = data.draw(st.integers(0, len(self.model) - n))
        value = data.draw(st.integers(1, 255))
        self.img.pwrite(bytes([value]) * n, off)
        self.model[off : off + n] = bytes([value]) * n

    @rule(data=st.data(), n=st.sampled_from([512, 4096, 70000, 1 << 20]), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, n: int, unmap: bool) -> None:
        n = min(n, len(self.model))
        off = data.draw(st.integers(0, len(self.model) - n))
        self.img.write_zeroes(off, n, unmap=unmap)
        self.model[off : off + n] = bytes(n)

    @rule(data=st.data(), n=st.sampled_from([4096, 70000, 1 << 20]))
    def discard(self, data: st.DataObject, n: int) -> None:
        if self.options.get("compat") == "0.10" and "backing_file" in self.options:
            return  # refused, as qemu refuses it
        n = min(n, len(self.model))
        off = data.draw(st.integers(0, len(self.model) - n))
        self.img.discard(off, n)
        cs = self.img.cluster_size
        start, end = off + (-off) % cs, (off + n) // cs * cs
        if end > start:
            self.model[start:end] = bytes(end - start)

    @rule(data=st.data())
    def write_compressed(self, data: st.DataObject) -> None:
        if "data_file" in self.options:
            return
        cs = self.img.cluster_size
        index = data.draw(st.integers(0, -(-len(self.model) // cs) - 1))
        if self._allocated(index * cs):
            return  # qemu refuses compressed writes over allocated clusters, so do we
        value = data.draw(st.integers(1, 255))
        n = min(cs, len(self.model) - index * cs)  # the last cluster may be partial
        block = ((bytes([value]) * 64 + bytes(range(64))) * (cs // 128))[:n]
        self.img.write_compressed(block, index * cs)
        self.model[index * cs : index * cs + n] = block

    def _allocated(self, offset: int) -> bool:
        from diskspec.generated import qcow2 as q

        head = self.img.head
        l1 = self.img._l1[offset >> head.l1_shift] & q.L1Entry.OFS_L2_TABLE_DIV512_MASK
        if not l1:
            return False
        index = (offset >> head.cluster_bits) & ((1 << head.l2_bits) - 1)
        entry = self.img._table(l1)[2 * index if head.extended_l2 else index]
        mask = q.L2Entry.OFS_CLUSTER_DIV512_MASK | q.L2Entry.COMPRESSED_MASK
        return bool(entry & mask)

    @rule()
    def create_snapshot(self) -> None:
        if self.options.get("refcount_bits") in (1, 2) or len(self.snapshots) >= 3:
            return
        self.counter += 1
        name = f"snap{self.counter}"
        self.img.create_snapshot(name)
        self.snapshots[name] = bytes(self.model)

    @rule(data=st.data())
    def apply_snapshot(self, data: st.DataObject) -> None:
        if not self.snapshots or self.options.get("refcount_bits", 16) < 8:
            return
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        self.img.apply_snapshot(name)
        self.model = bytearray(self.snapshots[name])

    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        if not self.snapshots:
            return
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        self.img.delete_snapshot(name)
        del self.snapshots[name]

    @rule(delta=st.sampled_from([-(1 << 20), -65536, -512, 512, 65536, 1 << 20, 5 << 20]))
    def resize(self, delta: int) -> None:
        if self.snapshots:
            return  # qemu refuses to resize images with snapshots, and so do we
        new = len(self.model) + delta
        if new < 1 << 20:
            return
        self.img.resize(new, shrink=delta < 0)
        if delta < 0:
            del self.model[new:]
        else:
            self.model += bytes(delta)  # grown space reads as zeros, even over a backing file

    @rule()
    def flush(self) -> None:
        self.img.flush()

    @rule()
    def reopen(self) -> None:
        self.img.close()
        self.img = diskspec.open(self.path, "r+")

    @invariant()
    def reads_like_the_model(self) -> None:
        if self.img is not None:
            assert self.img.size == len(self.model)
            assert self.img.pread(self.img.size, 0) == self.model

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                report = qemu_check(self.path)
                assert report["rc"] == 0, report
                assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
                assert qemu_read(self.path, self.dir / "out.raw") == self.model
                for name, content in self.snapshots.items():
                    got = qemu_read(self.path, self.dir / "snap.raw",
                                    ("-l", f"snapshot.name={name}"))
                    assert got == content, name
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestWriteMachine = WriteMachine.TestCase
TestWriteMachine.settings = settings(
    max_examples=40, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _writable(corpus: list[CorpusImage]) -> list[CorpusImage]:
    return [i for i in corpus if i.fmt == "qcow2"]


def test_writes_into_qemu_images(corpus: list[CorpusImage], tmp_path: Path) -> None:
    """Writes into images qemu made (snapshots, compressed, extended L2, data files, chains)
    keep every snapshot intact, pass qemu-img check and read the same in qemu."""
    done = 0
    for image in _writable(corpus):
        work = tmp_path / image.name
        shutil.copytree(image.path.parent, work, dirs_exist_ok=True,
                        ignore=lambda _d, names: [n for n in names if n.endswith(".lock")])
        path = work / image.path.name
        rng = random.Random(image.name)
        with diskspec.open(path, passphrase=image.secret) as img:
            snaps = {s.name: qemu_read(path, work / "s.raw", ("-l", f"snapshot.name={s.name}"),
                                       image.secret)
                     for s in img.snapshots()}
        model = bytearray(qemu_read(path, work / "before.raw", secret=image.secret))
        with diskspec.open(path, "r+", passphrase=image.secret) as img:
            for _ in range(40):
                n = rng.choice([1, 512, 4096, 5000, 70000, 200000])
                off = rng.randrange(0, img.size - n)
                if rng.random() < 0.8:
                    value = bytes([rng.randrange(1, 256)]) * n
                    img.pwrite(value, off)
                    model[off : off + n] = value
                else:
                    img.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
        report = qemu_check(path, image.secret)
        assert report["rc"] == 0 and report.get("corruptions", 0) == 0, (image.name, report)
        assert report.get("leaks", 0) == 0, (image.name, report)
        assert qemu_read(path, work / "after.raw", secret=image.secret) == model, image.name
        for name, want in snaps.items():
            got = qemu_read(path, work / "s.raw", ("-l", f"snapshot.name={name}"), image.secret)
            assert got == want, (image.name, name)
        done += 1
        shutil.rmtree(work)
    assert done >= 30


def test_interleaved_with_qemu_io(tmp_path: Path) -> None:
    """diskspec writes, qemu-io writes the same image, diskspec reads: both agree."""
    path = tmp_path / "i.qcow2"
    diskspec.create(path, "qcow2", "8M", cluster_size=4096)
    model = bytearray(8 << 20)
    rng = random.Random(7)
    for round_ in range(6):
        with diskspec.open(path, "r+") as img:
            for _ in range(10):
                n, off = rng.choice([512, 4096, 9000]), rng.randrange(0, (8 << 20) - 9000)
                img.pwrite(bytes([round_ + 1]) * n, off)
                model[off : off + n] = bytes([round_ + 1]) * n
        cmds = []
        for _ in range(10):
            n, off = rng.choice([512, 4096, 9000]), rng.randrange(0, (8 << 20) - 9000)
            cmds += ["-c", f"write -P {0x80 + round_} {off} {n}"]
            model[off : off + n] = bytes([0x80 + round_]) * n
        cmds += ["-c", f"write -z {rng.randrange(0, 1000) * 4096} 8192"]
        subprocess.run([require_tool("qemu-io"), *cmds, str(path)], check=True,
                       capture_output=True)
        zero_at = int(cmds[-1].split()[2])
        model[zero_at : zero_at + 8192] = bytes(8192)
        with diskspec.open(path) as img:
            assert img.pread(img.size, 0) == model, round_
        report = qemu_check(path)
        assert report["rc"] == 0 and report.get("leaks", 0) == 0, report


def test_data_file_raw_stays_a_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    diskspec.create(path, "qcow2", "4M", data_file="d.raw", data_file_raw="on")
    with diskspec.open(path, "r+") as img:
        img.pwrite(b"\x5a" * 200_000, 10_000)
        img.write_zeroes(65536, 65536)
        img.discard(131072, 65536)
    raw = (tmp_path / "d.raw").read_bytes()
    with diskspec.open(path) as img:
        assert img.pread(img.size, 0) == raw


def test_read_only_images_refuse_writes(tmp_path: Path) -> None:
    path = tmp_path / "r.qcow2"
    diskspec.create(path, "qcow2", "1M")
    before = path.read_bytes()
    with diskspec.open(path) as img:
        for call in (lambda: img.pwrite(b"x", 0), lambda: img.write_zeroes(0, 512),
                     lambda: img.discard(0, 65536)):
            with pytest.raises(diskspec.UsageError):
                call()
    assert path.read_bytes() == before


def _bitmap_bits(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every bitmap's flags and bits, read with the generated structures."""
    import os

    from diskspec.generated import qcow2 as q

    out: dict[str, tuple[int, bytes]] = {}
    with path.open("rb") as f:
        image = q.Qcow2.read(f)
        cs = image.header.cluster_size
        for ext in image.extension_area.extensions:
            if not isinstance(ext.data, q.ExtBitmaps):
                continue
            for entry in ext.data.read_bitmap_directory(f).entries:
                data = b""
                for word in entry.read_bitmap_table(f):
                    host = word & q.BitmapTableEntry.OFS_DATA_DIV512_MASK
                    if host:
                        data += os.pread(f.fileno(), cs, host)
                    else:
                        fill = b"\xff" if word & q.BitmapTableEntry.ALL_ONES_MASK else b"\0"
                        data += fill * cs
                out[entry.name.decode()] = (int(entry.flags), data)
    return out


def test_bitmaps_are_marked_like_qemu(corpus: list[CorpusImage], tmp_path: Path) -> None:
    image = next(i for i in corpus if "bitmaps" in i.tags)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(image.path, ours)
    shutil.copy(image.path, theirs)
    writes = [(5 << 20, 100_000), (20 << 20, 1), (0, 65536), (30 << 20, 3 << 20 // 2)]
    with diskspec.open(ours, "r+") as img:
        for off, n in writes:
            img.pwrite(b"\x42" * n, off)
        img.write_zeroes(12 << 20, 1 << 20)
    cmds = [f"write -P 0x42 {off} {n}" for off, n in writes] + [f"write -z {12 << 20} {1 << 20}"]
    args = [arg for c in cmds for arg in ("-c", c)]
    subprocess.run([require_tool("qemu-io"), *args, str(theirs)], check=True, capture_output=True)
    got, want = _bitmap_bits(ours), _bitmap_bits(theirs)
    assert got == want
    assert any(bits.strip(b"\0") for _, bits in got.values())  # something was marked
    report = qemu_check(ours)
    assert report["rc"] == 0 and report.get("leaks", 0) == 0, report


def test_writes_over_metadata_are_refused_and_mark_corrupt(tmp_path: Path) -> None:
    import struct

    from diskspec.generated import qcow2 as q

    path = tmp_path / "hostile.qcow2"
    diskspec.create(path, "qcow2", "4M")
    with diskspec.open(path, "r+") as img:
        img.pwrite(b"\x01" * 65536, 0)
    data = bytearray(path.read_bytes())
    head = q.Header.parse(data)
    l2 = struct.unpack_from(">Q", data, head.ofs_l1_table)[0] & q.L1Entry.OFS_L2_TABLE_DIV512_MASK
    # the first L2 entry now claims the refcount table as its data cluster (COPIED set)
    struct.pack_into(">Q", data, l2, q.L2Entry.COPIED_MASK | head.ofs_refcount_table)
    path.write_bytes(bytes(data))
    table_before = bytes(data[head.ofs_refcount_table : head.ofs_refcount_table + 65536])
    img = diskspec.open(path, "r+")
    with pytest.raises(diskspec.ImageError, match="Preventing invalid write on metadata"):
        img.pwrite(b"\x02" * 512, 0)
    img.close()
    after = path.read_bytes()
    assert after[head.ofs_refcount_table : head.ofs_refcount_table + 65536] == table_before
    assert q.Header.parse(after).incompatible_features & q.IncompatibleFeature.CORRUPT
    with pytest.raises(diskspec.ImageError, match="Image is corrupt; cannot be opened read/write"):
        diskspec.open(path, "r+")
    with diskspec.open(path) as ro:  # read-only opens still work, as in qemu
        assert ro.pread(512, 65536) == bytes(512)
