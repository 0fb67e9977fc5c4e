"""qcow v1 write conformance: what diskspec writes, qemu reads back, and the tables are sound.

A hypothesis state machine drives pwrite / write_zeroes / write_compressed / discard / flush /
reopen against a bytearray model, over plain, backed and AES-encrypted images; after every run
the independent table walker (tests/qcow_support.py) checks the allocation and qemu-img must
read the model. Writes interleaved with qemu-io, qemu-written images, a killed writer, and
what qemu refuses for qcow (resize, rebase, snapshots, checks) are checked too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import diskspec
from diskspec.cli import main
from diskspec.image import ImageError, UsageError
from diskspec.qcow.image import QcowImage
from diskspec.tests.corpus import CorpusImage
from diskspec.tests.qcow_support import qemu_img, qemu_io, qemu_raw, walk

SIZE = 1 << 20
PASSPHRASE = "diskspec qcow1 write test key"


def _new_image(folder: Path, kind: str, size: int = SIZE) -> tuple[Path, bytearray, str | None]:
    """A qcow image made by qemu-img ("plain", "backed" or "aes"), and what it reads."""
    path = folder / "img.qcow"
    model = bytearray(size)
    secret = None
    if kind == "backed":
        base = folder / "base.raw"
        rng = random.Random(size)
        content = bytes(rng.getrandbits(8) for _ in range(4096)) * (size // 4096 - 16)
        base.write_bytes(content)  # shorter than the disk: the rest reads zeros
        model[: len(content)] = content
        done = qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", str(path),
                        str(size), cwd=folder)
    elif kind == "aes":
        secret = PASSPHRASE
        done = qemu_img("create", "-q", "-f", "qcow", "--object", f"secret,id=s0,data={secret}",
                        "-o", "encrypt.format=aes,encrypt.key-secret=s0", str(path), str(size))
    else:
        done = qemu_img("create", "-q", "-f", "qcow", str(path), str(size))
    assert done.returncode == 0, done.stderr
    return path, model, secret


def _open(path: Path, secret: str | None) -> QcowImage:
    img = diskspec.open(path, "r+", passphrase=secret)
    assert isinstance(img, QcowImage)
    return img


class WriteMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskspec-qcow-write-"))
        self.model = bytearray()
        self.img: QcowImage | None = None
        self.secret: str | None = None

    @initialize(kind=st.sampled_from(["plain", "backed", "aes"]),
                odd=st.integers(0, 3))
    def start(self, kind: str, odd: int) -> None:
        # sizes that end mid-cluster (and mid-L2 table) too
        size = SIZE + odd * 1536
        self.path, self.model, self.secret = _new_image(self.dir, kind, size)
        self.img = _open(self.path, self.secret)

    def _image(self) -> QcowImage:
        assert self.img is not None
        return self.img

    @rule(data=st.data())
    def pwrite(self, data: st.DataObject) -> None:
        size = len(self.model)
        offset = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, min(20_000, size - offset)))
        byte = data.draw(st.integers(1, 255))
        self._image().pwrite(bytes([byte]) * n, offset)
        self.model[offset : offset + n] = bytes([byte]) * n

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        size = len(self.model)
        offset = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, min(40_000, size - offset)))
        self._image().write_zeroes(offset, n, unmap=unmap)
        self.model[offset : offset + n] = bytes(n)

    @precondition(lambda self: self.secret is None)
    @rule(data=st.data())
    def write_compressed(self, data: st.DataObject) -> None:
        img = self._image()
        cs = img.cluster_size
        index = data.draw(st.integers(0, -(-len(self.model) // cs) - 1))
        offset = index * cs
        n = min(cs, len(self.model) - offset)
        payload = bytes([data.draw(st.integers(0, 255))]) * (n // 2) + os.urandom(n - n // 2)
        if img._entry(offset):
            with pytest.raises(ImageError, match="allocated cluster"):
                img.write_compressed(payload, offset)
            return
        img.write_compressed(payload, offset)
        self.model[offset : offset + n] = payload

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, len(self.model) - 1))
        self._image().discard(offset, len(self.model) - offset)  # qemu: data stays

    @rule()
    def flush(self) -> None:
        self._image().flush()

    @rule()
    def reopen(self) -> None:
        self._image().close()
        self.img = _open(self.path, self.secret)

    @invariant()
    def reads_the_model(self) -> None:
        if self.img is not None:
            assert self.img.pread(len(self.model), 0) == self.model

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                walk(self.path)
                got = qemu_raw(self.path, self.dir / "out.raw", self.secret)
                assert got == self.model
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


WriteMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_write_machine = WriteMachine.TestCase


def test_random_writes_read_in_qemu(tmp_path: Path) -> None:
    rng = random.Random(99)
    for kind in ("plain", "backed", "aes"):
        folder = tmp_path / kind
        folder.mkdir()
        path, model, secret = _new_image(folder, kind)
        with _open(path, secret) as img:
            for i in range(60):
                n = rng.choice([1, 100, 511, 512, 4096, 5000, 70_000])
                off = rng.randrange(0, SIZE - n)
                chunk = rng.randbytes(n)
                img.pwrite(chunk, off)
                model[off : off + n] = chunk
                if i % 17 == 0:
                    img.write_zeroes(off // 2, 9000)
                    model[off // 2 : off // 2 + 9000] = bytes(9000)
        layout = walk(path)
        assert layout.clusters > 20
        assert qemu_raw(path, folder / "out.raw", secret) == model, kind
        if secret is None:
            model_file = folder / "model.raw"
            model_file.write_bytes(model)
            cmp = qemu_img("compare", "-f", "qcow", "-F", "raw", str(path), str(model_file))
            assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_writes_into_qemu_images(corpus: list[CorpusImage], tmp_path: Path) -> None:
    """The corpus images, copied, take writes over their compressed and backed clusters."""
    rng = random.Random(5)
    checked = 0
    for image in (i for i in corpus if i.fmt == "qcow"):
        folder = tmp_path / image.name
        folder.mkdir()
        path = folder / image.path.name
        shutil.copy(image.path, path)
        if "backing" in image.tags:
            shutil.copy(image.path.parent / "raw-base.raw", folder / "raw-base.raw")
        model = bytearray(qemu_raw(path, folder / "before.raw", image.secret))
        with _open(path, image.secret) as img:
            for _ in range(30):
                n = rng.choice([1, 600, 4096, 9000])
                off = rng.randrange(0, img.size - n)
                chunk = rng.randbytes(n)
                img.pwrite(chunk, off)
                model[off : off + n] = chunk
            # partial writes into every compressed cluster: copy-on-write from the deflate data
            for e in img.map():
                if e.data and e.offset is None and not img.head.encrypted:
                    img.pwrite(b"\xee" * 10, e.start + 100)
                    model[e.start + 100 : e.start + 110] = b"\xee" * 10
        walk(path)
        assert qemu_raw(path, folder / "after.raw", image.secret) == model, image.name
        checked += 1
    assert checked == 5


def test_interleaved_with_qemu_io(tmp_path: Path) -> None:
    path, _, _ = _new_image(tmp_path, "plain")
    qemu_io(path, "write -P 0xab 0 64k", "write -P 0xcd 300k 10k")
    with _open(path, None) as img:
        assert img.pread(65536, 0) == b"\xab" * 65536
        img.pwrite(b"\x11" * 5000, 60_000)
        img.pwrite(b"\x22" * 8192, 512 * 1024)
        img.write_zeroes(300 * 1024, 4096)
    qemu_io(path, "read -P 0xab 0 60000", "read -P 0x11 60000 5000", "read -P 0xab 65000 536",
            "read -P 0x22 512k 8k", "read -P 0 300k 4k", "read -P 0xcd 304k 6k",
            "write -P 0x33 1000 1000", "write -c -P 0x44 768k 4k", "discard 0 4k")
    with diskspec.open(path) as img:
        assert img.pread(1000, 1000) == b"\x33" * 1000
        assert img.pread(4096, 768 * 1024) == b"\x44" * 4096
        assert img.pread(1000, 0) == b"\xab" * 1000  # discard is a no-op in qemu's qcow
    walk(path)


def test_write_compressed_like_convert_c(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(3)
    data = bytearray(SIZE + 1000)
    for at in range(0, len(data), 65536):
        k = min(20000, len(data) - at)
        data[at : at + k] = rng.choice([b"abc" * 6667, rng.randbytes(20000)])[:k]
    data[-1000:] = b"z" * 1000  # the last, short cluster is compressed too
    src.write_bytes(data)
    out = tmp_path / "out.qcow"
    assert main(["convert", "-c", "-O", "qcow", "-f", "raw", str(src), str(out)]) == 0
    layout = walk(out)
    assert layout.compressed > 5 and layout.clusters > 0  # random clusters stay normal
    assert qemu_raw(out, tmp_path / "back.raw") == bytes(data) + bytes(-len(data) % 512)
    with diskspec.open(out, "r+") as img:
        assert isinstance(img, QcowImage)
        with pytest.raises(UsageError, match="exactly one cluster"):
            img.write_compressed(b"x" * 100, 0)
    enc, _, secret = _new_image(tmp_path, "aes")
    with _open(enc, secret) as img, pytest.raises(UsageError, match="encryption"):
        img.write_compressed(bytes(img.cluster_size), 0)


def test_write_zeroes_keeps_unallocated_when_it_can(tmp_path: Path) -> None:
    path, _, _ = _new_image(tmp_path, "plain")
    with _open(path, None) as img:
        img.write_zeroes(0, SIZE)
    assert walk(path).clusters == 0 and walk(path).tables == 0
    with _open(path, None) as img:
        img.pwrite(b"\x01" * 8192, 0)
        img.write_zeroes(0, 8192, unmap=True)  # whole clusters with nothing below: dropped
        assert img._entry(0) == 0 and img.pread(8192, 0) == bytes(8192)
    (tmp_path / "backed").mkdir()
    backed, model, _ = _new_image(tmp_path / "backed", "backed")
    with _open(backed, None) as img:
        img.write_zeroes(0, 4096)  # over backing data: real zeros
        assert img.pread(4096, 0) == bytes(4096)
        assert img._entry(0) != 0
    model[:4096] = bytes(4096)
    assert qemu_raw(backed, tmp_path / "b.raw") == model


def test_cli_commit_empties_like_qemu(tmp_path: Path) -> None:
    """``commit`` writes the data into the backing file, then qemu's make_empty: zeroed L1 and
    the file cut right after it (a 64-byte file here, as qemu leaves it)."""
    for tool in ("qemu", "diskspec"):
        folder = tmp_path / tool
        folder.mkdir()
        path, model, _ = _new_image(folder, "backed")
        qemu_io(path, "write -P 0x5e 4k 12k", "write -P 0x6f 1000k 1k")
        model[4096 : 4096 + 12288] = b"\x5e" * 12288
        model[1000 * 1024 : 1001 * 1024] = b"\x6f" * 1024
        if tool == "qemu":
            assert qemu_img("commit", "-q", "-f", "qcow", str(path)).returncode == 0
        else:
            assert main(["commit", "-q", str(path)]) == 0
        assert (folder / "base.raw").read_bytes() == model[: (folder / "base.raw").stat().st_size]
    assert (tmp_path / "qemu" / "img.qcow").read_bytes() == (
        tmp_path / "diskspec" / "img.qcow").read_bytes()


def test_what_qemu_refuses_for_qcow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = _new_image(tmp_path, "backed")
    raw2 = tmp_path / "other.raw"
    raw2.write_bytes(bytes(SIZE))
    before = path.read_bytes()
    cases = [
        (["resize", str(path), "2M"], ["resize", "-f", "qcow", str(path), "2M"],
         "Image format driver does not support resize"),
        (["rebase", "-u", "-b", "other.raw", "-F", "raw", str(path)],
         ["rebase", "-f", "qcow", "-u", "-b", "other.raw", "-F", "raw", str(path)],
         "Could not change the backing file to 'other.raw': Operation not supported"),
        (["rebase", "-b", "other.raw", "-F", "raw", str(path)], None,
         "Could not change the backing file to 'other.raw': Operation not supported"),
        (["snapshot", "-c", "s1", str(path)], ["snapshot", "-c", "s1", str(path)],
         "Could not create snapshot 's1': -95 (Operation not supported)"),
        (["snapshot", "-a", "s1", str(path)], ["snapshot", "-a", "s1", str(path)],
         "Could not apply snapshot 's1': Block driver does not support snapshots"),
        (["snapshot", "-d", "s1", str(path)], ["snapshot", "-d", "s1", str(path)],
         "Could not delete snapshot 's1': snapshot not found"),
        (["amend", "-o", "size=2M", str(path)], ["amend", "-f", "qcow", "-o", "size=2M",
                                                 str(path)],
         "Format driver 'qcow' does not support option amendment"),
        (["measure", "-O", "qcow", "--size", "1M"], ["measure", "-O", "qcow", "--size", "1M"],
         "Block driver 'qcow' does not support size measurement"),
    ]
    for mine, theirs, words in cases:
        capsys.readouterr()
        assert main(mine) == 1, mine
        assert words in capsys.readouterr().err, mine
        if theirs is not None:
            done = qemu_img(*theirs, cwd=tmp_path)
            assert done.returncode == 1 and words in done.stderr, (theirs, done.stderr)
        assert path.read_bytes() == before, mine
    assert main(["check", str(path)]) == 63
    assert qemu_img("check", "-f", "qcow", str(path)).returncode == 63
    assert main(["snapshot", "-l", str(path)]) == 0
    with diskspec.open(path, "r+") as img:
        assert isinstance(img, QcowImage) and img.snapshots() == []
        with pytest.raises(UsageError, match="does not support resize"):
            img.resize(2 * SIZE)


def test_measure_of_a_qcow_source(corpus: list[CorpusImage],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for image in (i for i in corpus if i.fmt == "qcow" and i.secret is None):
        capsys.readouterr()
        assert main(["measure", "--output=json", "-O", "qcow2", str(image.path)]) == 0
        done = qemu_img("measure", "--output=json", "-O", "qcow2", "-f", "qcow",
                        str(image.path), cwd=image.path.parent)
        assert json.loads(capsys.readouterr().out) == json.loads(done.stdout), image.name


# a killed writer ------------------------------------------------------------------------------

_CHILD = r"""
import json, sys
import diskspec
plan = json.load(open(sys.argv[2]))
with diskspec.open(sys.argv[1], "r+") as img:
    for i, (offset, n, byte) in enumerate(plan):
        if byte < 0:
            img.write_zeroes(offset, n)
        else:
            img.pwrite(bytes([byte]) * n, offset)
        if i % 7 == 6:
            img.flush()
        print(i, flush=True)
