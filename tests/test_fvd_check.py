"""``check`` and ``check -r`` of damaged FVD images, with qemu-img's exit codes (0 clean,
1 could not check, 2 corruptions, 3 leaks only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import diskspec
from diskspec.fvd import FvdImage
from diskspec.generated import fvd as fv
from diskspec.tests.fvd_support import KiB, build, digest, read_all

from .test_cli import ds_inproc as ds

CHUNK = 64 * KiB


def _filled(folder: Path, kind: str = "compact", chunks: int = 6) -> tuple[Path, bytearray]:
    built = build(folder, kind, block_size=4096)
    with diskspec.open(built.path, "r+") as img:
        for c in range(chunks):
            data = bytes([c + 1]) * (CHUNK // 2)
            img.pwrite(data, c * CHUNK + 1000)
            built.model[c * CHUNK + 1000 : c * CHUNK + 1000 + len(data)] = data
    return built.path, built.model


def _header(path: Path) -> fv.Header:
    return fv.Header.parse(path.read_bytes()[: fv.Header.SIZE])


def _set_entry(path: Path, v: int, value: int) -> None:
    h = _header(path)
    with path.open("r+b") as f:
        f.seek(h.ofs_table + 4 * v)
        f.write(struct.pack("<I", value))


def _entry(path: Path, v: int) -> int:
    h = _header(path)
    raw = path.read_bytes()[h.ofs_table + 4 * v : h.ofs_table + 4 * v + 4]
    return int(struct.unpack("<I", raw)[0])


def _check(folder: Path, name: str, *extra: str) -> tuple[int, str, str]:
    got = ds("check", *extra, name, cwd=folder)
    assert "Traceback" not in got.stderr
    return got.returncode, got.stdout, got.stderr


@pytest.mark.parametrize("kind", ["plain", "compact", "raw-base", "qcow2-base-compact"])
def test_clean_images_check_clean(tmp_path: Path, kind: str) -> None:
    path, _ = _filled(tmp_path, kind)
    code, out, _ = _check(tmp_path, path.name)
    assert code == 0 and out.startswith("No errors were found on the image.\n")
    code, out, _ = _check(tmp_path, path.name, "--output=json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "fvd" and report["check-errors"] == 0


def test_leaked_chunks_are_reported_and_repaired(tmp_path: Path) -> None:
    path, model = _filled(tmp_path)
    _set_entry(path, 1, 0xFFFFFFFF)  # chunk 1 leaks: nothing points at it any more
    model[CHUNK : 2 * CHUNK] = bytes(CHUNK)
    before = digest(path)
    code, out, err = _check(tmp_path, path.name)
    assert code == 3, (out, err)
    assert "1 leaked clusters were found on the image." in out
    assert "Leaked chunk 1" in err
    assert digest(path) == before, "check without -r wrote"
    code, out, err = _check(tmp_path, path.name, "-r", "leaks")
    assert code == 0, (out, err)
    assert "    1 leaked clusters" in out
    with diskspec.open(path) as img:
        assert isinstance(img, FvdImage)
        assert read_all(img) == bytes(model)
        assert img.used_chunks == 5
        assert path.stat().st_size == img.h.len_metadata + 5 * CHUNK


def test_bitmap_padding_is_a_corruption(tmp_path: Path) -> None:
    path, model = _filled(tmp_path, "raw-base")
    h = _header(path)
    blocks = -(-h.len_base_img // h.block_size)
    with path.open("r+b") as f:
        f.seek(h.ofs_bitmap + blocks // 8 + 2)
        f.write(b"\x10")
    code, out, err = _check(tmp_path, path.name)
    assert code == 2 and "padding bits" in err, (out, err)
    assert "1 errors were found on the image." in out
    code, _, err = _check(tmp_path, path.name, "-r", "leaks")
    assert code == 2, err  # padding is not a leak
    code, out, err = _check(tmp_path, path.name, "-r", "all")
    assert code == 0, (out, err)
    with diskspec.open(path) as img:
        assert read_all(img) == bytes(model)


def test_table_entry_past_the_end_of_the_file(tmp_path: Path) -> None:
    path, model = _filled(tmp_path)
    _set_entry(path, 2, 1000)
    with diskspec.open(path) as img, pytest.raises(diskspec.FormatError, match="past the end"):
        img.pread(10, 2 * CHUNK)
    code, out, err = _check(tmp_path, path.name)
    assert code == 2 and "table entry 2 (chunk 1000) points past the end" in err
    assert "1 leaked clusters were found" in out  # chunk 2 leaks, the ones below 1000 not
    assert err.count("Leaked chunk") == 1
    code, out, err = _check(tmp_path, path.name, "-r", "all")
    assert code == 0, (out, err)
    assert "    1 corruptions" in out
    model[2 * CHUNK : 3 * CHUNK] = bytes(CHUNK)  # the chunk was lost: it reads as zeros
    with diskspec.open(path) as img:
        assert read_all(img) == bytes(model)


def test_a_chunk_shared_by_two_entries_gets_a_copy(tmp_path: Path) -> None:
    path, model = _filled(tmp_path)
    _set_entry(path, 4, _entry(path, 3))
    model[4 * CHUNK : 5 * CHUNK] = model[3 * CHUNK : 4 * CHUNK]
    with diskspec.open(path) as img:
        assert read_all(img) == bytes(model)  # reading a shared chunk is harmless
    code, _, err = _check(tmp_path, path.name)
    assert code == 2 and "is also used by entry 3" in err
    with diskspec.open(path, "r+") as img, pytest.raises(diskspec.FormatError, match="check"):
        img.pwrite(b"x", 4 * CHUNK)  # writing one would change the other
    code, out, err = _check(tmp_path, path.name, "-r", "all")
    assert code == 0, (out, err)
    with diskspec.open(path, "r+") as img:
        assert read_all(img) == bytes(model)
        img.pwrite(b"y" * 10, 4 * CHUNK)
        model[4 * CHUNK : 4 * CHUNK + 10] = b"y" * 10
    with diskspec.open(path) as img:
        assert read_all(img) == bytes(model)


def _patched(path: Path, **fields: int) -> None:
    h = _header(path)
    for name, value in fields.items():
        setattr(h, name, value)
    with path.open("r+b") as f:
        f.write(h.build())


CROSS_FIELD = {
    "bitmap too small": ({"len_bitmap": 0, "ofs_journal": 8192}, "len_bitmap"),
    "bitmap overlaps the journal": ({"ofs_journal": 8192}, "overlaps"),
    "journal past the metadata": ({"len_journal": 1 << 30}, "ends past the metadata"),
    "unaligned table": ({"ofs_table": 12290}, "ofs_table"),
    "compact without chunks": ({"chunk_size": 0}, "chunk_size"),
    "metadata past the file": ({"len_metadata": 1 << 40}, "past the end of the file"),
    "no block size": ({"block_size": 0}, "block_size"),
    "base range past the disk": ({"len_base_img": 1 << 30}, "len_base_img"),
}


@pytest.mark.parametrize("name", sorted(CROSS_FIELD))
def test_cross_field_violations_cannot_be_checked(tmp_path: Path, name: str) -> None:
    path, _ = _filled(tmp_path, "raw-base-compact")
    fields, needle = CROSS_FIELD[name]
    _patched(path, **fields)
    before = digest(path)
    for extra in ((), ("-r", "all")):
        code, out, err = _check(tmp_path, path.name, *extra)
        assert code == 1 and out == "" and needle in err and err.count("\n") == 1, err
    assert digest(path) == before


def test_check_repair_of_a_dirty_image(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base-compact", block_size=512)
    img = diskspec.open(built.path, "r+")
    assert isinstance(img, FvdImage)
    img.pwrite(b"z" * 5000, 123456)
    built.model[123456 : 128456] = b"z" * 5000
    img.flush()
    img.abandon()
    code, out, err = _check(tmp_path, built.path.name)
    assert code == 0 and "journal records replayed" in err, (out, err)
    code, out, err = _check(tmp_path, built.path.name, "-r", "all")
    assert code == 0
    with diskspec.open(built.path) as ro:
        assert isinstance(ro, FvdImage)
        assert ro.h.clean_shutdown == 1 and read_all(ro) == bytes(built.model)
