"""The reference pages: each spec lowered to tables and byte diagrams (docs/formats/).

A second output of the same model the code comes from: the passes have run (packed widths,
flag enums), this module lowers every type and enum into rows and diagram boxes, and the
``format.md.j2`` / ``structure.svg.j2`` / ``overview.svg.j2`` templates print them. Nothing
here reads an image; every number comes from the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from . import filters as F
from .model import Field, Instance, Spec, TypeDef
from .passes import _fixed_size, _static_size

__all__ = [
    "ROLE_COLORS",
    "DocEnum",
    "DocPage",
    "DocRow",
    "DocType",
    "lower_docs",
    "render_docs",
    "spec_lines",
]

SPEC_LINK = "../../specs"  # docs/formats/ -> specs/
CODE_LINK = "../../generated"

# Diagram geometry (pixels); the diagrams are plain text, so equal input gives equal bytes.
UNIT_ROW = 640  # width of one row of fields
ROW_H = 34
LEFT = 70  # room for the row offsets
TOP = 40  # room for the column numbers
CHAR_W = 6.7  # 11px monospace

# One colour per role of a region or cluster, shared by the overview pictures here and by the
# cluster map of ``diskspec map --picture``.
ROLE_COLORS: dict[str, str] = {
    "header": "#34495e",
    "l1": "#8e44ad",
    "l2": "#c39bd3",
    "refcount_table": "#d35400",
    "refcount_block": "#f0b27a",
    "snapshot": "#7d6608",
    "bitmap": "#f4d03f",
    "table": "#5dade2",
    "journal": "#a04000",
    "encryption": "#7b7d7d",
    "data": "#27ae60",
    "compressed": "#2e86c1",
    "leaked": "#e74c3c",
    "free": "#ecf0f1",
}


# --------------------------------------------------------------------------------------------
# Lowered page


@dataclass(slots=True)
class DocRow:
    offset: str
    size: str
    type: str
    name: str
    orig_id: str
    doc: str
    constraints: str
    spec_path: str
    spec_href: str
    attr: str  # dotted path of the generated class attribute
    kind: str  # "seq", "value instance", "positioned instance"


@dataclass(slots=True)
class Box:
    x: int
    y: int
    w: int
    h: int
    label: str
    title: str
    style: str  # "field", "cond", "var", "elided"


@dataclass(slots=True)
class Diagram:
    file: str
    width: int
    height: int
    title: str
    columns: list[tuple[int, str]]  # x, number
    rows: list[tuple[int, str]]  # y, offset label
    boxes: list[Box]


@dataclass(slots=True)
class DocType:
    id: str
    cls: str
    anchor: str
    doc: str
    orig_id: str
    spec_path: str
    spec_href: str
    size: str
    params: list[str]
    rows: list[DocRow]
    diagram: Diagram | None


@dataclass(slots=True)
class DocEnumRow:
    value: str
    name: str
    member: str
    orig_id: str
    label: str
    doc: str


@dataclass(slots=True)
class DocEnum:
    id: str
    cls: str
    anchor: str
    flags: bool
    spec_path: str
    spec_href: str
    rows: list[DocEnumRow]


@dataclass(slots=True)
class Region:
    x: int
    w: int
    label: str
    note: str
    role: str
    link: str
    ref: str


@dataclass(slots=True)
class Overview:
    file: str
    width: int
    height: int
    title: str
    regions: list[Region]


@dataclass(slots=True)
class DocPage:
    spec: Spec
    title: str
    doc: str
    doc_ref: list[str]
    types: list[DocType]
    enums: list[DocEnum]
    overview: Overview
    diagrams: list[Diagram] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Helpers


def spec_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of every spec path (``/types/header/seq/3``) in a .ksy file."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str, line: int) -> None:
        lines[path or "/"] = line  # the line of the key, or of the "- " of a list item
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, f"{path}/{key.value}", key.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}/{i}", item.start_mark.line + 1)

    root = yaml.compose(text)
    if root is not None:
        walk(root, "", 1)
    return lines


def _raw(spec: Spec, path: str) -> dict[str, Any]:
    node: Any = spec.raw
    for part in path.strip("/").split("/"):
        if not part:
            continue
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node if isinstance(node, dict) else {}


def _cell(text: str) -> str:
    """One Markdown table cell: a single line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _text(value: Any) -> str:
    return " ".join(str(value).split())


