"""What ``diskspec explain`` shows: a tree of structures and fields with their file offsets.

Values are the attributes of the generated classes (diskspec.generated); where each field lies
and what it means comes from the same model the classes were generated from (the .ksy specs
through diskspec.generator.model), so the explanation cannot disagree with the parser.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..generator import filters as F
from ..generator.expr import Attr, BinOp, Bool, Cond, EnumLit, Name, Node, Num, Unary
from ..generator.model import Field, Spec, TypeDef, load_spec
from ..generator.passes import run_passes

__all__ = ["Item", "Walker", "first_line", "human_size", "spec_of"]

# the largest number of array items shown one by one; the rest is counted
SHOWN_ITEMS = 8
# the most bytes of one field shown in hex
SHOWN_BYTES = 16

Read = Callable[[int, int], bytes]  # (offset, length) -> bytes of the file


@dataclass(slots=True)
class Item:
    """One structure or field: where it lies, its bytes, its value and what it means."""

    name: str
    offset: int
    size: int
    value: Any = None
    type: str = ""  # generated class (structures) or Kaitai type (fields)
    doc: str = ""
    note: str = ""  # what the runtime concludes
    spec_path: str = ""
    attr: str = ""  # the generated class attribute the value comes from
    raw: bytes = b""
    children: list[Item] = field(default_factory=list)
    bits: str = ""  # for a field of a bit-packed entry: "bit 63", "bits 9..55"

    def find(self, name: str) -> Item | None:
        return next((c for c in self.children if c.name == name), None)

    def walk(self) -> Sequence[Item]:
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return out


def first_line(text: str) -> str:
    text = " ".join(text.split())
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


def human_size(n: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20),
                        ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


@cache
def spec_of(name: str) -> Spec:
    """The model of one packaged spec, after the passes (packed widths, flag enums)."""
    path = Path(str(resources.files("diskspec.specs") / f"{name}.ksy"))
    spec = load_spec(path)
    run_passes(spec)
    return spec


def _type_text(f: Field) -> str:
    ref = f.type
    if ref.kind == "int":
        return f"{'s' if ref.signed else 'u'}{ref.width}"
    if ref.kind == "bits":
        return f"b{ref.width}"
    if ref.kind in ("user", "switch"):
        return ref.user or "switch"
    return "bytes"


def show(value: Any) -> str:
    """A value as explain prints it: enums and flags by name, bytes as text when they are."""
    if isinstance(value, IntFlag):
        names = [m.name.lower() for m in type(value) if m in value and m.name]
        known = 0
        for m in type(value):
            known |= int(m)
        unknown = int(value) & ~known
        parts = names + ([f"unknown bits {unknown:#x}"] if unknown else [])
        return f"{int(value):#x}" + (f" ({', '.join(parts)})" if parts else "")
    if isinstance(value, IntEnum):
        return f"{int(value)} ({value.name.lower()})"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value} ({value:#x})" if value > 9 else str(value)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).rstrip(b"\0")
        if not text:
            return f"{len(value)} zero bytes" if value else "empty"
        if all(32 <= b < 127 for b in text):
            return repr(text.decode("ascii"))
        return bytes(value[:SHOWN_BYTES]).hex(" ") + (" …" if len(value) > SHOWN_BYTES else "")
    if isinstance(value, array):
        return f"{len(value)} entries"
    if isinstance(value, list):
        return f"{len(value)} items"
    return "" if value is None else type(value).__name__


class Walker:
    """Turns a parsed generated object into Items, field by field, using the spec's model."""

    def __init__(self, spec_name: str, module: Any, read: Read) -> None:
        self.spec = spec_of(spec_name)
        self.module = module
        self.read = read
        self.notes: dict[tuple[str, str], Callable[[Any, Any], str]] = {}

    def typedef(self, ident: str) -> TypeDef:
        return self.spec.root if ident == self.spec.root.id else self.spec.types[ident]

    def structure(self, ident: str, obj: Any, offset: int, name: str | None = None,
                  parents: tuple[Any, ...] = ()) -> Item:
        t = self.typedef(ident)
        cls = F.class_name(t.id)
        item = Item(name or t.id, offset, 0, obj, f"{self.spec.id}.{cls}",
                    first_line(t.doc), spec_path=t.path,
                    attr=f"diskspec.generated.{self.spec.id}.{cls}")
        at = offset
        for f in t.seq:
            value = getattr(obj, F.attr_name(f.id))
            if value is None:  # absent: a false condition, or a switch without a case
                continue
            child = self.field(t, f, obj, value, at, (obj, *parents))
            item.children.append(child)
            at += child.size
        item.size = at - offset
        item.raw = self.read(offset, min(item.size, SHOWN_BYTES))
        return item

    def field(self, t: TypeDef, f: Field, obj: Any, value: Any, at: int,
              scope: tuple[Any, ...]) -> Item:
        cls = F.class_name(t.id)
        item = Item(f.id, at, 0, value, _type_text(f), first_line(f.doc), spec_path=f.path,
                    attr=f"diskspec.generated.{self.spec.id}.{cls}.{F.attr_name(f.id)}")
        declared = self.eval(f.size, scope) if f.size is not None else None
        ref = f.type
        if f.repeat:
            item.size = self.repeat(f, value, at, item, scope)
            if ref.kind == "user":
                kind = "array" if isinstance(value, array) else "list"
                item.type = f"{self.spec.id}.{F.class_name(ref.user)} {kind}"
        elif ref.kind in ("user", "switch") and not isinstance(value, (bytes, bytearray)):
            ident = ref.user or self.type_id(value)
            sub = self.structure(ident, value, at, f.id, scope)
            item.children = sub.children
            item.type = sub.type
            item.size = sub.size
        elif ref.kind == "int":
            item.size = ref.width
        elif f.contents is not None:
            item.size = len(f.contents)
        else:
            item.size = len(value)
        if declared is not None:
            item.size = declared
        item.raw = self.read(at, min(item.size, SHOWN_BYTES))
        note = self.notes.get((t.id, f.id))
        if note is not None:
            item.note = note(scope[0], value)
        return item

    def type_id(self, value: Any) -> str:
        name = type(value).__name__
        return next(t.id for t in self.spec.types.values() if F.class_name(t.id) == name)

    def repeat(self, f: Field, value: Any, at: int, item: Item, scope: tuple[Any, ...]) -> int:
        ref = f.type
        if isinstance(value, array):
            if ref.kind == "user":
                width = self.spec.types[ref.user].word_width * self.spec.types[ref.user].words
            elif ref.kind == "bits":
                width = ref.width
            else:
                width = ref.width * 8
            for i, word in enumerate(value[:SHOWN_ITEMS]):
                offset = at + i * width // 8
                if ref.kind == "user":
                    item.children.append(self.word(ref.user, int(word), offset, f"{f.id}[{i}]"))
                else:
                    item.children.append(Item(f"{f.id}[{i}]", offset, max(width // 8, 1),
                                              int(word), _type_text(f)))
            return (len(value) * width + 7) // 8
        size = 0
        for i, element in enumerate(value):
            sub = self.structure(ref.user, element, at + size, f"{f.id}[{i}]", scope)
            if i < SHOWN_ITEMS * 8:
                item.children.append(sub)
            size += sub.size
        return size

    def class_of(self, ident: str) -> str:
        return F.class_name(ident)

    def word_size(self, ident: str) -> int:
        t = self.spec.types[ident]
        return t.word_width * t.words // 8

    def word(self, ident: str, raw: int, offset: int, name: str) -> Item:
        """A bit-packed entry (an L1 or L2 entry): its fields from the class's masks."""
        t = self.spec.types[ident]
        cls_name = F.class_name(ident)
        cls = getattr(self.module, cls_name)
        size = self.word_size(ident)
        item = Item(name, offset, size, raw, f"{self.spec.id}.{cls_name}", first_line(t.doc),
                    spec_path=t.path, attr=f"diskspec.generated.{self.spec.id}.{cls_name}",
                    raw=self.read(offset, size))
        if t.words > 1:
            return item
        obj = cls.from_raw(raw)
        for f in t.seq:
            lo = getattr(cls, f"{F.const_name(f.id)}_SHIFT")
            hi = lo + f.type.width - 1
            item.children.append(
                Item(f.id, offset, size, getattr(obj, F.attr_name(f.id)), f"b{f.type.width}",
                     first_line(f.doc), spec_path=f.path,
                     attr=f"diskspec.generated.{self.spec.id}.{cls_name}.{F.attr_name(f.id)}",
                     bits=f"bit {lo}" if lo == hi else f"bits {lo}..{hi}")
            )
        return item

    # expressions (sizes) -------------------------------------------------------------------

    def eval(self, node: Node, scope: tuple[Any, ...]) -> int:
        return int(self._eval(node, scope))

    def _eval(self, node: Node, scope: tuple[Any, ...]) -> Any:
        match node:
            case Num(value) | Bool(value):
                return value
            case Name("_parent"):
                return scope[1] if len(scope) > 1 else None
            case Name("_root"):
                return scope[-1]
            case Name(ident):
                return getattr(scope[0], F.attr_name(ident))
            case Attr(base, "to_i"):
                return int(self._eval(base, scope))
            case Attr(base, attr):
                return getattr(self._eval(base, scope), F.attr_name(attr))
            case EnumLit(enum, member):
                m = next(m for m in self.spec.enums[enum].members if m.id == member)
                return m.value
            case Unary("not", x):
                return not self._eval(x, scope)
            case Unary("-", x):
                return -self._eval(x, scope)
            case Unary("~", x):
                return ~self._eval(x, scope)
            case Cond(test, then, other):
                return self._eval(then if self._eval(test, scope) else other, scope)
            case BinOp(op, a, b):
                return _BINOPS[op](self._eval(a, scope), self._eval(b, scope))
        raise ValueError(f"explain cannot evaluate {node}")


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "<<": lambda a, b: a << b,
    ">>": lambda a, b: a >> b,
    "&": lambda a, b: a & b,
    "|": lambda a, b: a | b,
    "^": lambda a, b: a ^ b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "and": lambda a, b: a and b,
    "or": lambda a, b: a or b,
}
