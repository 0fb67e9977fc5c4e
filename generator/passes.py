"""Small named passes over the model, run in registry order (stage 3 of the pipeline).

Each pass reads the model and either annotates it or fails with a ModelError naming the spec
path. The last passes lower every type into the code fragments the templates print: struct
runs, parse statements, build statements, validation, properties and positioned readers, for
the dataclass module and for the construct module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import filters as F
from .expr import (
    Attr,
    BinOp,
    Bool,
    Cond,
    EnumLit,
    ExprError,
    Name,
    Node,
    Num,
    Unary,
    names_used,
    render,
)
from .model import Field, Instance, ModelError, Spec, TypeDef, TypeRef

__all__ = ["PASSES", "Code", "TypeCode", "run_passes"]


# --------------------------------------------------------------------------------------------
# Lowered code, what the templates print


@dataclass(slots=True)
class FieldCode:
    name: str
    annotation: str
    default: str | None
    doc: list[str]


@dataclass(slots=True)
class MethodCode:
    name: str
    lines: list[str]


@dataclass(slots=True)
class TypeCode:
    typedef: TypeDef
    cls: str
    doc: list[str]
    constants: list[str] = field(default_factory=list)  # "NAME: ClassVar[int] = 0x.."
    fields: list[FieldCode] = field(default_factory=list)
    params_sig: str = ""  # ", *, cluster_bits: int" for parse/read
    params_pass: str = ""  # ", cluster_bits=cluster_bits"
    parse: list[str] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    validate: list[str] = field(default_factory=list)
    properties: list[MethodCode] = field(default_factory=list)
    readers: list[MethodCode] = field(default_factory=list)
    first_read: int = 4096
    construct: list[str] = field(default_factory=list)


@dataclass(slots=True)
class EnumCode:
    cls: str
    base: str  # IntEnum / IntFlag
    doc: list[str]
    members: list[tuple[str, str, list[str]]]  # name, value, doc
    labels: list[tuple[str, str]] = field(default_factory=list)  # member name, -label
    labels_name: str = ""


@dataclass(slots=True)
class Code:
    spec: Spec
    module_doc: list[str] = field(default_factory=list)
    structs: list[tuple[str, str]] = field(default_factory=list)  # name, format
    enums: list[EnumCode] = field(default_factory=list)
    types: list[TypeCode] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Helpers


def _all_types(spec: Spec) -> list[TypeDef]:
    return [spec.root, *spec.types.values()]


def _type_of(spec: Spec, name: str, path: str) -> TypeDef:
    if name == spec.root.id:
        return spec.root
    if name not in spec.types:
        raise ModelError(f"{spec.source} {path}: unknown type {name!r}")
    return spec.types[name]


def _field(t: TypeDef, ident: str) -> Field | None:
    return next((f for f in t.seq if f.id == ident), None)


def _instance(t: TypeDef, ident: str) -> Instance | None:
    return next((i for i in t.instances if i.id == ident), None)


def _user_types(f: Field) -> list[str]:
    if f.type.kind == "user":
        return [f.type.user]
    if f.type.kind == "switch":
        return [t for _, t in f.type.cases]
    return []


def _fixed_size(spec: Spec, f: Field) -> int | None:
    """Static size of one unconditional, unrepeated field, if it has one."""
    if f.contents is not None:
        return len(f.contents)
    if isinstance(f.size, Num):
        return f.size.value
    if f.size is not None or f.size_eos:
        return None
    if f.type.kind == "int":
        return f.type.width
    if f.type.kind == "user":
        return _static_size(spec, spec.types[f.type.user])
    return None


def _static_size(spec: Spec, t: TypeDef) -> int | None:
    if t.packed_width:
        return t.packed_width // 8
    total = 0
    for f in t.seq:
        if f.cond is not None or f.repeat:
            return None
        size = _fixed_size(spec, f)
        if size is None:
            return None
        total += size
    return total


def _min_size(spec: Spec, t: TypeDef) -> int:
    """A lower bound of the bytes one instance consumes (to bound hostile repeat counts)."""
    total = 0
    for f in t.seq:
        if f.cond is not None or f.repeat:
            continue
        size = _fixed_size(spec, f)
        total += size or 0
    return total


# --------------------------------------------------------------------------------------------
# Expression rendering in a scope


@dataclass(slots=True)
class Scope:
    spec: Spec
    typedef: TypeDef
    base: str  # "o." / "self." / "ctx."
    root: str
    parent: str
    item: str | None = None
    item_type: TypeDef | None = None
    eof: str | None = None
    inline: bool = True  # expand value instances (no properties exist on the scratch object)
    wrap_optional: bool = False  # build mode: conditional fields may be None
    construct: bool = False

    def at(self, typedef: TypeDef, base: str) -> Scope:
        return Scope(
            self.spec, typedef, base, self.root, self.parent, self.item, self.item_type,
            self.eof, self.inline, self.wrap_optional, self.construct,
        )


def _enum_lit(scope: Scope, lit: EnumLit) -> str:
    enum = scope.spec.enums.get(lit.enum)
    if enum is None:
        raise ExprError(f"unknown enum {lit.enum!r}")
    member = next((m for m in enum.members if m.id == lit.member), None)
    if member is None:
        raise ExprError(f"unknown enum member {lit.enum}::{lit.member}")
    if scope.construct or enum.as_flags:
        # a flag set's enum names bit numbers (Kaitai's meaning), not the flag values
        return hex(member.value) if member.value > 255 else str(member.value)
    return f"{F.class_name(enum.id)}.{F.enum_member(member.id)}"


def _member(scope: Scope, t: TypeDef, base: str, ident: str) -> tuple[str, TypeDef | None]:
    # In a parser, the current type's fields are locals and its value instances are expanded;
    # anything reached through another object (a parsed child) uses its properties.
    own = t is scope.typedef and base == scope.base
    f = _field(t, ident)
    if f is not None:
        code = f"{base}{ident}"
        wrap = scope.wrap_optional or (not own and not scope.construct)
        if wrap and f.cond is not None:
            code = (
                f"required({code}, _SPEC, {f.path!r}, {F.class_name(t.id)!r}, {ident!r})"
            )
        child = None
        if f.type.kind == "user" and not f.repeat:
            child = scope.spec.types.get(f.type.user)
        return code, child
    if any(p.id == ident for p in t.params):
        return ("ctx._params." if scope.construct else base) + ident, None
    inst = _instance(t, ident)
    if inst is not None and inst.value is not None:
        if scope.inline and (own or scope.construct):
            inner = expr(inst.value, scope.at(t, base))
            simple = inner.replace(".", "").replace("_", "").isalnum()
            return (inner if simple else f"({inner})"), None
        return f"{base}{ident}", None
    raise ExprError(f"{ident!r} is not a field, parameter or value instance of {t.id}")


def _resolve(scope: Scope, n: Node) -> tuple[str, TypeDef | None]:
    if isinstance(n, Name):
        if n.ident == "_root":
            return scope.root, scope.spec.root
        if n.ident == "_parent":
            parent = scope.typedef.parent
            if parent is None:
                raise ExprError(f"_parent of {scope.typedef.id} is not unique")
            return scope.parent, _type_of(scope.spec, parent, scope.typedef.path)
        if n.ident == "_":
            if scope.item is None:
                raise ExprError("_ used outside repeat-until or valid")
            return scope.item, scope.item_type
        return _member(scope, scope.typedef, scope.base, n.ident)
    if isinstance(n, Attr):
        if n.base == Name("_io"):
            if n.attr == "eof" and scope.eof is not None:
                return scope.eof, None
            raise ExprError(f"_io.{n.attr} is not supported here")
        code, t = _resolve(scope, n.base)
        if t is None:
            raise ExprError(f"cannot look up {n.attr!r} in {code}")
        return _member(scope, t, f"{code}.", n.attr)
    raise ExprError(f"unexpected {n}")


def expr(node: Node, scope: Scope) -> str:
    return render(node, lambda n: _resolve(scope, n)[0], lambda e: _enum_lit(scope, e))


def _is_bool(node: Node) -> bool:
    match node:
        case Bool():
            return True
        case BinOp(op, _, _):
            return op in ("and", "or", "==", "!=", "<", ">", "<=", ">=")
        case Unary("not", _):
            return True
        case Cond(_, then, _):
            return _is_bool(then)
    return False


def _kaitai_text(node: Node) -> str:
    """A readable Kaitai rendering for messages."""
    match node:
        case Num(v):
            return hex(v) if v > 255 else str(v)
        case Bool(v):
            return "true" if v else "false"
        case Name(i):
            return i
        case Attr(b, a):
            return f"{_kaitai_text(b)}.{a}"
        case EnumLit(e, m):
            return f"{e}::{m}"
        case Unary(op, x):
            return f"{op} {_kaitai_text(x)}" if op == "not" else f"{op}{_kaitai_text(x)}"
        case BinOp(op, a, b):
            return f"({_kaitai_text(a)} {op} {_kaitai_text(b)})"
        case Cond(t, a, b):
            return f"({_kaitai_text(t)} ? {_kaitai_text(a)} : {_kaitai_text(b)})"
    return "?"


def _pystr(text: str, width: int = 60) -> str:
    """A string literal, split into implicitly joined pieces when long."""
    if len(text) <= width:
        return repr(text)
    pieces = []
    while text:
        cut = text.rfind(" ", 0, width) + 1 if len(text) > width else len(text)
        cut = cut or width
        pieces.append(repr(text[:cut]))
        text = text[cut:]
    return "(" + " ".join(pieces) + ")"


def _indent(lines: list[str], n: int = 1) -> list[str]:
    pad = "    " * n
    return [pad + line if line else line for line in lines]


# --------------------------------------------------------------------------------------------
# Passes that annotate the model


def pass_check_ids(spec: Spec) -> None:
    for t in _all_types(spec):
        seen: set[str] = set()
        for ident in [p.id for p in t.params] + [f.id for f in t.seq] + [
            i.id for i in t.instances
        ]:
            if ident in seen:
                raise ModelError(f"{spec.source} {t.path}: duplicate id {ident!r}")
            if ident in F._KEYWORDS:
                raise ModelError(f"{spec.source} {t.path}: id {ident!r} shadows a builtin")
            seen.add(ident)


def pass_resolve_parents(spec: Spec) -> None:
    parents: dict[str, set[str]] = {}
    for t in _all_types(spec):
        fields = list(t.seq) + [i.read for i in t.instances if i.read is not None]
        for f in fields:
            for name in _user_types(f):
                _type_of(spec, name, f.path)
                parents.setdefault(name, set()).add(t.id)
    for name, ps in parents.items():
        if len(ps) == 1 and name in spec.types:
            spec.types[name].parent = next(iter(ps))


def pass_mark_flags(spec: Spec) -> None:
    for t in _all_types(spec):
        for f in t.seq:
            for ref in (f.enum, f.flags):
                if ref is not None and ref not in spec.enums:
                    raise ModelError(f"{spec.source} {f.path}: unknown enum {ref!r}")
            if f.flags:
                spec.enums[f.flags].as_flags = True


def pass_classify_packed(spec: Spec) -> None:
    """Types made only of unconditional bit fields of 8, 16, 32 or 64 bits in all."""
    for t in spec.types.values():
        if t.seq and all(f.type.kind == "bits" for f in t.seq):
            if any(f.cond is not None or f.repeat or f.valid for f in t.seq):
                raise ModelError(f"{spec.source} {t.path}: bit fields must be plain")
            width = sum(f.type.width for f in t.seq)
            if width not in (8, 16, 32, 64):
                raise ModelError(f"{spec.source} {t.path}: {width} bits is not a word")
            t.packed_width = width
            t.word_width = width
            t.words = 1


def pass_classify_words(spec: Spec) -> None:
    """Types that are a run of equal-width words (an extended L2 entry is two u64)."""
    for t in spec.types.values():
        if t.packed_width or not t.seq:
            continue
        widths: list[int] = []
        for f in t.seq:
            if f.cond is not None or f.repeat or f.size is not None:
                break
            if f.type.kind == "user" and spec.types[f.type.user].packed_width:
                widths.append(spec.types[f.type.user].packed_width)
            else:
                break
        else:
            if len(set(widths)) == 1:
                t.word_width = widths[0]
                t.words = len(widths)


# --------------------------------------------------------------------------------------------
# Lowering to the dataclass module


class _Lower:
    def __init__(self, spec: Spec, code: Code) -> None:
        self.spec = spec
        self.code = code
        self.n_structs = 0

    # scopes -------------------------------------------------------------------------------

    def parse_scope(self, t: TypeDef) -> Scope:
        return Scope(self.spec, t, "v_", "_root", "_parent", eof="(pos >= end)")

    def build_scope(self, t: TypeDef, base: str = "self.") -> Scope:
        return Scope(
            self.spec, t, base, "_root", "_parent", inline=False, wrap_optional=True
        )

    def struct(self, fmt: str) -> str:
        name = f"_S{self.n_structs}"
        self.n_structs += 1
        self.code.structs.append((name, fmt))
        return name

    def err_args(self, t: TypeDef, f: Field | Instance) -> str:
        return f"_SPEC, {f.path!r}, {F.class_name(t.id)!r}, {f.id!r}"

    # one type ----------------------------------------------------------------------------

    def lower(self, t: TypeDef) -> TypeCode:
        tc = TypeCode(typedef=t, cls=F.class_name(t.id), doc=self.doc_lines(t))
        tc.params_sig = "".join(
            f", {p.id}: {F.param_annotation(p.type)}" for p in t.params
        )
        tc.params_pass = "".join(f", {p.id}={p.id}" for p in t.params)
        for p in t.params:
            tc.fields.append(
                FieldCode(p.id, F.param_annotation(p.type), None, F.docstring(p.doc, 4))
            )
        for f in t.seq:
            default = None
            if f.contents is not None:
                default = repr(f.contents)
            elif f.cond is not None:
                default = "None"
            doc = F.docstring(self.field_doc(f), 4)
            tc.fields.append(FieldCode(f.id, F.field_annotation(self.spec, f), default, doc))
        for f in t.seq:
            if f.contents is not None:
                tc.constants.append(
                    f"{F.const_name(f.id)}_CONTENTS: ClassVar[bytes] = {f.contents!r}"
                )
        if not t.packed_width:
            # byte offsets of fields whose position is static (when present at all)
            at = 0
            for f in t.seq:
                size = None if f.repeat else _fixed_size(self.spec, f)
                tc.constants.append(f"{F.const_name(f.id)}_AT: ClassVar[int] = {at}")
                if size is None:
                    break
                at += size
        size = _static_size(self.spec, t)
        if size is not None:
            tc.constants.append(f"SIZE: ClassVar[int] = {size}")
            tc.first_read = size
        if t.packed_width:
            self.lower_packed(t, tc)
        else:
            self.lower_parse(t, tc)
            self.lower_build(t, tc)
        self.lower_validate(t, tc)
        self.lower_instances(t, tc)
        return tc

    def doc_lines(self, t: TypeDef) -> list[str]:
        text = t.doc or t.id.replace("_", " ").capitalize() + "."
        extra = []
        if t.orig_id:
            extra.append(f"QEMU: {t.orig_id}")
        extra.append(f"Spec: {self.spec.source} {t.path}")
        return F.docstring(text + "\n\n" + "\n".join(extra), 4)

    def field_doc(self, f: Field | Instance) -> str:
        text = f.doc or f.id.replace("_", " ").capitalize() + "."
        if f.orig_id:
            text += f"\n\nQEMU: {f.orig_id}"
        return text

    # packed words --------------------------------------------------------------------------

    def lower_packed(self, t: TypeDef, tc: TypeCode) -> None:
        width = t.packed_width
        lsb_first = t.bit_endian == "le"
        shift = 0 if lsb_first else width
        parts = []
        for f in t.seq:
            w = f.type.width
            if lsb_first:
                pos = shift
                shift += w
            else:
                shift -= w
                pos = shift
            mask = ((1 << w) - 1) << pos
            cname = F.const_name(f.id)
            tc.constants.append(f"{cname}_SHIFT: ClassVar[int] = {pos}")
            tc.constants.append(f"{cname}_MASK: ClassVar[int] = {mask:#x}")
            parts.append((f, pos, w))
        fmt = (">" if t.endian == "be" else "<") + F.struct_char(width // 8, False)
        s = self.struct(fmt)
        tc.constants.append(f"WORD: ClassVar[str] = {F.array_typecode(width)!r}")
        conv = []
        for f, pos, w in parts:
            get = f"(raw >> {pos}) & {(1 << w) - 1:#x}"
            conv.append(f"{f.id}={'bool(' + get + ')' if w == 1 else get},")
        tc.readers.append(
            MethodCode(
                "from_raw",
                [
                    "@classmethod",
                    f"def from_raw(cls, raw: int) -> {tc.cls}:",
                    '    """Decode the fields from the raw word."""',
                    "    return cls(",
                    *_indent(conv, 2),
                    "    )",
                ],
            )
        )
        joined = " | ".join(f"(int(self.{f.id}) << {pos})" for f, pos, _ in parts)
        tc.readers.append(
            MethodCode(
                "to_raw",
                [
                    "def to_raw(self) -> int:",
                    '    """Encode the fields into the raw word."""',
                    f"    return {joined}",
                ],
            )
        )
        tc.parse = [
            f"need(buf, pos, {width // 8}, end, _SPEC, {t.path!r}, {tc.cls!r}, 'raw')",
            f"return cls.from_raw({s}.unpack_from(buf, pos)[0]), pos + {width // 8}",
        ]
        checks = []
        for f, _, w in parts:
            checks += [
                f"if not 0 <= int(self.{f.id}) <= {(1 << w) - 1:#x}:",
                f"    raise build_error({self.err_args(t, f)}, "
                f"'does not fit in {w} bits')",
            ]
        tc.build = [*checks, f"out += {s}.pack(self.to_raw())"]

    # parse ---------------------------------------------------------------------------------

    def scalar(self, f: Field) -> bool:
        return not f.repeat and (
            f.contents is not None
            or (f.type.kind == "int" and f.size is None)
            or (f.type.kind == "bytes" and isinstance(f.size, Num))
        )

    def group(self, t: TypeDef) -> list[list[Field]]:
        groups: list[list[Field]] = []
        for f in t.seq:
            last = groups[-1] if groups else None
            if (
                last is not None
                and self.scalar(f)
                and self.scalar(last[0])
                and repr(last[0].cond) == repr(f.cond)
                and last[0].type.endian == f.type.endian
            ):
                last.append(f)
            else:
                groups.append([f])
        return groups

    def fmt_char(self, f: Field) -> tuple[str, int]:
        if f.contents is not None:
            return f"{len(f.contents)}s", len(f.contents)
        if f.type.kind == "int":
            return F.struct_char(f.type.width, f.type.signed), f.type.width
        assert isinstance(f.size, Num)
        return f"{f.size.value}s", f.size.value

    def lower_parse(self, t: TypeDef, tc: TypeCode) -> None:
        scope = self.parse_scope(t)
        lines = [f"v_{p.id} = {p.id}" for p in t.params]
        lines += [
            f"v_{f.id}: Any = None"
            for f in t.seq
            if f.cond is not None or f.type.kind == "switch"
        ]
        for group in self.group(t):
            body: list[str] = []
            if self.scalar(group[0]):
                body = self.parse_run(t, tc, group, scope)
            else:
                body = self.parse_one(t, group[0], scope)
            cond = group[0].cond
            if cond is not None:
                lines.append(f"if {expr(cond, scope)}:")
                lines += _indent(body)
            else:
                lines += body
        idents = [p.id for p in t.params] + [f.id for f in t.seq]
        args = ", ".join(f"{i}=v_{i}" for i in idents)
        lines.append(f"return cls({args}), pos")
        tc.parse = lines

    def post(self, t: TypeDef, f: Field, value: str, offset: str, scope: Scope) -> list[str]:
        """Enum conversion and validity checks after a scalar is read."""
        lines = []
        if f.contents is not None:
            lines += [
                f"if {value} != {f.contents!r}:",
                f"    raise invalid({self.err_args(t, f)}, {offset}, "
                f"{repr(f.contents)!r}, {value})",
            ]
        lines += self.valid_lines(t, f, value, offset, scope)
        if f.flags:
            cls = F.class_name(f.flags)
            tmp = f"_{f.id}"
            lines += [
                f"{tmp} = _FLAGS_{cls}.get({value})",
                f"{value} = {tmp} if {tmp} is not None else flag_of({cls}, {value}, "
                f"_FLAGS_{cls})",
            ]
        elif f.enum:
            cls = F.class_name(f.enum)
            lines.append(f"{value} = _BY_VALUE_{cls}.get({value}, {value})")
        return lines

    def valid_lines(
        self, t: TypeDef, f: Field, value: str, offset: str, scope: Scope
    ) -> list[str]:
        v = f.valid
        if v is None:
            return []
        item = Scope(
            scope.spec, t, scope.base, scope.root, scope.parent, value, None, scope.eof,
            scope.inline, scope.wrap_optional,
        )
        tests: list[tuple[str, str]] = []  # (failing condition, what was expected)
        if v.eq is not None:
            tests.append((f"{value} != {expr(v.eq, item)}", _kaitai_text(v.eq)))
        if v.any_of is not None:
            opts = ", ".join(expr(x, item) for x in v.any_of)
            tests.append(
                (f"{value} not in ({opts})", "one of " + ", ".join(map(_kaitai_text, v.any_of)))
            )
        if v.min is not None:
            tests.append((f"{value} < {expr(v.min, item)}", ">= " + _kaitai_text(v.min)))
        if v.max is not None:
            tests.append((f"{value} > {expr(v.max, item)}", "<= " + _kaitai_text(v.max)))
        if v.expr is not None:
            tests.append((expr(Unary("not", v.expr), item), re.sub(r"\b_\b", f.id, v.text)))
        out = []
        for test, text in tests:
            out += [
                f"if {test}:",
                f"    raise invalid({self.err_args(t, f)}, {offset}, {_pystr(text)}, {value})",
            ]
        return out

    def parse_run(
        self, t: TypeDef, tc: TypeCode, group: list[Field], scope: Scope
    ) -> list[str]:
        chars = []
        offsets = []
        size = 0
        for f in group:
            ch, n = self.fmt_char(f)
            chars.append(ch)
            offsets.append(size)
            size += n
        s = self.struct((">" if group[0].type.endian == "be" else "<") + "".join(chars))
        first = group[0]
        targets = ", ".join(f"{scope.base}{f.id}" for f in group)
        lines = [
            f"if pos + {size} > end:",
            f"    need(buf, pos, {size}, end, {self.err_args(t, first)})",
            f"({targets},) = {s}.unpack_from(buf, pos)",
        ]
        for f, rel in zip(group, offsets, strict=True):
            at = f"pos + {rel}" if rel else "pos"
            lines += self.post(t, f, f"{scope.base}{f.id}", at, scope)
        lines.append(f"pos += {size}")
        return lines

    def child_call(self, t: TypeDef, f: Field, name: str, scope: Scope, end: str) -> str:
        child = _type_of(self.spec, name, f.path)
        args = "".join(
            f", {p.id}={expr(a, scope)}"
            for p, a in zip(child.params, f.type.args, strict=True)
        )
        if len(child.params) != len(f.type.args):
            raise ModelError(f"{self.spec.source} {f.path}: {name} takes {len(child.params)}")
        parent = "None"
        if self.uses_parent(child):
            if scope.base == "o.":
                parent = "o"
            else:
                here = [x.id for x in t.params] + [x.id for x in t.seq[: t.seq.index(f)]]
                parent = "Ns.of(" + ", ".join(f"{i}=v_{i}" for i in here) + ")"
        return f"{F.class_name(child.id)}._parse(buf, pos, {end}, {parent}, _root{args})"

    def uses_parent(self, t: TypeDef) -> bool:
        nodes: list[Node] = []
        for f in t.seq:
            nodes += [n for n in (f.cond, f.size, f.repeat_expr, f.repeat_until) if n]
            if f.valid is not None and f.valid.expr is not None:
                nodes.append(f.valid.expr)
            if f.type.switch_on is not None:
                nodes.append(f.type.switch_on)
        return any("_parent" in names_used(n) for n in nodes)

    def parse_one(self, t: TypeDef, f: Field, scope: Scope) -> list[str]:
        target = f"{scope.base}{f.id}"
        ea = self.err_args(t, f)
        ref = f.type
        if f.repeat:
            return self.parse_repeat(t, f, scope)
        lines: list[str] = []
        if f.size is not None:
            lines += [f"_n = {expr(f.size, scope)}", f"need(buf, pos, _n, end, {ea})"]
            stop = "pos + _n"
        elif f.size_eos:
            stop = "end"
        else:
            stop = ""
        sized = bool(stop)
        if ref.kind == "bytes":
            if not sized:
                raise ModelError(f"{self.spec.source} {f.path}: bytes need a size")
            lines.append(f"{target} = bytes(buf[pos:{stop}])")
            lines.append(f"pos = {stop}")
            return lines
        if ref.kind == "user":
            call = self.child_call(t, f, ref.user, scope, stop or "end")
            if sized:
                lines += [f"{target}, _ = {call}", f"pos = {stop}"]
            else:
                lines.append(f"{target}, pos = {call}")
            return lines
        if ref.kind == "switch":
            assert ref.switch_on is not None
            lines.append(f"_sw = {expr(ref.switch_on, scope)}")
            for i, (key, name) in enumerate(ref.cases):
                kw = "if" if i == 0 else "elif"
                call = self.child_call(t, f, name, scope, stop or "end")
                lines.append(f"{kw} _sw == {expr(key, scope)}:")
                if sized:
                    lines.append(f"    {target}, _ = {call}")
                else:
                    lines.append(f"    {target}, pos = {call}")
            if sized:
                lines += ["else:", f"    {target} = bytes(buf[pos:{stop}])", f"pos = {stop}"]
            else:
                lines += ["else:", f"    {target} = None"]
            return lines
        raise ModelError(f"{self.spec.source} {f.path}: cannot parse {ref.kind}")

    def word_item(self, ref: TypeRef) -> tuple[int, int, bool] | None:
        """(bits per word, words per item, big endian) for array-stored items."""
        if ref.kind == "int":
            return ref.width * 8, 1, ref.endian == "be"
        if ref.kind == "user":
            child = self.spec.types[ref.user]
            if child.word_width:
                return child.word_width, child.words, child.endian == "be"
        return None

    def count_line(self, f: Field, scope: Scope, itemsize: str) -> list[str]:
        if f.repeat == "expr":
            assert f.repeat_expr is not None
            return [f"_n = {expr(f.repeat_expr, scope)}"]
        if f.repeat == "eos":
            return [f"_n = (end - pos) // {itemsize}"]
        raise ModelError(f"{self.spec.source} {f.path}: repeat {f.repeat} of words")

    def parse_repeat(self, t: TypeDef, f: Field, scope: Scope) -> list[str]:
        target = f"{scope.base}{f.id}"
        ea = self.err_args(t, f)
        word = self.word_item(f.type)
        if word is not None and f.size is None:
            bits, per, be = word
            size = bits // 8 * per
            tc = F.array_typecode(bits, f.type.kind == "int" and f.type.signed)
            return [
                *self.count_line(f, scope, str(size)),
                f"need(buf, pos, _n * {size}, end, {ea})",
                f"{target} = unpack_words(buf, pos, _n * {per}, {tc!r}, {be})",
                f"pos += _n * {size}",
            ]
        if f.type.kind == "bits":
            w = f.type.width
            if w not in (1, 2, 4):
                raise ModelError(f"{self.spec.source} {f.path}: repeated b{w}")
            lsb = (f.type.endian or t.bit_endian) == "le"
            if f.repeat != "expr":
                raise ModelError(f"{self.spec.source} {f.path}: bit arrays need repeat: expr")
            return [
                *self.count_line(f, scope, "1"),
                f"_nb = (_n * {w} + 7) // 8",
                f"need(buf, pos, _nb, end, {ea})",
                f"{target} = unpack_bits(buf, pos, _n, {w}, {lsb})",
                "pos += _nb",
            ]
        if f.type.kind not in ("user", "bytes"):
            raise ModelError(f"{self.spec.source} {f.path}: cannot repeat {f.type.kind}")
        # a list of structures, each possibly in a sized substream
        item: list[str] = []
        if f.size is not None:
            item += [f"_n = {expr(f.size, scope)}", f"need(buf, pos, _n, end, {ea})"]
            if f.type.kind == "bytes":
                item += ["_item = bytes(buf[pos:pos + _n])"]
            else:
                item += [f"_item, _ = {self.child_call(t, f, f.type.user, scope, 'pos + _n')}"]
            item += ["pos += _n"]
        elif f.type.kind == "user":
            item += [f"_item, pos = {self.child_call(t, f, f.type.user, scope, 'end')}"]
        else:
            raise ModelError(f"{self.spec.source} {f.path}: repeated bytes need a size")
        item.append(f"{target}.append(_item)")
        minimum = 1
        if f.type.kind == "user":
            minimum = max(1, _min_size(self.spec, self.spec.types[f.type.user]))
        lines = [f"{target} = []"]
        if f.repeat == "expr":
            assert f.repeat_expr is not None
            lines += [
                f"_count = {expr(f.repeat_expr, scope)}",
                f"need(buf, pos, _count * {minimum}, end, {ea})",
                "for _ in range(_count):",
                *_indent(item),
            ]
        elif f.repeat == "eos":
            lines += [
                "while pos < end:",
                "    _at = pos",
                *_indent(item),
                "    if pos == _at:",
                f"        raise invalid({ea}, pos, 'progress', 'an empty item')",
            ]
        elif f.repeat == "until":
            assert f.repeat_until is not None
            until_scope = Scope(
                self.spec, t, scope.base, "_root", "_parent", "_item",
                self.spec.types.get(f.type.user), "(pos >= end)",
            )
            lines += [
                "while True:",
                "    _at = pos",
                *_indent(item),
                f"    if {expr(f.repeat_until, until_scope)}:",
                "        break",
                "    if pos == _at:",
                f"        raise invalid({ea}, pos, 'progress', 'an empty item')",
            ]
        return lines

    # build ---------------------------------------------------------------------------------

    def lower_build(self, t: TypeDef, tc: TypeCode) -> None:
        scope = self.build_scope(t)
        lines: list[str] = []
        if t is self.spec.root:
            lines.append("_root = self")
        for group in self.group(t):
            body: list[str] = []
            if self.scalar(group[0]):
                body = self.build_run(t, group, scope)
            else:
                body = self.build_one(t, group[0], scope)
            cond = group[0].cond
            if cond is None:
                lines += body
                continue
            present = [
                f"if self.{f.id} is None:\n"
                f"    raise build_error({self.err_args(t, f)}, "
                f"{'required when ' + _kaitai_text(cond)!r})"
                for f in group
            ]
            absent = " or ".join(f"self.{f.id} is not None" for f in group)
            lines.append(f"if {expr(cond, scope)}:")
            for p in present:
                lines += _indent(p.split("\n"))
            lines += _indent(body)
            lines += [
                f"elif {absent}:",
                f"    raise build_error({self.err_args(t, group[0])}, "
                f"{'must be None unless ' + _kaitai_text(cond)!r})",
            ]
        if not lines:
            lines.append("pass")
        tc.build = lines

    def build_run(self, t: TypeDef, group: list[Field], scope: Scope) -> list[str]:
        chars = []
        checks = []
        for f in group:
            ch, n = self.fmt_char(f)
            chars.append(ch)
            if ch.endswith("s"):
                checks += [
                    f"if len(self.{f.id}) != {n}:",
                    f"    raise build_error({self.err_args(t, f)}, "
                    f"f'needs {n} bytes, has {{len(self.{f.id})}}')",
                ]
        s = self.struct((">" if group[0].type.endian == "be" else "<") + "".join(chars))
        values = ", ".join(f"self.{f.id}" for f in group)
        return [*checks, f"out += {s}.pack({values})"]

    def len_check(self, t: TypeDef, f: Field, got: str, want: str, what: str) -> list[str]:
        return [
            f"_want = {want}",
            f"if {got} != _want:",
            f"    raise build_error({self.err_args(t, f)}, "
            f"f'{what} {{{got}}} disagrees with {{_want}}')",
        ]

    def build_child(self, f: Field, value: str) -> str:
        return f"{value}._build(_b, self, _root)"

    def build_one(self, t: TypeDef, f: Field, scope: Scope) -> list[str]:
        value = f"self.{f.id}"
        ref = f.type
        if f.repeat:
            return self.build_repeat(t, f, scope)
        if ref.kind == "bytes":
            lines = []
            if f.size is not None:
                lines += self.len_check(t, f, f"len({value})", expr(f.size, scope), "length")
            return [*lines, f"out += {value}"]
        if ref.kind in ("user", "switch"):
            lines = []
            if ref.kind == "switch" and f.size is None and not f.size_eos:
                return [f"if {value} is not None:", f"    {value}._build(out, self, _root)"]
            if f.size is None and not f.size_eos:
                return [f"{value}._build(out, self, _root)"]
            lines.append("_b = bytearray()")
            if ref.kind == "switch":
                lines += [
                    f"if isinstance({value}, bytes):",
                    f"    _b += {value}",
                    "else:",
                    f"    {value}._build(_b, self, _root)",
                ]
            else:
                lines.append(f"{value}._build(_b, self, _root)")
            if f.size is not None:
                lines += self.len_check(t, f, "len(_b)", expr(f.size, scope), "length")
            lines.append("out += _b")
            return lines
        raise ModelError(f"{self.spec.source} {f.path}: cannot build {ref.kind}")

    def build_repeat(self, t: TypeDef, f: Field, scope: Scope) -> list[str]:
        value = f"self.{f.id}"
        word = self.word_item(f.type)
        count = expr(f.repeat_expr, scope) if f.repeat_expr is not None else None
        if word is not None and f.size is None:
            _, per, be = word
            lines = []
            if count is not None:
                want = f"{count} * {per}" if per > 1 else count
                lines += self.len_check(t, f, f"len({value})", want, "entries")
            return [*lines, f"out += words_to_bytes({value}, {be})"]
        if f.type.kind == "bits":
            lsb = (f.type.endian or t.bit_endian) == "le"
            lines = []
            if count is not None:
                lines += self.len_check(t, f, f"len({value})", count, "entries")
            return [*lines, f"out += bits_to_bytes({value}, {f.type.width}, {lsb})"]
        lines = []
        if count is not None:
            lines += self.len_check(t, f, f"len({value})", count, "entries")
        lines.append(f"for _item in {value}:")
        if f.size is not None:
            inner = ["_b = bytearray()"]
            add = "_b += _item" if f.type.kind == "bytes" else "_item._build(_b, self, _root)"
            inner.append(add)
            inner += self.len_check(t, f, "len(_b)", expr(f.size, scope), "length")
            inner.append("out += _b")
            lines += _indent(inner)
        else:
            lines.append("    _item._build(out, self, _root)")
        return lines

    # validate ------------------------------------------------------------------------------

    def lower_validate(self, t: TypeDef, tc: TypeCode) -> None:
        scope = self.build_scope(t)
        lines: list[str] = []
        for f in t.seq:
            value = f"self.{f.id}"
            body: list[str] = []
            if f.contents is not None:
                body += [
                    f"if {value} != {f.contents!r}:",
                    f"    raise invalid({self.err_args(t, f)}, None, "
                    f"{repr(f.contents)!r}, {value})",
                ]
            body += self.valid_lines(t, f, value, "None", scope)
            users = _user_types(f)
            if f.repeat and self.word_item(f.type) is not None:
                users = []
            if users and f.repeat:
                body += [f"for _item in {value}:", "    _item.validate()"]
            elif users:
                if f.type.kind == "switch" or f.cond is not None:
                    body += [f"if not isinstance({value}, (bytes, type(None))):",
                             f"    {value}.validate()"]
                else:
                    body.append(f"{value}.validate()")
            if not body:
                continue
            if f.cond is not None or f.type.kind == "switch":
                lines.append(f"if {value} is not None:")
                lines += _indent(body)
            else:
                lines += body
        tc.validate = lines or ["pass"]

    # instances -----------------------------------------------------------------------------

    def lower_instances(self, t: TypeDef, tc: TypeCode) -> None:
        scope = self.build_scope(t)
        for inst in t.instances:
            doc = F.docstring(self.field_doc(inst) + f"\n\nSpec: {self.spec.source} "
                              f"{inst.path}", 4)
            if inst.value is not None:
                rtype = "bool" if _is_bool(inst.value) else "int"
                body = expr(inst.value, scope)
                if rtype == "bool":
                    body = f"bool({body})"
                tc.properties.append(
                    MethodCode(
                        inst.id,
                        [
                            "@property",
                            f"def {inst.id}(self) -> {rtype}:",
                            '    """',
                            *doc,
                            '    """',
                            f"    return {body}",
                        ],
                    )
                )
            else:
                assert inst.read is not None
                tc.readers.append(self.reader(t, inst, doc, scope))

    def reader(self, t: TypeDef, inst: Instance, doc: list[str], scope: Scope) -> MethodCode:
        f = inst.read
        assert f is not None and f.pos is not None
        if f.io not in (None, "_root._io"):
            raise ModelError(f"{self.spec.source} {f.path}: io {f.io} is not supported")
        ann = F.field_annotation(self.spec, f)
        root = "self" if t is self.spec.root else "None"
        ea = self.err_args(t, inst)
        body: list[str] = []
        if f.cond is not None:
            body += [f"if {expr(Unary('not', f.cond), scope)}:", "    return None"]
        body += [f"_pos = {expr(f.pos, scope)}", "f.seek(_pos)"]
        word = self.word_item(f.type) if f.repeat else None
        if word is not None:
            bits, per, be = word
            size = bits // 8 * per
            typecode = F.array_typecode(bits, f.type.kind == "int" and f.type.signed)
            assert f.repeat_expr is not None
            body += [
                f"_n = {expr(f.repeat_expr, scope)}",
                f"_data = read_padded(f, _n * {size})",
                f"return unpack_words(_data, 0, _n * {per}, {typecode!r}, {be})",
            ]
        elif f.type.kind == "bytes" and not f.repeat:
            assert f.size is not None
            body += [
                f"_n = {expr(f.size, scope)}",
                f"need(b'', 0, _n, _n, {ea})",
                "return read_padded(f, _n)",
            ]
        else:
            # parse a synthetic one-field holder at the position, growing the read as needed
            holder = Field(
                id=f.id, path=f.path, doc="", orig_id=None, type=f.type, size=f.size,
                size_eos=f.size_eos, repeat=f.repeat, repeat_expr=f.repeat_expr,
                repeat_until=f.repeat_until,
            )
            rscope = Scope(self.spec, t, "o.", "_root", "_parent", eof="(pos >= end)")
            inner = [
                "o: Any = Ns()",
                "for _k in self.__slots__:",
                "    setattr(o, _k, getattr(self, _k))",
                "pos = 0",
                "end = len(buf)",
                f"_root = {root} if {root} is not None else o",
                "_parent = self",
                *self.parse_one(t, holder, rscope),
                f"return o.{f.id}  # type: ignore[no-any-return]",
            ]
            first = 4096
            if f.size is not None:
                body.append(f"_first = {expr(f.size, scope)}")
            else:
                body.append(f"_first = {first}")
            body += [
                f"def _parse(buf: bytes) -> {ann.replace(' | None', '')}:",
                *_indent(inner),
                "return read_growing(f, _parse, _first, pad_eof=True)",
            ]
        ann_ret = ann
        return MethodCode(
            f"read_{inst.id}",
            [
                f"def read_{inst.id}(self, f: BinaryIO) -> {ann_ret}:",
                '    """',
                *doc,
                "",
                "    Reads from the whole image file ``f`` at the instance's position.",
                '    """',
                *_indent(body),
            ],
        )


