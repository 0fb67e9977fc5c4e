"""The generated reference pages (docs/formats/): complete, linked, deterministic, drift-gated."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from diskspec.generator import filters as F
from diskspec.generator.model import load_spec
from diskspec.generator.pipeline import (
    check_docs,
    docs_path,
    generate,
    generate_docs,
    render_docs_all,
    repo_paths,
)

SPECS, GENERATED = repo_paths()
DOCS = docs_path()
SPEC_FILES = sorted(SPECS.glob("*.ksy"))
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return render_docs_all(SPECS)


def test_committed_pages_match_the_specs() -> None:
    drifts = check_docs(SPECS, DOCS)
    assert drifts == [], "\n".join(d.diff for d in drifts)


def test_pages_are_deterministic(pages: dict[str, str]) -> None:
    assert render_docs_all(SPECS) == pages


@pytest.mark.parametrize("ksy", SPEC_FILES, ids=lambda p: p.stem)
def test_every_field_and_instance_has_a_row(ksy: Path, pages: dict[str, str]) -> None:
    spec = load_spec(ksy)
    page = pages[f"{spec.id}.md"]
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    module = f"diskspec.generated.{spec.id}"
    count = 0
    for t in [spec.root, *spec.types.values()]:
        cls = F.class_name(t.id)
        assert f'<a id="{t.id.replace("_", "-")}"></a>' in page, t.id
        for f in t.seq:
            attr = f"`{module}.{cls}.{F.attr_name(f.id)}`"
            row = next((r for r in rows if r.endswith(f"| {attr} |")), None)
            assert row is not None, (t.id, f.id)
            assert f"**{f.id}**" in row and f"`{f.path}`" in row
            if f.orig_id:
                assert f"`{f.orig_id}`" in row
            if f.doc:
                assert " ".join(f.doc.split()).replace("|", "\\|") in row
            count += 1
        for inst in t.instances:
            name = F.attr_name(inst.id) if inst.read is None else f"read_{inst.id}"
            row = next((r for r in rows if r.endswith(f"| `{module}.{cls}.{name}` |")), None)
            assert row is not None, (t.id, inst.id)
            assert f"**{inst.id}**" in row and f"`{inst.path}`" in row
            count += 1
    for enum in spec.enums.values():
        for m in enum.members:
            member = f"`{module}.{F.class_name(enum.id)}.{F.enum_member(m.id)}`"
            assert any(r.endswith(f"| {member} |") for r in rows), (enum.id, m.id)
    assert count > 10


@pytest.mark.parametrize("ksy", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_links_point_at_the_field(ksy: Path, pages: dict[str, str]) -> None:
    spec = load_spec(ksy)
    lines = ksy.read_text().splitlines()
    page = pages[f"{spec.id}.md"]
    links = re.findall(rf"\[`(/[^`]*)`\]\(\.\./\.\./specs/{ksy.name}#L(\d+)\)", page)
    assert links
    seen = dict(links)
    for t in spec.types.values():
        for f in t.seq:
            line = lines[int(seen[f.path]) - 1]
            assert re.match(rf"\s*- id: {f.id}$", line), (f.path, line)
        for inst in t.instances:
            assert lines[int(seen[inst.path]) - 1].strip() == f"{inst.id}:", inst.path


def test_every_diagram_is_svg_with_the_field_names(pages: dict[str, str]) -> None:
    for ksy in SPEC_FILES:
        spec = load_spec(ksy)
        page = pages[f"{spec.id}.md"]
        pictures = re.findall(r"\]\((svg/[^)]+\.svg)\)", page)
        assert f"svg/{spec.id}-overview.svg" in pictures
        for t in [spec.root, *spec.types.values()]:
            name = f"svg/{spec.id}-{t.id.replace('_', '-')}.svg"
            assert name in pictures, name
            root = ET.fromstring(pages[name])
            titles = " ".join(e.text or "" for e in root.iter(f"{SVG}title"))
            for f in t.seq:
                assert re.search(rf"\b{f.id} \(", titles), (name, f.id)
    for name, text in pages.items():
        if name.endswith(".svg"):
            ET.fromstring(text)  # well-formed


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "diskspec.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_check_fails_when_a_page_is_edited(tmp_path: Path) -> None:
    out, docs = tmp_path / "gen", tmp_path / "docs"
    generate(SPECS, out)
    generate_docs(SPECS, docs)
    args = ("--check", "--output", str(out), "--docs", str(docs))
    assert _cli(*args).returncode == 0
    target = docs / "qcow2.md"
    target.write_text(target.read_text().replace("cluster_bits", "cluster_bytes", 1))
    done = _cli(*args)
    assert done.returncode == 1
    assert "-" in done.stdout and "a/docs/formats/qcow2.md" in done.stdout
    assert done.stderr.startswith("diskspec: error: generated code is out of date: docs/qcow2.md")


def test_check_fails_on_an_edited_picture_and_a_stray_page(tmp_path: Path) -> None:
    out, docs = tmp_path / "gen", tmp_path / "docs"
    generate(SPECS, out)
    generate_docs(SPECS, docs)
    svg = docs / "svg" / "fvd-header.svg"
    svg.write_bytes(svg.read_bytes().replace(b"magic", b"magik", 1))
    (docs / "stray.md").write_text("# not generated\n")
    names = {d.path.name for d in check_docs(SPECS, docs)}
    assert names == {"fvd-header.svg", "stray.md"}
    done = _cli("--output", str(out), "--docs", str(docs))
    assert done.returncode == 0
    assert check_docs(SPECS, docs) == [] and not (docs / "stray.md").exists()
