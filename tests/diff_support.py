"""Helpers of the three-way differential test (tests/test_differential.py).

One spec, three parsers, compared field by field:

* ``ours``: the generated dataclasses (``diskspec.generated.<id>``);
* ``construct``: the generated construct schemas (``diskspec.generated.<id>_construct``);
* ``ksc``: the official Kaitai Struct compiler's Python output (``kaitaistruct`` runtime);

and, wherever the test can work it out from the bytes alone (``struct.unpack`` and the
constants of the format documents), a fourth, ``raw``.

`Differ` collects disagreements (image, structure path, field, every implementation's value)
and counts what was compared. `Trees` walks a parse tree of the generated classes and the
matching construct and KSC objects generically: every seq field, every value instance
(property) and every positioned instance (``read_<name>(f)``), so a field added to a spec
is compared without touching the test. Tables of bit-packed words are compared column by
column (`compare_packed`), entry by entry, and may be sampled (`Sampled`) for the slow
implementations.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from construct import Computed, Struct

__all__ = [
    "MAX_PROBLEMS",
    "NA",
    "PLAIN",
    "SAMPLE_HEAD",
    "SAMPLE_LIMIT",
    "Differ",
    "Layout",
    "Part",
    "Sampled",
    "Shape",
    "Trees",
    "compare_packed",
    "compare_values",
    "norm",
    "parse_with_params",
    "sample_indices",
    "shape_of",
]

#: Tables with more entries than this are compared entry by entry between ours and raw only;
#: the slow implementations see `sample_indices` (the first SAMPLE_HEAD entries and every
#: entry with a nonzero word).
SAMPLE_LIMIT = 20_000
SAMPLE_HEAD = 4096
#: Disagreements listed in one assertion message (all are counted).
MAX_PROBLEMS = 60
#: Entries listed per disagreeing table column.
_SHOWN_PER_COLUMN = 3


class _NotAvailable:
    """An implementation that has no value here (not parsed, or not exposed)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<n/a>"


NA: Any = _NotAvailable()


def norm(value: object) -> object:
    """The comparable form of a parsed value.

    bool and int enums / flags become plain ints, bytes-likes become bytes, None stays None.
    Anything else (a struct where a scalar was expected, say) becomes a tag naming its type,
    which never equals a scalar, so the disagreement is reported instead of hidden.
    """
    if value is None or type(value) is int:
        return value
    if isinstance(value, int):  # bool, IntEnum, IntFlag
        return int(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return f"<{type(value).__qualname__}>"


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 9:
        return f"{value} ({value:#x})"
    if isinstance(value, bytes) and len(value) > 48:
        return f"{value[:48]!r}... ({len(value)} bytes)"
    return repr(value)


def _norm_all(values: Iterable[object]) -> list[object]:
    return [v if type(v) is int else norm(v) for v in values]


Column = tuple[Sequence[int], Sequence[object]]
"""Values of one field at the given entry indices."""


@dataclass
class Differ:
    """Compares values of one image and remembers every disagreement and what it compared.

    ``fields`` counts compared fields: one per scalar field, one per (entry, field) of a
    table column. ``values`` counts the individual values that took part.
    """

    image: str
    fields: int = 0
    values: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.image}: {where}: {message}")

    def same(self, where: str, **impls: object) -> bool:
        """All implementations that have a value (not `NA`) must agree on it."""
        got = {name: norm(value) for name, value in impls.items() if value is not NA}
        if len(got) < 2:
            self.problem(where, f"nothing to compare it with (only {', '.join(got) or 'none'})")
            return False
        self.fields += 1
        self.values += len(got)
        first = next(iter(got.values()))
        if all(value == first for value in got.values()):
            return True
        shown = ", ".join(f"{name}={_show(value)}" for name, value in got.items())
        self.problem(where, f"implementations disagree: {shown}")
        return False

    def same_column(
        self,
        where: str,
        name: str,
        reference: tuple[str, Column],
        others: Mapping[str, Column],
        detail: Callable[[int], str] | None = None,
    ) -> None:
        """Every other column must equal the reference at each of its indices.

        The reference covers at least the indices of the others (usually every entry).
        Disagreements name the entry: ``where[index].name``.
        """
        ref_name, (ref_idx, ref_raw) = reference
        ref_vals = _norm_all(ref_raw)
        suffix = f".{name}" if name else ""
        if len(ref_idx) != len(ref_vals):
            self.problem(f"{where}[*]{suffix}", f"{ref_name}: {len(ref_idx)} indices, values")
            return
        self.fields += len(ref_idx)
        self.values += len(ref_idx)
        lookup: dict[int, object] | None = None
        full = isinstance(ref_idx, range) and ref_idx == range(len(ref_idx))
        for other, (idx, raw_vals) in others.items():
            vals = _norm_all(raw_vals)
            if len(idx) != len(vals):
                self.problem(f"{where}[*]{suffix}", f"{other}: {len(idx)} indices, {len(vals)}")
                continue
            self.values += len(vals)
            if idx == ref_idx:
                expected: list[object] = ref_vals
            elif full:
                expected = [ref_vals[i] if 0 <= i < len(ref_vals) else NA for i in idx]
            else:
                if lookup is None:
                    lookup = dict(zip(ref_idx, ref_vals, strict=True))
                expected = [lookup.get(i, NA) for i in idx]
            if expected == vals:
                continue
            bad = [(i, e, v) for i, e, v in zip(idx, expected, vals, strict=True) if e != v]
            for i, e, v in bad[:_SHOWN_PER_COLUMN]:
                extra = detail(i) if detail is not None else ""
                self.problem(
                    f"{where}[{i}]{suffix}", f"{other}={_show(v)} but {ref_name}={_show(e)}{extra}"
                )
            if len(bad) > _SHOWN_PER_COLUMN:
                self.problem(
                    f"{where}[*]{suffix}",
                    f"{len(bad)} of {len(idx)} entries disagree between {other} and {ref_name}",
                )

    def check(self, minimum_fields: int) -> None:
        """Fail with every disagreement; also fail if too little was compared."""
        problems = list(self.problems)
        if self.fields < minimum_fields:
            problems.append(
                f"{self.image}: only {self.fields} fields compared, expected >= {minimum_fields}"
            )
        if problems:
            shown = problems[:MAX_PROBLEMS]
            more = len(problems) - len(shown)
            tail = f"\n... and {more} more" if more else ""
            raise AssertionError(
                f"{len(problems)} disagreement(s) after {self.fields} compared fields:\n"
                + "\n".join(shown)
                + tail
            )


