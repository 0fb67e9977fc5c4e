"""The command line with FVD: create, info, check, map, convert to and from FVD (qemu-img is
the oracle for the qcow2 side), prefetch, rebase, commit, resize; mixed chains both ways."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import diskspec
from diskspec.fvd import FvdImage
from diskspec.tests.corpus import require_tool
from diskspec.tests.fvd_support import KiB, MiB, build, read_all

from .test_cli import ds, ds_inproc


def _qemu_qcow2(folder: Path, name: str, size: str, *writes: str) -> Path:
    path = folder / name
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), size],
                   check=True)
    for w in writes:
        subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-c", w, str(path)], check=True,
                       capture_output=True)
    return path


def _qemu_raw(folder: Path, src: Path, name: str) -> bytes:
    out = folder / name
    subprocess.run([require_tool("qemu-img"), "convert", "-O", "raw", str(src), str(out)],
                   check=True)
    return out.read_bytes()


def test_create_through_the_cli(tmp_path: Path) -> None:
    got = ds("create", "-f", "fvd", "-o", "block_size=4096,compact_image=on,chunk_size=256k",
             "disk.fvd", "1G", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("Formatting 'disk.fvd', fmt=fvd size=1073741824")
    info = json.loads(ds("info", "--output=json", "disk.fvd", cwd=tmp_path).stdout)
    assert info["format"] == "fvd" and info["virtual-size"] == 1 << 30
    data = info["format-specific"]["data"]
    assert info["format-specific"]["type"] == "fvd"
    assert data["compact-image"] is True and data["chunk-size"] == 256 * KiB
    assert data["block-size"] == 0  # no base: no bitmap
    assert data["clean-shutdown"] is True and data["all-data-in-fvd-img"] is True
    # a base of another format, booleans as off/false
    _qemu_qcow2(tmp_path, "base.qcow2", "8M", "write -P 0x33 0 1M")
    got = ds("create", "-f", "fvd", "-b", "base.qcow2", "-F", "qcow2", "-o",
             "copy_on_read=off,compact_image=false", "top.fvd", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    info = json.loads(ds("info", "--output=json", "top.fvd", cwd=tmp_path).stdout)
    assert info["virtual-size"] == 8 * MiB
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["block-size"] == 512
    assert info["format-specific"]["data"]["copy-on-read"] is False
    chain = json.loads(ds("info", "--backing-chain", "--output=json", "top.fvd",
                          cwd=tmp_path).stdout)
    assert [layer["format"] for layer in chain] == ["fvd", "qcow2"]
    human = ds("info", "top.fvd", cwd=tmp_path).stdout
    assert "file format: fvd" in human and "backing file format: qcow2" in human
    bad = ds("create", "-f", "fvd", "-o", "cluster_size=64k", "x.fvd", "1M", cwd=tmp_path)
    assert bad.returncode == 1 and "Invalid parameter 'cluster_size'" in bad.stderr


@pytest.mark.parametrize("options", ["", "compact_image=on,chunk_size=64k"])
def test_convert_qcow2_to_fvd_and_back(tmp_path: Path, options: str) -> None:
    src = _qemu_qcow2(tmp_path, "src.qcow2", "24M", "write -P 0x11 0 3M",
                      "write -P 0x22 7M 65537", "write -z 1M 1M", "write -P 0x44 23M 1M")
    want = _qemu_raw(tmp_path, src, "want.raw")
    args = ["convert", "-O", "fvd", *(["-o", options] if options else []), "src.qcow2",
            "dst.fvd"]
    got = ds_inproc(*args, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    got = ds_inproc("convert", "-O", "raw", "dst.fvd", "out.raw", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out.raw").read_bytes() == want
    assert ds_inproc("check", "dst.fvd", cwd=tmp_path).returncode == 0
    assert ds_inproc("compare", "src.qcow2", "dst.fvd", cwd=tmp_path).returncode == 0
    # and qemu-img reads what diskspec wrote from FVD into qcow2
    got = ds_inproc("convert", "-O", "qcow2", "dst.fvd", "back.qcow2", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert _qemu_raw(tmp_path, tmp_path / "back.qcow2", "back.raw") == want


def test_fvd_over_qcow2_and_qcow2_over_fvd(tmp_path: Path) -> None:
    base = _qemu_qcow2(tmp_path, "base.qcow2", "4M", "write -P 0x5a 0 3M", "write -z 1M 64k")
    model = bytearray(_qemu_raw(tmp_path, base, "base.raw"))
    diskspec.create(tmp_path / "mid.fvd", "fvd", 4 * MiB, backing_file="base.qcow2",
                    backing_fmt="qcow2", block_size=65536, compact_image=True)
    with diskspec.open(tmp_path / "mid.fvd", "r+") as mid:
        mid.pwrite(b"m" * 100_000, 1_000_000)
        model[1_000_000:1_100_000] = b"m" * 100_000
    # qcow2 over the FVD image: the opener recurses through open_image with fmt "fvd"
    top = tmp_path / "top.qcow2"
    diskspec.create(top, "qcow2", 4 * MiB, backing_file="mid.fvd", backing_fmt="fvd")
    with diskspec.open(top, "r+") as img:
        assert isinstance(img.backing, FvdImage)  # type: ignore[attr-defined]
        img.pwrite(b"t" * 5000, 1_050_000)
        model[1_050_000:1_055_000] = b"t" * 5000
    got = ds_inproc("convert", "-O", "raw", "top.qcow2", "top.raw", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "top.raw").read_bytes() == bytes(model)
    chain = json.loads(ds_inproc("info", "--backing-chain", "--output=json", "top.qcow2",
                                 cwd=tmp_path).stdout)
    assert [layer["format"] for layer in chain][:2] == ["qcow2", "fvd"]
    assert ds_inproc("check", "top.qcow2", cwd=tmp_path).returncode == 0


def test_map_shows_base_and_fvd_ranges(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base-compact", size=2 * MiB, base_size=1 * MiB,
                  block_size=65536)
    with diskspec.open(built.path, "r+") as img:
        img.pwrite(b"a" * 65536, 0)  # one block of the base range, into chunk 0
        img.pwrite(b"b" * 10, 1536 * KiB)  # past the base
    got = ds_inproc("map", "--output=json", built.path.name, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    extents = json.loads(got.stdout)
    head = extents[0]
    assert head["start"] == 0 and head["length"] == 65536 and head["depth"] == 0
    assert head["data"] and head["offset"] > 0
    assert any(e["depth"] == 1 and e["data"] for e in extents)  # base data
    at = next(e for e in extents if e["start"] <= 1536 * KiB < e["start"] + e["length"])
    assert at["depth"] == 0 and at["data"]
    end = extents[-1]
    assert end["start"] + end["length"] == 2 * MiB and end["zero"]
    assert sum(e["length"] for e in extents) == 2 * MiB


def test_prefetch_then_the_base_is_not_needed(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base-compact", size=2 * MiB, block_size=4096)
    got = ds("fvd", "prefetch", built.path.name, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "no longer needed" in got.stdout
    assert built.base is not None
    built.base.unlink()
    with diskspec.open(built.path) as img:
        assert isinstance(img, FvdImage) and img.backing is None
        assert img.h.all_data_in_fvd_img == 1
        assert read_all(img) == bytes(built.model)
    assert ds_inproc("check", built.path.name, cwd=tmp_path).returncode == 0
    info = json.loads(ds_inproc("info", "--output=json", built.path.name, cwd=tmp_path).stdout)
    assert info["format-specific"]["data"]["all-data-in-fvd-img"] is True
    assert ds("fvd", "prefetch", "nope.fvd", cwd=tmp_path).returncode == 1


def test_commit_and_rebase(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base", size=1 * MiB, base_size=1 * MiB, block_size=4096)
    with diskspec.open(built.path, "r+") as img:
        img.pwrite(b"c" * 9000, 5000)
        built.model[5000:14000] = b"c" * 9000
    got = ds_inproc("commit", built.path.name, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert built.base is not None
    assert built.base.read_bytes() == bytes(built.model)
    with diskspec.open(built.path) as img:
        assert read_all(img) == bytes(built.model)
        assert all(kind == 2 for kind, *_ in img._plan(0, img.size))  # emptied: all base
    # safe rebase onto a zero base keeps the content; then the new base is named
    (tmp_path / "zero.raw").write_bytes(bytes(1 * MiB))
    got = ds_inproc("rebase", "-b", "zero.raw", "-F", "raw", built.path.name, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    with diskspec.open(built.path) as img:
        assert isinstance(img, FvdImage) and img.base_name == "zero.raw"
        assert read_all(img) == bytes(built.model)


def test_resize(tmp_path: Path) -> None:
    plain = build(tmp_path, "raw-base", size=1 * MiB, block_size=4096)
    with diskspec.open(plain.path, "r+") as img:
        img.pwrite(b"p" * 1000, 1 * MiB - 1000)
    assert ds_inproc("resize", plain.path.name, "3M", cwd=tmp_path).returncode == 0
    got = ds_inproc("resize", plain.path.name, "512K", cwd=tmp_path)
    assert got.returncode == 1 and "--shrink" in got.stderr
    assert ds_inproc("resize", "--shrink", plain.path.name, "512K", cwd=tmp_path).returncode == 0
    assert ds_inproc("resize", plain.path.name, "2M", cwd=tmp_path).returncode == 0
    with diskspec.open(plain.path) as img:
        assert isinstance(img, FvdImage)
        assert img.size == 2 * MiB and img.h.len_base_img == 512 * KiB
        want = bytes(plain.model[: 512 * KiB]) + bytes(1536 * KiB)  # grown part reads zeros
        assert read_all(img) == want
        assert img.check().exit_code() == 0
    compact = build(tmp_path, "compact", size=1 * MiB)  # 16 chunks of 64 KiB: room for 1024
    assert ds_inproc("resize", compact.path.name, "64M", cwd=tmp_path).returncode == 0
    got = ds_inproc("resize", compact.path.name, "65M", cwd=tmp_path)
    assert got.returncode == 1 and "cannot grow" in got.stderr
    with diskspec.open(compact.path, "r+") as img:
        img.pwrite(b"q" * 10, 63 * MiB)
        assert img.pread(10, 63 * MiB) == b"q" * 10
        img.resize(1 * MiB, shrink=True)
        img.resize(64 * MiB)
        assert img.pread(10, 63 * MiB) == bytes(10)
        assert img.check().exit_code() in (0, 3)
    with diskspec.open(compact.path) as img:
        assert img.snapshots() == []
        with pytest.raises(diskspec.UsageError, match="Operation not supported"):
            img.create_snapshot("s")  # type: ignore[attr-defined]


def test_add_storage_cmd_is_kept_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cmd = f"touch {marker}"
    built = build(tmp_path, "raw-base-compact", size=4 * MiB, block_size=4096,
                  add_storage_cmd=cmd, storage_grow_unit=64 * KiB)
    with diskspec.open(built.path, "r+") as img:  # every chunk grows the storage
        for at in range(0, 4 * MiB, 64 * KiB):
            img.pwrite(b"g" * 100, at + 10)
        img.resize(4 * MiB + 64 * KiB)
        img.set_backing("base.raw", "raw")  # type: ignore[attr-defined]
    with diskspec.open(built.path) as img:
        assert isinstance(img, FvdImage)
        assert img.h.add_storage_cmd.rstrip(b"\0") == cmd.encode()
        assert img.pread(100, 64 * KiB + 10) == b"g" * 100
        assert img.info()["format-specific"]["data"]["add-storage-cmd"] == cmd
    assert not marker.exists()


def test_backing_false_opens_the_image_alone(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base-data-file", block_size=4096)
    with diskspec.open(built.path, "r+") as img:
        img.pwrite(b"d" * 10, 700 * KiB)
    (tmp_path / "data.raw").rename(tmp_path / "elsewhere.raw")
    assert built.base is not None
    built.base.unlink()
    with diskspec.open(built.path, backing=False) as img:
        assert isinstance(img, FvdImage) and img.backing is None
        assert img.info()["format-specific"]["data"]["data-file"] == "data.raw"
        with pytest.raises(diskspec.FormatError, match=r"data file data\.raw is not open"):
            img.pread(10, 700 * KiB)


def test_a_compact_image_without_table_room_cannot_grow(tmp_path: Path) -> None:
    # a 0-byte compact image has a 0-byte table, and its journal starts right there
    diskspec.create(tmp_path / "z.fvd", "fvd", 0, compact_image=True)
    got = ds_inproc("resize", "z.fvd", "1M", cwd=tmp_path)
    assert got.returncode == 1 and "holds 0 chunks" in got.stderr
    # 4 MiB of 4 KiB chunks fill a 4 KiB table exactly: not one chunk more
    diskspec.create(tmp_path / "f.fvd", "fvd", "4M", compact_image=True, chunk_size=4096)
    got = ds_inproc("resize", "f.fvd", "4100K", cwd=tmp_path)
    assert got.returncode == 1 and "holds 1024 chunks" in got.stderr
    assert ds_inproc("check", "z.fvd", cwd=tmp_path).returncode == 0
    assert ds_inproc("check", "f.fvd", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("base_fmt", ["raw", "qcow", "qcow2"])
@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
def test_fvd_over_every_base_format(tmp_path: Path, base_fmt: str, compact: bool) -> None:
    """FVD over raw, qcow and qcow2 bases written by qemu: reads equal qemu's view of the base
    with diskspec's writes on top, and a qcow v1 image (qemu reads it) can sit over FVD."""
    qi = require_tool("qemu-img")
    base = tmp_path / f"base.{base_fmt}"
    subprocess.run([qi, "create", "-q", "-f", base_fmt, str(base), "6M"], check=True)
    for w in ("write -P 0x5a 0 2M", "write -P 0x6b 3M 100k", "write -P 0x7c 5M 512"):
        subprocess.run([require_tool("qemu-io"), "-f", base_fmt, "-c", w, str(base)],
                       check=True, capture_output=True)
    model = bytearray(_qemu_raw(tmp_path, base, "base.as.raw"))
    fvd = tmp_path / "mid.fvd"
    diskspec.create(fvd, "fvd", 6 * MiB, backing_file=base.name, backing_fmt=base_fmt,
                    block_size=4096, compact_image=compact)
    with diskspec.open(fvd, "r+") as img:
        for at, n in ((1_000_001, 70_000), (3 * MiB - 7, 20), (6 * MiB - 3000, 3000)):
            data = bytes((at + i) % 251 for i in range(n))
            img.pwrite(data, at)
            model[at:at + n] = data
    assert ds_inproc("check", "mid.fvd", cwd=tmp_path).returncode == 0
    got = ds_inproc("convert", "-O", "raw", "mid.fvd", "mid.raw", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "mid.raw").read_bytes() == bytes(model)
    # a qcow v1 image over the FVD disk (the caller names the backing format; qcow stores none)
    top = tmp_path / "top.qcow"
    diskspec.create(top, "qcow", 6 * MiB, backing_file="mid.fvd", backing_fmt="fvd")
    with diskspec.open(top, "r+", backing_format="fvd") as img:
        img.pwrite(b"q" * 4096, 8192)
        model[8192:12288] = b"q" * 4096
    with diskspec.open(top, backing_format="fvd") as img:
        assert img.pread(len(model), 0) == bytes(model)


