"""Hypothesis round trips of every generated structure: build(parse(b)) == b, parse(build(x)) == x.

Strategies are derived from the specs (tests/strategies.py). Types whose fields depend on their
parent (``_parent`` in an expression) are exercised through that parent.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diskspec.generator.expr import names_used
from diskspec.generator.model import Spec, TypeDef, load_spec
from diskspec.generator.pipeline import repo_paths
from diskspec.tests.strategies import StructDrawer

SPECS, _ = repo_paths()
LOADED: dict[str, tuple[Spec, Any]] = {}
for _ksy in sorted(SPECS.glob("*.ksy")):
    _spec = load_spec(_ksy)
    from diskspec.generator.passes import run_passes

    run_passes(_spec)
    LOADED[_spec.id] = (_spec, importlib.import_module(f"diskspec.generated.{_spec.id}"))


def _uses_parent(t: TypeDef) -> bool:
    nodes = []
    for f in t.seq:
        nodes += [n for n in (f.cond, f.size, f.repeat_expr) if n is not None]
    return any("_parent" in names_used(n) for n in nodes)


REACHED: dict[str, set[str]] = {}
RICH_ROOTS: list[int] = []

CASES = [
    (spec_id, t.id)
    for spec_id, (spec, _) in LOADED.items()
    for t in [spec.root, *spec.types.values()]
    if not _uses_parent(t)
]


@pytest.mark.parametrize(("spec_id", "type_id"), CASES, ids=[f"{s}.{t}" for s, t in CASES])
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(data=st.data())
def test_round_trip(spec_id: str, type_id: str, data: st.DataObject) -> None:
    spec, module = LOADED[spec_id]
    t = spec.root if type_id == spec.root.id else spec.types[type_id]
    drawer = StructDrawer(spec, module)
    obj = data.draw(drawer.type_strategy(t))
    REACHED.setdefault(spec_id, set()).update(drawer.reached)
    cls = type(obj)
    params = {p.id: getattr(obj, p.id) for p in t.params}
    raw = obj.build()
    again = cls.parse(raw, **params)
    assert again == obj
    assert again.build() == raw
    parsed, end = cls.parse_prefix(raw, **params)
    assert parsed == obj
    assert end == len(raw)


def test_every_type_is_reached_by_some_strategy() -> None:
    """Types reachable only through a parent were still drawn, so they were round-tripped.

    Runs after the round trips above (file order) and reads what they recorded.
    """
    assert REACHED, "run with the round-trip tests"
    for spec_id, (spec, _) in LOADED.items():
        positioned = {
            i.read.type.user
            for t in [spec.root, *spec.types.values()]
            for i in t.instances
            if i.read is not None and i.read.type.kind == "user"
        }
        missing = set(spec.types) - REACHED.get(spec_id, set()) - positioned
        assert not missing, f"{spec_id}: never drawn: {sorted(missing)}"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_round_trip_qcow2_v3_header_clusters(data: st.DataObject) -> None:
    """v3 header clusters with several extensions, the case qemu writes most."""
    spec, module = LOADED["qcow2"]
    drawer = StructDrawer(spec, module, {("header", "version"): 3})
    image = data.draw(drawer.type_strategy(spec.root))
    assume(len(image.extension_area.extensions) > 1)
    raw = image.build()
    again = module.Qcow2.parse(raw)
    assert again == image
    assert again.build() == raw
    RICH_ROOTS.append(again.header.len_header)


def test_qcow2_strategy_reached_v3_headers_with_extensions() -> None:
    """The v3 round trips above ran on real cases (not all rejected)."""
    assert RICH_ROOTS, "the qcow2 root strategy drew no v3 header with two or more extensions"
