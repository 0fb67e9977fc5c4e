"""The thin runtime base under the generated structure classes (diskspec.generated).

Generated modules import only from here: error construction, bounds checks, bulk array and
bit-array decoding, and growing reads from files. Nothing format-specific lives here.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import Any, BinaryIO, TypeVar

from .errors import BuildError, StructError, TruncatedError, ValidationError

__all__ = [
    "API_VERSION",
    "Buffer",
    "Ns",
    "bits_to_bytes",
    "build_error",
    "enum_or_int",
    "flag_of",
    "invalid",
    "need",
    "read_growing",
    "read_padded",
    "required",
    "unpack_bits",
    "unpack_words",
    "words_to_bytes",
]

API_VERSION = 1
"""Bumped whenever the generated code needs a different base; generated modules check it."""

Buffer = bytes | bytearray | memoryview

_LITTLE = sys.byteorder == "little"
_E = TypeVar("_E", bound=IntEnum)
_T = TypeVar("_T")


class Ns:
    """Scratch namespace: what a child's ``_parent`` expressions see while parsing."""

    @classmethod
    def of(cls, **fields: Any) -> Ns:
        ns = cls()
        ns.__dict__.update(fields)
        return ns

    def __getattr__(self, name: str) -> Any:
        # A field read before it exists: expressions see None, as Kaitai's do.
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def need(
    buf: Buffer, pos: int, n: int, end: int, spec: str, path: str, struct: str, field: str
) -> None:
    """Raise TruncatedError unless ``n`` bytes are available at ``pos`` before ``end``."""
    if n < 0:
        raise ValidationError(spec, path, struct, field, pos, f"negative size {n}")
    if pos + n > end:
        raise TruncatedError(spec, path, struct, field, pos, pos + n, min(end, len(buf)))


def invalid(
    spec: str, path: str, struct: str, field: str, offset: int | None, expected: str, got: Any
) -> ValidationError:
    shown = hex(got) if isinstance(got, int) and not isinstance(got, bool) else repr(got)
    return ValidationError(spec, path, struct, field, offset, f"expected {expected}, got {shown}")


def build_error(spec: str, path: str, struct: str, field: str, problem: str) -> BuildError:
    return BuildError(spec, path, struct, field, None, problem)


def required(value: _T | None, spec: str, path: str, struct: str, field: str) -> _T:
    """A conditional field used in an expression must be present."""
    if value is None:
        raise StructError(spec, path, struct, field, None, "field is absent")
    return value


def enum_or_int(cls: type[_E], value: int) -> _E | int:
    """The enum member for ``value``, or the plain int when the value is unknown (kept)."""
    try:
        return cls(value)
    except ValueError:
        return value


_F = TypeVar("_F", bound=IntFlag)
_FLAG_CACHE_LIMIT = 1024


def flag_of(cls: type[_F], value: int, cache: dict[int, _F]) -> _F:
    """The flag value for ``value`` (unknown bits kept), remembered in a bounded cache."""
    flag = cls(value)
    if len(cache) < _FLAG_CACHE_LIMIT:
        cache[value] = flag
    return flag


def unpack_words(
    buf: Buffer, pos: int, count: int, typecode: str, big_endian: bool
) -> array[int]:
    """Decode ``count`` integers of one array typecode in bulk."""
    out = array(typecode)
    out.frombytes(memoryview(buf)[pos : pos + count * out.itemsize])
    if big_endian == _LITTLE and out.itemsize > 1:
        out.byteswap()
    return out


def words_to_bytes(values: array[int], big_endian: bool) -> bytes:
    if big_endian == _LITTLE and values.itemsize > 1:
        swapped = array(values.typecode, values)
        swapped.byteswap()
        return swapped.tobytes()
    return values.tobytes()


_BIT_TABLES: dict[tuple[int, bool], list[bytes]] = {}


def _bit_table(width: int, lsb_first: bool) -> list[bytes]:
    key = (width, lsb_first)
    table = _BIT_TABLES.get(key)
    if table is None:
        per = 8 // width
        mask = (1 << width) - 1
        table = []
        for byte in range(256):
            vals = [(byte >> (k * width)) & mask for k in range(per)]
            if not lsb_first:
                vals.reverse()
            table.append(bytes(vals))
        _BIT_TABLES[key] = table
    return table


def unpack_bits(buf: Buffer, pos: int, count: int, width: int, lsb_first: bool) -> array[int]:
    """Decode ``count`` packed fields of 1, 2 or 4 bits into an array of bytes."""
    nbytes = (count * width + 7) // 8
    table = _bit_table(width, lsb_first)
    out = array("B", b"".join(table[b] for b in memoryview(buf)[pos : pos + nbytes]))
    del out[count:]
    return out


def bits_to_bytes(values: array[int], width: int, lsb_first: bool) -> bytes:
    """Pack fields of 1, 2 or 4 bits back into bytes (the inverse of unpack_bits)."""
    per = 8 // width
    mask = (1 << width) - 1
    out = bytearray((len(values) * width + 7) // 8)
    for i, v in enumerate(values):
        k = i % per
        shift = k * width if lsb_first else 8 - (k + 1) * width
        out[i // per] |= (v & mask) << shift
    return bytes(out)


def read_padded(f: BinaryIO, n: int) -> bytes:
    """Read ``n`` bytes; an image file reads as zeros past its end."""
    data = f.read(n)
    return data + bytes(n - len(data)) if len(data) < n else data


def read_growing(
    f: BinaryIO,
    parse: Callable[[bytes], _T],
    first: int,
    limit: int = 1 << 28,
    pad_eof: bool = False,
) -> _T:
    """Parse from a file, reading more whenever the parser says the data was truncated.

    With ``pad_eof`` the file reads as zeros past its end (image semantics), up to ``limit``.
    """
    buf = f.read(first)
    while True:
        try:
            return parse(buf)
        except TruncatedError as exc:
            if exc.needed > limit or exc.needed <= len(buf):
                raise
            more = f.read(exc.needed - len(buf))
            if not more and not pad_eof:
                raise
            buf += more + bytes(exc.needed - len(buf) - len(more))
