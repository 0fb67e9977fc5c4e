"""``diskspec convert`` between every pair of raw, qcow, qcow2 and FVD, with and without -c.

Each result is checked by qemu-img where qemu-img knows the format (``check`` exit code,
``compare`` against the source) and by diskspec for FVD, which qemu never learned: the FVD side
is turned into raw by diskspec and that raw file is compared by qemu-img.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from diskspec.tests.corpus import require_tool
from diskspec.tests.test_cli import ds_inproc, qi

FORMATS = ["raw", "qcow", "qcow2", "fvd"]
QEMU_KNOWS = {"raw", "qcow", "qcow2"}
COMPRESSES = {"qcow", "qcow2"}
SIZE = (5 << 20) + 1536
WRITES = ["write -P 0x11 0 300k", "write -P 0x22 1M 64k", "write -P 0x33 2047k 2k",
          "write -P 0x44 3M 1M", f"write -P 0x55 {SIZE - 1024} 1024"]


def _source(tmp: Path, fmt: str) -> Path:
    raw = tmp / "pattern.raw"
    if not raw.exists():
        qi("create", "-q", "-f", "raw", raw.name, str(SIZE), cwd=tmp)
        args = [require_tool("qemu-io"), "-f", "raw"]
        for w in WRITES:
            args += ["-c", w]
        subprocess.run([*args, raw.name], cwd=tmp, check=True, capture_output=True)
    if fmt == "raw":
        return raw
    src = tmp / f"src.{fmt}"
    if fmt in QEMU_KNOWS:
        done = qi("convert", "-f", "raw", "-O", fmt, raw.name, src.name, cwd=tmp)
    else:
        done = ds_inproc("convert", "-f", "raw", "-O", fmt, raw.name, src.name, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return src


def _as_raw(tmp: Path, path: Path, fmt: str) -> Path:
    """A raw copy of what ``path`` reads, made by qemu-img where it can, else by diskspec."""
    out = tmp / f"{path.name}.as.raw"
    run = qi if fmt in QEMU_KNOWS else ds_inproc
    done = run("convert", "-f", fmt, "-O", "raw", path.name, out.name, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "c"])
@pytest.mark.parametrize("dst_fmt", FORMATS)
@pytest.mark.parametrize("src_fmt", FORMATS)
def test_convert_between_formats(tmp_path: Path, src_fmt: str, dst_fmt: str,
                                 compress: bool) -> None:
    src = _source(tmp_path, src_fmt)
    dst = tmp_path / f"dst.{dst_fmt}"
    flags = ["-c"] if compress else []
    ours = ds_inproc("convert", *flags, "-f", src_fmt, "-O", dst_fmt, src.name, dst.name,
                     cwd=tmp_path)
    if compress and dst_fmt not in COMPRESSES:
        # what qemu-img says for a format without compressed writes
        assert ours.returncode == 1
        assert ours.stderr == "diskspec: error: Compression not supported for this file format\n"
        if dst_fmt in QEMU_KNOWS:
            theirs = qi("convert", *flags, "-f", "raw", "-O", dst_fmt,
                        _source(tmp_path, "raw").name, "q." + dst_fmt, cwd=tmp_path)
            assert theirs.returncode == 1 and "Compression not supported" in theirs.stderr
        return
    assert ours.returncode == 0, ours.stderr
    # the result is sound by the format's own checker (qemu-img for qcow2; qemu-img has no
    # check for raw and qcow, exit 63; diskspec's for FVD)
    if dst_fmt in QEMU_KNOWS:
        check = qi("check", "-f", dst_fmt, dst.name, cwd=tmp_path)
        assert check.returncode == (0 if dst_fmt == "qcow2" else 63), check.stderr
    else:
        check = ds_inproc("check", "-f", dst_fmt, dst.name, cwd=tmp_path)
        assert check.returncode == 0, check.stdout + check.stderr
    # same guest content as the source, by qemu-img compare
    a = src if src_fmt in QEMU_KNOWS else _as_raw(tmp_path, src, src_fmt)
    b = dst if dst_fmt in QEMU_KNOWS else _as_raw(tmp_path, dst, dst_fmt)
    fa = src_fmt if src_fmt in QEMU_KNOWS else "raw"
    fb = dst_fmt if dst_fmt in QEMU_KNOWS else "raw"
    same = qi("compare", "-f", fa, "-F", fb, a.name, b.name, cwd=tmp_path)
    assert same.returncode == 0, same.stdout
    assert (tmp_path / "pattern.raw").read_bytes()[:SIZE] == _as_raw(
        tmp_path, dst, dst_fmt).read_bytes()[:SIZE]
    if compress:
        with_c = _compressed_clusters(tmp_path, dst, dst_fmt)
        assert with_c > 0, "nothing was written compressed"


def _compressed_clusters(tmp: Path, path: Path, fmt: str) -> int:
    import json

    if fmt == "qcow2":
        report = json.loads(qi("check", "--output=json", path.name, cwd=tmp).stdout)
        return int(report.get("compressed-clusters", 0))
    # qcow: qemu-img map shows compressed ranges as data without an offset
    extents = json.loads(qi("map", "--output=json", "-f", fmt, path.name, cwd=tmp).stdout)
    return sum(1 for e in extents if e["data"] and "offset" not in e)