# --------------------------------------------------------------------------------------------
# Structure shapes


@dataclass(frozen=True)
class Shape:
    """What a generated class exposes, split by kind."""

    params: tuple[str, ...]  # keyword-only parameters of parse() (Kaitai params)
    seq: tuple[str, ...]  # seq fields (dataclass fields that are not params)
    values: tuple[str, ...]  # value instances (properties)
    positioned: tuple[str, ...]  # positioned instances (read_<name>(f) methods)
    packed: bool  # a bit-packed word type (from_raw / to_raw / masks)


@functools.cache
def shape_of(cls: Any) -> Shape:
    signature = inspect.signature(cls.parse)
    params = tuple(
        p.name
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not p.name.startswith("_")
    )
    seq = tuple(f.name for f in dataclasses.fields(cls) if f.name not in params)
    members = vars(cls)
    values = tuple(name for name, member in members.items() if isinstance(member, property))
    positioned = tuple(
        name.removeprefix("read_")
        for name, member in members.items()
        if name.startswith("read_") and inspect.isfunction(member)
    )
    return Shape(params, seq, values, positioned, packed="WORD" in members)


@functools.cache
def _with_params(schema: Any, **params: object) -> Any:
    fixed = [name / Computed(value) for name, value in params.items()]
    return Struct(*fixed, *schema.subcons)


def parse_with_params(schema: Any, data: bytes, **params: object) -> Any:
    """Parse a parameterised construct ``schema`` standalone, whichever way it reads params.

    construct keeps the keyword arguments of ``parse(data, **params)`` in the outer context,
    where ``ctx._params.<param>`` finds them; a schema that reads ``ctx.<param>`` (what the
    generator emitted before) only finds them in the struct's own context. This passes them
    both ways: as keywords, and as leading Computed fields of a copy of the struct (so the
    result also holds them). test_construct_parameterised_types_parse_standalone checks the
    plain ``schema.parse(data, **params)``.
    """
    return _with_params(schema, **params).parse(data, **params)


# --------------------------------------------------------------------------------------------
# Tables of packed words


