"""``diskspec explain``: its values are the generated classes', its offsets hold those bytes, its
translations agree with qemu-img map, and its HTML page renders in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diskspec.explain import STRUCTURES, Item, explain, format_text, translate
from diskspec.explain.tree import spec_of
from diskspec.generated import fvd, qcow, qcow2
from diskspec.generator import filters as F
from diskspec.tests.corpus import CorpusImage, image_opts, require_tool
from diskspec.tests.test_differential import FVD_LAYOUTS_BUILT

ENDIAN = {"qcow2": "big", "qcow": "big", "fvd": "little"}
MODULES: dict[str, Any] = {"qcow2": qcow2, "qcow": qcow, "fvd": fvd}
ARTIFACTS = Path(__file__).resolve().parent.parent / ".cache" / "artifacts"
CHROMIUM = "/usr/bin/chromium"


def _images(corpus: list[CorpusImage]) -> list[CorpusImage]:
    return [c for c in corpus if c.fmt in ("qcow2", "qcow")]


@pytest.fixture(scope="module")
def fvd_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fvd")
    out = []
    for layout in FVD_LAYOUTS_BUILT:
        path = folder / f"{layout.name}.fvd"
        path.write_bytes(layout.build())
        out.append(path)
    return out


def _leaves(items: list[Item]) -> Iterator[tuple[Item, Item | None]]:
    def go(item: Item, parent: Item | None) -> Iterator[tuple[Item, Item | None]]:
        if not item.children:
            yield item, parent
        for child in item.children:
            yield from go(child, item)

    for item in items:
        yield from go(item, None)


def _check_items(path: Path, fmt: str, items: list[Item]) -> int:
    """Every leaf field: its bytes in the file decode to its value (or its bits of the word)."""
    data = path.read_bytes()
    module = MODULES[fmt]
    checked = 0
    for item, parent in _leaves(items):
        if item.bits:
            assert parent is not None
            cls = getattr(module, parent.type.split(".")[1])
            mask = getattr(cls, f"{F.const_name(item.name)}_MASK")
            shift = getattr(cls, f"{F.const_name(item.name)}_SHIFT")
            word = int.from_bytes(data[parent.offset : parent.offset + parent.size], ENDIAN[fmt])
            assert word == parent.value, parent.name
            assert int(item.value) == (word & mask) >> shift, (parent.name, item.name)
        elif re.fullmatch(r"[us][1248]", item.type):
            raw = data[item.offset : item.offset + item.size]
            assert len(raw) == int(item.type[1]), item.name
            got = int.from_bytes(raw, ENDIAN[fmt], signed=item.type[0] == "s")
            assert got == int(item.value), (path.name, item.name, item.offset)
        elif isinstance(item.value, bytes) and item.type == "bytes" and item.size:
            assert data[item.offset : item.offset + item.size] == item.value, item.name
        else:
            continue
        checked += 1
    return checked


def _header_values(fmt: str, path: Path) -> tuple[str, Any]:
    with open(path, "rb") as f:
        if fmt == "qcow2":
            return "header", qcow2.Qcow2.read(f).header
        if fmt == "qcow":
            return "header", qcow.Qcow.read(f).header
        return "header", fvd.Fvd.read(f).header


def _compare_header(fmt: str, path: Path, items: list[Item]) -> int:
    """The header's fields, as explain shows them, equal the generated class's attributes."""
    name, header = _header_values(fmt, path)
    section = next(s for s in items if s.name == name)
    spec = spec_of(fmt)
    shown = {c.name: c for c in section.children}
    count = 0
    for f in spec.types["header"].seq:
        value = getattr(header, F.attr_name(f.id))
        if value is None:
            assert f.id not in shown
            continue
        assert shown[f.id].value == value, f.id
        assert shown[f.id].spec_path == f.path
        count += 1
    return count


def test_explain_matches_the_generated_classes_on_the_corpus(
    corpus: list[CorpusImage], fvd_images: list[Path]
) -> None:
    images = [(c.path, c.fmt) for c in _images(corpus)] + [(p, "fvd") for p in fvd_images]
    assert len(images) > 40
    fields = headers = 0
    for path, fmt in images:
        report = explain(path)
        assert report.fmt == fmt, path
        headers += _compare_header(fmt, path, report.sections)
        fields += _check_items(path, fmt, report.sections)
        text = format_text(report)
        assert "header" in text and "=>" in text
    assert headers > 40 * 12 and fields > 2000


def test_every_structure_option_prints_only_that_structure(corpus: list[CorpusImage]) -> None:
    by_name = {c.name: c for c in corpus}
    for image, fmt in (("qcow2-v3-snapshots", "qcow2"), ("qcow2-v3-bitmaps", "qcow2"),
                       ("qcow2-v3-luks", "qcow2"), ("qcow1-backing", "qcow")):
        path = by_name[image].path
        whole = {s.name.split("[")[0] for s in explain(path).sections}
        for name in STRUCTURES[fmt]:
            got = explain(path, structure=name).sections
            assert {s.name.split("[")[0] for s in got} <= {name}
            assert bool(got) == (name in whole), (image, name)
    snaps = explain(by_name["qcow2-v3-snapshots"].path, structure="snapshots").sections
    assert snaps and snaps[0].children and "L1 of" in snaps[0].children[0].note


def _qemu_map(image: CorpusImage) -> list[dict[str, Any]]:
    done = subprocess.run(
        [require_tool("qemu-img"), "map", "--output=json", *image_opts(image)],
        capture_output=True, text=True, check=True,
    )
    extents: list[dict[str, Any]] = json.loads(done.stdout)
    return extents


def _host(item: Item) -> int | None:
    return next((c.value for c in item.children if c.name == "host"), None)


def test_at_translates_like_qemu_img_map(corpus: list[CorpusImage]) -> None:
    checked = 0
    # (qemu-img map cannot open an external data file through --image-opts file.filename)
    for image in [c for c in _images(corpus) if "data_file" not in c.tags]:
        for e in _qemu_map(image):
            if not e["data"] or e["depth"] != 0 or "offset" not in e:
                continue
            for guest in sorted({e["start"], e["start"] + e["length"] - 1}):
                item = translate(image.path, guest).sections[0]
                assert _host(item) == e["offset"] + guest - e["start"], (image.name, guest)
                checked += 1
            if checked > 40 * 8:
                break
    assert checked > 100


def test_at_shows_the_whole_translation(corpus: list[CorpusImage], fvd_images: list[Path]) -> None:
    path = next(c.path for c in corpus if c.name == "qcow2-v3-c64k-r16")
    extent = next(e for e in _qemu_map(next(c for c in corpus if c.path == path)) if e["data"])
    item = translate(path, extent["start"]).sections[0]
    names = [c.name for c in item.children]
    assert names[0].startswith("l1[") and names[1].startswith("l2[")
    assert names[-2:] == ["host", "refcount"] and item.children[-1].value == 1
    assert any(c.name == "copied" for c in item.children[1].children)
    compact = next(p for p in fvd_images if p.name == "fvd-base-bitmap-table.fvd")
    item = translate(compact, 0).sections[0]
    assert [c.name for c in item.children] == ["bitmap bit 0", "table[0]", "host"]
    assert item.children[0].value == 1 and item.children[2].value == 24576
    empty = translate(compact, 10 << 20).sections[0]
    assert "EMPTY" in empty.children[-1].note


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "diskspec.cli", "explain", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_cli_output_and_one_line_errors(corpus: list[CorpusImage], tmp_path: Path) -> None:
    path = str(next(c.path for c in corpus if c.name == "qcow2-v3-c64k-r16"))
    done = _cli(path)
    assert done.returncode == 0, done.stderr
    assert "64 KiB clusters, L2 holds 8192 entries, one L2 table covers 512 MiB" in done.stdout
    assert "refcount_table" in done.stdout and "feature_name_table" in done.stdout
    done = _cli("--structure", "header", path)
    assert "\nextensions  @" not in done.stdout and "cluster_bits" in done.stdout
    assert "L1 index 0" in _cli("--at", "64K", path).stdout
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an image" * 100)
    truncated = tmp_path / "short.qcow2"
    truncated.write_bytes(Path(path).read_bytes()[:40])
    for args in ([str(junk)], [str(truncated)], ["--structure", "nope", path],
                 ["-f", "fvd", path], ["--at", "-1", path], [str(tmp_path / "missing")]):
        done = _cli(*args)
        assert done.returncode == 1, args
        assert done.stderr.startswith("diskspec: error: ") and done.stderr.count("\n") == 1, (
            args, done.stderr)


def _browser() -> str:
    """The Debian chromium the test set-up installs (make browser); never a skip."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    return CHROMIUM


def _chromium(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={home}", "--virtual-time-budget=5000",
           *args]
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, env=env)


def test_html_page_renders_and_highlights_in_a_browser(
    corpus: list[CorpusImage], tmp_path: Path
) -> None:
    image = next(c.path for c in corpus if c.name == "qcow2-v3-bitmaps")
    page = tmp_path / "explain.html"
    done = subprocess.run(
        [sys.executable, "-m", "diskspec.cli", "explain", "--html", str(page), str(image)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html
    url = f"{page.as_uri()}#selftest"
    dom = _chromium("--dump-dom", url, home=tmp_path / "chromium")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="selftest-result"[^>]*>([^<]*)</pre>', dom.stdout)
    assert found, dom.stdout[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["ok"], result
    assert result["checked"] >= 10 and result["fields"] > 100 and result["hexBytes"] > 1000
    assert result["highlight"] != result["plain"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "explain.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1400,900", url,
                     home=tmp_path / "chromium")
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(shot, ARTIFACTS / "explain-qcow2-v3-bitmaps.png")
