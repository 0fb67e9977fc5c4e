"""``amend`` against qemu-img amend on copies of the same image: refcount widths both ways,
compat 1.1 -> 0.10 with zero clusters (plain, allocated, under a backing file, shared with
snapshots), bitmaps and zstd, and qemu's refusals with qemu's messages."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import diskspec
from diskspec.tests.corpus import require_tool
from diskspec.tests.test_cli import ds_inproc, qi

WRITES = ["write -P 1 0 200k", "write -z 64k 64k", "write -z -u 256k 128k",
          "write -P 2 1M 64k", "write -z 1M 64k", "write -c -P 3 2M 64k"]


def _io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = [require_tool("qemu-io"), "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def _build(tmp: Path, recipe: str) -> Path:
    """An image written by qemu: plain, snap, backing, bitmaps, zstd or zstd-c."""
    img = tmp / "a.qcow2"
    opts = "compat=1.1"
    if recipe.startswith("zstd"):
        opts += ",compression_type=zstd"
    if recipe.startswith("r"):  # r1 .. r64: another refcount width to start from
        opts += f",refcount_bits={recipe[1:]}"
    backing: list[str] = []
    if recipe == "backing":
        qi("create", "-q", "-f", "raw", "base.raw", "4M", cwd=tmp)
        _io(tmp / "base.raw", "write -P 7 0 4M", fmt="raw")
        backing = ["-b", "base.raw", "-F", "raw"]
    assert qi("create", "-q", "-f", "qcow2", "-o", opts, *backing, img.name, "4M",
              cwd=tmp).returncode == 0
    writes = [w for w in WRITES if recipe != "zstd" or "-c" not in w]
    _io(img, *writes)
    if recipe == "snap":
        qi("snapshot", "-c", "s1", img.name, cwd=tmp)
        _io(img, "write -z 0 64k", "write -z 1M 64k", "write -P 4 3M 64k")
        qi("snapshot", "-c", "s2", img.name, cwd=tmp)
        _io(img, "write -z 3M 64k")
    if recipe == "bitmaps":
        assert qi("bitmap", "--add", img.name, "b0", cwd=tmp).returncode == 0
        _io(img, "write -P 5 512k 4k")
    return img


def _snapshot_names(path: Path) -> list[str]:
    out = qi("snapshot", "-l", path.name, cwd=path.parent).stdout.splitlines()[2:]
    return [line.split()[1] for line in out]


def _same_guest(a: Path, b: Path) -> None:
    cwd = a.parent
    assert qi("compare", a.name, b.name, cwd=cwd).returncode == 0
    for snap in _snapshot_names(b):
        for path, out in ((a, "x.raw"), (b, "y.raw")):
            assert qi("convert", "-O", "raw", "-l", f"snapshot.name={snap}", path.name, out,
                      cwd=cwd).returncode == 0
        assert (cwd / "x.raw").read_bytes() == (cwd / "y.raw").read_bytes(), snap


CASES = [
    ("plain", "compat=0.10"),
    ("snap", "compat=0.10"),
    ("backing", "compat=0.10"),
    ("bitmaps", "compat=0.10"),
    ("zstd", "compat=0.10"),
    ("plain", "refcount_bits=1"),
    ("plain", "refcount_bits=2"),
    ("snap", "refcount_bits=4"),
    ("snap", "refcount_bits=8"),
    ("plain", "refcount_bits=32"),
    ("snap", "refcount_bits=64"),
    ("r8", "refcount_bits=16,compat=0.10"),
    ("r1", "refcount_bits=64"),
    ("backing", "refcount_bits=2,lazy_refcounts=on"),
]


@pytest.mark.parametrize(("recipe", "amend"), CASES)
def test_amend_matches_qemu_img(tmp_path: Path, recipe: str, amend: str) -> None:
    theirs_dir, ours_dir = tmp_path / "q", tmp_path / "o"
    theirs_dir.mkdir()
    img = _build(theirs_dir, recipe)
    shutil.copytree(theirs_dir, ours_dir, dirs_exist_ok=True)
    mine = ours_dir / img.name
    shutil.copy(mine, ours_dir / "before.qcow2")
    theirs = qi("amend", "-f", "qcow2", "-o", amend, img.name, cwd=theirs_dir)
    ours = ds_inproc("amend", "-f", "qcow2", "-o", amend, mine.name, cwd=ours_dir)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    # what we write is clean (qemu 7.2 itself leaves stale COPIED flags when it expands
    # zero clusters shared with snapshots, and leaks the bitmaps it keeps in a v2 image)
    check = qi("check", "--output=json", mine.name, cwd=ours_dir)
    assert check.returncode == 0, check.stdout
    info_o = json.loads(qi("info", "--output=json", mine.name, cwd=ours_dir).stdout)
    info_q = json.loads(qi("info", "--output=json", img.name, cwd=theirs_dir).stdout)
    assert info_o["format-specific"] == info_q["format-specific"]
    assert info_o.get("snapshots") == info_q.get("snapshots")
    shutil.copy(theirs_dir / img.name, ours_dir / "theirs.qcow2")
    assert qi("compare", mine.name, "theirs.qcow2", cwd=ours_dir).returncode == 0
    # every snapshot still reads what it read before (qemu 7.2 zeroes clusters shared with
    # snapshots in place when it expands zero clusters, so its snapshots are no reference)
    _same_guest(mine, ours_dir / "before.qcow2")
    if "compat=0.10" in amend:
        # nothing is left that a version 2 reader could misread
        with diskspec.open(mine) as img:
            assert img.info()["format-specific"]["data"]["compat"] == "0.10"
            assert img.head.bitmaps is None
        assert _zero_flags(mine) == 0


def _zero_flags(path: Path) -> int:
    """L2 entries with the zero flag in the active and snapshot tables."""
    from diskspec.qcow2.image import Qcow2Image
    from diskspec.qcow2.masks import L2_COMPRESSED, L2_ZERO

    with diskspec.open(path) as img:
        assert isinstance(img, Qcow2Image)
        return sum(1 for e in img._all_l2_entries() if e & L2_ZERO and not e & L2_COMPRESSED)


REFUSALS = [
    ("snap", "refcount_bits=1"),
    ("zstd-c", "compat=0.10"),
    ("plain", "compat=0.10,refcount_bits=8"),
    ("plain", "refcount_bits=3"),
    ("plain", "refcount_bits=128"),
]


@pytest.mark.parametrize(("recipe", "amend"), REFUSALS)
def test_amend_refuses_as_qemu_img(tmp_path: Path, recipe: str, amend: str) -> None:
    img = _build(tmp_path, recipe)
    before = img.read_bytes()
    (tmp_path / "q.qcow2").write_bytes(before)
    theirs = qi("amend", "-f", "qcow2", "-o", amend, "q.qcow2", cwd=tmp_path)
    assert theirs.returncode == 1
    ours = ds_inproc("amend", "-f", "qcow2", "-o", amend, img.name, cwd=tmp_path)
    assert ours.returncode == 1
    # refused before anything is written (qemu 7.2 expands zero clusters first and then
    # refuses a zstd image with compressed clusters)
    assert img.read_bytes() == before
    assert ours.stderr.removeprefix("diskspec: error: ") == theirs.stderr.removeprefix(
        "qemu-img: "), (ours.stderr, theirs.stderr)
    assert qi("check", img.name, cwd=tmp_path).returncode == 0