@dataclass(frozen=True)
class Part:
    """One word of a packed table entry.

    ``cls`` is the generated packed class (from_raw, to_raw, <FIELD>_MASK / <FIELD>_SHIFT);
    ``reference`` decodes each of its fields and value instances independently from the raw
    word, with the constants of the format document; ``attr`` names the member of the
    construct / KSC entry that holds this word's fields (None: the entry itself).
    """

    cls: Any
    reference: Mapping[str, Callable[[int], int]]
    attr: str | None = None

    def __post_init__(self) -> None:
        shape = shape_of(self.cls)
        wanted = set(shape.seq) | set(shape.values)
        if set(self.reference) != wanted:
            raise ValueError(
                f"reference decoders of {self.cls.__name__}: {sorted(self.reference)} "
                f"!= fields and value instances {sorted(wanted)}"
            )


@dataclass(frozen=True)
class Layout:
    """How one entry of a table is laid out: one `Part` per word; no parts: plain values."""

    parts: tuple[Part, ...]


PLAIN = Layout(())


@dataclass(frozen=True)
class Sampled:
    """Entries of one implementation at some indices only."""

    indices: Sequence[int]
    items: Sequence[Any]


Source = Any
"""A full sequence of entries, a `Sampled` subset, or `NA`."""


def sample_indices(words: Sequence[int], per: int = 1) -> list[int]:
    """The first SAMPLE_HEAD entries and every later entry with a nonzero word."""
    n = len(words) // per
    head = min(n, SAMPLE_HEAD)
    if per == 1:
        later = [i for i in range(head, n) if words[i]]
    else:
        later = [i for i in range(head, n) if any(words[i * per : (i + 1) * per])]
    return [*range(head), *later]


def _column_of(source: Source) -> tuple[Sequence[int], Sequence[Any]] | None:
    if source is NA:
        return None
    if isinstance(source, Sampled):
        return source.indices, source.items
    return range(len(source)), source


def _count(source: Source) -> object:
    if source is NA or isinstance(source, Sampled):
        return NA
    return len(source)


def _same_count(d: Differ, where: str, n: int, construct: Source, ksc: Source, raw: object) -> None:
    """The number of entries, where another implementation has one (a sample has none)."""
    counts = {"construct": _count(construct), "ksc": _count(ksc), "raw": raw}
    if any(count is not NA for count in counts.values()):
        d.same(f"{where} (entries)", ours=n, **counts)


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, NA)
    return getattr(obj, name, NA)


def _word_detail(words: Sequence[int]) -> Callable[[int], str]:
    def detail(i: int) -> str:
        return f" (raw word {words[i]:#018x})" if 0 <= i < len(words) else ""

    return detail


