"""Helpers of the qcow v1 tests: qemu-img / qemu-io runners and an independent table walker.

The walker reads a qcow v1 file with the generated classes only (none of diskspec.qcow) and
proves its allocation is sound: every L2 table and data cluster is cluster-aligned and inside
the file, compressed data is inside the file, and no two of them (nor the header, the backing
name and the L1 table) share a byte.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from diskspec.generated import qcow as qv
from diskspec.tests.corpus import SECRET_ID, _secret_object, require_tool

__all__ = ["Layout", "qemu_img", "qemu_io", "qemu_raw", "qemu_target", "walk"]


def qemu_target(path: Path, secret: str | None = None, fmt: str = "qcow") -> list[str]:
    """qemu's arguments naming the image without probing (with its secret if encrypted)."""
    spec = f"driver={fmt},file.filename={path}"
    if secret is None:
        return ["--image-opts", spec]
    return ["--object", _secret_object(secret), "--image-opts",
            f"{spec},encrypt.key-secret={SECRET_ID}"]


def qemu_img(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "LC_ALL": "C"}, check=False)


def qemu_io(path: Path, *commands: str, secret: str | None = None) -> str:
    """Run qemu-io commands on a qcow image; fails the test when one of them fails."""
    cmd = [require_tool("qemu-io")]
    for c in commands:
        cmd += ["-c", c]
    done = subprocess.run([*cmd, *qemu_target(path, secret)], capture_output=True, text=True,
                          cwd=path.parent, check=False)
    assert done.returncode == 0, done.stderr
    assert " failed: " not in done.stdout and "Pattern verification failed" not in done.stdout, (
        done.stdout
    )
    return done.stdout


def qemu_raw(path: Path, out: Path, secret: str | None = None) -> bytes:
    """The guest content as ``qemu-img convert -O raw`` reads it."""
    done = subprocess.run(
        [require_tool("qemu-img"), "convert", *qemu_target(path, secret), "-O", "raw",
         str(out)],
        capture_output=True, text=True, cwd=path.parent, check=False,
    )
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


@dataclass
class Layout:
    tables: int = 0
    clusters: int = 0
    compressed: int = 0


def walk(path: Path) -> Layout:
    """Check the allocation of a qcow v1 file (see the module doc); returns what it found."""
    data = path.read_bytes()
    eof = len(data)
    root = qv.Qcow.parse(data[: qv.Header.SIZE])
    h = root.header
    cs = h.cluster_size
    used: list[tuple[int, int, str]] = [(0, qv.Header.SIZE, "header")]
    if h.ofs_backing_file_name:
        used.append((h.ofs_backing_file_name,
                     h.ofs_backing_file_name + h.len_backing_file_name, "backing name"))
    l1_len = 8 * h.num_l1_entries
    assert h.ofs_l1_table + l1_len <= eof, "L1 table past EOF"
    used.append((h.ofs_l1_table, h.ofs_l1_table + l1_len, "L1"))
    l1 = [qv.L1Entry.parse(data, h.ofs_l1_table + 8 * i).ofs_l2_table
          for i in range(h.num_l1_entries)]
    found = Layout()
    for i, l2_offset in enumerate(l1):
        if not l2_offset:
            continue
        assert l2_offset % cs == 0, f"L2 table {i} at {l2_offset:#x} is not cluster-aligned"
        assert l2_offset + h.len_l2_table <= eof, f"L2 table {i} at {l2_offset:#x} past EOF"
        used.append((l2_offset, l2_offset + h.len_l2_table, f"L2 {i}"))
        found.tables += 1
        table = qv.L2Table.parse(data, l2_offset, l2_bits=h.l2_bits)
        for j, raw in enumerate(table.entries):
            if not raw:
                continue
            entry = qv.L2Entry.from_raw(raw)
            where = f"L2 {i} entry {j}"
            if entry.compressed:
                desc = qv.CompressedDescriptor(cluster_bits=h.cluster_bits, raw=raw)
                start, end = desc.ofs_compressed, desc.ofs_compressed + desc.len_compressed
                assert desc.len_compressed > 0, where
                assert end <= eof, f"{where}: compressed data past EOF"
                used.append((start, end, where))
                found.compressed += 1
            else:
                start = entry.ofs_cluster
                assert start % cs == 0, f"{where}: cluster {start:#x} not aligned"
                assert start + cs <= eof, f"{where}: cluster {start:#x} past EOF"
                used.append((start, start + cs, where))
                found.clusters += 1
    used.sort()
    for (s1, e1, w1), (s2, e2, w2) in pairwise(used):
        assert e1 <= s2, f"{w1} [{s1:#x}, {e1:#x}) overlaps {w2} [{s2:#x}, {e2:#x})"
    return found
