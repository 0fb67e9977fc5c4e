"""Internal snapshots and resize: diskspec and qemu-img take turns on the same images."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

import diskspec
from diskspec.tests.corpus import require_tool

OPTIONS: list[dict[str, Any]] = [
    {},
    {"cluster_size": 512},
    {"compat": "0.10", "cluster_size": 4096},
    {"extended_l2": "on", "cluster_size": 16384},
    {"refcount_bits": 64, "cluster_size": 4096},
    {"refcount_bits": 4},
]


def _qemu_img(*args: str, cwd: Path) -> str:
    done = subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True,
                          cwd=cwd, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _read(path: Path, snapshot: str | None = None) -> bytes:
    out = path.with_suffix(".raw")
    extra = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
    _qemu_img("convert", *extra, "-O", "raw", path.name, out.name, cwd=path.parent)
    return out.read_bytes()


def _clean(path: Path) -> None:
    out = _qemu_img("check", path.name, cwd=path.parent)
    assert "No errors were found" in out, out


@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_snapshot_life_cycle(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "s.qcow2"
    diskspec.create(path, "qcow2", "8M", **options)
    with diskspec.open(path, "r+") as img:
        img.pwrite(b"A" * 300_000, 0)
        assert img.create_snapshot("one") == "1"
        img.pwrite(b"B" * 100_000, 50_000)
        img.write_zeroes(1 << 20, 1 << 20)
        assert img.create_snapshot("two") == "2"
        img.pwrite(b"C" * 5000, 7 << 20)
        current = img.pread(img.size, 0)
        views = {s.name: img.open_snapshot(s.name).pread(img.size, 0) for s in img.snapshots()}
    _clean(path)
    assert _read(path) == current
    one, two = _read(path, "one"), _read(path, "two")
    assert views == {"one": one, "two": two}
    listing = _qemu_img("snapshot", "-l", path.name, cwd=tmp_path)
    assert "one" in listing and "two" in listing
    with diskspec.open(path, "r+") as img:
        img.apply_snapshot("one")
        assert img.pread(img.size, 0) == one
    _clean(path)
    assert _read(path) == one
    with diskspec.open(path, "r+") as img:
        img.delete_snapshot("one")
        img.pwrite(b"D" * 70_000, 10_000)
    _clean(path)
    assert _read(path, "two") == two
    with diskspec.open(path, "r+") as img:
        img.delete_snapshot("2")  # by id, as qemu accepts
        assert img.snapshots() == []
    _clean(path)


def test_qemu_and_diskspec_take_turns(tmp_path: Path) -> None:
    path = tmp_path / "t.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "t.qcow2", "4M", cwd=tmp_path)
    subprocess.run([require_tool("qemu-io"), "-c", "write -P 0x11 0 1M", str(path)],
                   check=True, capture_output=True)
    _qemu_img("snapshot", "-c", "by-qemu", "t.qcow2", cwd=tmp_path)
    by_qemu = _read(path, "by-qemu")
    with diskspec.open(path, "r+") as img:
        img.pwrite(b"\x22" * 200_000, 100_000)
        img.create_snapshot("by-diskspec")
        img.pwrite(b"\x33" * 4096, 0)
    by_diskspec = _read(path, "by-diskspec")
    _clean(path)
    _qemu_img("snapshot", "-a", "by-diskspec", "t.qcow2", cwd=tmp_path)
    assert _read(path) == by_diskspec
    _qemu_img("snapshot", "-d", "by-diskspec", "t.qcow2", cwd=tmp_path)
    with diskspec.open(path, "r+") as img:
        img.apply_snapshot("by-qemu")
        img.delete_snapshot("by-qemu")
    _clean(path)
    assert _read(path) == by_qemu


def test_refcount_width_limits_snapshots_like_qemu(tmp_path: Path) -> None:
    path = tmp_path / "r1.qcow2"
    diskspec.create(path, "qcow2", "1M", refcount_bits=1)
    before = path.read_bytes()
    with diskspec.open(path, "r+") as img:
        img.pwrite(b"x" * 65536, 0)
        with pytest.raises(diskspec.UsageError, match="Invalid argument"):
            img.create_snapshot("s")
    _clean(path)
    assert before != path.read_bytes()  # the write landed, the snapshot did not


@pytest.mark.parametrize("cluster", [512, 65536])
def test_resize_grow_and_shrink_like_qemu(tmp_path: Path, cluster: int) -> None:
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    for p in (ours, theirs):
        diskspec.create(p, "qcow2", "1M", cluster_size=cluster)
        with diskspec.open(p, "r+") as img:
            img.pwrite(b"\x44" * 700_000, 200_000)
    with diskspec.open(ours, "r+") as img:
        img.resize(64 << 20)  # the L1 must grow with 512-byte clusters
        img.pwrite(b"\x55" * 5000, 60 << 20)
    _qemu_img("resize", "q.qcow2", "64M", cwd=tmp_path)
    subprocess.run([require_tool("qemu-io"), "-c", f"write -P 0x55 {60 << 20} 5000",
                    str(theirs)], check=True, capture_output=True)
    _clean(ours)
    assert _read(ours) == _read(theirs)
    with diskspec.open(ours, "r+") as img:
        with pytest.raises(diskspec.UsageError, match="--shrink"):
            img.resize(512 << 10)
        img.resize(512 << 10, shrink=True)
    _qemu_img("resize", "--shrink", "q.qcow2", "512K", cwd=tmp_path)
    _clean(ours)
    assert _read(ours) == _read(theirs)
    info = _qemu_img("info", "o.qcow2", cwd=tmp_path)
    assert "512 KiB" in info


def test_resize_refused_with_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    diskspec.create(path, "qcow2", "1M")
    with diskspec.open(path, "r+") as img:
        img.create_snapshot("s")
        with pytest.raises(diskspec.UsageError, match="has snapshots"):
            img.resize(2 << 20)


def test_shrink_then_grow_reads_zeros(tmp_path: Path) -> None:
    """The kept part of a partial last cluster is zeroed on shrink (qemu 7.2 would let the
    old bytes come back after growing again; a guest expects zeros)."""
    path = tmp_path / "z.qcow2"
    diskspec.create(path, "qcow2", "3M", cluster_size="2M")
    with diskspec.open(path, "r+") as img:
        img.pwrite(b"\x55" * (1 << 20), 2 << 20)
        img.resize((2 << 20) + 512, shrink=True)
        img.resize(7 << 20)
        assert img.pread((5 << 20) - 512, (2 << 20) + 512) == bytes((5 << 20) - 512)
    _clean(path)
    assert _read(path)[(2 << 20) + 512 :] == bytes((7 << 20) - (2 << 20) - 512)


def test_grow_over_a_longer_backing_file_reads_zeros(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"\x66" * (4 << 20))
    path = tmp_path / "top.qcow2"
    diskspec.create(path, "qcow2", "1M", backing_file="base.raw", backing_fmt="raw")
    with diskspec.open(path, "r+") as img:
        img.resize(6 << 20)
        assert img.pread(1 << 20, 0) == b"\x66" * (1 << 20)
        assert img.pread(5 << 20, 1 << 20) == bytes(5 << 20)
    _clean(path)
    assert _read(path) == b"\x66" * (1 << 20) + bytes(5 << 20)
