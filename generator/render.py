"""Rendering (stage 4) and formatting (stage 5): jinja2 with StrictUndefined over lowered code."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources

import jinja2

from diskspec import structbase

from .passes import Code

__all__ = ["API_VERSION", "format_source", "render_construct", "render_structs"]

API_VERSION = structbase.API_VERSION

# what generated code may import from the runtime base (everything it exports)
_HELPERS = tuple(name for name in structbase.__all__ if name != "API_VERSION")


def _environment() -> jinja2.Environment:
    loader = jinja2.FileSystemLoader(str(resources.files("diskspec.generator") / "templates"))
    return jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def format_source(text: str) -> str:
    """Sort imports and format with the pinned ruff, then normalize blank lines.

    The same ruff version always gives the same bytes, so the output is deterministic.
    """
    fix = ["check", "--fix-only", "--select", "I,RUF022,RUF100,UP034", "--exit-zero"]
    for args in (fix, ["format"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "--line-length", "100", "--quiet",
             "--stdin-filename", "generated.py", "-"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ruff {args[0]} failed on generated code: {done.stderr.strip()}")
        text = done.stdout
    return _normalize(text)


def _normalize(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    out: list[str] = []
    blank = 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 2:
            out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def _body_text(code: Code) -> str:
    parts: list[str] = []
    for t in code.types:
        parts += t.parse + t.build + t.validate + [f.annotation for f in t.fields]
        for m in t.properties + t.readers:
            parts += m.lines
    return "\n".join(parts)


def render_structs(code: Code) -> str:
    body = _body_text(code)
    helpers = [h for h in _HELPERS if re.search(rf"\b{h}\b", body) or h == "Buffer"]
    helpers = sorted({*helpers, "Ns", "read_growing"}, key=lambda h: (h[0].islower(), h))
    bases = sorted({e.base for e in code.enums})
    template = _environment().get_template("structs.py.j2")
    text = template.render(
        spec=code.spec,
        code=code,
        api_version=API_VERSION,
        helpers=helpers,
        uses_array="array[" in body or "array(" in body,
        enum_bases=", ".join(bases),
    )
    return format_source(text)


_CONSTRUCT = (
    "Array", "Bitwise", "BitsInteger", "BitsSwapped", "BitStruct", "Bytes", "ByteSwapped",
    "Computed", "Const", "ExprAdapter", "FixedSized", "Flag", "GreedyBytes", "GreedyRange", "If",
    "LazyBound", "Pass", "Pointer", "RepeatUntil", "Struct", "Switch",
)


def render_construct(code: Code) -> str:
    body = "\n".join(line for t in code.types for line in t.construct)
    names = [n for n in _CONSTRUCT if re.search(rf"\b{n}\b", body)]
    names += sorted(set(re.findall(r"\bInt\d+[su][bl]\b", body)))
    widths = sorted({int(w) for w in re.findall(r"\b_rev(\d+)\b", body)})
    template = _environment().get_template("construct.py.j2")
    text = template.render(
        spec=code.spec,
        code=code,
        construct_names=sorted(names),
        reversed_widths=widths,
        uses_eof="_eof(" in body,
    )
    return format_source(text)