def _num(value: int) -> str:
    return f"{value:#x}" if value > 255 else str(value)


def _anchor(ident: str) -> str:
    return ident.replace("_", "-")


class _Lower:
    def __init__(self, spec: Spec, source: str) -> None:
        self.spec = spec
        self.lines = spec_lines(source)
        self.module = f"diskspec.generated.{spec.id}"

    def href(self, path: str) -> str:
        return f"{SPEC_LINK}/{self.spec.source}#L{self.lines[path]}"

    def type_link(self, ident: str) -> str:
        return f"[{ident}](#{_anchor(ident)})"

    # fields -------------------------------------------------------------------------------

    def type_text(self, f: Field, raw: dict[str, Any]) -> str:
        ref = f.type
        if f.contents is not None:
            base = "magic " + f.contents.hex(" ")
        elif ref.kind == "int":
            base = f"{'s' if ref.signed else 'u'}{ref.width}{ref.endian if ref.width > 1 else ''}"
        elif ref.kind == "bits":
            base = f"b{ref.width}"
        elif ref.kind == "bool":
            base = "bool"
        elif ref.kind == "user":
            base = self.type_link(ref.user)
        elif ref.kind == "switch":
            cases = ", ".join(self.type_link(t) for _, t in ref.cases)
            base = f"switch on `{_text(raw['type']['switch-on'])}`: {cases}, else bytes"
        else:
            base = "bytes"
        if f.enum:
            base += f" enum {self.type_link(f.enum)}"
        if f.flags:
            base += f" flags {self.type_link(f.flags)}"
        if f.repeat == "expr":
            base += f", `{_text(raw['repeat-expr'])}` times"
        elif f.repeat == "eos":
            base += ", repeated to the end"
        elif f.repeat == "until":
            base += f", repeated until `{_text(raw['repeat-until'])}`"
        return base

    def size_text(self, f: Field, raw: dict[str, Any]) -> tuple[str, int | None]:
        one = _fixed_size(self.spec, f)
        if f.type.kind == "bits":
            return f"{f.type.width} bit{'s' if f.type.width > 1 else ''}", None
        if f.repeat:
            return "varies", None
        if one is not None:
            return str(one), one
        if f.size is not None:
            return f"`{_text(raw['size'])}`", None
        if f.size_eos:
            return "to the end", None
        return "varies", None

    def constraints(self, f: Field, raw: dict[str, Any]) -> str:
        parts = []
        if f.cond is not None:
            parts.append(f"present if `{_text(raw['if'])}`")
        if f.contents is not None:
            parts.append("must equal the magic")
        valid = raw.get("valid")
        if isinstance(valid, dict):
            if "eq" in valid:
                parts.append(f"= {_text(valid['eq'])}")
            if "any-of" in valid:
                parts.append("one of " + ", ".join(_text(v) for v in valid["any-of"]))
            if "min" in valid:
                parts.append(f"≥ {_text(valid['min'])}")
            if "max" in valid:
                parts.append(f"≤ {_text(valid['max'])}")
            if "expr" in valid:
                parts.append(f"`{_text(valid['expr'])}`")
        elif valid is not None:
            parts.append(f"= {_text(valid)}")
        return "; ".join(parts)

    def rows(self, t: TypeDef) -> tuple[list[DocRow], list[tuple[str, int | None, int]]]:
        """The table rows, and (name, size in units, bit width) for the diagram."""
        cls = F.class_name(t.id)
        rows: list[DocRow] = []
        layout: list[tuple[str, int | None, int]] = []
        at: int | None = 0
        bit = t.packed_width
        for f in t.seq:
            raw = _raw(self.spec, f.path)
            size, n = self.size_text(f, raw)
            if t.packed_width:
                width = f.type.width
                if t.bit_endian == "le":
                    lo = t.packed_width - bit
                    offset = f"bit {lo}" if width == 1 else f"bits {lo}..{lo + width - 1}"
                else:
                    lo = bit - width
                    offset = f"bit {lo}" if width == 1 else f"bits {lo}..{lo + width - 1}"
                bit -= width
                layout.append((f.id, width, width))
            else:
                offset = str(at) if at is not None else "—"
                layout.append((f.id, n, 0))
                at = at + n if at is not None and n is not None else None
            rows.append(
                DocRow(
                    offset=offset,
                    size=size,
                    type=self.type_text(f, raw),
                    name=f.id,
                    orig_id=f.orig_id or "",
                    doc=_cell(f.doc),
                    constraints=_cell(self.constraints(f, raw)),
                    spec_path=f.path,
                    spec_href=self.href(f.path),
                    attr=f"{self.module}.{cls}.{F.attr_name(f.id)}",
                    kind="seq",
                )
            )
        for inst in t.instances:
            rows.append(self.instance_row(cls, inst))
        return rows, layout

    def instance_row(self, cls: str, inst: Instance) -> DocRow:
        raw = _raw(self.spec, inst.path)
        if inst.read is None:
            return DocRow(
                offset="—",
                size="—",
                type=f"value `{_text(raw['value'])}`",
                name=inst.id,
                orig_id=inst.orig_id or "",
                doc=_cell(inst.doc),
                constraints="",
                spec_path=inst.path,
                spec_href=self.href(inst.path),
                attr=f"{self.module}.{cls}.{F.attr_name(inst.id)}",
                kind="value instance",
            )
        f = inst.read
        size, _ = self.size_text(f, raw)
        where = f"at `{_text(raw['pos'])}`"
        if f.io:
            where += f" in `{f.io}`"
        return DocRow(
            offset=where,
            size=size,
            type=self.type_text(f, raw),
            name=inst.id,
            orig_id=inst.orig_id or "",
            doc=_cell(inst.doc),
            constraints=_cell(self.constraints(f, raw)),
            spec_path=inst.path,
            spec_href=self.href(inst.path),
            attr=f"{self.module}.{cls}.read_{inst.id}",
            kind="positioned instance",
        )

    # diagrams -----------------------------------------------------------------------------

    def diagram(self, t: TypeDef, layout: list[tuple[str, int | None, int]]) -> Diagram:
        """An RFC-style field diagram: rows of 32 bits, or of 4 / 8 bytes."""
        name = f"svg/{self.spec.id}-{_anchor(t.id)}.svg"
        conds = {f.id: _text(_raw(self.spec, f.path)["if"]) for f in t.seq if f.cond is not None}
        if t.packed_width:
            per_row = 32
            order = layout if t.bit_endian != "le" else list(reversed(layout))
            unit_name = "bit"
        else:
            total = _static_size(self.spec, t)
            per_row = 4 if total is not None and total <= 64 else 8
            order = layout
            unit_name = "byte"
        unit_w = UNIT_ROW // per_row
        boxes: list[Box] = []
        row_labels: list[tuple[int, str]] = []
        row = 0
        col = 0
        at: int | None = 0
        labelled: set[int] = set()

        def y_of(r: int) -> int:
            return TOP + r * ROW_H

        def label_row(r: int) -> None:
            if r in labelled:
                return
            labelled.add(r)
            if t.packed_width:
                first = t.packed_width - 1 - r * per_row
                row_labels.append((y_of(r), f"bit {first}"))
            else:
                row_labels.append((y_of(r), "+?" if at is None else str(at - col)))

        def put(ident: str, units: int, style: str, title: str) -> None:
            nonlocal row, col
            w = units * unit_w
            label = _shorten(ident, w)
            boxes.append(Box(LEFT + col * unit_w, y_of(row), w, ROW_H, label, title, style))
            col += units
            if col == per_row:
                row, col = row + 1, 0

        for ident, units, _bits in order:
            style = "cond" if ident in conds else "field"
            if units is None:
                # a size only known from the data: the rest of the row, then a full dashed row
                label_row(row)
                title = f"{ident} ({unit_name}s: variable)"
                text = f"{ident} (if {conds[ident]})" if ident in conds else ident
                put(text, per_row - col, "var", title)
                at = None
                continue
            title = f"{ident} ({units} {unit_name}{'s' if units > 1 else ''})"
            left = units
            while left:
                label_row(row)
                take = min(left, per_row - col)
                if col == 0 and left >= 3 * per_row:
                    # a long run of whole rows: drawn as one elided row
                    whole = left // per_row
                    boxes.append(
                        Box(LEFT, y_of(row), UNIT_ROW, ROW_H,
                            f"{ident} … {whole * per_row} {unit_name}s", title, "elided")
                    )
                    row += 1
                    left -= whole * per_row
                    if at is not None:
                        at += whole * per_row
                    continue
                put(ident if left == units else f"… {ident}", take, style, title)
                left -= take
                if at is not None:
                    at += take
        rows = row + (1 if col else 0)
        columns = [
            (LEFT + i * unit_w, str(per_row - 1 - i if t.packed_width else i))
            for i in range(per_row)
            if per_row <= 8 or i % 4 == 0 or i == per_row - 1
        ]
        return Diagram(
            file=name,
            width=LEFT + UNIT_ROW + 10,
            height=TOP + rows * ROW_H + 10,
            title=f"{self.spec.id} {t.id}",
            columns=columns,
            rows=row_labels,
            boxes=boxes,
        )

    # whole page ---------------------------------------------------------------------------

    def lower_type(self, t: TypeDef) -> DocType:
        rows, layout = self.rows(t)
        size = _static_size(self.spec, t)
        diagram = self.diagram(t, layout) if t.seq else None
        ident = t.id
        return DocType(
            id=ident,
            cls=f"{self.module}.{F.class_name(ident)}",
            anchor=_anchor(ident),
            doc=t.doc if t is not self.spec.root else ROOT_DOC,
            orig_id=t.orig_id or "",
            spec_path=t.path,
            spec_href=self.href(t.path),
            size=(
                f"{t.packed_width} bits" if t.packed_width
                else f"{size} bytes" if size is not None else "variable"
            ),
            params=[f"`{p.id}` ({p.doc})" if p.doc else f"`{p.id}`" for p in t.params],
            rows=rows,
            diagram=diagram,
        )

    def lower_enum(self, ident: str) -> DocEnum:
        enum = self.spec.enums[ident]
        cls = F.class_name(ident)
        rows = []
        for m in enum.members:
            value = (
                f"bit {m.value} ({1 << m.value:#x})" if enum.as_flags else _num(m.value)
            )
            rows.append(
                DocEnumRow(
                    value=value,
                    name=m.id,
                    member=f"{self.module}.{cls}.{F.enum_member(m.id)}",
                    orig_id=m.orig_id or "",
                    label=m.label or "",
                    doc=_cell(m.doc),
                )
            )
        return DocEnum(
            id=ident,
            cls=f"{self.module}.{cls}",
            anchor=_anchor(ident),
            flags=enum.as_flags,
            spec_path=enum.path,
            spec_href=self.href(enum.path),
            rows=rows,
        )


