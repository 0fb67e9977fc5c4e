"""``make demo``: build a few images with qemu-img and show their structures, as diskspec reads
them through the classes generated from specs/*.ksy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .generated import qcow, qcow2

__all__ = ["main"]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _show(title: str, obj: object, skip: tuple[str, ...] = ("padding",)) -> None:
    print(f"  {title}")
    for name in getattr(obj, "__slots__", ()):
        if name in skip:
            continue
        value = getattr(obj, name)
        if value is None:
            continue
        shown: object = value
        if isinstance(value, int) and not isinstance(value, bool):
            label = getattr(value, "name", None)
            shown = f"{value:#x} ({label.lower()})" if label else hex(value)
        if isinstance(value, bytes):
            shown = value.rstrip(bytes(1))[:60]
        print(f"    {name:28} {shown}")


def _qcow2(path: Path) -> None:
    with path.open("rb") as f:
        first = f.read(1 << 21)
        head = qcow2.Header.parse(first)
        image = qcow2.Qcow2.parse(first[: head.cluster_size])
        h = image.header
        print(f"{path.name}: qcow2 version {h.version}, {h.cluster_size} byte clusters, "
              f"{h.refcount_bits}-bit refcounts, {h.num_l2_entries} L2 entries per table")
        _show("header", h)
        for ext in image.extension_area.extensions:
            kind = getattr(ext.ext_type, "name", hex(ext.ext_type)).lower()
            print(f"  extension {kind}: {ext.len_data} bytes")
            if isinstance(ext.data, qcow2.ExtFeatureNameTable):
                for entry in ext.data.entries:
                    label = entry.name.rstrip(bytes(1)).decode()
                    kind = getattr(entry.feature_type, "name", str(entry.feature_type))
                    print(f"    {kind:12} bit {entry.bit}: {label}")
            elif ext.data is not None and not isinstance(ext.data, bytes):
                _show(type(ext.data).__name__, ext.data)
        name = image.read_backing_file_name(f)
        if name is not None:
            print(f"  backing file: {name.decode()}")
        l1 = image.read_l1_table(f)
        used = [e & qcow2.L1Entry.OFS_L2_TABLE_DIV512_MASK for e in l1 if e]
        print(f"  L1 table: {len(l1)} entries, L2 tables at {[hex(o) for o in used]}")
        for snap in image.read_snapshot_table(f):
            print(f"  snapshot {snap.id_str.decode()} {snap.name.decode()!r}: "
                  f"L1 at {snap.ofs_l1_table:#x}, disk size {snap.extra_data.len_virtual_disk}")
    print()


def _qcow1(path: Path) -> None:
    with path.open("rb") as f:
        image = qcow.Qcow.read(f)
        h = image.header
        print(f"{path.name}: qcow version 1, {h.cluster_size} byte clusters, "
              f"{h.num_l2_entries} entries per L2 table, {h.num_l1_entries} L1 entries")
        _show("header", h)
        name = image.read_backing_file_name(f)
        if name is not None:
            print(f"  backing file: {name.decode()}")
    print()


def main() -> int:
    qemu_img = shutil.which("qemu-img")
    qemu_io = shutil.which("qemu-io")
    if qemu_img is None or qemu_io is None:
        print("diskspec: error: the demo needs qemu-img and qemu-io (apt-get install qemu-utils)",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="diskspec-demo-") as tmp:
        d = Path(tmp)
        base = d / "base.raw"
        _run(qemu_img, "create", "-q", "-f", "raw", str(base), "64M")
        v3 = d / "v3.qcow2"
        _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(v3))
        _run(qemu_io, "-c", "write -P 0x5a 0 1M", "-c", "write -z 2M 64k", str(v3))
        _run(qemu_img, "snapshot", "-c", "before-upgrade", str(v3))
        v2 = d / "v2.qcow2"
        _run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
             str(v2), "16M")
        el2 = d / "extended.qcow2"
        _run(qemu_img, "create", "-q", "-f", "qcow2",
             "-o", "extended_l2=on,compression_type=zstd,refcount_bits=8", str(el2), "1G")
        v1 = d / "old.qcow"
        _run(qemu_img, "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", str(v1))
        for path in (v3, v2, el2):
            _qcow2(path)
        _qcow1(v1)
        _tour(d)
    return 0


def _tour(d: Path) -> None:
    """The command line on the same images: what a qemu-img user types, diskspec answers."""
    from .cli import main as cli

    steps = [
        ["create", "-f", "qcow2", "-o", "cluster_size=4096", str(d / "new.qcow2"), "8M"],
        ["info", str(d / "v3.qcow2")],
        ["check", str(d / "v3.qcow2")],
        ["map", "--output=json", str(d / "v3.qcow2")],
        ["snapshot", "-c", "second", str(d / "v3.qcow2")],
        ["snapshot", "-l", str(d / "v3.qcow2")],
        ["convert", "-c", "-O", "qcow2", str(d / "v3.qcow2"), str(d / "small.qcow2")],
        ["compare", str(d / "v3.qcow2"), str(d / "small.qcow2")],
        ["info", "--output=json", str(d / "small.qcow2")],
        # the other two formats: qcow v1 (qemu-img reads it too) and FVD (only diskspec does)
        ["convert", "-O", "qcow", str(d / "v3.qcow2"), str(d / "old-style.qcow")],
        ["convert", "-O", "fvd", "-o", "compact_image=on", str(d / "old-style.qcow"),
         str(d / "fast.fvd")],
        ["info", str(d / "fast.fvd")],
        ["check", str(d / "fast.fvd")],
        ["compare", str(d / "fast.fvd"), str(d / "v3.qcow2")],
        # the layouts themselves
        ["explain", "--structure", "header", str(d / "small.qcow2")],
        ["explain", "--at", "1M", str(d / "v3.qcow2")],
        ["map", "--picture", str(d / "v3.svg"), str(d / "v3.qcow2")],
    ]
    for args in steps:
        print(f"$ diskspec {' '.join(a.replace(str(d) + '/', '') for a in args)}")
        sys.stdout.flush()
        code = cli(args)
        sys.stdout.flush()
        if code:
            print(f"(exit {code})")
        print()


if __name__ == "__main__":
    raise SystemExit(main())