def pass_lower(spec: Spec, code: Code) -> None:
    low = _Lower(spec, code)
    code.module_doc = F.docstring(f"{spec.title}.\n\n{spec.doc}", 0)
    for enum in spec.enums.values():
        members = []
        for m in enum.members:
            value = (1 << m.value) if enum.as_flags else m.value
            mdoc = m.doc + (f" (QEMU: {m.orig_id})" if m.orig_id else "")
            members.append((F.enum_member(m.id), f"{value:#x}", F.docstring(mdoc, 4)))
        labels = [(F.enum_member(m.id), m.label) for m in enum.members if m.label]
        code.enums.append(
            EnumCode(
                F.class_name(enum.id),
                "IntFlag" if enum.as_flags else "IntEnum",
                F.docstring(f"{enum.id} ({spec.source} {enum.path})", 4),
                members,
                labels,
                f"{F.const_name(enum.id)}_LABELS" if labels else "",
            )
        )
    for t in _all_types(spec):
        code.types.append(low.lower(t))
    code.exports = sorted(
        [e.cls for e in code.enums]
        + [e.labels_name for e in code.enums if e.labels_name]
        + [t.cls for t in code.types]
    )


# --------------------------------------------------------------------------------------------
# Lowering to construct


def _construct_leaf(spec: Spec, t: TypeDef, f: Field, scope: Scope) -> str:
    ref = f.type
    if f.contents is not None:
        return f"Const({f.contents!r})"
    if ref.kind == "int":
        return F.construct_int(ref)
    if ref.kind == "bytes":
        if f.size_eos:
            return "GreedyBytes"
        assert f.size is not None
        return f"Bytes(lambda ctx: {expr(f.size, scope)})"
    if ref.kind == "user":
        if ref.args:
            raise ModelError(f"{spec.source} {f.path}: construct cannot pass parameters")
        return f"LazyBound(lambda: {F.class_name(ref.user)})"
    if ref.kind == "switch":
        assert ref.switch_on is not None
        cases = ", ".join(
            f"{expr(k, scope)}: LazyBound(lambda: {F.class_name(n)})" for k, n in ref.cases
        )
        default = "GreedyBytes" if (f.size is not None or f.size_eos) else "Pass"
        return f"Switch(lambda ctx: {expr(ref.switch_on, scope)}, {{{cases}}}, default={default})"
    if ref.kind == "bits":
        w = ref.width
        lsb = (ref.endian or t.bit_endian) == "le"
        if w == 1:
            return "Flag"
        return f"ExprAdapter(BitsInteger({w}), _rev{w}, _rev{w})" if lsb else f"BitsInteger({w})"
    raise ModelError(f"{spec.source} {f.path}: construct cannot express {ref.kind}")


