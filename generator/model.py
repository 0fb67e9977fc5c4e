"""The intermediate model: a .ksy file loaded into typed records, with spec paths kept.

Stage 1 of the pipeline (load -> model -> passes -> render -> format -> import). Loading only
reads and checks the shape of the YAML; the passes in :mod:`diskspec.generator.passes` resolve
references and compute everything the templates print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .expr import Node, parse_expr

__all__ = [
    "EnumDef",
    "EnumMember",
    "Field",
    "Instance",
    "ModelError",
    "Param",
    "Spec",
    "TypeDef",
    "TypeRef",
    "Valid",
    "load_spec",
]


class ModelError(ValueError):
    """A .ksy construct the generator does not accept, with its spec path."""


@dataclass(slots=True)
class EnumMember:
    value: int
    id: str
    doc: str
    orig_id: str | None
    label: str | None = None  # -label: a display name the format itself stores


@dataclass(slots=True)
class EnumDef:
    id: str
    path: str
    members: list[EnumMember]
    as_flags: bool = False  # set by a pass when a field names it in -flags


@dataclass(slots=True)
class Valid:
    eq: Node | None = None
    any_of: list[Node] | None = None
    min: Node | None = None
    max: Node | None = None
    expr: Node | None = None
    text: str = ""  # the constraint as written, for error messages


_INT = re.compile(r"^([us])([1248])(be|le)?$")
_BITS = re.compile(r"^b([1-9][0-9]?)(be|le)?$")
_USER = re.compile(r"^([a-z][a-z0-9_]*)(?:\((.*)\))?$")


@dataclass(slots=True)
class TypeRef:
    kind: str  # "int", "bits", "bytes", "user", "switch", "bool"
    width: int = 0  # bytes for int, bits for bits
    signed: bool = False
    endian: str = "be"
    user: str = ""
    args: list[Node] = field(default_factory=list)
    switch_on: Node | None = None
    cases: list[tuple[Node, str]] = field(default_factory=list)


@dataclass(slots=True)
class Field:
    id: str
    path: str
    doc: str
    orig_id: str | None
    type: TypeRef
    size: Node | None = None
    size_eos: bool = False
    contents: bytes | None = None
    cond: Node | None = None
    repeat: str | None = None  # "expr", "eos", "until"
    repeat_expr: Node | None = None
    repeat_until: Node | None = None
    enum: str | None = None
    flags: str | None = None
    valid: Valid | None = None
    # positioned instances only
    pos: Node | None = None
    io: str | None = None


@dataclass(slots=True)
class Instance:
    id: str
    path: str
    doc: str
    orig_id: str | None
    value: Node | None  # a value instance ...
    read: Field | None  # ... or a positioned one


@dataclass(slots=True)
class Param:
    id: str
    path: str
    doc: str
    type: TypeRef


@dataclass(slots=True)
class TypeDef:
    id: str
    path: str
    doc: str
    doc_ref: list[str]
    orig_id: str | None
    endian: str
    bit_endian: str
    params: list[Param]
    seq: list[Field]
    instances: list[Instance]
    # filled in by passes
    parent: str | None = None
    packed_width: int = 0  # bits, when every seq field is a bit field
    word_width: int = 0  # bits per word, when the type is a run of equal words
    words: int = 0  # words per record


@dataclass(slots=True)
class Spec:
    id: str
    title: str
    source: str  # file name, e.g. "qcow2.ksy"
    doc: str
    doc_ref: list[str]
    endian: str
    bit_endian: str
    types: dict[str, TypeDef]
    enums: dict[str, EnumDef]
    root: TypeDef
    raw: dict[str, Any]


def _doc(node: dict[str, Any]) -> str:
    return str(node.get("doc", "")).strip()


def _doc_ref(node: dict[str, Any]) -> list[str]:
    ref = node.get("doc-ref", [])
    return [str(r) for r in (ref if isinstance(ref, list) else [ref])]


def _typeref(spec: Any, path: str, endian: str) -> TypeRef:
    if spec is None:
        return TypeRef("bytes")
    if isinstance(spec, dict):
        if set(spec) != {"switch-on", "cases"}:
            raise ModelError(f"{path}: only switch-on/cases type maps are supported")
        cases = [(parse_expr(k), str(v)) for k, v in spec["cases"].items()]
        return TypeRef("switch", switch_on=parse_expr(spec["switch-on"]), cases=cases)
    text = str(spec)
    if text == "bool":
        return TypeRef("bool")
    if m := _INT.match(text):
        return TypeRef("int", int(m[2]), m[1] == "s", m[3] or endian)
    if m := _BITS.match(text):
        return TypeRef("bits", int(m[1]), False, m[2] or "")
    if m := _USER.match(text):
        args = [parse_expr(a) for a in m[2].split(",")] if m[2] else []
        return TypeRef("user", user=m[1], args=args)
    raise ModelError(f"{path}: unsupported type {text!r}")


def _valid(spec: Any, path: str) -> Valid:
    if not isinstance(spec, dict):
        return Valid(eq=parse_expr(spec), text=str(spec))
    unknown = set(spec) - {"eq", "any-of", "min", "max", "expr"}
    if unknown:
        raise ModelError(f"{path}/valid: unsupported keys {sorted(unknown)}")
    return Valid(
        eq=parse_expr(spec["eq"]) if "eq" in spec else None,
        any_of=[parse_expr(v) for v in spec["any-of"]] if "any-of" in spec else None,
        min=parse_expr(spec["min"]) if "min" in spec else None,
        max=parse_expr(spec["max"]) if "max" in spec else None,
        expr=parse_expr(spec["expr"]) if "expr" in spec else None,
        text=" ".join(str(spec.get("expr", "")).split()),
    )


def _contents(spec: Any) -> bytes:
    if isinstance(spec, str):
        return spec.encode("ascii")
    return bytes(int(b) for b in spec)


_ATTR_KEYS = {
    "id", "doc", "doc-ref", "type", "size", "size-eos", "contents", "if", "repeat",
    "repeat-expr", "repeat-until", "enum", "valid", "pos", "io",
}


def _field(spec: dict[str, Any], ident: str, path: str, endian: str) -> Field:
    unknown = {k for k in spec if not k.startswith("-")} - _ATTR_KEYS - {"value"}
    if unknown:
        raise ModelError(f"{path}: unsupported keys {sorted(unknown)}")

    def opt(key: str) -> Node | None:
        return parse_expr(spec[key]) if key in spec else None

    return Field(
        id=ident,
        path=path,
        doc=_doc(spec),
        orig_id=str(spec["-orig-id"]) if "-orig-id" in spec else None,
        type=_typeref(spec.get("type"), path, endian),
        size=opt("size"),
        size_eos=bool(spec.get("size-eos", False)),
        contents=_contents(spec["contents"]) if "contents" in spec else None,
        cond=opt("if"),
        repeat=spec.get("repeat"),
        repeat_expr=opt("repeat-expr"),
        repeat_until=opt("repeat-until"),
        enum=spec.get("enum"),
        flags=spec.get("-flags"),
        valid=_valid(spec["valid"], path) if "valid" in spec else None,
        pos=opt("pos"),
        io=str(spec["io"]) if "io" in spec else None,
    )


def _typedef(ident: str, node: dict[str, Any], path: str, meta: dict[str, Any]) -> TypeDef:
    tmeta = node.get("meta", {})
    endian = str(tmeta.get("endian", meta.get("endian", "be")))
    bit_endian = str(tmeta.get("bit-endian", meta.get("bit-endian", "be")))
    params = [
        Param(
            str(p["id"]),
            f"{path}/params/{i}",
            _doc(p),
            _typeref(p["type"], f"{path}/params/{i}", endian),
        )
        for i, p in enumerate(node.get("params", []))
    ]
    seq = [
        _field(a, str(a["id"]), f"{path}/seq/{i}", endian)
        for i, a in enumerate(node.get("seq", []))
    ]
    instances: list[Instance] = []
    for name, inst in node.get("instances", {}).items():
        ipath = f"{path}/instances/{name}"
        value = parse_expr(inst["value"]) if "value" in inst else None
        read = None if value is not None else _field(inst, str(name), ipath, endian)
        orig = str(inst["-orig-id"]) if "-orig-id" in inst else None
        instances.append(Instance(str(name), ipath, _doc(inst), orig, value, read))
    return TypeDef(
        id=ident,
        path=path or "/",
        doc=_doc(node),
        doc_ref=_doc_ref(node),
        orig_id=str(node["-orig-id"]) if "-orig-id" in node else None,
        endian=endian,
        bit_endian=bit_endian,
        params=params,
        seq=seq,
        instances=instances,
    )


def _enum(ident: str, node: dict[Any, Any], path: str) -> EnumDef:
    members = []
    for value, spec in node.items():
        if isinstance(spec, dict):
            members.append(
                EnumMember(
                    int(value),
                    str(spec["id"]),
                    _doc(spec),
                    str(spec["-orig-id"]) if "-orig-id" in spec else None,
                    str(spec["-label"]) if "-label" in spec else None,
                )
            )
        else:
            members.append(EnumMember(int(value), str(spec), "", None))
    return EnumDef(ident, path, members)


def load_spec(path: Path) -> Spec:
    """Load one .ksy file into the model (stage 1)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or "meta" not in raw:
        raise ModelError(f"{path.name}: not a Kaitai Struct spec (no meta)")
    meta = raw["meta"]
    types = {
        str(name): _typedef(str(name), node, f"/types/{name}", meta)
        for name, node in raw.get("types", {}).items()
    }
    root = _typedef(str(meta["id"]), raw, "", meta)
    root.path = "/"
    enums = {
        str(name): _enum(str(name), node, f"/enums/{name}")
        for name, node in raw.get("enums", {}).items()
    }
    return Spec(
        id=str(meta["id"]),
        title=str(meta.get("title", meta["id"])),
        source=path.name,
        doc=_doc(raw),
        doc_ref=_doc_ref(raw),
        endian=str(meta.get("endian", "be")),
        bit_endian=str(meta.get("bit-endian", "be")),
        types=types,
        enums=enums,
        root=root,
        raw=raw,
    )
