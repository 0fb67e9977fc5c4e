"""``diskspec map --picture``: the counts drawn agree with qemu-img check and qemu-img map."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import pytest

from diskspec.explain.clustermap import cluster_map, render_svg
from diskspec.generated import qcow2
from diskspec.generator.docs import ROLE_COLORS
from diskspec.tests.corpus import CorpusImage, image_opts, require_tool
from diskspec.tests.test_differential import FVD_LAYOUTS_BUILT

MiB = 1 << 20


def _qemu(image: CorpusImage, command: str) -> Any:
    done = subprocess.run(
        [require_tool("qemu-img"), command, "--output=json", *image_opts(image)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode in (0, 3), done.stderr  # 3: leaks only
    return json.loads(done.stdout)


def _picture(path: Path, out: Path) -> ET.Element:
    done = subprocess.run(
        [sys.executable, "-m", "diskspec.cli", "map", "--picture", str(out), str(path)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: ")
    return ET.fromstring(out.read_text())


def _counts(svg: ET.Element) -> dict[str, int]:
    return {r.attrib["data-role"]: int(r.attrib["data-count"])
            for r in svg.iter("{http://www.w3.org/2000/svg}rect") if "data-role" in r.attrib}


def _data_clusters(extents: list[dict[str, Any]], cs: int) -> int:
    """Guest clusters qemu-img map shows as data stored in this image (with a host offset)."""
    touched = set()
    for e in extents:
        if e["data"] and e["depth"] == 0 and "offset" in e:
            touched.update(range(e["start"] // cs, (e["start"] + e["length"] - 1) // cs + 1))
    return len(touched)


def test_picture_counts_match_qemu_img_check_and_map(corpus: list[CorpusImage],
                                                      tmp_path: Path) -> None:
    # (qemu-img opens an external data file only with options --image-opts does not get here)
    images = [c for c in corpus if c.fmt == "qcow2" and "data_file" not in c.tags]
    assert len(images) > 30
    compared = 0
    for image in images:
        m = cluster_map(image.path)
        svg = ET.fromstring(render_svg(m, image.name))
        counts = _counts(svg)
        check = _qemu(image, "check")
        assert int(svg.attrib["data-allocated"]) == check.get("allocated-clusters", 0), image.name
        assert int(svg.attrib["data-compressed"]) == check.get("compressed-clusters", 0)
        assert int(svg.attrib["data-fragmented"]) == check.get("fragmented-clusters", 0), image.name
        assert int(svg.attrib["data-leaks"]) == check.get("leaks", 0) == counts.get("leaked", 0)
        cs = m.unit
        assert sum(counts.values()) == int(svg.attrib["data-clusters"])
        assert int(svg.attrib["data-clusters"]) == -(-image.path.stat().st_size // cs)
        assert counts["header"] == 1 and counts["refcount_table"] >= 1
        if image.secret is None:  # qemu-img map gives no offsets for encrypted clusters
            assert int(svg.attrib["data-guest-data"]) == _data_clusters(_qemu(image, "map"), cs)
            compared += 1
        if "compressed" in image.tags and "converted" not in image.tags:
            assert counts.get("compressed", 0) >= 1, image.name
        for tag, role in (("snapshots", "snapshot"), ("bitmaps", "bitmap"),
                          ("luks", "encryption")):
            assert (role in counts) == (tag in image.tags), (image.name, role)
    assert compared > 25


def _leak_one_cluster(path: Path) -> None:
    """Append a cluster nothing references and give it refcount 1 (16-bit refcounts)."""
    with open(path, "r+b") as f:
        image = qcow2.Qcow2.read(f)
        h = image.header
        assert h.refcount_bits == 16
        cs = h.cluster_size
        size = f.seek(0, 2)
        k = -(-size // cs)
        mask = qcow2.RefcountTableEntry.OFS_REFCOUNT_BLOCK_DIV512_MASK
        block = image.read_refcount_table(f)[0] & mask
        assert k < h.num_refcount_block_entries
        f.seek(block + 2 * k)
        f.write(struct.pack(">H", 1))
        f.truncate((k + 1) * cs)


def test_a_leaked_cluster_is_drawn_as_leaked(corpus: list[CorpusImage], tmp_path: Path) -> None:
    source = next(c for c in corpus if c.name == "qcow2-v3-c64k-r16")
    copy = tmp_path / "leaky.qcow2"
    shutil.copy(source.path, copy)
    _leak_one_cluster(copy)
    leaky = CorpusImage("leaky", copy, "qcow2", {}, frozenset())
    assert _qemu(leaky, "check")["leaks"] == 1
    svg = _picture(copy, tmp_path / "leaky.svg")
    assert _counts(svg)["leaked"] == 1 and svg.attrib["data-leaks"] == "1"
    before = _counts(_picture(source.path, tmp_path / "clean.svg"))
    assert "leaked" not in before


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, out = 8, []
    while at < len(data):
        (n,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + n]
        (crc,) = struct.unpack(">I", data[at + 8 + n : at + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        at += 12 + n
    return out


def test_png_is_the_same_picture(corpus: list[CorpusImage], tmp_path: Path) -> None:
    source = next(c for c in corpus if c.name == "qcow2-v3-snapshots")
    svg = _picture(source.path, tmp_path / "map.svg")
    png = tmp_path / "map.png"
    done = subprocess.run(
        [sys.executable, "-m", "diskspec.cli", "map", "--picture", str(png), str(source.path)],
        capture_output=True, text=True, check=True,
    )
    assert done.stdout.startswith("wrote")
    chunks = _png_chunks(png.read_bytes())
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert (width, height) == (int(svg.attrib["width"]), int(svg.attrib["height"]))
    text = dict(body.split(b"\0", 1) for kind, body in chunks if kind == b"tEXt")
    assert {k.decode()[6:]: int(v) for k, v in text.items() if k.startswith(b"count:")} == (
        _counts(svg))
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    first = next(r for r in svg.iter("{http://www.w3.org/2000/svg}rect")
                 if r.attrib.get("fill") == ROLE_COLORS["header"])
    x, y = int(first.attrib["x"]) + 2, int(first.attrib["y"]) + 2
    assert pixels[y * stride + 1 + 3 * x : y * stride + 4 + 3 * x].hex() == (
        ROLE_COLORS["header"][1:])


@pytest.mark.parametrize("layout", FVD_LAYOUTS_BUILT, ids=lambda x: x.name)
def test_fvd_regions(layout: Any, tmp_path: Path) -> None:
    path = tmp_path / f"{layout.name}.fvd"
    data = layout.build()
    h = layout.header_values()
    compact = bool(h["compact_image"])
    if compact:  # the first four physical chunks exist in the file
        data += bytes(int(h["len_metadata"]) + 4 * int(h["chunk_size"]) - len(data))
    path.write_bytes(data)
    counts = _counts(_picture(path, tmp_path / "fvd.svg"))
    unit = 4096
    want = {"header": 8192 // unit, "bitmap": int(h["len_bitmap"]) // unit,
            "table": -(-4 * len(layout.table) // unit) if compact else 0,
            "journal": int(h["len_journal"]) // unit}
    metadata = -(-int(h["len_metadata"]) // unit)
    want["header"] += metadata - sum(want.values())
    if compact:
        chunk = int(h["chunk_size"]) // unit
        allocated = {e & 0x7FFF_FFFF for e in layout.table if e != 0xFFFF_FFFF}
        want["data"] = chunk * len(allocated & {0, 1, 2, 3})
        want["free"] = 4 * chunk - want["data"]
    assert counts == {k: v for k, v in want.items() if v}


def test_qcow1_pictures_match_qemu_img_map(corpus: list[CorpusImage], tmp_path: Path) -> None:
    images = [c for c in corpus if c.fmt == "qcow"]
    assert len(images) >= 4
    for image in images:
        svg = _picture(image.path, tmp_path / f"{image.name}.svg")
        counts = _counts(svg)
        assert svg.attrib["data-format"] == "qcow" and counts["header"] == 1
        assert counts.get("l2", 0) >= 1, image.name  # (the L1 table shares cluster 0)
        cs = int(svg.attrib["data-unit"])
        if image.secret is None:
            assert int(svg.attrib["data-guest-data"]) == _data_clusters(_qemu(image, "map"), cs)
            assert counts.get("data", 0) == int(svg.attrib["data-guest-data"]), image.name
        assert ("compressed" in counts) == ("compressed" in image.tags), image.name
