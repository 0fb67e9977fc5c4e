"""Tests of the harness around the official Kaitai Struct compiler (tests/ksc_support.py)."""

from __future__ import annotations

import struct
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from diskspec.tests.ksc_support import KSC_VERSION, KscError, compile_ksy, load_compiled

SAMPLE_KSY = """\
meta:
  id: harness_sample
  title: Harness sample
  endian: be
seq:
  - id: magic
    contents: [0x51, 0x46, 0x49, 0xfb]
  - id: version
    type: u4
  - id: size
    type: u8
  - id: cluster_bits
    type: u4
    -orig-id: cluster_bits_field
  - id: extra
    type: u4
    if: version >= 3
  - id: num_entries
    type: u4
  - id: table
    type: u8
    repeat: expr
    repeat-expr: num_entries
  - id: kind
    type: u4
    enum: image_kind
  - id: entry
    type: entry(cluster_bits)
types:
  entry:
    params:
      - id: bits
        type: u4
    seq:
      - id: raw
        type: u8
    instances:
      offset:
        value: raw & ((1 << bits) - 1)
      flags:
        value: raw >> bits
enums:
  image_kind:
    1: plain
    2: compressed
"""


def _sample_bytes(version: int, table: list[int], kind: int, raw: int) -> bytes:
    out = b"QFI\xfb" + struct.pack(">IQI", version, 0x1_0000_0000, 16)
    if version >= 3:
        out += struct.pack(">I", 0xDEADBEEF)
    out += struct.pack(">I", len(table)) + struct.pack(f">{len(table)}Q", *table)
    return out + struct.pack(">IQ", kind, raw)


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ksc_sample")
    spec = work / "harness_sample.ksy"
    spec.write_text(SAMPLE_KSY, encoding="utf-8")
    out = work / "out"
    written = compile_ksy([spec], out)
    assert written == [out / "harness_sample.py"]
    assert written[0].is_file()
    return out


@pytest.fixture(scope="module")
def sample_module(sample_out: Path) -> ModuleType:
    return load_compiled(sample_out, "harness_sample")


def test_compiler_version_pinned() -> None:
    assert KSC_VERSION == "0.11.0"


def test_valid_spec_parses_hand_built_bytes(sample_module: ModuleType) -> None:
    cls = sample_module.HarnessSample
    data = _sample_bytes(3, [1, 2**64 - 1, 0x1234], 2, (0x5 << 16) | 0xABCD)
    parsed = cls.from_bytes(data)
    assert parsed.magic == b"QFI\xfb"
    assert parsed.version == 3
    assert parsed.size == 0x1_0000_0000
    assert parsed.cluster_bits == 16
    assert parsed.extra == 0xDEADBEEF
    assert parsed.num_entries == 3
    assert parsed.table == [1, 2**64 - 1, 0x1234]
    assert parsed.kind == cls.ImageKind.compressed
    assert parsed.entry.bits == 16
    assert parsed.entry.raw == 0x5ABCD
    assert parsed.entry.offset == 0xABCD
    assert parsed.entry.flags == 5
    assert parsed._io.is_eof()


def test_valid_spec_if_false_and_empty_repeat(sample_module: ModuleType) -> None:
    cls = sample_module.HarnessSample
    parsed = cls.from_bytes(_sample_bytes(2, [], 1, 7))
    assert parsed.version == 2
    # ksc 0.11 Python output leaves an attribute whose `if:` is false unset (no None)
    assert not hasattr(parsed, "extra")
    assert parsed.table == []
    assert parsed.kind == cls.ImageKind.plain
    assert parsed.entry.offset == 7


def test_bad_magic_is_rejected(sample_module: ModuleType) -> None:
    import kaitaistruct

    cls = sample_module.HarnessSample
    data = b"QFI\xfa" + _sample_bytes(3, [], 1, 0)[4:]
    with pytest.raises(kaitaistruct.ValidationNotEqualError):
        cls.from_bytes(data)


def test_load_compiled_does_not_leak_modules(sample_out: Path, sample_module: ModuleType) -> None:
    assert "harness_sample" not in sys.modules
    assert str(sample_out.resolve()) not in sys.path
    assert not (sample_out / "__pycache__").exists()
    again = load_compiled(sample_out, "harness_sample")
    assert again is not sample_module
    assert again.HarnessSample is not sample_module.HarnessSample


def test_unknown_type_reports_spec_path(tmp_path: Path) -> None:
    spec = tmp_path / "broken.ksy"
    spec.write_text(
        textwrap.dedent(
            """\
            meta:
              id: broken
              endian: be
            seq:
              - id: header
                type: header
            types:
              header:
                seq:
                  - id: magic
                    type: u4
                  - id: version
                    type: u4
                  - id: oops
                    type: no_such_type
            """
        ),
        encoding="utf-8",
    )
    with pytest.raises(KscError) as excinfo:
        compile_ksy([spec], tmp_path / "out")
    message = str(excinfo.value)
    assert "/types/header/seq/2/type" in message
    assert "no_such_type" in message
    assert not (tmp_path / "out" / "broken.py").exists()


def test_imports_resolve_relative_to_importing_spec(tmp_path: Path) -> None:
    (tmp_path / "sub" / "leaf").mkdir(parents=True)
    (tmp_path / "common").mkdir()
    (tmp_path / "top.ksy").write_text(
        "meta: {id: top, endian: le, imports: [sub/middle]}\nseq: [{id: m, type: middle}]\n",
        encoding="utf-8",
    )
    (tmp_path / "sub" / "middle.ksy").write_text(
        "meta: {id: middle, endian: le, imports: [leaf/cell, ../common/word]}\n"
        "seq: [{id: c, type: cell}, {id: w, type: word}]\n",
        encoding="utf-8",
    )
    (tmp_path / "sub" / "leaf" / "cell.ksy").write_text(
        "meta: {id: cell}\nseq: [{id: v, type: u1}]\n", encoding="utf-8"
    )
    (tmp_path / "common" / "word.ksy").write_text(
        "meta: {id: word, endian: le}\nseq: [{id: v, type: u2}]\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    written = compile_ksy([tmp_path / "top.ksy"], out)
    assert sorted(p.name for p in written) == ["cell.py", "middle.py", "top.py", "word.py"]
    top = load_compiled(out, "top")
    parsed = top.Top.from_bytes(b"\x07\x34\x12")
    assert parsed.m.c.v == 7
    assert parsed.m.w.v == 0x1234
    for name in ("top", "middle", "cell", "word"):
        assert name not in sys.modules
