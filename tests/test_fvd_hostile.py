"""Hostile FVD images: bad magic or version, truncated headers, regions overlapping or past
the end of the file, absurd sizes, loops. Each is a one-line error (through the API a
FormatError, through the CLI exit 1 with no traceback), the file is unchanged, and memory
stays bounded."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import diskspec
from diskspec.generated import fvd as fv
from diskspec.tests.fvd_support import build, digest

from .test_cli import ds_inproc


def _header(path: Path) -> fv.Header:
    return fv.Header.parse(path.read_bytes()[: fv.Header.SIZE])


def _set(**fields: object) -> Callable[[Path], None]:
    def patch(path: Path) -> None:
        h = _header(path)
        for name, value in fields.items():
            setattr(h, name, value)
        with path.open("r+b") as f:
            f.write(h.build())

    return patch


def _poke(offset: int, raw: bytes) -> Callable[[Path], None]:
    def patch(path: Path) -> None:
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(raw)

    return patch


def _truncate(n: int) -> Callable[[Path], None]:
    def patch(path: Path) -> None:
        with path.open("r+b") as f:
            f.truncate(n)

    return patch


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "version 2": (_poke(4, b"\x02\0\0\0"), "not an FVD v1 image (version 2)"),
    "version 0": (_poke(4, b"\0\0\0\0"), "not an FVD v1 image (version 0)"),
    "truncated header": (_truncate(600), "Header"),
    "metadata past EOF": (_set(len_metadata=1 << 50), "past the end of the file"),
    "negative metadata": (_set(len_metadata=-4096), "len_metadata"),
    "huge bitmap": (_set(len_bitmap=1 << 60), "ends past the metadata"),
    "bitmap in the header": (_set(ofs_bitmap=4096), "past the header region"),
    "table over the bitmap": (_set(ofs_table=8192), "overlaps"),
    "journal over the table": (_set(ofs_journal=12288), "overlaps"),
    "absurd virtual size": (_set(len_virtual_disk=1 << 62), "len_virtual_disk"),
    "virtual size not sectors": (_set(len_virtual_disk=1000), "len_virtual_disk"),
    "odd block size": (_set(block_size=1000), "block_size"),
    "odd chunk size": (_set(chunk_size=5000), "chunk_size"),
    "journal not sectors": (_set(len_journal=1000), "len_journal"),
    "loop": (_set(base_img=b"raw-base-compact.fvd".ljust(1024, b"\0"),
                  base_img_fmt=b"fvd".ljust(16, b"\0")), "infinite loop"),
    "unknown base format": (_set(base_img_fmt=b"vmdk".ljust(16, b"\0")), "Unknown driver"),
    "data file format": (_set(data_file=b"d.raw".ljust(1024, b"\0"),
                              data_file_fmt=b"vmdk".ljust(16, b"\0")), "Unknown driver"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_images_are_one_line_errors(tmp_path: Path, name: str) -> None:
    built = build(tmp_path, "raw-base-compact", block_size=4096)
    with diskspec.open(built.path, "r+") as img:
        img.pwrite(b"x" * 100_000, 300_000)
    patch, needle = HOSTILE[name]
    patch(built.path)
    files = sorted(tmp_path.iterdir())
    before = digest(*files)
    tracemalloc.start()
    try:
        for mode in ("r", "r+"):
            with pytest.raises(diskspec.FormatError) as info:
                diskspec.open(built.path, mode, "fvd")
            assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    for args in (["info"], ["check"], ["map"], ["convert", "-O", "raw"]):
        extra = ["out.raw"] if args[0] == "convert" else []
        got = ds_inproc(*args, "-f", "fvd", built.path.name, *extra, cwd=tmp_path)
        assert got.returncode == 1 and got.stderr.count("\n") == 1, (args, got.stderr)
        assert needle in got.stderr
    (tmp_path / "out.raw").unlink(missing_ok=True)
    assert digest(*files) == before


def test_bad_magic_is_not_fvd(tmp_path: Path) -> None:
    built = build(tmp_path, "plain")
    _poke(0, b"QFI\xfb")(built.path)
    with pytest.raises(diskspec.FormatError, match="not an FVD v1 image"):
        diskspec.open(built.path, "r", "fvd")
    _poke(0, b"\0\0\0\0")(built.path)
    with pytest.raises(diskspec.FormatError, match="bad magic 00000000"):
        diskspec.open(built.path, "r", "fvd")
    with diskspec.open(built.path) as img:  # no magic at all: a raw image, as qemu sees it
        assert img.fmt == "raw"


def test_a_missing_base_is_a_clear_error(tmp_path: Path) -> None:
    built = build(tmp_path, "raw-base")
    assert built.base is not None
    built.base.unlink()
    got = ds_inproc("info", built.path.name, cwd=tmp_path)
    assert got.returncode == 1 and "base.raw" in got.stderr and got.stderr.count("\n") == 1
    with diskspec.open(built.path, backing=False) as img:  # the image alone still opens
        assert img.fmt == "fvd"