def _shorten(ident: str, width: int) -> str:
    room = int((width - 6) / CHAR_W)
    if room >= len(ident):
        return ident
    if room <= 1:
        return ""
    return ident[: room - 1] + "…"


# --------------------------------------------------------------------------------------------
# The overview picture: a typical image, region by region


@dataclass(frozen=True, slots=True)
class _Part:
    label: str
    ref: str  # a root instance, a root seq field or a type of the spec
    units: int  # relative width
    role: str
    note: str


# The layout qemu-img (or the FVD reference driver) writes for a new image with defaults; each
# region names the spec element that describes it, and generation fails when one is missing.
_TYPICAL: dict[str, list[_Part]] = {
    "qcow2": [
        _Part("header", "header", 2, "header", "cluster 0, with extensions"),
        _Part("refcount table", "refcount_table", 2, "refcount_table", "cluster 1"),
        _Part("refcount block", "refcount_block", 2, "refcount_block", "cluster 2"),
        _Part("L1 table", "l1_table", 2, "l1", "cluster 3"),
        _Part("L2 table", "l2_table", 2, "l2", "allocated on write"),
        _Part("data clusters", "", 6, "data", "guest data, any order"),
        _Part("L2 table", "l2_table", 2, "l2", ""),
        _Part("data", "", 3, "data", ""),
        _Part("snapshot table", "snapshot_table", 2, "snapshot", "if snapshots"),
    ],
    "qcow": [
        _Part("header", "header", 2, "header", "48 bytes"),
        _Part("backing name", "backing_file_name", 2, "header", "if any"),
        _Part("L1 table", "l1_table", 3, "l1", "8-aligned"),
        _Part("L2 table", "l2_table", 3, "l2", "cluster-aligned, appended"),
        _Part("data clusters", "", 6, "data", "appended in write order"),
        _Part("L2 table", "l2_table", 3, "l2", ""),
        _Part("data", "", 4, "data", ""),
    ],
    "fvd": [
        _Part("header region", "header", 3, "header", "8192 bytes"),
        _Part("bitmap", "bitmap", 3, "bitmap", "if a base image"),
        _Part("table", "table", 3, "table", "if compact"),
        _Part("journal", "journal", 4, "journal", "if bitmap or table"),
        _Part("data (at metadata_size)", "", 10, "data", "raw or chunks"),
    ],
}