def _construct_field(spec: Spec, t: TypeDef, f: Field, scope: Scope) -> str:
    leaf = _construct_leaf(spec, t, f, scope)
    if f.repeat and f.type.kind == "bits":
        assert f.repeat_expr is not None
        leaf = (
            f"BitsSwapped(Bitwise(Array(lambda ctx: {expr(f.repeat_expr, scope)}, {leaf})))"
        )
        return leaf if f.cond is None else f"If(lambda ctx: {expr(f.cond, scope)}, {leaf})"
    if f.size is not None and f.type.kind != "bytes":
        leaf = f"FixedSized(lambda ctx: {expr(f.size, scope)}, {leaf})"
    if f.repeat == "expr":
        assert f.repeat_expr is not None
        leaf = f"Array(lambda ctx: {expr(f.repeat_expr, scope)}, {leaf})"
    elif f.repeat == "eos":
        leaf = f"GreedyRange({leaf})"
    elif f.repeat == "until":
        assert f.repeat_until is not None
        until = Scope(
            spec, t, "ctx.", "ctx._root", "ctx._", "obj",
            spec.types.get(f.type.user), "_eof(ctx)", construct=True,
        )
        leaf = f"RepeatUntil(lambda obj, lst, ctx: {expr(f.repeat_until, until)}, {leaf})"
    if f.cond is not None:
        leaf = f"If(lambda ctx: {expr(f.cond, scope)}, {leaf})"
    return leaf


