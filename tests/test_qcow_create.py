"""qcow v1 create conformance: diskspec writes the same bytes as ``qemu-img create -f qcow``,
prints the same "Formatting" line, and refuses what qemu refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import diskspec
from diskspec.cli import main
from diskspec.image import UsageError
from diskspec.tests.qcow_support import qemu_img

SECRET = ["--object", "secret,id=s0,data=some passphrase"]
CASES: list[tuple[str, list[str]]] = [
    ("1", []),
    ("1000", []),
    ("64M", []),
    ("100G", []),
    ("3T", []),
    ("64M", ["-o", "encrypt.format=aes,encrypt.key-secret=s0"]),
    ("1M", ["-o", "encryption=on,encrypt.key-secret=s0"]),
    ("10M", ["-b", "base.raw", "-F", "raw"]),
    ("10M", ["-b", "sub/../base.raw", "-F", "raw", "-o", "encrypt.format=aes,"
             "encrypt.key-secret=s0"]),
    ("5G", ["-b", "BASE_ABS", "-F", "raw"]),
    ("1M", ["-b", "b" * 7 + "/../base.raw", "-F", "raw"]),
    ("1M", ["-o", "encryption=off"]),
]


def _prepare(tmp_path: Path, args: list[str]) -> list[str]:
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "bbbbbbb").mkdir(exist_ok=True)
    return [a.replace("BASE_ABS", str(tmp_path / "base.raw")) for a in args]


@pytest.mark.parametrize(("size", "args"), CASES, ids=[f"{s}:{' '.join(a)}" for s, a in CASES])
def test_create_matches_qemu_img(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str, args: list[str]
) -> None:
    args = _prepare(tmp_path, args)
    done = qemu_img("create", "-f", "qcow", *SECRET, *args, "qemu.qcow", size, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    capsys.readouterr()
    here = os.getcwd()
    os.chdir(tmp_path)  # qemu-img and diskspec both take relative names as given
    try:
        assert main(["create", "-f", "qcow", *SECRET, *args, "mine.qcow", size]) == 0
    finally:
        os.chdir(here)
    out = capsys.readouterr().out
    assert out == done.stdout.replace("qemu.qcow", "mine.qcow")
    want = (tmp_path / "qemu.qcow").read_bytes()
    assert (tmp_path / "mine.qcow").read_bytes() == want
    with diskspec.open(tmp_path / "mine.qcow", backing=False) as img:
        assert img.size == -(-_bytes(size) // 512) * 512


def _bytes(size: str) -> int:
    from diskspec.qcow2.create import parse_size

    return parse_size(size)


def test_python_api_matches_too(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    diskspec.create(tmp_path / "a.qcow", "qcow", "7M", backing_file="base.raw",
                    backing_fmt="raw", passphrase="pw", **{"encrypt.format": "aes"})
    done = qemu_img("create", "-q", "-f", "qcow", *SECRET, "-b", "base.raw", "-F", "raw", "-o",
                    "encrypt.format=aes,encrypt.key-secret=s0", "b.qcow", "7M", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.qcow").read_bytes() == (tmp_path / "b.qcow").read_bytes()


REFUSED = [
    ("0", [], "Image size is too small, cannot be zero length"),
    ("1M", ["-o", "encrypt.format=aes"], "Parameter 'encrypt.key-secret' is required for cipher"),
    ("1M", ["-o", "encrypt.format=aes,encrypt.key-secret=s9"], "No secret with id 's9'"),
    ("1M", ["-o", "encrypt.format=luks,encrypt.key-secret=s0"], "Unsupported encryption format"),
    ("1M", ["-o", "encryption=on,encrypt.format=aes,encrypt.key-secret=s0"],
     "'encrypt.format' and its alias 'encryption' can't be used at the same time"),
    ("1M", ["-b", "base.raw"], "Backing file specified without backing format"),
    ("1M", ["-o", "cluster_size=512"], "Invalid parameter 'cluster_size'"),
]


@pytest.mark.parametrize(("size", "args", "words"), REFUSED, ids=[w for _, _, w in REFUSED])
def test_create_refuses_what_qemu_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str, args: list[str], words: str
) -> None:
    args = _prepare(tmp_path, args)
    done = qemu_img("create", "-q", "-f", "qcow", *SECRET, *args, "qemu.qcow", size,
                    cwd=tmp_path)
    assert done.returncode == 1
    assert words in done.stderr, done.stderr
    capsys.readouterr()
    mine = tmp_path / "mine.qcow"
    args = [a if a != "base.raw" else str(tmp_path / "base.raw") for a in args]
    assert main(["create", "-q", "-f", "qcow", *SECRET, *args, str(mine), size]) == 1
    assert words in capsys.readouterr().err


def test_backing_name_limit(tmp_path: Path) -> None:
    name = "x" * 1024
    with pytest.raises(UsageError, match="Backing file name too long"):
        diskspec.create(tmp_path / "a.qcow", "qcow", "1M", backing_file=name, backing_fmt="raw")
    assert not (tmp_path / "a.qcow").exists()
    diskspec.create(tmp_path / "b.qcow", "qcow", "1M", backing_file=name[:1023],
                    backing_fmt="raw")
    with diskspec.open(tmp_path / "b.qcow", backing=False) as img:
        assert img.info()["backing-filename"] == name[:1023]