"""


def _states(plan: list[list[int]], start: bytes, cs: int) -> dict[int, list[bytes]]:
    """Every content each guest cluster may have after a crash: its content after each
    prefix of the plan (a cluster is written as a whole or not at all)."""
    states: dict[int, list[bytes]] = {}
    current = bytearray(start)
    for c in range(0, len(start), cs):
        states[c] = [bytes(current[c : c + cs])]
    for offset, n, byte in plan:
        current[offset : offset + n] = bytes(n) if byte < 0 else bytes([byte]) * n
        for c in range(offset - offset % cs, offset + n, cs):
            states[c].append(bytes(current[c : c + cs]))
    return states


@pytest.mark.parametrize("kind", ["plain", "backed"])
def test_killed_writer_leaves_only_leaks(tmp_path: Path, kind: str) -> None:
    rng = random.Random(kind)
    interrupted = 0
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        path, start, _ = _new_image(folder, kind)
        with diskspec.open(path) as img:
            cs = img.cluster_size  # type: ignore[attr-defined]
        plan = []
        for _ in range(2000):
            # within one cluster each, so that every cluster is old or new
            c = rng.randrange(0, SIZE // cs) * cs
            inner = rng.randrange(0, cs)
            n = rng.randrange(1, cs - inner + 1)
            plan.append([c + inner, n, rng.choice([-1, *range(1, 256)])])
        plan_file = folder / "plan.json"
        plan_file.write_text(json.dumps(plan))
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(plan_file)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        first = child.stdout.readline()  # the child is writing
        assert first.strip() == "0", first
        time.sleep(rng.uniform(0.0, 0.1))
        child.send_signal(signal.SIGKILL)
        done = [first, *child.stdout.read().splitlines()]
        child.wait()
        interrupted += child.returncode == -signal.SIGKILL and len(done) < len(plan)
        walk(path)
        got = qemu_raw(path, folder / "after.raw")
        with diskspec.open(path) as img:
            assert img.pread(img.size, 0) == got
        states = _states(plan, bytes(start), cs)
        for c, allowed in states.items():
            assert got[c : c + cs] in allowed, (attempt, c)
        with _open(path, None) as img:  # and it takes more writes
            img.pwrite(b"\x99" * 3000, 7)
        walk(path)
    assert interrupted, "the writer always finished before it was killed"


@pytest.mark.parametrize("kind", ["plain", "backed"])
def test_every_crash_point_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Record every host write of a session, then rebuild the file as a crash after each of
    them leaves it: the tables must be sound and every cluster old or new."""
    rng = random.Random(11)
    path, start, _ = _new_image(tmp_path, kind)
    with diskspec.open(path) as img:
        cs = img.cluster_size  # type: ignore[attr-defined]
    qemu_io(path, f"write -c -P 0x3c 0 {cs}")  # a compressed cluster to overwrite
    start[:cs] = b"\x3c" * cs
    original = path.read_bytes()
    plan = []
    for _ in range(40):
        c = rng.choice([0, rng.randrange(0, SIZE // cs) * cs])
        inner = rng.randrange(0, cs)
        plan.append([c + inner, rng.randrange(1, cs - inner + 1), rng.randrange(1, 256)])
    writes: list[tuple[int, bytes]] = []
    real_pwrite = os.pwrite

    def recording(fd: int, data: Any, offset: int) -> int:
        if os.path.samefile(f"/proc/self/fd/{fd}", path):
            writes.append((offset, bytes(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    with _open(path, None) as img:
        for i, (offset, n, byte) in enumerate(plan):
            img.pwrite(bytes([byte]) * n, offset)
            if i % 9 == 8:
                img.flush()
    monkeypatch.undo()
    assert len(writes) > 40
    states = _states(plan, bytes(start), cs)
    crashed = tmp_path / "crashed.qcow"
    for cut in range(len(writes) + 1):
        image = bytearray(original)
        for offset, data in writes[:cut]:
            image[len(image) : offset] = bytes(max(0, offset - len(image)))
            image[offset : offset + len(data)] = data
        crashed.write_bytes(image)
        walk(crashed)
        with diskspec.open(crashed) as img:
            got = img.pread(img.size, 0)
        for c, allowed in states.items():
            assert got[c : c + cs] in allowed, (cut, c)


def test_convert_to_qcow_with_backing_and_encryption(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random.Random(8).randbytes(300_000) + bytes(200_000) + b"\x01" * 12_288
    src.write_bytes(data)
    (tmp_path / "base.raw").write_bytes(b"\x07" * len(data))
    backed = tmp_path / "backed.qcow"
    assert main(["convert", "-f", "raw", "-O", "qcow", "-B", "base.raw", "-F", "raw", str(src),
                 str(backed)]) == 0
    walk(backed)
    # -B: the zero ranges the copy skips read from the backing file, as with qemu-img
    done = qemu_img("convert", "-f", "raw", "-O", "qcow", "-B", "base.raw", "-F", "raw",
                    str(src), str(tmp_path / "qemu.qcow"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert qemu_raw(backed, tmp_path / "a.raw") == qemu_raw(tmp_path / "qemu.qcow",
                                                            tmp_path / "b.raw")
    enc = tmp_path / "enc.qcow"
    assert main(["convert", "-f", "raw", "-O", "qcow", "--object", "secret,id=s0,data=pw", "-o",
                 "encrypt.format=aes,encrypt.key-secret=s0", str(src), str(enc)]) == 0
    walk(enc)
    assert qemu_raw(enc, tmp_path / "c.raw", "pw") == data + bytes(-len(data) % 512)
    assert b"\x01" * 512 not in enc.read_bytes()  # really encrypted


def test_hostile_tables_cannot_make_writes_hit_metadata(tmp_path: Path) -> None:
    """L1 and L2 entries pointing into the header, the L1 table or an L2 table: a write
    there is refused and the file left as it was (qemu's qcow driver would write)."""
    from diskspec.generated import qcow as qv
    from diskspec.tests.test_bad_input import _poke

    path = tmp_path / "big.qcow"
    assert qemu_img("create", "-q", "-f", "qcow", str(path), "4G").returncode == 0  # 16 KiB L1
    qemu_io(path, "write -P 0x11 0 4k")
    data = path.read_bytes()
    h = qv.Qcow.parse(data).header
    l2 = qv.L1Entry.parse(data, h.ofs_l1_table).ofs_l2_table
    cases = {
        "data over the L2 table": _poke(data, l2, ">Q", l2),
        "data over the L1 table": _poke(data, l2, ">Q", 4096),
        "table in the header": _poke(data, h.ofs_l1_table, ">Q", 8),
    }
    for what, image in cases.items():
        path.write_bytes(image)
        with (_open(path, None) as img,
              pytest.raises(ImageError, match="invalid write on metadata")):
            img.pwrite(b"\x99" * 100, 0)
            img.flush()
        assert path.read_bytes() == image, what