OVERVIEW_W = 900
DARK_ROLES = ("header", "l1", "refcount_table", "snapshot", "journal", "data", "compressed")
ROOT_DOC = "The file as a whole: the fields read from offset 0, and the positioned tables."


def _overview(spec: Spec) -> Overview:
    parts = _TYPICAL.get(spec.id, [])
    root = spec.root
    known = {f.id: f.path for f in root.seq} | {i.id: i.path for i in root.instances}
    known |= {t.id: t.path for t in spec.types.values()}
    total = sum(p.units for p in parts) or 1
    regions = []
    x = 10
    for p in parts:
        if p.ref and p.ref not in known:
            raise ValueError(f"{spec.source}: overview region {p.label!r} names {p.ref!r}")
        w = p.units * (OVERVIEW_W - 20) // total
        link = f"#{_anchor(p.ref if p.ref in spec.types else root.id)}" if p.ref else ""
        regions.append(Region(x, w, p.label, p.note, p.role, link, p.ref))
        x += w
    return Overview(f"svg/{spec.id}-overview.svg", OVERVIEW_W, 150, spec.title, regions)


def lower_docs(spec: Spec, source: str) -> DocPage:
    """The reference page of one spec (the passes must have run on it)."""
    low = _Lower(spec, source)
    types = [low.lower_type(t) for t in [spec.root, *spec.types.values()]]
    enums = [low.lower_enum(e) for e in spec.enums]
    page = DocPage(
        spec=spec,
        title=spec.title,
        doc=spec.doc,
        doc_ref=spec.doc_ref,
        types=types,
        enums=enums,
        overview=_overview(spec),
    )
    page.diagrams = [t.diagram for t in types if t.diagram is not None]
    return page


def render_docs(spec: Spec, source: str) -> dict[str, str]:
    """The page and its pictures, by path relative to docs/formats/."""
    from .render import _environment

    page = lower_docs(spec, source)
    env = _environment()
    files = {
        f"{spec.id}.md": env.get_template("format.md.j2").render(page=page, spec_link=SPEC_LINK),
        page.overview.file: env.get_template("overview.svg.j2").render(
            o=page.overview, source=spec.source, colors=ROLE_COLORS, dark=DARK_ROLES
        ),
    }
    structure = env.get_template("structure.svg.j2")
    for d in page.diagrams:
        files[d.file] = structure.render(d=d, source=spec.source, top=TOP)
    return {name: _tidy(text) for name, text in files.items()}


def _tidy(text: str) -> str:
    """No trailing blanks, at most one blank line in a row, one final newline."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n") + "\n"
