"""All naming and type spelling of the generator, in one place (templates only loop)."""

from __future__ import annotations

import re

from .model import EnumDef, Field, Spec, TypeDef, TypeRef

__all__ = [
    "array_typecode",
    "class_name",
    "const_name",
    "construct_int",
    "docstring",
    "enum_member",
    "field_annotation",
    "item_annotation",
    "struct_char",
]

_KEYWORDS = {"type", "id", "len", "bytes", "int", "str", "list", "format", "hash", "filter"}


def class_name(ident: str) -> str:
    """``l2_entry_extended`` -> ``L2EntryExtended``; ``qcow2`` -> ``Qcow2``."""
    return "".join(part[:1].upper() + part[1:] for part in ident.split("_") if part)


def const_name(ident: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", ident.upper())


def enum_member(ident: str) -> str:
    name = const_name(ident)
    return name if not name[:1].isdigit() else f"V_{name}"


def struct_char(width: int, signed: bool) -> str:
    char = {1: "b", 2: "h", 4: "i", 8: "q"}[width]
    return char if signed else char.upper()


def array_typecode(width_bits: int, signed: bool = False) -> str:
    return struct_char(width_bits // 8, signed)


def construct_int(ref: TypeRef) -> str:
    sign = "s" if ref.signed else "u"
    return f"Int{ref.width * 8}{sign}{'b' if ref.endian == 'be' else 'l'}"


def enum_class(enum: EnumDef) -> str:
    return class_name(enum.id)


def is_word_item(spec: Spec, ref: TypeRef) -> bool:
    """An item a table stores as a plain array of integers."""
    if ref.kind == "int":
        return True
    return ref.kind == "user" and spec.types[ref.user].word_width > 0


def item_annotation(spec: Spec, f: Field) -> str:
    """The Python type of one (unrepeated) value of the field."""
    ref = f.type
    if ref.kind == "int":
        if f.flags:
            return class_name(f.flags)
        if f.enum:
            return f"{class_name(f.enum)} | int"
        return "int"
    if ref.kind == "bits":
        return "bool" if ref.width == 1 else "int"
    if ref.kind == "bool":
        return "bool"
    if ref.kind == "bytes":
        return "bytes"
    if ref.kind == "user":
        return class_name(spec.types[ref.user].id)
    if ref.kind == "switch":
        names = [class_name(t) for _, t in ref.cases]
        tail = "bytes" if (f.size is not None or f.size_eos) else "None"
        return " | ".join([*dict.fromkeys(names), tail])
    raise ValueError(ref.kind)


def field_annotation(spec: Spec, f: Field) -> str:
    if f.repeat:
        if is_word_item(spec, f.type) or (f.type.kind == "bits" and f.type.width < 8):
            base = "array[int]"
        else:
            base = f"list[{item_annotation(spec, f)}]"
    else:
        base = item_annotation(spec, f)
    if f.cond is not None and "None" not in base.split(" | "):
        return f"{base} | None"
    return base


def param_annotation(ref: TypeRef) -> str:
    return "bool" if ref.kind == "bool" else "int"


def attr_name(ident: str) -> str:
    return f"{ident}_" if ident in _KEYWORDS else ident


def docstring(text: str, indent: int) -> list[str]:
    """A docstring body as lines (no quotes), safe to embed in triple quotes."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"').strip()
    pad = " " * indent
    return [f"{pad}{line}".rstrip() for line in text.splitlines()] if text else []


def type_title(t: TypeDef) -> str:
    return class_name(t.id)
