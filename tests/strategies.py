"""Hypothesis strategies derived from the specs' model, for every generated structure.

A strategy draws a structure field by field in spec order, evaluating the spec's own
conditions, sizes and counts (translated by the generator) against what it drew so far, and
honouring ``valid`` constraints. Length and count fields that a later field's size or repeat
count refers to are filled in from what was drawn for that later field.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from diskspec.generator.expr import BinOp, Name, Node, Num
from diskspec.generator.model import Field, Spec, TypeDef
from diskspec.generator.passes import Scope, expr
from diskspec.structbase import Ns

__all__ = ["PARAM_RANGES", "StructDrawer"]

PARAM_RANGES: dict[str, tuple[int, int]] = {
    "cluster_bits": (9, 16),
    "refcount_order": (0, 6),
    "l2_bits": (6, 13),
}

_BIG = 1 << 16  # tables larger than this many bytes are drawn mostly zero


@dataclass
class _Ctx:
    o: Any
    parent: Any
    root: Any
    budget: int | None = None  # bytes available in a sized substream
    bound: dict[str, str] = field(default_factory=dict)  # length field -> field it measures


def _conjuncts(node: Node) -> list[Node]:
    if isinstance(node, BinOp) and node.op == "and":
        return _conjuncts(node.left) + _conjuncts(node.right)
    return [node]


def _expr_bounds(node: Node, lo: int, hi: int) -> tuple[int, int]:
    """Tighten [lo, hi] by top-level ``_ >= N`` / ``_ <= N`` terms of a valid expression."""
    for term in _conjuncts(node):
        if isinstance(term, BinOp) and term.left == Name("_") and isinstance(term.right, Num):
            n = term.right.value
            if term.op == ">=":
                lo = max(lo, n)
            elif term.op == ">":
                lo = max(lo, n + 1)
            elif term.op == "<=":
                hi = min(hi, n)
            elif term.op == "<":
                hi = min(hi, n - 1)
    return lo, hi


class StructDrawer:
    """Draws instances of the generated classes of one spec."""

    def __init__(
        self, spec: Spec, module: ModuleType, overrides: dict[tuple[str, str], Any] | None = None
    ) -> None:
        self.spec = spec
        self.module = module
        self.reached: set[str] = set()
        self.overrides = overrides or {}  # (type id, field id) -> value to use

    # expressions ------------------------------------------------------------------------

    def eval(
        self, node: Node, t: TypeDef, ctx: _Ctx, item: Any = None, item_type: TypeDef | None = None
    ) -> Any:
        scope = Scope(self.spec, t, "o.", "_root", "_parent", "_item", item_type, "False")
        code = expr(node, scope)
        env = {"o": ctx.o, "_parent": ctx.parent, "_root": ctx.root, "_item": item}
        return eval(code, vars(self.module), env)

    def cls(self, t: TypeDef) -> Any:
        return getattr(self.module, "".join(p[:1].upper() + p[1:] for p in t.id.split("_")))

    # drawing ----------------------------------------------------------------------------

    def type_strategy(self, t: TypeDef, parent: Any = None) -> st.SearchStrategy[Any]:
        @st.composite
        def draw_it(draw: st.DrawFn) -> Any:
            return self.draw_type(draw, t, parent, None, None)

        return draw_it()

    def _bindings(self, t: TypeDef) -> dict[str, str]:
        """Unconstrained sibling int fields that only measure a later field (size or count)."""
        ints = {f.id for f in t.seq if f.type.kind == "int" and f.valid is None}
        out: dict[str, str] = {}
        for f in t.seq:
            node = f.repeat_expr if f.repeat else f.size
            if isinstance(node, Name) and node.ident in ints:
                out[node.ident] = f.id
        return out

    def draw_type(
        self, draw: st.DrawFn, t: TypeDef, parent: Any, root: Any, budget: int | None
    ) -> Any:
        self.reached.add(t.id)
        o = Ns()
        ctx = _Ctx(o, parent, root if root is not None else o, budget, self._bindings(t))
        for p in t.params:
            if p.type.kind == "bool":
                setattr(o, p.id, draw(st.booleans()))
            else:
                lo, hi = PARAM_RANGES[p.id]
                setattr(o, p.id, draw(st.integers(lo, hi)))
        tail: Field | None = None
        for f in t.seq:
            if f.cond is not None and not self.eval(f.cond, t, ctx):
                setattr(o, f.id, None)
                continue
            if f.id in ctx.bound:
                setattr(o, f.id, 0)  # filled in when the measured field is drawn
                continue
            if f.size_eos and f is t.seq[-1] and budget is not None:
                tail = f
                setattr(o, f.id, b"")
                continue
            if (t.id, f.id) in self.overrides:
                setattr(o, f.id, self.overrides[(t.id, f.id)])
            else:
                setattr(o, f.id, self.draw_field(draw, t, f, ctx))
            for length, target in ctx.bound.items():
                if target == f.id:
                    setattr(o, length, self.measure(t, f, ctx))
        obj = self.make(t, o)
        if tail is not None and budget is not None:
            used = len(obj.build(_parent=parent))
            assume(used <= budget)
            setattr(o, tail.id, draw(self.blob(budget - used)))
            obj = self.make(t, o)
        return obj

    def make(self, t: TypeDef, o: Any) -> Any:
        names = [p.id for p in t.params] + [f.id for f in t.seq]
        return self.cls(t)(**{n: getattr(o, n) for n in names})

    def measure(self, t: TypeDef, f: Field, ctx: _Ctx) -> int:
        value = getattr(ctx.o, f.id)
        if f.repeat:
            per = 1
            if f.type.kind == "user":
                per = max(1, self.spec.types[f.type.user].words)
            return len(value) // per if isinstance(value, array) else len(value)
        if isinstance(value, bytes):
            return len(value)
        return len(value.build(_parent=ctx.o))

    def blob(self, n: int) -> st.SearchStrategy[bytes]:
        if n > _BIG:
            return st.just(bytes(n))
        return st.binary(min_size=n, max_size=n)

    def draw_int(self, draw: st.DrawFn, t: TypeDef, f: Field, ctx: _Ctx) -> int:
        ref = f.type
        bits = ref.width * 8
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ref.signed else (0, (1 << bits) - 1)
        v = f.valid
        if v is not None and v.any_of is not None:
            return int(draw(st.sampled_from([self.eval(x, t, ctx) for x in v.any_of])))
        if v is not None and v.eq is not None:
            return int(self.eval(v.eq, t, ctx))
        if v is not None and v.min is not None:
            lo = max(lo, int(self.eval(v.min, t, ctx)))
        if v is not None and v.max is not None:
            hi = min(hi, int(self.eval(v.max, t, ctx)))
        if v is not None and v.expr is not None:
            lo, hi = _expr_bounds(v.expr, lo, hi)
        choices: list[st.SearchStrategy[int]] = [st.integers(lo, hi)]
        small_hi = min(hi, lo + 64)
        choices.append(st.integers(lo, small_hi))
        # aligned sizes and offsets, as formats like them
        typical = [x for x in range(0, 4097, 8) if lo <= x <= hi]
        if typical:
            choices.append(st.sampled_from(typical))
        if f.enum:
            members = [m.value for m in self.spec.enums[f.enum].members]
            choices.append(st.sampled_from([m for m in members if lo <= m <= hi] or [lo]))
        value = draw(st.one_of(*choices))
        if v is not None and v.expr is not None:
            assume(self.eval(v.expr, t, ctx, item=value))
        return int(value)

    def draw_field(self, draw: st.DrawFn, t: TypeDef, f: Field, ctx: _Ctx) -> Any:
        if f.contents is not None:
            return f.contents
        if f.repeat:
            return self.draw_repeat(draw, t, f, ctx)
        return self.draw_one(draw, t, f, ctx)

    def size_of(self, t: TypeDef, f: Field, ctx: _Ctx) -> int | None:
        if f.size is None:
            return None
        if isinstance(f.size, Name) and f.size.ident in ctx.bound:
            return None
        n = int(self.eval(f.size, t, ctx))
        assume(0 <= n <= 1 << 22)
        return n

    def draw_one(self, draw: st.DrawFn, t: TypeDef, f: Field, ctx: _Ctx) -> Any:
        ref = f.type
        if ref.kind == "int":
            return self.draw_int(draw, t, f, ctx)
        if ref.kind == "bits":
            if ref.width == 1:
                return draw(st.booleans())
            return draw(st.integers(0, (1 << ref.width) - 1))
        size = self.size_of(t, f, ctx)
        if ref.kind == "bytes":
            if size is None:
                return draw(st.binary(max_size=48))
            return draw(self.blob(size))
        names: list[str] = []
        if ref.kind == "user":
            names = [ref.user]
        elif ref.kind == "switch":
            assert ref.switch_on is not None
            key = self.eval(ref.switch_on, t, ctx)
            names = [n for k, n in ref.cases if self.eval(k, t, ctx) == key]
            if not names:
                return (
                    draw(self.blob(size))
                    if size is not None
                    else (draw(st.binary(max_size=48)) if f.size is not None else None)
                )
        child = self.spec.types[names[0]]
        obj = self.draw_type(draw, child, ctx.o, ctx.root, size)
        if size is not None:
            assume(len(obj.build(_parent=ctx.o)) == size)
        return obj

    def draw_repeat(self, draw: st.DrawFn, t: TypeDef, f: Field, ctx: _Ctx) -> Any:
        ref = f.type
        bound = isinstance(f.repeat_expr, Name) and f.repeat_expr.ident in ctx.bound
        if f.repeat == "expr" and not bound:
            assert f.repeat_expr is not None
            count = int(self.eval(f.repeat_expr, t, ctx))
            assume(0 <= count <= 1 << 19)
        elif f.repeat == "until":
            count = -1
        else:
            count = draw(st.integers(0, 6))
        word = None
        if ref.kind == "int":
            word = (ref.width * 8, 1, ref.signed)
        elif ref.kind == "user" and self.spec.types[ref.user].word_width:
            child = self.spec.types[ref.user]
            word = (child.word_width, child.words, False)
        if word is not None:
            bits, per, signed = word
            code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
            code = code.lower() if signed else code
            raw = draw(self.blob(count * per * bits // 8))
            out = array(code)
            out.frombytes(raw)
            return out
        if ref.kind == "bits":
            mask = (1 << ref.width) - 1
            raw = draw(self.blob(count))
            return array("B", bytes(b & mask for b in raw))
        items: list[Any] = []
        child = self.spec.types[ref.user] if ref.kind == "user" else None
        item_size = self.size_of(t, f, ctx) if f.size is not None else None
        limit = count if count >= 0 else 8
        for _ in range(limit):
            if child is None:
                items.append(draw(self.blob(item_size or 0)))
                continue
            item = self.draw_type(draw, child, ctx.o, ctx.root, item_size)
            items.append(item)
            if f.repeat == "until":
                assert f.repeat_until is not None
                if self.eval(f.repeat_until, t, ctx, item=item, item_type=child):
                    break
        else:
            if f.repeat == "until":
                assume(False)
        return items
