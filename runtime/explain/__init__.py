"""``diskspec explain``: an image's structures laid out field by field, for learning the formats.

    from diskspec.explain import explain
    report = explain("disk.qcow2")
    for item in report.sections: print(item.name, item.offset, item.note)

Every value is an attribute of a diskspec.generated object; offsets, meanings and spec paths
come from the spec model. ``translate`` follows one guest offset through the tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import FormatError
from ..generated import fvd as g_fvd
from ..generated import qcow2 as g_qcow2
from .fvd import STRUCTURES as FVD_STRUCTURES
from .fvd import explain_fvd, translate_fvd
from .qcow import STRUCTURES as QCOW_STRUCTURES
from .qcow import explain_qcow, translate_qcow
from .qcow2 import STRUCTURES as QCOW2_STRUCTURES
from .qcow2 import explain_qcow2, translate_qcow2
from .tree import SHOWN_BYTES, Item, Read, show

__all__ = ["ExplainError", "Explanation", "Item", "detect", "explain", "format_text", "translate"]

FORMATS = ("qcow2", "qcow", "fvd")
STRUCTURES: dict[str, tuple[str, ...]] = {
    "qcow2": QCOW2_STRUCTURES, "qcow": QCOW_STRUCTURES, "fvd": FVD_STRUCTURES,
}
_EXPLAIN: dict[str, Callable[[BinaryIO, Read], list[Item]]] = {
    "qcow2": explain_qcow2, "qcow": explain_qcow, "fvd": explain_fvd,
}
_TRANSLATE: dict[str, Callable[[BinaryIO, Read, int], Item]] = {
    "qcow2": translate_qcow2, "qcow": translate_qcow, "fvd": translate_fvd,
}


class ExplainError(FormatError):
    """An image explain cannot lay out (unknown format, no such structure)."""


@dataclass(slots=True)
class Explanation:
    path: Path
    fmt: str
    file_size: int
    sections: list[Item]


def detect(head: bytes) -> str:
    """The format from the magic (qcow and qcow2 share it; the version tells them apart)."""
    magic = g_qcow2.Header.MAGIC_CONTENTS
    if head.startswith(magic):
        at = g_qcow2.Header.VERSION_AT
        version = int.from_bytes(head[at : at + 4], "big")
        return "qcow" if version == 1 else "qcow2"
    if head.startswith(g_fvd.Header.MAGIC_CONTENTS):
        return "fvd"
    raise ExplainError("not a qcow, qcow2 or FVD image (unknown magic)")


def _run(path: str | Path, fmt: str | None,
         go: Callable[[str, BinaryIO, Read], object]) -> tuple[str, int, object]:
    path = Path(path)
    with open(path, "rb") as f:
        fd = f.fileno()

        def read(offset: int, n: int) -> bytes:
            return os.pread(fd, max(n, 0), offset) if offset >= 0 else b""

        found = detect(read(0, 16))
        if fmt is not None and fmt != found:
            if fmt not in FORMATS:
                raise ExplainError(f"explain knows {', '.join(FORMATS)}, not {fmt!r}")
            raise ExplainError(f"{path}: the magic says {found}, not {fmt}")
        try:
            result = go(found, f, read)
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ExplainError(f"{path}: cannot lay out this {found} image ({exc})") from exc
        return found, os.fstat(fd).st_size, result


def explain(path: str | Path, fmt: str | None = None, structure: str | None = None) -> Explanation:
    """Every structure of the image, or only ``structure`` (e.g. "header", "l1")."""
    found, size, sections = _run(path, fmt, lambda k, f, read: _EXPLAIN[k](f, read))
    assert isinstance(sections, list)
    if structure is not None:
        known = STRUCTURES[found]
        if structure not in known:
            raise ExplainError(
                f"no structure {structure!r} in {found}; known: {', '.join(known)}"
            )
        sections = [s for s in sections if s.name.split("[")[0] == structure]
    return Explanation(Path(path), found, size, sections)


def translate(path: str | Path, guest: int, fmt: str | None = None) -> Explanation:
    """The way from one guest offset to its host bytes, table by table."""
    found, size, item = _run(path, fmt, lambda k, f, read: _TRANSLATE[k](f, read, guest))
    assert isinstance(item, Item)
    return Explanation(Path(path), found, size, [item])


# --------------------------------------------------------------------------------------------
# Text


def _hex(raw: bytes, size: int) -> str:
    text = raw[:8].hex(" ")
    return text + (" …" if size > 8 else "")


def _lines(item: Item, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    if item.children or depth == 0:
        head = f"{pad}{item.name}"
        if item.size or item.offset:
            head += f"  @ {item.offset:#x}, {item.size} bytes"
        if item.type:
            head += f"  [{item.type}]"
        out.append(head)
        if item.doc and depth == 0:
            out.append(f"{pad}  {item.doc}")
        if item.note:
            out.append(f"{pad}  => {item.note}")
        for child in item.children:
            _lines(child, depth + 1, out)
        return
    value = show(item.value)
    where = f"{item.bits:<12}" if item.bits else f"{item.offset:#010x}  "
    raw = "" if item.bits else _hex(item.raw, item.size)
    out.append(f"{pad}{where}  {raw:<26} {item.name} = {value}".rstrip())
    if item.doc:
        out.append(f"{pad}{'':14}{item.doc}")
    if item.note:
        out.append(f"{pad}{'':14}=> {item.note}")


def format_text(report: Explanation) -> str:
    out = [f"{report.path}: {report.fmt}, {report.file_size} bytes on disk", ""]
    for section in report.sections:
        _lines(section, 0, out)
        out.append("")
    return "\n".join(out)


__all__ += ["SHOWN_BYTES", "STRUCTURES"]
