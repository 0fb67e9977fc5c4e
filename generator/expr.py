"""Kaitai Struct expressions: a small parser to an AST, and rendering to Python.

The Kaitai expression language follows Python's grammar and precedence, with ``a ? b : c`` for
the conditional, ``enum::member`` literals, ``.to_i`` and the special names ``_``, ``_io``,
``_root`` and ``_parent``. Only the subset the diskspec specs use is accepted; anything else is
a :class:`ExprError` naming the expression.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Attr",
    "BinOp",
    "Cond",
    "EnumLit",
    "ExprError",
    "Name",
    "Node",
    "Num",
    "Unary",
    "names_used",
    "parse_expr",
]


class ExprError(ValueError):
    """An expression the generator cannot parse or translate."""


@dataclass(frozen=True, slots=True)
class Num:
    value: int


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool


@dataclass(frozen=True, slots=True)
class Name:
    ident: str


@dataclass(frozen=True, slots=True)
class Attr:
    base: Node
    attr: str


@dataclass(frozen=True, slots=True)
class EnumLit:
    enum: str
    member: str


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "-", "~", "not"
    operand: Node


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Cond:
    test: Node
    then: Node
    other: Node


Node = Num | Bool | Name | Attr | EnumLit | Unary | BinOp | Cond

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>0x[0-9a-fA-F_]+|0b[01_]+|0o[0-7_]+|[0-9][0-9_]*)
      | (?P<enum>[a-z_][a-z0-9_]*::[a-z_][a-z0-9_]*)
      | (?P<name>[a-zA-Z_][a-zA-Z0-9_]*)
      | (?P<op><<|>>|<=|>=|==|!=|[-+*/%&|^~<>()?:.])
    )""",
    re.VERBOSE,
)

# Binary operators by precedence, lowest first (Python's order).
_LEVELS: list[tuple[str, ...]] = [
    ("or",),
    ("and",),
    ("==", "!=", "<", ">", "<=", ">="),
    ("|",),
    ("^",),
    ("&",),
    ("<<", ">>"),
    ("+", "-"),
    ("*", "/", "%"),
]


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ExprError(f"cannot parse expression {text!r} at column {pos}")
        tokens.append(m.group(m.lastgroup or "op"))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ExprError(f"expected {expected or 'more'} in expression {self.text!r}")
        self.i += 1
        return tok

    def parse(self) -> Node:
        node = self.cond()
        if self.peek() is not None:
            raise ExprError(f"unexpected {self.peek()!r} in expression {self.text!r}")
        return node

    def cond(self) -> Node:
        test = self.binary(0)
        if self.peek() == "?":
            self.take("?")
            then = self.cond()
            self.take(":")
            other = self.cond()
            return Cond(test, then, other)
        return test

    def binary(self, level: int) -> Node:
        if level == len(_LEVELS):
            return self.unary()
        if _LEVELS[level] == ("and",):
            left = self.not_test()
            while self.peek() == "and":
                self.take()
                left = BinOp("and", left, self.not_test())
            return left
        left = self.binary(level + 1)
        while self.peek() in _LEVELS[level]:
            op = self.take()
            left = BinOp(op, left, self.binary(level + 1))
        return left

    def not_test(self) -> Node:
        if self.peek() == "not":
            self.take()
            return Unary("not", self.not_test())
        return self.binary(2)

    def unary(self) -> Node:
        if self.peek() in ("-", "~"):
            op = self.take()
            return Unary(op, self.unary())
        return self.postfix()

    def postfix(self) -> Node:
        node = self.atom()
        while self.peek() == ".":
            self.take()
            node = Attr(node, self.take())
        return node

    def atom(self) -> Node:
        tok = self.take()
        if tok == "(":
            node = self.cond()
            self.take(")")
            return node
        if tok[0].isdigit():
            return Num(int(tok.replace("_", ""), 0))
        if "::" in tok:
            enum, member = tok.split("::")
            return EnumLit(enum, member)
        if tok in ("true", "false"):
            return Bool(tok == "true")
        if re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", tok):
            return Name(tok)
        raise ExprError(f"unexpected {tok!r} in expression {self.text!r}")


def parse_expr(text: str | int | bool) -> Node:
    """Parse a Kaitai expression (YAML may already have made it an int or a bool)."""
    if isinstance(text, bool):
        return Bool(text)
    if isinstance(text, int):
        return Num(text)
    return _Parser(str(text)).parse()


def names_used(node: Node) -> set[str]:
    """The first identifiers of every name path in the expression."""
    found: set[str] = set()

    def walk(n: Node) -> None:
        match n:
            case Name(ident):
                found.add(ident)
            case Attr(base, _):
                walk(base)
            case Unary(_, operand):
                walk(operand)
            case BinOp(_, left, right):
                walk(left)
                walk(right)
            case Cond(test, then, other):
                walk(test)
                walk(then)
                walk(other)
            case _:
                pass

    walk(node)
    return found


_PY_OPS = {"/": "//"}

# Python precedence of each rendered form; higher binds tighter.
_PREC = {
    "or": 1, "and": 2, "not": 3,
    "==": 4, "!=": 4, "<": 4, ">": 4, "<=": 4, ">=": 4,
    "|": 5, "^": 6, "&": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10,
}
_ATOM = 12
_NEGATE = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}


def render(node: Node, name: Callable[[Node], str | None], enum: Callable[[EnumLit], str]) -> str:
    """Render ``node`` as Python source with only the parentheses Python needs.

    ``name`` is asked for every Name and Attr node and returns Python source for the whole
    path (parenthesized by the caller when it is not a single atom).
    """

    def wrap(part: tuple[str, int], need: int) -> str:
        code, prec = part
        return f"({code})" if prec < need else code

    def go(n: Node) -> tuple[str, int]:
        match n:
            case Num(value):
                return (hex(value) if value > 255 else str(value)), _ATOM
            case Bool(value):
                return ("True" if value else "False"), _ATOM
            case EnumLit():
                return enum(n), _ATOM
            case Attr(base, "to_i") if isinstance(base, EnumLit):
                code = enum(base)
                return (code if code[:1].isdigit() else f"int({code})"), _ATOM
            case Attr(base, "to_i"):
                return f"int({go(base)[0]})", _ATOM
            case Name() | Attr():
                got = name(n)
                if got is None:
                    raise ExprError(f"cannot resolve {n}")
                return got, _ATOM
            case Unary("not", BinOp(op, left, right)) if op in _NEGATE:
                return go(BinOp(_NEGATE[op], left, right))
            case Unary("not", operand):
                return f"not {wrap(go(operand), 3)}", 3
            case Unary(op, operand):
                return f"{op}{wrap(go(operand), 11)}", 11
            case BinOp(op, left, right):
                prec = _PREC[op]
                # comparisons do not chain; "and" inside "or" is parenthesized for clarity
                left_need = prec + 1 if prec == 4 else (3 if op == "or" else prec)
                right_need = 3 if op == "or" else prec + 1
                sym = _PY_OPS.get(op, op)
                return f"{wrap(go(left), left_need)} {sym} {wrap(go(right), right_need)}", prec
            case Cond(test, then, other):
                return f"{wrap(go(then), 1)} if {wrap(go(test), 1)} else {wrap(go(other), 0)}", 0
        raise ExprError(f"cannot render {n}")

    return go(node)[0]
