"""Creating encrypted qcow2 images (encrypt.format=luks|aes) as ``qemu-img create`` does.

AES images are compared byte for byte with qemu's. LUKS images hold random parts (master key,
salts, UUID) and timed PBKDF2 counts, so everything else is compared: cluster 0, the refcount
structures and L1 table, the LUKS header fields, where the key material lies, the file length,
and ``qemu-img info``'s format-specific block. qemu then checks, reads and refuses (wrong
passphrase) what diskspec writes; diskspec opens what qemu writes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import diskspec
from diskspec.cli import main
from diskspec.crypto import InvalidPasswordError
from diskspec.generated import qcow2 as q
from diskspec.image import UsageError
from diskspec.tests.corpus import require_tool

PASS = "luks pass phrase"
SECRET = ["--object", f"secret,id=sec0,data={PASS}"]
FAST = {"encrypt.iter-time": "10"}  # keeps PBKDF2 short, for qemu and for diskspec
CPU_USAGE_FLAKE = "Unable to get accurate CPU usage"  # qemu 7.2's PBKDF2 timing, when busy
RETRIES = 20


def _qemu(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "LC_ALL": "C"}, check=False)


def _qemu_timed(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """qemu-img where it times PBKDF2, which fails now and then on a busy machine: retried."""
    for _ in range(RETRIES):
        done = _qemu(*args, cwd=cwd)
        if CPU_USAGE_FLAKE not in done.stderr:
            break
    return done


def _qemu_create(cwd: Path, name: str, size: str, options: dict[str, str]) -> None:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    done = _qemu_timed("create", "-q", "-f", "qcow2", *SECRET, "-o", opts, name, size, cwd=cwd)
    assert done.returncode == 0, done.stderr


def _target(path: Path, secret: str = PASS) -> list[str]:
    return ["--object", f"secret,id=k,data={secret}", "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=k"]


def _ours(path: Path, size: str, options: dict[str, str]) -> None:
    diskspec.create(path, "qcow2", size, secrets={"sec0": PASS.encode()}, **options)


def _check_clean(path: Path) -> None:
    done = _qemu("check", "--output=json", *_target(path), cwd=path.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0


def _format_specific(path: Path) -> dict[str, Any]:
    done = _qemu("info", "--output=json", *_target(path), cwd=path.parent)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)["format-specific"]
    return data


# --------------------------------------------------------------------------------------------
# AES: no random parts, so qemu's bytes exactly

AES_CASES: list[dict[str, str]] = [
    {"encrypt.format": "aes", "encrypt.key-secret": "sec0"},
    {"encryption": "on", "encrypt.key-secret": "sec0"},
    {"encrypt.format": "aes", "encrypt.key-secret": "sec0", "compat": "0.10"},
    {"encrypt.format": "aes", "encrypt.key-secret": "sec0", "cluster_size": "4096",
     "backing_file": "base.raw", "backing_fmt": "raw"},
]


@pytest.mark.parametrize("options", AES_CASES, ids=lambda o: ",".join(o))
def test_aes_is_qemus_bytes(tmp_path: Path, options: dict[str, str]) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    _ours(tmp_path / "ours.qcow2", "64M", options)
    _qemu_create(tmp_path, "theirs.qcow2", "64M", options)
    ours = (tmp_path / "ours.qcow2").read_bytes()
    assert ours == (tmp_path / "theirs.qcow2").read_bytes()
    head = q.Header.parse(ours)
    assert head.crypt_method == q.CryptMethod.AES
    _check_clean(tmp_path / "ours.qcow2")
    assert _format_specific(tmp_path / "ours.qcow2")["data"]["encrypt"] == {"format": "aes"}


def test_aes_data_round_trips_with_qemu(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    _ours(path, "4M", {"encrypt.format": "aes", "encrypt.key-secret": "sec0"})
    payload = os.urandom(100_000)
    with diskspec.open(path, "r+", passphrase=PASS) as img:
        img.pwrite(payload, 3000)
    done = _qemu("convert", *_target(path), "-O", "raw", "out.raw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    raw = (tmp_path / "out.raw").read_bytes()
    assert raw == bytes(3000) + payload + bytes((4 << 20) - 103000)


# --------------------------------------------------------------------------------------------
# LUKS: the same layout as qemu's, random parts aside

LUKS_CASES: list[tuple[str, dict[str, str]]] = [
    ("1G", {}),
    ("64M", {"compat": "0.10"}),
    ("64M", {"cluster_size": "4096"}),
    ("64M", {"cluster_size": "2M"}),
    ("64M", {"refcount_bits": "1", "cluster_size": "16384"}),
    ("10T", {}),
    ("64M", {"backing_file": "base.raw", "backing_fmt": "raw"}),
    ("64M", {"data_file": "x.data"}),  # the LUKS area stays in the qcow2 file
    ("64M", {"encrypt.cipher-alg": "aes-128", "encrypt.cipher-mode": "cbc",
             "encrypt.ivgen-alg": "essiv", "encrypt.ivgen-hash-alg": "sha256",
             "encrypt.hash-alg": "sha512"}),
    ("64M", {"encrypt.cipher-alg": "aes-192"}),
    ("64M", {"encrypt.ivgen-hash-alg": "sha1"}),  # written ("xts-plain64:sha1"), not used
    ("64M", {"encrypt.cipher-mode": "ctr", "encrypt.ivgen-alg": "plain"}),
    ("64M", {"encrypt.cipher-mode": "ecb", "encrypt.ivgen-hash-alg": "sha1"}),
    ("64M", {"encrypt.ivgen-alg": "essiv", "encrypt.cipher-mode": "cbc"}),
]

# what is random or timed: the master key digest (salt, count, value), the UUID, slot 0's salt
# and iterations, and the key material itself
RANDOM_FIELDS = ("mk_digest", "mk_digest_salt", "mk_digest_iterations", "uuid")


def _luks_area(data: bytes) -> tuple[q.Qcow2, q.ExtFullDiskEncryption, q.LuksHeader]:
    image = q.Qcow2.parse(data)
    head = image.header
    cs = 1 << head.cluster_bits
    fde = [e.data for e in image.extension_area.extensions
           if e.ext_type == q.HeaderExtensionType.FULL_DISK_ENCRYPTION]
    assert len(fde) == 1 and isinstance(fde[0], q.ExtFullDiskEncryption)
    assert fde[0].ofs_encryption_header % cs == 0
    return image, fde[0], q.LuksHeader.parse(data, fde[0].ofs_encryption_header)


def _fixed_fields(luks: q.LuksHeader) -> dict[str, Any]:
    fields = {name: getattr(luks, name) for name in luks.__dataclass_fields__
              if name not in (*RANDOM_FIELDS, "key_slots")}
    slots = [(int(s.active), s.ofs_key_material_sectors, s.num_stripes) for s in luks.key_slots]
    rest = [(s.iterations, s.salt) for s in luks.key_slots[1:]]
    return fields | {"slots": slots, "inactive": rest}


def _nonzero_sectors(data: bytes, start: int, end: int) -> list[int]:
    return [at for at in range(start, end, 512) if data[at : at + 512].count(0) != 512]


def _scrub_info(info: dict[str, Any]) -> dict[str, Any]:
    encrypt = info["data"]["encrypt"]
    assert isinstance(encrypt["uuid"], str) and len(encrypt["uuid"]) == 36
    assert encrypt["master-key-iters"] >= 1000 and encrypt["slots"][0]["iters"] >= 1000
    encrypt["uuid"] = encrypt["master-key-iters"] = encrypt["slots"][0]["iters"] = "random"
    return info


@pytest.mark.parametrize(("size", "extra"), LUKS_CASES,
                         ids=[f"{s}:{','.join(f'{k}={v}' for k, v in o.items())}"
                              for s, o in LUKS_CASES])
def test_luks_layout_is_qemus(tmp_path: Path, size: str, extra: dict[str, str]) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    options = {"encrypt.format": "luks", "encrypt.key-secret": "sec0", **FAST, **extra}
    _ours(tmp_path / "ours.qcow2", size, options)
    _qemu_create(tmp_path, "theirs.qcow2", size, options)
    ours = (tmp_path / "ours.qcow2").read_bytes()
    theirs = (tmp_path / "theirs.qcow2").read_bytes()
    assert len(ours) == len(theirs)
    image, fde, luks = _luks_area(ours)
    _, their_fde, their_luks = _luks_area(theirs)
    assert image.header.crypt_method == q.CryptMethod.LUKS
    assert fde == their_fde
    # header, extensions, refcount table and blocks, L1: no random part, the same bytes
    start = fde.ofs_encryption_header
    assert ours[:start] == theirs[:start]
    assert _fixed_fields(luks) == _fixed_fields(their_luks)
    # the header, then slot 0's key material, then zeros, in both
    end = start + fde.len_encryption_header
    assert _nonzero_sectors(ours, start, len(ours)) == _nonzero_sectors(theirs, start, len(ours))
    assert ours[end:].count(0) == len(ours) - end
    assert _scrub_info(_format_specific(tmp_path / "ours.qcow2")) == _scrub_info(
        _format_specific(tmp_path / "theirs.qcow2"))
    _check_clean(tmp_path / "ours.qcow2")
    with diskspec.open(tmp_path / "ours.qcow2", passphrase=PASS) as img:
        assert img.pread(65536, 0) == bytes(65536)


def test_luks_iterations_follow_iter_time(tmp_path: Path) -> None:
    slow, fast = tmp_path / "slow.qcow2", tmp_path / "fast.qcow2"
    _ours(fast, "1M", {"encrypt.format": "luks", "encrypt.key-secret": "sec0", **FAST})
    _ours(slow, "1M", {"encrypt.format": "luks", "encrypt.key-secret": "sec0",
                       "encrypt.iter-time": "200"})
    _, _, a = _luks_area(fast.read_bytes())
    _, _, b = _luks_area(slow.read_bytes())
    assert b.key_slots[0].iterations > 4 * a.key_slots[0].iterations
    assert b.mk_digest_iterations > a.mk_digest_iterations
    assert a.uuid != b.uuid and a.mk_digest_salt != b.mk_digest_salt


def test_qemu_reads_what_diskspec_writes(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    _ours(path, "16M", {"encrypt.format": "luks", "encrypt.key-secret": "sec0", **FAST})
    payload = os.urandom(200_000)
    with diskspec.open(path, "r+", passphrase=PASS) as img:
        img.pwrite(payload, 1 << 20)
        img.pwrite(b"tail" * 128, (16 << 20) - 512)
    _check_clean(path)
    done = _qemu("convert", *_target(path), "-O", "raw", "out.raw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with diskspec.open(path, passphrase=PASS) as img:
        assert (tmp_path / "out.raw").read_bytes() == img.pread(img.size, 0)
        assert img.pread(len(payload), 1 << 20) == payload
    wrong = _qemu("convert", *_target(path, "not it"), "-O", "raw", "bad.raw", cwd=tmp_path)
    assert wrong.returncode == 1
    assert "Invalid password, cannot unlock any keyslot" in wrong.stderr
    with pytest.raises(InvalidPasswordError):
        diskspec.open(path, passphrase="not it")


def test_diskspec_reads_what_qemu_writes(tmp_path: Path) -> None:
    _qemu_create(tmp_path, "q.qcow2", "8M",
                 {"encrypt.format": "luks", "encrypt.key-secret": "sec0", **FAST})
    path = tmp_path / "q.qcow2"
    done = subprocess.run(
        [require_tool("qemu-io"), *_target(path), "-c", "write -P 0x5a 65536 131072"],
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    with diskspec.open(path, passphrase=PASS) as img:
        assert img.pread(131072, 65536) == b"\x5a" * 131072
        assert img.pread(65536, 0) == bytes(65536)


def test_preallocated_luks_image_is_consistent(tmp_path: Path) -> None:
    # as qemu's, the preallocated clusters hold zeros on disk, which do not decrypt to zeros
    path = tmp_path / "p.qcow2"
    _ours(path, "8M", {"encrypt.format": "luks", "encrypt.key-secret": "sec0", **FAST,
                       "preallocation": "metadata"})
    _qemu_create(tmp_path, "t.qcow2", "8M", {"encrypt.format": "luks",
                                             "encrypt.key-secret": "sec0", **FAST,
                                             "preallocation": "metadata"})
    assert path.stat().st_size == (tmp_path / "t.qcow2").stat().st_size
    _check_clean(path)


# --------------------------------------------------------------------------------------------
# refusals, in qemu's words

REFUSED: list[tuple[dict[str, str], str]] = [
    ({"encrypt.format": "luks"}, "Parameter 'encrypt.key-secret' is required for cipher"),
    ({"encrypt.format": "aes"}, "Parameter 'encrypt.key-secret' is required for cipher"),
    ({"encryption": "on"}, "Parameter 'encrypt.key-secret' is required for cipher"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "nope"}, "No secret with id 'nope'"),
    ({"encrypt.format": "xyz", "encrypt.key-secret": "sec0"},
     "Parameter 'format' does not accept value 'xyz'"),
    ({"encryption": "on", "encrypt.format": "luks", "encrypt.key-secret": "sec0"},
     "'encrypt.format' and its alias 'encryption' can't be used at the same time"),
    ({"encrypt.format": "aes", "encrypt.key-secret": "sec0", "encrypt.cipher-alg": "aes-128"},
     "Parameter 'encrypt.cipher-alg' is unexpected"),
    ({"encrypt.key-secret": "sec0"}, "Parameter 'encrypt.format' is missing"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.cipher-alg": "foo"},
     "Parameter 'cipher-alg' does not accept value 'foo'"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.cipher-mode": "foo"},
     "Parameter 'cipher-mode' does not accept value 'foo'"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.ivgen-alg": "foo"},
     "Parameter 'ivgen-alg' does not accept value 'foo'"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.hash-alg": "foo"},
     "Parameter 'hash-alg' does not accept value 'foo'"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.iter-time": "abc"},
     "Parameter 'encrypt.iter-time' expects a number"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.cipher-alg": "cast5-128"},
     "Unsupported cipher mode xts"),
    ({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.cipher-alg": "aes-128",
      "encrypt.cipher-mode": "cbc", "encrypt.ivgen-alg": "essiv",
      "encrypt.ivgen-hash-alg": "sha1"}, "No AES cipher with key size 20 available"),
]


@pytest.mark.parametrize(("options", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_refusals_are_qemus(tmp_path: Path, options: dict[str, str], message: str) -> None:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    done = _qemu("create", "-q", "-f", "qcow2", *SECRET, "-o", opts, "t.qcow2", "1M",
                 cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == f"qemu-img: t.qcow2: {message}\n"
    with pytest.raises(UsageError) as caught:
        _ours(tmp_path / "o.qcow2", "1M", options)
    assert str(caught.value) == message


def test_aes_192_without_xts_is_refused(tmp_path: Path) -> None:
    # 24-byte keys * 4000 stripes are not whole sectors: qemu-img 7.2 aborts on an assertion
    options = {"encrypt.format": "luks", "encrypt.key-secret": "sec0", **FAST,
               "encrypt.cipher-alg": "aes-192", "encrypt.cipher-mode": "cbc"}
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    done = _qemu_timed("create", "-q", "-f", "qcow2", *SECRET, "-o", opts, "t.qcow2", "1M",
                       cwd=tmp_path)
    assert done.returncode != 0 and "Assertion" in done.stderr
    with pytest.raises(UsageError, match="LUKS key material of 96000 bytes is not a whole"):
        _ours(tmp_path / "o.qcow2", "1M", options)


# --------------------------------------------------------------------------------------------
# the command line


def _run(cwd: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(list(args))
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return code, out.out, out.err


FORMATTING = [
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    "encrypt.iter-time=10,encrypt.hash-alg=sha1,encrypt.ivgen-hash-alg=sha256,"
    "encrypt.ivgen-alg=essiv,encrypt.cipher-mode=cbc,encrypt.cipher-alg=aes-128,"
    "encrypt.key-secret=sec0,encrypt.format=luks,compat=0.10",
    "encryption=on,encrypt.key-secret=sec0,cluster_size=4k",
    "encrypt.format=aes,encrypt.key-secret=sec0,lazy_refcounts=on",
]


@pytest.mark.parametrize("opts", FORMATTING)
def test_create_prints_qemus_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  opts: str) -> None:
    theirs = _qemu("create", "-f", "qcow2", *SECRET, "-o", opts, "x.qcow2", "1G", cwd=tmp_path)
    code, out, err = _run(tmp_path, "create", "-f", "qcow2", *SECRET, "-o", opts, "x.qcow2",
                          "1G", capsys=capsys)
    assert code == 0, err
    assert out == theirs.stdout  # printed before qemu's PBKDF2 timing, which may fail
    with diskspec.open(tmp_path / "x.qcow2", passphrase=PASS) as img:
        assert img.info()["encrypted"] is True


def test_convert_makes_an_encrypted_copy(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    source = os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(4096)
    (tmp_path / "src.raw").write_bytes(source)
    # two secrets: the target must be opened with the one encrypt.key-secret names
    code, _, err = _run(tmp_path, "convert", "-O", "qcow2", "--object", "secret,id=a,data=x",
                        *SECRET, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,"
                        "encrypt.iter-time=10", "src.raw", "enc.qcow2", capsys=capsys)
    assert code == 0, err
    done = _qemu("convert", *_target(tmp_path / "enc.qcow2"), "-O", "raw", "back.raw",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "back.raw").read_bytes() == source
    _check_clean(tmp_path / "enc.qcow2")
    # an encrypted source (its own secret, by --image-opts) into an AES copy with another
    code, _, err = _run(tmp_path, "convert", "-O", "qcow2", "--object", "secret,id=a,data=x",
                        *SECRET, "--image-opts",
                        "-o", "encrypt.format=aes,encrypt.key-secret=a",
                        "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=sec0",
                        "aes.qcow2", capsys=capsys)
    assert code == 0, err
    with diskspec.open(tmp_path / "aes.qcow2", passphrase="x") as img:
        assert img.pread(img.size, 0) == source


def test_passphrase_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw.txt").write_bytes(PASS.encode() + b"\n")  # one newline is stripped
    (tmp_path / "src.raw").write_bytes(os.urandom(70000))
    pw = ["--passphrase-file", "pw.txt"]
    code, out, err = _run(tmp_path, "create", "-f", "qcow2", *pw, "-o",
                          "encrypt.format=luks,encrypt.iter-time=10", "l.qcow2", "1M",
                          capsys=capsys)
    assert code == 0, err
    assert out.startswith("Formatting 'l.qcow2', fmt=qcow2 encrypt.format=luks "
                          "encrypt.iter-time=10 cluster_size=65536")
    _check_clean(tmp_path / "l.qcow2")
    # convert: the plain source is opened as it is, the new image with the file's key
    for fmt, name in (("qcow2", "c.qcow2"), ("qcow", "c.qcow")):
        code, _, err = _run(tmp_path, "convert", *pw, "-O", fmt, "-o", "encrypt.format="
                            + ("luks,encrypt.iter-time=10" if fmt == "qcow2" else "aes"),
                            "src.raw", name, capsys=capsys)
        assert code == 0, err
        code, out, err = _run(tmp_path, "compare", *pw, name, "src.raw", capsys=capsys)
        assert (code, out) == (0, "Images are identical.\n"), err
    done = _qemu("compare", *_target(tmp_path / "c.qcow2"), "driver=raw,file.filename=src.raw",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # qemu's AES qcow2 and qcow v1 images open with it too
    _qemu_create(tmp_path, "a.qcow2", "1M", {"encrypt.format": "aes", "encrypt.key-secret":
                                             "sec0"})
    code, out, err = _run(tmp_path, "info", *pw, "--output=json", "a.qcow2", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    (tmp_path / "bad.txt").write_text("wrong\n")
    code, _, err = _run(tmp_path, "compare", "--passphrase-file", "bad.txt", "c.qcow2",
                        "src.raw", capsys=capsys)
    assert code == 2
    assert "Invalid password, cannot unlock any keyslot" in err


MEASURED = [
    ("1G", "encrypt.format=luks,encrypt.key-secret=sec0"),
    ("100M", "encrypt.format=luks,encrypt.key-secret=sec0"),
    ("16T", "encrypt.format=luks,encrypt.key-secret=sec0"),
    ("1G", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,"
           "cluster_size=4096"),
    ("1G", "encrypt.format=aes,encrypt.key-secret=sec0"),
    ("1G", "encrypt.format=aes"),  # qemu measures only LUKS, and checks nothing else
    ("1G", "encrypt.format=luks"),
]


@pytest.mark.parametrize(("size", "opts"), MEASURED)
def test_measure_is_qemus(tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str,
                          opts: str) -> None:
    args = ("measure", *SECRET, "--output=json", "-O", "qcow2", "--size", size, "-o", opts)
    theirs = _qemu_timed(*args, cwd=tmp_path)
    code, out, err = _run(tmp_path, *args, capsys=capsys)
    if theirs.returncode:
        assert code == 1
        assert err == theirs.stderr.replace("qemu-img: ", "diskspec: error: ")
    else:
        assert code == 0, err
        assert json.loads(out) == json.loads(theirs.stdout)
