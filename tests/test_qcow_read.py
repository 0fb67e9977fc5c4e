"""qcow v1 read conformance: the qemu-made corpus reads, maps and infos as qemu-img says,
and hostile headers give one-line errors without touching the file."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

import diskspec
from diskspec.compress import CompressedDataError
from diskspec.generated import qcow as qv
from diskspec.image import ImageError
from diskspec.qcow.image import QcowImage
from diskspec.qcow2.info import format_info_json
from diskspec.qcow2.mapping import format_map_json
from diskspec.tests.corpus import CorpusImage, image_opts
from diskspec.tests.qcow_support import qemu_img, qemu_io, qemu_raw, walk
from diskspec.tests.test_bad_input import _poke

H = qv.Header


def _qcow1(corpus: list[CorpusImage]) -> list[CorpusImage]:
    images = [i for i in corpus if i.fmt == "qcow"]
    assert {i.name for i in images} >= {"qcow1-plain", "qcow1-compressed", "qcow1-aes",
                                        "qcow1-backing", "qcow1-convert-compressed"}
    return images


def test_corpus_reads_like_qemu(corpus: list[CorpusImage], tmp_path: Path) -> None:
    rng = random.Random(7)
    for image in _qcow1(corpus):
        want = qemu_raw(image.path, tmp_path / f"{image.name}.raw", image.secret)
        with diskspec.open(image.path, passphrase=image.secret) as img:
            assert isinstance(img, QcowImage)
            assert img.size == len(want), image.name
            assert img.pread(img.size, 0) == want, image.name
            for _ in range(60):
                n = rng.choice([1, 7, 511, 512, 513, 4095, 4097, 65537, 300_001])
                off = rng.randrange(0, img.size - n)
                assert img.pread(n, off) == want[off : off + n], (image.name, off, n)
        walk(image.path)  # the walker accepts what qemu wrote


def test_encrypted_image_needs_its_key(corpus: list[CorpusImage]) -> None:
    image = next(i for i in corpus if i.name == "qcow1-aes")
    with diskspec.open(image.path) as img, pytest.raises(ImageError, match="passphrase"):
        img.pread(4096, 0)
    with diskspec.open(image.path, passphrase="not the key") as img:
        assert img.pread(4096, 0) != bytes([0x11]) * 4096
    # the key is the first 16 bytes of the passphrase
    assert image.secret is not None
    with (diskspec.open(image.path, passphrase=image.secret[:16] + "anything") as img,
          diskspec.open(image.path, passphrase=image.secret) as ref):
        assert img.pread(65536, 0) == ref.pread(65536, 0)


def test_map_and_info_match_qemu(corpus: list[CorpusImage]) -> None:
    for image in _qcow1(corpus):
        cwd = image.path.parent
        with diskspec.open(image.path, passphrase=image.secret) as img:
            assert isinstance(img, QcowImage)
            done = qemu_img("map", "--output=json", *image_opts(image), cwd=cwd)
            assert done.returncode == 0, done.stderr
            assert format_map_json(img.map()) == done.stdout, image.name
            # info needs no key: qemu names the file as given, so run it on the plain name
            done = qemu_img("info", "--output=json", "-f", "qcow", str(image.path), cwd=cwd)
            assert done.returncode == 0, done.stderr
            want = json.loads(done.stdout)
            got = img.info()
            assert list(got.items()) == list(want.items()), image.name
            assert format_info_json(got) == done.stdout, image.name
            done = qemu_img("info", "--output=json", "--backing-chain", "-f", "qcow",
                            str(image.path), cwd=cwd)
            assert done.returncode == 0, done.stderr
            assert format_info_json(img.info_chain()) == done.stdout, image.name


def _base_header(tmp_path: Path) -> bytes:
    path = tmp_path / "fresh.qcow"
    diskspec.create(path, "qcow", "64M")
    return path.read_bytes()


HOSTILE = [
    (H.CLUSTER_BITS_AT, ">B", 8, "Cluster size must be between 512 and 64k"),
    (H.CLUSTER_BITS_AT, ">B", 17, "Cluster size must be between 512 and 64k"),
    (H.CLUSTER_BITS_AT, ">B", 0xFF, "Cluster size must be between 512 and 64k"),
    (H.L2_BITS_AT, ">B", 5, "L2 table size must be between 512 and 64k"),
    (H.L2_BITS_AT, ">B", 14, "L2 table size must be between 512 and 64k"),
    (H.L2_BITS_AT, ">B", 0x1B, "L2 table size must be between 512 and 64k"),
    (H.LEN_VIRTUAL_DISK_AT, ">Q", 0xEEEEEEEEEEEEEEEE, "Image too large"),
    (H.LEN_VIRTUAL_DISK_AT, ">Q", 0x7FFFFFFFFFFFFFFF, "Image too large"),
    (H.LEN_VIRTUAL_DISK_AT, ">Q", 1, "Image size is too small"),
    (H.LEN_VIRTUAL_DISK_AT, ">Q", 0, "Image size is too small"),
    (H.CRYPT_METHOD_AT, ">I", 2, "invalid encryption method in qcow header"),
    (H.VERSION_AT, ">I", 2, "qcow (v1) does not support qcow version 2"),
    (H.VERSION_AT, ">I", 3, "qcow (v1) does not support qcow version 3"),
    (0, ">I", 0x12345678, "Image not in qcow format"),
]


@pytest.mark.parametrize(("offset", "fmt", "value", "words"), HOSTILE,
                         ids=[f"{o}={v:#x}" for o, _, v, _ in HOSTILE])
def test_hostile_headers_match_qemu(
    tmp_path: Path, offset: int, fmt: str, value: int, words: str
) -> None:
    path = tmp_path / "bad.qcow"
    path.write_bytes(_poke(_base_header(tmp_path), offset, fmt, value))
    before = hashlib.sha256(path.read_bytes()).digest()
    for mode in ("r", "r+"):
        with pytest.raises(diskspec.FormatError) as failure:
            diskspec.open(path, mode, "qcow")
        message = str(failure.value)
        assert "\n" not in message and words in message, message
        assert str(path) in message
    assert hashlib.sha256(path.read_bytes()).digest() == before
    done = qemu_img("info", "-f", "qcow", str(path))
    assert done.returncode != 0 and words in done.stderr, done.stderr


def test_backing_name_too_long(tmp_path: Path) -> None:
    data = _poke(_base_header(tmp_path), H.OFS_BACKING_FILE_NAME_AT, ">Q", H.SIZE)
    for length in (1024, 0x7FFFFFFF, 0xFFFFFFFF):
        path = tmp_path / "bad.qcow"
        path.write_bytes(_poke(data, H.LEN_BACKING_FILE_NAME_AT, ">I", length))
        with pytest.raises(ImageError, match="Backing file name too long"):
            diskspec.open(path, fmt="qcow", backing=False)
        assert "Backing file name too long" in qemu_img("info", "-f", "qcow", str(path)).stderr


def test_truncated_header_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "short.qcow"
    path.write_bytes(_base_header(tmp_path)[:20])
    with pytest.raises(diskspec.FormatError, match=r"Header\.magic.*needs 48 bytes"):
        diskspec.open(path, fmt="qcow")


def test_l1_past_eof_reads_zeros_and_refuses_writes(tmp_path: Path) -> None:
    """qemu zero-fills reads past EOF, so it opens such an image; diskspec does too, with a
    bounded read of the L1 table, but will not write its entries far past the file."""
    path = tmp_path / "far.qcow"
    path.write_bytes(_poke(_base_header(tmp_path)[: H.SIZE], H.OFS_L1_TABLE_AT, ">Q", 1 << 40))
    before = path.read_bytes()
    with diskspec.open(path, fmt="qcow") as img:
        assert img.pread(1 << 20, 0) == bytes(1 << 20)
    with pytest.raises(ImageError, match="past the end of the file"):
        diskspec.open(path, "r+", "qcow")
    assert path.read_bytes() == before
    qemu_io(path, "read -P 0 0 1M")


def test_huge_l1_of_a_tiny_file_is_bounded(tmp_path: Path) -> None:
    """The largest size qemu accepts with 512-byte clusters and 64-entry L2 tables needs
    268 million L1 entries; only what the file holds is read."""
    data = _poke(_base_header(tmp_path)[: H.SIZE], H.CLUSTER_BITS_AT, ">B", 9)
    data = _poke(data, H.L2_BITS_AT, ">B", 6)
    path = tmp_path / "huge.qcow"
    path.write_bytes(_poke(data, H.LEN_VIRTUAL_DISK_AT, ">Q", ((1 << 31) - 1) // 8 << 15))
    with diskspec.open(path, fmt="qcow") as img:
        assert isinstance(img, QcowImage)
        assert len(img._l1) == 0
        assert img.pread(4096, img.size - 4096) == bytes(4096)
    path.write_bytes(_poke(data, H.LEN_VIRTUAL_DISK_AT, ">Q", (((1 << 31) - 1) // 8 + 1) << 15))
    with pytest.raises(ImageError, match="Image too large"):
        diskspec.open(path, fmt="qcow")


def _one_cluster_image(tmp_path: Path) -> tuple[Path, int]:
    """A qemu-written image with one data cluster at guest 0; returns it and its L2 entry's
    file offset."""
    path = tmp_path / "one.qcow"
    assert qemu_img("create", "-f", "qcow", str(path), "1M").returncode == 0
    qemu_io(path, "write -P 0x5a 0 4k")
    data = path.read_bytes()
    l2 = qv.L1Entry.parse(data, qv.Qcow.parse(data).header.ofs_l1_table).ofs_l2_table
    return path, l2


def test_unaligned_cluster_offset_is_an_io_error(tmp_path: Path) -> None:
    path, l2 = _one_cluster_image(tmp_path)
    data = path.read_bytes()
    entry = qv.L2Entry.parse(data, l2).ofs_cluster
    path.write_bytes(_poke(data, l2, ">Q", entry + 4))
    with diskspec.open(path) as img, pytest.raises(ImageError, match="Input/output error"):
        img.pread(512, 0)
    done = qemu_img("convert", "-f", "qcow", "-O", "raw", str(path), str(tmp_path / "x.raw"))
    assert done.returncode != 0 and "Input/output error" in done.stderr


def test_corrupt_compressed_cluster(tmp_path: Path) -> None:
    path, l2 = _one_cluster_image(tmp_path)
    data = path.read_bytes()
    bogus = qv.L2Entry(compressed=True, ofs_cluster=(100 << (63 - 12)) | H.SIZE).to_raw()
    path.write_bytes(_poke(data, l2, ">Q", bogus))
    with diskspec.open(path) as img, pytest.raises(CompressedDataError):
        img.pread(512, 0)


def test_backing_is_raw_unless_told_and_never_probed(tmp_path: Path) -> None:
    inner = tmp_path / "inner.qcow"
    diskspec.create(inner, "qcow", "1M")
    with diskspec.open(inner, "r+") as img:
        img.pwrite(b"\x77" * 4096, 0)
    top = tmp_path / "top.qcow"
    diskspec.create(top, "qcow", "1M", backing_file="inner.qcow", backing_fmt="qcow")
    with diskspec.open(top) as img:
        assert isinstance(img, QcowImage)
        assert img.backing is not None and img.backing.fmt == "raw"
        assert img.pread(4, 0) == inner.read_bytes()[:4]  # the qcow header, as raw bytes
    with diskspec.open(top, backing_format="qcow") as img:
        assert img.backing is not None and img.backing.fmt == "qcow"
        assert img.pread(4096, 0) == b"\x77" * 4096
    with diskspec.open(top, backing=False) as img:
        assert img.backing is None and img.pread(4096, 0) == bytes(4096)


def test_backing_loop_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "self.qcow"
    diskspec.create(path, "qcow", "1M", backing_file="self.qcow", backing_fmt="qcow")
    for fmt in ("qcow", None):  # even as raw bytes, a file may not back itself
        with pytest.raises(ImageError, match="infinite loop"):
            diskspec.open(path, backing_format=fmt)
    with diskspec.open(path, backing=False) as img:
        assert img.backing is None


def test_qcow2_over_a_qcow_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow"
    diskspec.create(base, "qcow", "2M")
    with diskspec.open(base, "r+") as img:
        img.pwrite(b"\x42" * 5000, 1000)
    top = tmp_path / "top.qcow2"
    diskspec.create(top, "qcow2", "2M", backing_file="base.qcow", backing_fmt="qcow")
    with diskspec.open(top, "r+") as img:
        img.pwrite(b"\x43" * 100, 3000)
    done = qemu_img("convert", "-f", "qcow2", "-O", "raw", str(top), str(tmp_path / "t.raw"))
    assert done.returncode == 0, done.stderr
    with diskspec.open(top) as img:
        assert img.pread(img.size, 0) == (tmp_path / "t.raw").read_bytes()
        got = format_info_json(img.info_chain())  # type: ignore[attr-defined]
        extents = format_map_json(img.map())
    done = qemu_img("info", "--output=json", "--backing-chain", str(top), cwd=tmp_path)
    assert got == done.stdout
    assert extents == qemu_img("map", "--output=json", str(top), cwd=tmp_path).stdout


def test_cli_info_and_map_text_match_qemu(
    corpus: list[CorpusImage], capsys: pytest.CaptureFixture[str]
) -> None:
    from diskspec.cli import main

    for image in (i for i in _qcow1(corpus) if i.secret is None):
        cwd = image.path.parent
        for args in (["info"], ["info", "--backing-chain"], ["map"]):
            capsys.readouterr()
            code = main([*args, str(image.path)])
            out, err = capsys.readouterr()
            done = qemu_img(*args, "-f", "qcow", str(image.path), cwd=cwd)
            assert (code, out) == (done.returncode, done.stdout), (image.name, args)
            if code:
                assert err.split(": ", 2)[-1] == done.stderr.split(": ", 1)[-1], image.name