def compare_packed(
    d: Differ,
    where: str,
    words: Sequence[int],
    layout: Layout,
    *,
    construct: Source,
    ksc: Source,
    raw: Sequence[int] | None,
) -> None:
    """Compare a table of packed words (ours: an array of raw words) field by field.

    Ours is decoded twice, with the generated <FIELD>_MASK / <FIELD>_SHIFT constants (every
    entry) and with from_raw (every entry of a small table, the sample of a large one), and
    from_raw(w).to_raw() must give w back. ``raw`` (struct.unpack of the bytes) is compared
    word by word and decoded with the Part's reference decoders, for every entry.
    """
    per = len(layout.parts)
    n = len(words) // per
    _same_count(d, where, n, construct, ksc, NA if raw is None else len(raw) // per)
    all_idx = range(n)
    if raw is not None:
        if len(raw) != len(words):
            return
        every_word = range(len(words))
        d.same_column(where, "(word)", ("raw", (every_word, raw)), {"ours": (every_word, words)})
    cons = _column_of(construct)
    kcol = _column_of(ksc)
    obj_idx: Sequence[int] = all_idx if n <= SAMPLE_LIMIT else sample_indices(words, per)
    for p, part in enumerate(layout.parts):
        shape = shape_of(part.cls)
        mine = list(words[p::per])
        theirs = list(raw[p::per]) if raw is not None else None
        objs = [part.cls.from_raw(mine[i]) for i in obj_idx]
        cons_parts = None if cons is None else [_sub(e, part.attr) for e in cons[1]]
        ksc_parts = None if kcol is None else [_sub(e, part.attr) for e in kcol[1]]
        prefix = f"{part.attr}." if part.attr else ""
        detail = _word_detail(mine)
        d.same_column(
            where,
            f"{prefix}(to_raw)",
            ("raw word", (all_idx, mine)),
            {"ours.from_raw.to_raw": (obj_idx, [o.to_raw() for o in objs])},
            detail,
        )
        for name in shape.seq:
            mask = getattr(part.cls, f"{name.upper()}_MASK")
            shift = getattr(part.cls, f"{name.upper()}_SHIFT")
            others: dict[str, Column] = {
                "ours.from_raw": (obj_idx, [getattr(o, name) for o in objs])
            }
            if theirs is not None:
                decode = part.reference[name]
                others["raw"] = (all_idx, [decode(w) for w in theirs])
            if cons is not None and cons_parts is not None:
                others["construct"] = (cons[0], [_get(e, name) for e in cons_parts])
            if kcol is not None and ksc_parts is not None:
                others["ksc"] = (kcol[0], [_get(e, name) for e in ksc_parts])
            reference = ("ours.masks", (all_idx, [(w & mask) >> shift for w in mine]))
            d.same_column(where, prefix + name, reference, others, detail)
        for name in shape.values:
            ours_col: Column = (obj_idx, [getattr(o, name) for o in objs])
            if theirs is not None:
                decode = part.reference[name]
                ref_col: tuple[str, Column] = ("raw", (all_idx, [decode(w) for w in theirs]))
                others = {"ours": ours_col}
            else:
                ref_col = ("ours", ours_col)
                others = {}
            # construct's BitStructs carry no value instances (the generator emits none for
            # packed types): compare construct only where it has the field.
            if cons is not None and cons_parts and _get(cons_parts[0], name) is not NA:
                others["construct"] = (cons[0], [_get(e, name) for e in cons_parts])
            if kcol is not None and ksc_parts is not None:
                others["ksc"] = (kcol[0], [_get(e, name) for e in ksc_parts])
            d.same_column(where, prefix + name, ref_col, others, detail)


def _sub(entry: Any, attr: str | None) -> Any:
    return entry if attr is None else _get(entry, attr)


def compare_values(
    d: Differ,
    where: str,
    values: Sequence[int],
    *,
    construct: Source,
    ksc: Source,
    raw: Sequence[int] | None,
) -> None:
    """Compare a table of plain integers (or flags) entry by entry."""
    n = len(values)
    _same_count(d, where, n, construct, ksc, NA if raw is None else len(raw))
    others: dict[str, Column] = {}
    if raw is not None:
        others["raw"] = (range(len(raw)), raw)
    for name, source in (("construct", construct), ("ksc", ksc)):
        column = _column_of(source)
        if column is not None:
            others[name] = column
    d.same_column(where, "", ("ours", (range(n), values)), others)


# --------------------------------------------------------------------------------------------
# Generic parse tree comparison


@dataclass
class Trees:
    """Walks a parse tree of the generated classes next to the construct and KSC trees.

    * ``ours_file``: the image file, for ours' positioned instances (``read_<name>(f)``);
      construct has parsed them already (Pointer) and KSC reads them lazily.
    * ``deferred``: (class name, instance name) of positioned instances the caller compares
      itself (e.g. a table that has to be sampled).
    * ``layouts``: (class name, field or instance name) -> `Layout` of every table (array)
      the tree holds; `PLAIN` for arrays of plain values.
    * ``reference`` / ``raw_tables``: values worked out independently from the bytes, by path
      (``Qcow2.header.version``, ``Qcow2.l1_table``); each must be used exactly once
      (`leftovers`). A list's length is the path plus `` (length)``.
    """

    differ: Differ
    ours_file: BinaryIO | None = None
    deferred: frozenset[tuple[str, str]] = frozenset()
    layouts: Mapping[tuple[str, str], Layout] = field(default_factory=dict)
    reference: dict[str, object] = field(default_factory=dict)
    raw_tables: dict[str, Sequence[int]] = field(default_factory=dict)

    def leftovers(self) -> None:
        """Report reference values nothing was compared with (a gap in the comparison)."""
        for where in sorted(self.reference):
            self.differ.problem(where, "has a reference value but was never compared")
        for where in sorted(self.raw_tables):
            self.differ.problem(where, "has raw table words but was never compared")

    def compare(self, where: str, ours: object, cons: object, ksc: object) -> None:
        if dataclasses.is_dataclass(ours) and not isinstance(ours, type):
            self._struct(where, ours, cons, ksc)
        elif isinstance(ours, list):
            self._list(where, ours, cons, ksc)
        else:
            raw = self.reference.pop(where, NA)
            self.differ.same(where, ours=ours, construct=cons, ksc=ksc, raw=raw)

    def _list(self, where: str, ours: list[Any], cons: object, ksc: object) -> None:
        d = self.differ
        if cons is not NA and not isinstance(cons, list):
            d.problem(where, f"construct gives {_show(norm(cons))}, ours a list")
            cons = NA
        if ksc is not NA and not isinstance(ksc, list):
            d.problem(where, f"ksc gives {_show(norm(ksc))}, ours a list")
            ksc = NA
        d.same(
            f"{where} (length)",
            ours=len(ours),
            construct=len(cons) if isinstance(cons, list) else NA,
            ksc=len(ksc) if isinstance(ksc, list) else NA,
            raw=self.reference.pop(f"{where} (length)", NA),
        )
        for i, item in enumerate(ours):
            c = cons[i] if isinstance(cons, list) and i < len(cons) else NA
            k = ksc[i] if isinstance(ksc, list) and i < len(ksc) else NA
            self.compare(f"{where}[{i}]", item, c, k)

    def _struct(self, where: str, ours: Any, cons: Any, ksc: Any) -> None:
        d = self.differ
        cls: Any = type(ours)
        name = cls.__name__
        shape = shape_of(cls)
        if cons is not NA and not isinstance(cons, dict):
            d.problem(where, f"construct gives {_show(norm(cons))}, ours a {name}")
            cons = NA
        if ksc is not NA and type(ksc).__name__ != name:
            d.problem(where, f"ksc gives {_show(norm(ksc))}, ours a {name}")
            ksc = NA
        deferred = {p for p in shape.positioned if (name, p) in self.deferred}
        if cons is not NA:
            keys = {key for key in cons if not key.startswith("_")}
            expected = set(shape.seq) | set(shape.values) | (set(shape.positioned) - deferred)
            missing = expected - keys
            extra = keys - expected - set(shape.params) - deferred
            if missing or extra:
                d.problem(
                    where,
                    f"construct {name} fields differ: missing {sorted(missing)}, "
                    f"extra {sorted(extra)}",
                )
        for f in shape.seq:
            value = getattr(ours, f)
            c = cons.get(f, NA) if cons is not NA else NA
            k = getattr(ksc, f, None) if ksc is not NA else NA  # KSC leaves if-false unset
            if ksc is not NA and value is not None and not hasattr(ksc, f):
                d.problem(f"{where}.{f}", f"ksc {name} has no attribute {f}")
            if isinstance(value, array):
                self._table(f"{where}.{f}", (name, f), value, c, k)
            else:
                self.compare(f"{where}.{f}", value, c, k)
        for p in shape.params:
            self.differ.same(
                f"{where}.{p}",
                ours=getattr(ours, p),
                construct=cons.get(p, NA) if cons is not NA else NA,
                ksc=getattr(ksc, p, NA) if ksc is not NA else NA,
                raw=self.reference.pop(f"{where}.{p}", NA),
            )
        for v in shape.values:
            k = NA
            if ksc is not NA:
                if isinstance(getattr(type(ksc), v, None), property):
                    k = getattr(ksc, v)
                else:
                    d.problem(f"{where}.{v}", f"ksc {name} has no value instance {v}")
            c = cons.get(v, NA) if cons is not NA else NA
            self.compare(f"{where}.{v}", getattr(ours, v), c, k)
        for p in shape.positioned:
            if p in deferred:
                continue
            if self.ours_file is None:
                d.problem(f"{where}.{p}", "no image file to read the positioned instance from")
                continue
            value = getattr(ours, f"read_{p}")(self.ours_file)
            c = cons.get(p, NA) if cons is not NA else NA
            k = NA
            if ksc is not NA:
                if isinstance(getattr(type(ksc), p, None), property):
                    k = getattr(ksc, p)
                else:
                    d.problem(f"{where}.{p}", f"ksc {name} has no instance {p}")
            if isinstance(value, array):
                self._table(f"{where}.{p}", (name, p), value, c, k)
            else:
                self.compare(f"{where}.{p}", value, c, k)

    def _table(
        self, where: str, key: tuple[str, str], words: array[int], cons: Any, ksc: Any
    ) -> None:
        layout = self.layouts.get(key)
        if layout is None:
            self.differ.problem(where, f"no entry layout known for table {key[0]}.{key[1]}")
            return
        raw = self.raw_tables.pop(where, None)
        for impl, source in (("construct", cons), ("ksc", ksc)):
            if source is not NA and not isinstance(source, list):
                self.differ.problem(where, f"{impl} gives {_show(norm(source))}, ours a table")
        cons = cons if isinstance(cons, list) else NA
        ksc = ksc if isinstance(ksc, list) else NA
        if layout is PLAIN:
            compare_values(self.differ, where, words, construct=cons, ksc=ksc, raw=raw)
        else:
            compare_packed(self.differ, where, words, layout, construct=cons, ksc=ksc, raw=raw)
