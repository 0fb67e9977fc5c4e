"""Read conformance: every qcow2 image qemu-img wrote reads byte-identical through diskspec."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

import diskspec
from diskspec.tests.corpus import CorpusImage, image_opts, require_tool


def _qemu_raw(image: CorpusImage, dest: Path, snapshot: str | None = None) -> bytes:
    cmd = [require_tool("qemu-img"), "convert", "-O", "raw"]
    if snapshot is not None:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    cmd += [*image_opts(image), str(dest)]
    # qemu 7.2 resolves a relative data-file name against its working folder
    subprocess.run(cmd, check=True, capture_output=True, cwd=image.path.parent)
    return dest.read_bytes()


def _readable(corpus: list[CorpusImage]) -> list[CorpusImage]:
    return [i for i in corpus if i.fmt == "qcow2"]


def test_corpus_has_the_read_matrix(corpus: list[CorpusImage]) -> None:
    tags = set().union(*(i.tags for i in _readable(corpus)))
    for tag in ("v2", "v3", "backing", "compressed", "zstd", "extended_l2", "snapshots",
                "data_file", "data_file_raw", "bitmaps", "refcount_bits", "discard", "luks",
                "aes"):
        assert tag in tags, tag


def test_whole_image_reads_like_qemu(corpus: list[CorpusImage], tmp_path: Path) -> None:
    checked = 0
    for image in _readable(corpus):
        want = _qemu_raw(image, tmp_path / f"{image.name}.raw")
        with diskspec.open(image.path, passphrase=image.secret) as img:
            assert img.size == len(want), image.name
            got = img.pread(img.size, 0)
        assert got == want, image.name
        checked += 1
    assert checked >= 30


def test_unaligned_reads_match(corpus: list[CorpusImage], tmp_path: Path) -> None:
    rng = random.Random(1234)
    for image in _readable(corpus):
        want = _qemu_raw(image, tmp_path / f"{image.name}.raw")
        with diskspec.open(image.path, passphrase=image.secret) as img:
            for _ in range(40):
                n = rng.choice([1, 511, 512, 4095, 65537, 300_000])
                off = rng.randrange(0, max(1, img.size - n))
                assert img.pread(n, off) == want[off : off + n], (image.name, off, n)


def test_snapshots_read_like_qemu(corpus: list[CorpusImage], tmp_path: Path) -> None:
    seen = 0
    for image in _readable(corpus):
        if "snapshots" not in image.tags:
            continue
        with diskspec.open(image.path, passphrase=image.secret) as img:
            snaps = img.snapshots()
            assert [s.id for s in snaps] == [str(i + 1) for i in range(len(snaps))]
            for snap in snaps:
                want = _qemu_raw(image, tmp_path / f"{image.name}-{snap.id}.raw", snap.name)
                with img.open_snapshot(snap.name) as view:
                    assert view.pread(view.size, 0) == want, (image.name, snap.name)
                seen += 1
    assert seen >= 4


def _qemu_img(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True, cwd=cwd)


def test_backing_loops_are_an_error(tmp_path: Path) -> None:
    _qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=tmp_path)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
              cwd=tmp_path)
    _qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
              cwd=tmp_path)
    with pytest.raises(diskspec.ImageError, match="infinite loop"):
        diskspec.open(tmp_path / "b.qcow2")
    with diskspec.open(tmp_path / "b.qcow2", backing=False) as img:
        assert img.pread(512, 0) == bytes(512)


def test_backing_without_format_is_never_probed(tmp_path: Path) -> None:
    # the backing is really qcow2, but the overlay records no format: it must read as raw
    _qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
              cwd=tmp_path)
    data = bytearray((tmp_path / "top.qcow2").read_bytes())
    ext = data.find(b"qcow2", 112)  # the backing format extension's data
    data[ext - 8 : ext - 4] = b"\x12\x34\x56\x78"  # make the extension an unknown one
    (tmp_path / "top.qcow2").write_bytes(bytes(data))
    with diskspec.open(tmp_path / "top.qcow2") as img:
        head = (tmp_path / "base.qcow2").read_bytes()[:512]
        assert img.pread(512, 0) == head  # raw bytes of the qcow2 base, not its guest zeros


def test_reads_outside_the_image_are_refused(corpus: list[CorpusImage]) -> None:
    image = _readable(corpus)[0]
    with diskspec.open(image.path, passphrase=image.secret) as img:
        with pytest.raises(diskspec.UsageError):
            img.pread(1, img.size)
        with pytest.raises(diskspec.UsageError):
            img.pwrite(b"x", 0)


def test_raw_images_have_the_same_api(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    diskspec.create(path, "raw", "1M")
    with diskspec.open(path, "r+") as img:
        assert img.fmt == "raw" and img.size == 1 << 20
        img.pwrite(b"x" * 1000, 0)
        img.write_zeroes(0, 500)
        img.discard(500, 100)
        img.resize(2 << 20)
        assert img.pread(1000, 0) == bytes(600) + b"x" * 400
        assert img.snapshots() == []
        with pytest.raises(diskspec.UsageError, match="--shrink"):
            img.resize(1 << 20)
        with pytest.raises(diskspec.UsageError, match="not supported"):
            img.create_snapshot("s")
    assert path.stat().st_size == 2 << 20