def pass_lower_construct(spec: Spec, code: Code) -> None:
    for tc in code.types:
        t = tc.typedef
        scope = Scope(spec, t, "ctx.", "ctx._root", "ctx._", eof="_eof(ctx)", construct=True)
        if t.packed_width:
            fields = [
                f'"{f.id}" / ' + ("Flag" if f.type.width == 1 else f"BitsInteger({f.type.width})")
                for f in t.seq
            ]
            lsb_first = t.bit_endian == "le"
            if lsb_first:
                fields.reverse()
            fields += [
                f'"{i.id}" / Computed(lambda ctx: {expr(i.value, scope)})'
                for i in t.instances
                if i.value is not None
            ]
            if lsb_first:
                body = f"ByteSwapped(BitStruct({', '.join(fields)}))"
            else:
                body = f"BitStruct({', '.join(fields)})"
            tc.construct = [f"{tc.cls}: Any = {body}"]
            continue
        items = [f'"{f.id}" / {_construct_field(spec, t, f, scope)}' for f in t.seq]
        for inst in t.instances:
            if inst.value is not None:
                items.append(f'"{inst.id}" / Computed(lambda ctx: {expr(inst.value, scope)})')
            elif inst.read is not None and inst.read.pos is not None:
                pos = inst.read.pos
                r = inst.read
                leaf = _construct_field(spec, t, Field(
                    id=r.id, path=r.path, doc="", orig_id=None, type=r.type, size=r.size,
                    size_eos=r.size_eos, repeat=r.repeat, repeat_expr=r.repeat_expr,
                    repeat_until=r.repeat_until,
                ), scope)
                stream = ", stream=lambda ctx: ctx._root._io" if r.io else ""
                ptr = f"Pointer(lambda ctx: {expr(pos, scope)}, {leaf}{stream})"
                if r.cond is not None:
                    ptr = f"If(lambda ctx: {expr(r.cond, scope)}, {ptr})"
                items.append(f'"{inst.id}" / {ptr}')
        tc.construct = [f"{tc.cls}: Any = Struct(", *[f"    {i}," for i in items], ")"]


# --------------------------------------------------------------------------------------------
# Registry

ModelPass = Callable[[Spec], None]
CodePass = Callable[[Spec, Code], None]

PASSES: list[tuple[str, ModelPass]] = [
    ("check_ids", pass_check_ids),
    ("resolve_parents", pass_resolve_parents),
    ("mark_flags", pass_mark_flags),
    ("classify_packed", pass_classify_packed),
    ("classify_words", pass_classify_words),
]

CODE_PASSES: list[tuple[str, CodePass]] = [
    ("lower", pass_lower),
    ("lower_construct", pass_lower_construct),
]


def run_passes(spec: Spec) -> Code:
    for name, model_pass in PASSES:
        try:
            model_pass(spec)
        except ExprError as exc:
            raise ModelError(f"{spec.source}: pass {name}: {exc}") from exc
    code = Code(spec)
    for name, code_pass in CODE_PASSES:
        try:
            code_pass(spec, code)
        except ExprError as exc:
            raise ModelError(f"{spec.source}: pass {name}: {exc}") from exc
    return code