@pytest.mark.parametrize("options", ["", "compact_image=on", "compact_image=on,chunk_size=64k"])
def test_measure_fvd_is_what_convert_then_needs(tmp_path: Path, options: str) -> None:
    """qemu-img cannot measure FVD; diskspec's figure is checked against the image convert
    then writes: its metadata regions plus the chunks it allocates (compact) or the whole
    disk (plain, addressed like a raw file)."""
    from diskspec.fvd.consts import EMPTY

    _qemu_qcow2(tmp_path, "src.qcow2", "20M", "write -P 1 0 100k", "write -P 2 7M 1M",
                "write -z 9M 1M", "write -P 3 19M 4k")
    opt = ["-o", options] if options else []
    got = ds_inproc("measure", "--output=json", "-O", "fvd", *opt, "src.qcow2", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    figures = json.loads(got.stdout)
    empty = json.loads(ds_inproc("measure", "--output=json", "-O", "fvd", *opt, "--size", "20M",
                                 cwd=tmp_path).stdout)
    assert ds_inproc("convert", "-O", "fvd", *opt, "src.qcow2", "dst.fvd",
                     cwd=tmp_path).returncode == 0
    with diskspec.open(tmp_path / "dst.fvd") as img:
        assert isinstance(img, FvdImage)
        head = img.h
        if head.compact_image:
            assert img.table is not None
            used = sum(1 for e in img.table if e != EMPTY)
            assert figures["required"] == head.len_metadata + used * head.chunk_size
            assert empty["required"] == head.len_metadata
            chunks = -(-img.size // head.chunk_size)
            assert figures["fully-allocated"] == head.len_metadata + chunks * head.chunk_size
        else:
            assert figures["required"] == head.len_metadata + img.size
            assert figures == empty


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
def test_a_qcow2_data_file(tmp_path: Path, compact: bool) -> None:
    """data_file_fmt is honoured (fvd.md rule 6): the data region is a qcow2 image that grows
    by resize, stays sound for qemu-img check, and holds the guest bytes where the header's
    layout puts them."""
    opts = "data_file=d.qcow2,data_file_fmt=qcow2" + (",compact_image=on,chunk_size=64k"
                                                     if compact else "")
    got = ds_inproc("create", "-f", "fvd", "-o", opts, "img.fvd", "8M", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    model = bytearray(8 * MiB)
    with diskspec.open(tmp_path / "img.fvd", "r+") as img:
        for at, n in ((12345, 100_000), (7 * MiB, 5000), (3 * MiB + 1, 70_000)):
            data = bytes((at * 7 + i) % 253 for i in range(n))
            img.pwrite(data, at)
            model[at:at + n] = data
    check = subprocess.run([require_tool("qemu-img"), "check", "d.qcow2"], cwd=tmp_path,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    with diskspec.open(tmp_path / "img.fvd") as img:
        assert read_all(img) == bytes(model)
    assert ds_inproc("check", "img.fvd", cwd=tmp_path).returncode == 0
    info = json.loads(ds_inproc("info", "--output=json", "img.fvd", cwd=tmp_path).stdout)
    assert info["format-specific"]["data"]["data-file-format"] == "qcow2"
    # qemu-img reads the data file itself: in a plain image guest offset = data offset
    raw = _qemu_raw(tmp_path, tmp_path / "d.qcow2", "d.raw")
    if not compact:
        assert raw[: len(model)] == bytes(model)
        return
    from diskspec.fvd.consts import EMPTY

    with diskspec.open(tmp_path / "img.fvd") as img:
        assert isinstance(img, FvdImage) and img.table is not None
        cs = img.chunk_size
        placed = [(v, k) for v, k in enumerate(img.table) if k != EMPTY]
    assert len(placed) == 5  # the chunks the three writes touch, allocated in order
    for v, k in placed:
        assert raw[k * cs : (k + 1) * cs] == model[v * cs : (v + 1) * cs], (v, k)
