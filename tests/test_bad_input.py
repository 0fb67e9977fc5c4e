"""Hostile and broken structures give one-line FormatErrors naming structure, field and offset."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from diskspec import FormatError, TruncatedError, ValidationError
from diskspec.generated import fvd, qcow, qcow2
from diskspec.tests.corpus import require_tool


@pytest.fixture(scope="module")
def header_cluster(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("bad") / "good.qcow2"
    subprocess.run(
        [require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "64M"], check=True
    )
    return path.read_bytes()[:65536]


def _poke(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


CASES = [
    # offset, struct format, value, error class, text the message must contain
    (0, ">I", 0x51464900, ValidationError, "Header.magic at offset 0x0"),
    (4, ">I", 4, ValidationError, "Header.version at offset 0x4: expected one of 2, 3, got 0x4"),
    (4, ">I", 1, ValidationError, "Header.version at offset 0x4"),
    (20, ">I", 22, ValidationError, "Header.cluster_bits at offset 0x14"),
    (20, ">I", 8, ValidationError, "Header.cluster_bits at offset 0x14"),
    (16, ">I", 1024, ValidationError, "Header.len_backing_file_name at offset 0x10"),
    (36, ">I", 0xFFFFFFFF, ValidationError, "Header.num_l1_entries at offset 0x24"),
    (56, ">I", 0x00020001, ValidationError, "Header.num_refcount_table_clusters at offset 0x38"),
    (60, ">I", 65537, ValidationError, "Header.num_snapshots at offset 0x3c"),
    (96, ">I", 7, ValidationError, "Header.refcount_order at offset 0x60"),
    (100, ">I", 100, ValidationError, "Header.len_header at offset 0x64"),
    (100, ">I", 108, ValidationError, "Header.len_header at offset 0x64"),
    (100, ">I", 0xFFFFFFFF, ValidationError, "Header.len_header at offset 0x64"),
    (8, ">Q", 0xFFFFFFFFFFFFFFFF, ValidationError, "Header.cluster_bits"),
    # an unknown extension at 112 claiming 0x7fffffff bytes
    (116, ">I", 0x7FFFFFFF, TruncatedError, "HeaderExtension.data at offset 0x78"),
]


@pytest.mark.parametrize(("offset", "fmt", "value", "cls", "text"), CASES)
def test_qcow2_header_errors(
    header_cluster: bytes, offset: int, fmt: str, value: int, cls: type[Exception], text: str
) -> None:
    data = _poke(header_cluster, offset, fmt, value)
    if offset == 116:
        data = _poke(data, 112, ">I", 0x12345678)
    with pytest.raises(cls) as info:
        qcow2.Qcow2.parse(data)
    message = str(info.value)
    assert isinstance(info.value, FormatError)
    assert text in message
    assert "\n" not in message
    assert "qcow2.ksy /types/" in message


def test_truncated_header_names_the_field(header_cluster: bytes) -> None:
    with pytest.raises(TruncatedError) as info:
        qcow2.Header.parse(header_cluster[:50])
    assert info.value.field == "magic" or info.value.offset is not None
    assert "needs" in str(info.value)


def test_v1_limits() -> None:
    head = bytearray(48)
    struct.pack_into(">4sIQIIQBBHIQ", head, 0, b"QFI\xfb", 1, 0, 0, 0, 1 << 20, 12, 14, 0, 0, 48)
    with pytest.raises(ValidationError, match=r"Header.l2_bits at offset 0x21"):
        qcow.Header.parse(bytes(head))
    struct.pack_into(">B", head, 33, 9)
    struct.pack_into(">B", head, 32, 17)
    with pytest.raises(ValidationError, match=r"Header.cluster_bits at offset 0x20"):
        qcow.Header.parse(bytes(head))


def test_fvd_rejects_other_versions() -> None:
    head = bytearray(4336)
    struct.pack_into("<II", head, 0, 0x5143F5A9, 2)
    with pytest.raises(ValidationError, match=r"Header.version at offset 0x4"):
        fvd.Header.parse(bytes(head))
    struct.pack_into("<4s", head, 0, b"FVD\0")
    with pytest.raises(ValidationError, match=r"Header.magic at offset 0x0"):
        fvd.Header.parse(bytes(head))


def test_parsing_never_writes(tmp_path: Path, header_cluster: bytes) -> None:
    path = tmp_path / "bad.qcow2"
    path.write_bytes(_poke(header_cluster, 4, ">I", 9))
    before = path.stat().st_mtime_ns, path.read_bytes()
    with path.open("rb") as f, pytest.raises(ValidationError):
        qcow2.Qcow2.read(f)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_build_refuses_inconsistent_objects(header_cluster: bytes) -> None:
    image = qcow2.Qcow2.parse(header_cluster)
    ext = image.extension_area.extensions[0]
    ext.len_data += 8
    from diskspec import BuildError

    with pytest.raises(BuildError, match=r"HeaderExtension.data: length"):
        image.build()
    head = image.header
    head.compression_type = None
    with pytest.raises(BuildError, match=r"Header.compression_type: required when"):
        head.build()
