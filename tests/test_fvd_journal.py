"""The FVD journal: replay of a dirty image (in memory on a read-only open, byte-identical
file afterwards), bad records as one-line errors, recycling a tiny journal, and a writer
killed with SIGKILL at random moments."""

from __future__ import annotations

import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import diskspec
from diskspec.fvd import FvdImage
from diskspec.generated import fvd as fv
from diskspec.tests.fvd_support import KiB, MiB, build, digest, random_writes, read_all

from .test_cli import ds


def _dirty(folder: Path, kind: str, **extra: object) -> tuple[Path, bytearray]:
    """An image whose last writes live only in its journal (the writer was dropped)."""
    built = build(folder, kind, **extra)
    img = diskspec.open(built.path, "r+")
    assert isinstance(img, FvdImage)
    random_writes(img, built.model, random.Random(7), 20, 10 * KiB)
    img.flush()
    img.abandon()
    return built.path, built.model


@pytest.mark.parametrize("kind", ["compact", "raw-base", "qcow2-base-compact"])
def test_read_only_open_of_a_dirty_image_replays_in_memory(tmp_path: Path, kind: str) -> None:
    path, model = _dirty(tmp_path, kind, block_size=512)
    files = sorted(p for p in tmp_path.iterdir())
    before = digest(*files)
    with diskspec.open(path) as img:
        assert isinstance(img, FvdImage)
        assert img.h.clean_shutdown == 0 and img.replayed > 0
        assert read_all(img) == bytes(model)
        assert img.check().exit_code() == 0
        on_disk_bitmap = path.read_bytes()[img.h.ofs_bitmap : img.h.ofs_bitmap + 4096]
    assert digest(*files) == before
    if kind == "raw-base":  # without the replay the bits would be missing
        assert on_disk_bitmap.count(0) == len(on_disk_bitmap)
    # a read-write open persists the replay and the image is clean again
    with diskspec.open(path, "r+") as img:
        assert read_all(img) == bytes(model)
    with diskspec.open(path) as img:
        assert isinstance(img, FvdImage)
        assert img.h.clean_shutdown == 1 and img.replayed == 0
        assert read_all(img) == bytes(model)
        journal = path.read_bytes()[img.h.ofs_journal : img.h.ofs_journal + img.h.len_journal]
        assert journal.count(0) == len(journal), "the journal is zeroed after replay"


def _put_record(path: Path, sector: int, raw: bytes) -> None:
    with diskspec.open(path) as img:
        assert isinstance(img, FvdImage)
        at = img.h.ofs_journal + 512 * sector
    with path.open("r+b") as f:
        f.seek(at)
        f.write(raw.ljust(512, b"\0"))


BITMAP = int(fv.JournalRecordType.BITMAP)
TABLE = int(fv.JournalRecordType.TABLE)
BAD_RECORDS = {
    "bitmap past the disk": (struct.pack("<IIq", BITMAP, 8, (1 * MiB) // 512), "past the disk"),
    "negative sector": (struct.pack("<IIq", BITMAP, 8, -8), "past the disk"),
    "table past the table": (struct.pack("<IIIII", TABLE, 15, 2, 0, 1), "past the table"),
    "entry not an index": (struct.pack("<IIII", TABLE, 0, 1, 0xFFFFFFFF), "not a chunk index"),
    "unknown type": (struct.pack("<I", 0x0BADF00D), "unknown record type 0x0badf00d"),
    "entries past the sector": (struct.pack("<III", TABLE, 0, 200), "journal sector 3"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_journal_records_are_one_line_errors(tmp_path: Path, name: str) -> None:
    path, _ = _dirty(tmp_path, "raw-base-compact", block_size=4096)
    raw, needle = BAD_RECORDS[name]
    _put_record(path, 3, raw)
    before = digest(path)
    for mode in ("r", "r+"):
        with pytest.raises(diskspec.FormatError) as info:
            diskspec.open(path, mode)
        message = str(info.value)
        assert needle in message and "\n" not in message, message
        assert "journal sector 3" in message
    assert digest(path) == before
    got = ds("info", path.name, cwd=tmp_path)
    assert got.returncode == 1 and got.stderr.count("\n") == 1, got.stderr
    assert "Traceback" not in got.stderr and needle in got.stderr
    assert digest(path) == before


def test_a_tiny_journal_recycles(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base-compact", block_size=512, journal_size=4096)
    img = diskspec.open(built.path, "r+")
    assert isinstance(img, FvdImage) and img.h.len_journal == 4096
    seen: list[str] = []
    img.crash_hook = seen.append
    random_writes(img, built.model, random.Random(3), 60, 4 * KiB, flush=True)
    assert seen.count("recycle") >= 5
    img.abandon()  # dropped after a recycle: bitmap and table on disk plus the new journal
    with diskspec.open(built.path) as ro:
        assert read_all(ro) == bytes(built.model)
    with diskspec.open(built.path, "r+") as rw:
        assert read_all(rw) == bytes(built.model)
        assert rw.check().exit_code() == 0


WRITER = r"""
import random, sys
import diskspec
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
img = diskspec.open(path, "r+")
print("ready", flush=True)
i = 0
while True:
    at = rng.randrange(0, img.size - 70000)
    n = rng.choice([1, 512, 4096, 70000])
    img.pwrite(bytes([i % 255 + 1]) * n, at)
    img.flush()
    print(i, at, n, flush=True)
    i += 1
"""


@pytest.mark.parametrize("kind", ["raw-base-compact", "qcow2-base", "data-file"])
def test_sigkill_at_random_moments(tmp_path: Path, kind: str) -> None:
    rng = random.Random(kind)
    flushed = 0
    for round_ in range(3):
        folder = tmp_path / str(round_)
        folder.mkdir()
        built = build(folder, kind, block_size=rng.choice([512, 4096, 65536]),
                      journal_size=4096, seed=round_)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(built.path), str(round_)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"  # started however loaded the machine is
        time.sleep(rng.uniform(0.1, 0.6))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        # a line cut by the kill counts as not reported (its write is then the torn one)
        done = [tuple(map(int, line.split())) for line in out.splitlines(keepends=True)
                if line.endswith("\n")]
        flushed += len(done)
        model = built.model
        for i, at, n in done:
            model[at : at + n] = bytes([i % 255 + 1]) * n
        # the write after the last reported flush may be torn: old or new per sector
        replay = random.Random(round_)
        for _ in range(len(done) + 1):
            at = replay.randrange(0, len(model) - 70000)
            n = replay.choice([1, 512, 4096, 70000])
        nxt = bytes([len(done) % 255 + 1]) * n
        with diskspec.open(built.path) as img:
            got = bytearray(read_all(img))
        assert got[:at] == model[:at] and got[at + n :] == model[at + n :], kind
        new = bytearray(model)
        new[at : at + n] = nxt
        for k in range(at - at % 512, at + n, 512):
            assert got[k : k + 512] in (model[k : k + 512], new[k : k + 512]), (kind, k)
        with diskspec.open(built.path, "r+") as img:
            assert read_all(img) == bytes(got)
            assert img.check().exit_code() in (0, 3)
    assert flushed > 0, "the writers never got to flush"
