"""Sector encryption: qcow AES and LUKS1 in qcow2, against images qemu-img and qemu-io write.

Every qemu test makes its image with qemu-img, writes known patterns with qemu-io, then reads
the raw host clusters itself (header, L1, L2 followed here, not by the runtime), decrypts them
with diskspec.crypto and compares. The other direction too: clusters encrypted here are put
into the file and qemu-io must read the pattern back. Without qemu-img and qemu-io the tests
fail; they never skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
from cryptography.hazmat.primitives.ciphers import (
    BlockCipherAlgorithm,
    Cipher,
    algorithms,
    modes,
)

from diskspec import FormatError
from diskspec.crypto import (
    SECTOR_SIZE,
    InvalidPasswordError,
    LuksHeaderError,
    SectorCipher,
    UnsupportedCipherError,
    af_merge,
    af_split,
    luks_master_key,
    luks_unlock,
    qcow_aes_cipher,
    sector_cipher,
)
from diskspec.generated.qcow2 import (
    ExtFullDiskEncryption,
    L1Entry,
    L2Entry,
    LuksHeader,
    Qcow2,
)

PASS = "PASS"
WRONG = b"wrong passphrase"
CPU_USAGE_FLAKE = "Unable to get accurate CPU usage"
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# qemu helpers


@dataclass(frozen=True)
class Qemu:
    img: str
    io: str


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is required by the crypto tests (Debian/Ubuntu package: qemu-utils); "
            "install it, these tests never skip"
        )
    return path


@pytest.fixture(scope="module")
def qemu() -> Qemu:
    return Qemu(img=_require("qemu-img"), io=_require("qemu-io"))


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)


def _secret(passphrase: str = PASS) -> list[str]:
    return ["--object", f"secret,id=sec0,data={passphrase}"]


def _create(qemu: Qemu, fmt: str, path: Path, options: str) -> None:
    """qemu-img create; retried only on qemu 7.2's flaky PBKDF timing failure."""
    cmd = [qemu.img, "create", "-f", fmt, *_secret(), "-o", options, str(path), "16M"]
    for _ in range(20):
        done = _run(cmd)
        if done.returncode == 0:
            return
        if CPU_USAGE_FLAKE not in done.stderr:
            pytest.fail(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
        path.unlink(missing_ok=True)
    pytest.fail(f"{' '.join(cmd)} kept failing with {CPU_USAGE_FLAKE!r}")


def _image_opts(driver: str, path: Path) -> str:
    escaped = str(path).replace(",", ",,")
    return f"driver={driver},file.filename={escaped},encrypt.key-secret=sec0"


def _qemu_io(qemu: Qemu, driver: str, path: Path, *commands: str) -> None:
    cmd = [qemu.io, *_secret(), "--image-opts", _image_opts(driver, path)]
    for c in commands:
        cmd += ["-c", c]
    done = _run(cmd)
    if done.returncode != 0 or "failed" in done.stdout or done.stderr.strip():
        pytest.fail(f"{' '.join(cmd)}: rc {done.returncode}\n{done.stdout}\n{done.stderr}")


# --------------------------------------------------------------------------------------------
# Reading images by hand


def _read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    data = f.read(length)
    return data + bytes(length - len(data))


@dataclass
class Qcow2Image:
    qcow2: Qcow2
    fde: ExtFullDiskEncryption | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.qcow2.header.cluster_bits

    def host_offset(self, f: BinaryIO, guest: int) -> int:
        """Host offset of guest byte ``guest`` (standard L2 entries, allocated, uncompressed)."""
        cb = self.qcow2.header.cluster_bits
        l2_entries = self.cluster_size // 8
        l1 = self.qcow2.read_l1_table(f)
        l2_table = l1[guest >> (cb + cb - 3)] & L1Entry.OFS_L2_TABLE_DIV512_MASK
        assert l2_table, f"guest offset {guest:#x} has no L2 table"
        index = (guest >> cb) % l2_entries
        (entry,) = struct.unpack(">Q", _read_at(f, l2_table + 8 * index, 8))
        assert not entry & L2Entry.COMPRESSED_MASK
        cluster = entry & L2Entry.OFS_CLUSTER_DIV512_MASK
        assert cluster, f"guest offset {guest:#x} is not allocated"
        return int(cluster) + guest % self.cluster_size


def _open_qcow2(f: BinaryIO) -> Qcow2Image:
    f.seek(0)
    q = Qcow2.read(f)
    fde = None
    for ext in q.extension_area.extensions:
        if isinstance(ext.data, ExtFullDiskEncryption):
            fde = ext.data
    return Qcow2Image(qcow2=q, fde=fde)


def _luks(f: BinaryIO) -> tuple[LuksHeader, Callable[[int, int], bytes], Qcow2Image]:
    image = _open_qcow2(f)
    assert int(image.qcow2.header.crypt_method) == 2
    assert image.fde is not None, "no full disk encryption header extension"
    fde = image.fde
    header = fde.read_encryption_header(f)

    def read(offset: int, length: int) -> bytes:
        assert offset + length <= fde.len_encryption_header
        return _read_at(f, fde.ofs_encryption_header + offset, length)

    return header, read, image


def _luks_cluster(f: BinaryIO, image: Qcow2Image, cipher: SectorCipher, guest: int) -> bytes:
    host = image.host_offset(f, guest)
    return cipher.decrypt(_read_at(f, host, image.cluster_size), host // SECTOR_SIZE)


# --------------------------------------------------------------------------------------------
# LUKS in qcow2, every variant qemu-img 7.2 writes


@dataclass(frozen=True)
class Variant:
    options: str
    name: str
    hash_spec: str = "sha256"


LUKS_VARIANTS: dict[str, Variant] = {
    "default-aes-256-xts-plain64": Variant("", "aes-256-xts-plain64"),
    "aes-128-xts-plain64": Variant(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts", "aes-128-xts-plain64"
    ),
    "aes-192-xts-plain64": Variant(
        "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts", "aes-192-xts-plain64"
    ),
    "aes-256-xts-plain": Variant("encrypt.ivgen-alg=plain", "aes-256-xts-plain"),
    "aes-256-xts-essiv-sha256": Variant(
        "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256", "aes-256-xts-essiv:sha256"
    ),
    "aes-256-cbc-plain64": Variant(
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64", "aes-256-cbc-plain64"
    ),
    "aes-128-cbc-plain64": Variant(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc", "aes-128-cbc-plain64"
    ),
    "aes-256-cbc-essiv-sha256": Variant(
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        "aes-256-cbc-essiv:sha256",
    ),
    "aes-128-cbc-essiv-sha256": Variant(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
        "encrypt.ivgen-hash-alg=sha256",
        "aes-128-cbc-essiv:sha256",
    ),
    "aes-256-cbc-plain": Variant(
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain", "aes-256-cbc-plain"
    ),
    "aes-256-ctr-plain64": Variant("encrypt.cipher-mode=ctr", "aes-256-ctr-plain64"),
    "aes-256-ctr-essiv-sha256": Variant(
        "encrypt.cipher-mode=ctr,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        "aes-256-ctr-essiv:sha256",
    ),
    "aes-256-ecb": Variant("encrypt.cipher-mode=ecb", "aes-256-ecb-plain64"),
    "cast5-128-cbc-plain64": Variant(
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc", "cast5-128-cbc-plain64"
    ),
    "cast5-128-ctr-plain64": Variant(
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=ctr", "cast5-128-ctr-plain64"
    ),
    **{
        f"hash-{h}": Variant(f"encrypt.hash-alg={h}", "aes-256-xts-plain64", h)
        for h in ("md5", "sha1", "sha224", "sha384", "sha512", "ripemd160")
    },
}


def _luks_options(variant: Variant) -> str:
    base = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    return f"{base},{variant.options}" if variant.options else base


# Guest ranges qemu-io fills: (offset, length, pattern byte).
WRITES = ((0, MiB, 0x5A), (5 * MiB, 192 * 1024, 0xA5))


def _write_patterns(qemu: Qemu, driver: str, path: Path) -> None:
    _qemu_io(qemu, driver, path, *(f"write -P {p:#x} {o} {n}" for o, n, p in WRITES))


MISSING_IN_CRYPTOGRAPHY = {
    f"{family}-256-{mode}": Variant(
        f"encrypt.cipher-alg={family}-256,encrypt.cipher-mode={mode}", family
    )
    for family in ("twofish", "serpent")
    for mode in ("xts", "cbc")
}


@pytest.fixture(scope="module")
def luks_images(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every LUKS image, made in parallel: qemu-img spends seconds timing PBKDF2 for each."""
    folder = tmp_path_factory.mktemp("luks")

    def make(item: tuple[str, Variant]) -> tuple[str, Path]:
        name, variant = item
        path = folder / f"{name}.qcow2"
        _create(qemu, "qcow2", path, _luks_options(variant))
        if name in LUKS_VARIANTS:
            _write_patterns(qemu, "qcow2", path)
        return name, path

    jobs = [*LUKS_VARIANTS.items(), *MISSING_IN_CRYPTOGRAPHY.items()]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(make, jobs))


@pytest.mark.parametrize("name", list(LUKS_VARIANTS))
def test_luks_qcow2_image(qemu: Qemu, luks_images: dict[str, Path], name: str) -> None:
    variant = LUKS_VARIANTS[name]
    path = luks_images[name]

    with path.open("rb") as f:
        header, read, image = _luks(f)
        assert header.hash_spec.rstrip(b"\0").decode() == variant.hash_spec
        cipher = luks_unlock(header, read, PASS.encode())
        assert cipher.name == variant.name
        cs = image.cluster_size
        # Guest offset 0 first, as a read path would see it, then every written cluster.
        assert _luks_cluster(f, image, cipher, 0) == bytes([0x5A]) * cs
        for offset, length, pattern in WRITES:
            for guest in range(offset, offset + length, cs):
                assert _luks_cluster(f, image, cipher, guest) == bytes([pattern]) * cs, guest
        # Data never sits at host offset 0, so IV numbers from guest offsets would be wrong:
        # the host-offset IV is really what qemu used (ECB alone ignores IVs).
        host0 = image.host_offset(f, 0)
        assert host0 != 0
        if "ecb" not in variant.name:
            assert cipher.decrypt(_read_at(f, host0, cs), 0) != bytes([0x5A]) * cs

        with pytest.raises(InvalidPasswordError, match="Invalid password, cannot unlock any"):
            luks_unlock(header, read, WRONG)

    # The other way round: clusters encrypted here must read back in qemu.
    with path.open("r+b") as f:
        for guest, pattern in ((0, 0x3C), (5 * MiB + cs, 0xC3)):
            host = image.host_offset(f, guest)
            f.seek(host)
            f.write(cipher.encrypt(bytes([pattern]) * cs, host // SECTOR_SIZE))
    _qemu_io(qemu, "qcow2", path, f"read -P 0x3c 0 {cs}", f"read -P 0xc3 {5 * MiB + cs} {cs}")
    _qemu_io(qemu, "qcow2", path, f"read -P 0x5a {cs} {MiB - cs}")


@pytest.mark.parametrize("name", list(MISSING_IN_CRYPTOGRAPHY))
def test_luks_cipher_cryptography_lacks(luks_images: dict[str, Path], name: str) -> None:
    """qemu-img writes twofish and serpent; cryptography has neither, so opening says so."""
    family = MISSING_IN_CRYPTOGRAPHY[name].name
    with luks_images[name].open("rb") as f:
        header, read, _ = _luks(f)
        with pytest.raises(UnsupportedCipherError, match=f"{family!r} is not supported.*crypto"):
            luks_unlock(header, read, PASS.encode())


@pytest.fixture
def luks_header(
    luks_images: dict[str, Path],
) -> Iterator[tuple[LuksHeader, Callable[[int, int], bytes]]]:
    with luks_images["default-aes-256-xts-plain64"].open("rb") as f:
        header, read, _ = _luks(f)
        yield header, read


def test_luks_master_key_slot_and_errors(
    luks_header: tuple[LuksHeader, Callable[[int, int], bytes]],
) -> None:
    header, read = luks_header
    slot, key = luks_master_key(header, read, PASS.encode())
    assert slot == 0
    assert len(key) == header.len_key == 64

    with pytest.raises(InvalidPasswordError) as error:
        luks_unlock(header, read, b"pass")
    assert isinstance(error.value, FormatError)
    assert str(error.value) == "Invalid password, cannot unlock any keyslot"

    # A changed master key digest: the right passphrase opens nothing either.
    digest = bytes(b ^ 1 for b in header.mk_digest)
    with pytest.raises(InvalidPasswordError):
        luks_unlock(dataclasses.replace(header, mk_digest=digest), read, PASS.encode())

    def short(offset: int, length: int) -> bytes:
        return read(offset, length)[:-1]

    with pytest.raises(LuksHeaderError, match="Keyslot 0: key material is truncated"):
        luks_unlock(header, short, PASS.encode())


def _with_slot(header: LuksHeader, index: int, **changes: object) -> LuksHeader:
    slots = list(header.key_slots)
    slots[index] = dataclasses.replace(slots[index], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(header, key_slots=slots)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_stripes": 3999}, r"Keyslot 0 is corrupted \(stripes 3999 != 4000\)"),
        ({"active": 0x1234}, r"Keyslot 0 state \(active/disable\) is corrupted"),
        ({"ofs_key_material_sectors": 1}, "Keyslot 0 is overlapping with the LUKS header"),
        ({"ofs_key_material_sectors": 4000}, "Keyslot 0 is overlapping with the encrypted"),
        ({"ofs_key_material_sectors": 600}, "Keyslots 0 and 1 are overlapping"),
        ({"iterations": 0}, "Keyslot 0 iteration count is zero"),
    ],
)
def test_luks_corrupt_header(
    luks_header: tuple[LuksHeader, Callable[[int, int], bytes]],
    changes: dict[str, object],
    message: str,
) -> None:
    header, read = luks_header
    with pytest.raises(LuksHeaderError, match=message):
        luks_unlock(_with_slot(header, 0, **changes), read, PASS.encode())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cipher_name", b"blowfish", "unknown cipher 'blowfish'"),
        ("cipher_mode", b"xts-benbi", "unknown IV generator"),
        ("cipher_mode", b"ofb-plain64", "unknown cipher mode"),
        ("hash_spec", b"whirlpool", "unknown hash 'whirlpool'"),
        ("len_key", 40, "aes' takes 128, 192, 256-bit keys, not 160-bit"),
    ],
)
def test_luks_unsupported_header(
    luks_header: tuple[LuksHeader, Callable[[int, int], bytes]],
    field: str,
    value: object,
    message: str,
) -> None:
    header, read = luks_header
    if isinstance(value, bytes):
        value = value.ljust(32, b"\0")
    changed = dataclasses.replace(header, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(UnsupportedCipherError, match=message):
        luks_unlock(changed, read, PASS.encode())


# --------------------------------------------------------------------------------------------
# qcow AES (crypt_method 1): qcow v1 and qcow2


def _qcow1_host_offset(f: BinaryIO, guest: int) -> int:
    (magic, version, _, _, _, size, cb, l2_bits, _, crypt, l1_ofs) = struct.unpack(
        ">4sIQIIQBBHIQ", _read_at(f, 0, 48)
    )
    assert (magic, version, crypt) == (b"QFI\xfb", 1, 1)
    assert guest < size
    (l2_ofs,) = struct.unpack(">Q", _read_at(f, l1_ofs + 8 * (guest >> (cb + l2_bits)), 8))
    assert l2_ofs, "no L2 table"
    index = (guest >> cb) & ((1 << l2_bits) - 1)
    (entry,) = struct.unpack(">Q", _read_at(f, l2_ofs + 8 * index, 8))
    assert entry and not entry >> 63, f"cluster {entry:#x} unallocated or compressed"
    return int(entry) + guest % (1 << int(cb))


def test_qcow1_aes_image(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "aes.qcow"
    _create(qemu, "qcow", path, "encrypt.format=aes,encrypt.key-secret=sec0")
    _write_patterns(qemu, "qcow", path)
    cipher = qcow_aes_cipher(PASS.encode())
    assert cipher.name == "aes-128-cbc-plain64"
    wrong = qcow_aes_cipher(WRONG)
    cs = 4096  # qemu-img's qcow v1 clusters without a backing file
    with path.open("rb") as f:
        for offset, length, pattern in WRITES:
            for guest in range(offset, offset + length, cs):
                host = _qcow1_host_offset(f, guest)
                assert host != guest
                sealed = _read_at(f, host, cs)
                # The IV is the guest sector, not the host one.
                assert cipher.decrypt(sealed, guest // SECTOR_SIZE) == bytes([pattern]) * cs
                assert cipher.decrypt(sealed, host // SECTOR_SIZE) != bytes([pattern]) * cs
                assert wrong.decrypt(sealed, guest // SECTOR_SIZE) != bytes([pattern]) * cs
    with path.open("r+b") as f:
        f.seek(_qcow1_host_offset(f, cs))
        f.write(cipher.encrypt(b"\x3c" * cs, cs // SECTOR_SIZE))
    _qemu_io(qemu, "qcow", path, f"read -P 0x5a 0 {cs}", f"read -P 0x3c {cs} {cs}")


def test_qcow2_aes_image(qemu: Qemu, tmp_path: Path) -> None:
    """qemu-img 7.2 still creates crypt_method 1 qcow2 images (qemu-io reads and writes them)."""
    path = tmp_path / "aes.qcow2"
    _create(qemu, "qcow2", path, "encrypt.format=aes,encrypt.key-secret=sec0")
    _write_patterns(qemu, "qcow2", path)
    cipher = qcow_aes_cipher(PASS.encode())
    with path.open("rb") as f:
        image = _open_qcow2(f)
        assert int(image.qcow2.header.crypt_method) == 1
        assert image.fde is None
        cs = image.cluster_size
        for offset, length, pattern in WRITES:
            for guest in range(offset, offset + length, cs):
                host = image.host_offset(f, guest)
                assert host != guest
                sealed = _read_at(f, host, cs)
                assert cipher.decrypt(sealed, guest // SECTOR_SIZE) == bytes([pattern]) * cs
    with path.open("r+b") as f:
        host = image.host_offset(f, 0)
        f.seek(host)
        f.write(cipher.encrypt(b"\x3c" * cs, 0))
    _qemu_io(qemu, "qcow2", path, f"read -P 0x3c 0 {cs}", f"read -P 0x5a {cs} {cs}")


def test_qcow_aes_key() -> None:
    """Key: the passphrase up to a NUL, first 16 bytes, zero padded."""
    data = os.urandom(4 * SECTOR_SIZE)
    long = b"0123456789abcdefEXTRA"
    assert qcow_aes_cipher(long).encrypt(data, 9) == qcow_aes_cipher(long[:16]).encrypt(data, 9)
    short = b"key"
    assert qcow_aes_cipher(short).encrypt(data, 9) == qcow_aes_cipher(b"key\0tail").encrypt(data, 9)
    reference = _reference("aes", "cbc-plain64", short.ljust(16, b"\0"))
    assert qcow_aes_cipher(short).encrypt(data, 9) == reference(data, 9, True)


# --------------------------------------------------------------------------------------------
# Round trips and an independent per-sector reference built on cryptography's own modes


def _algorithm(family: str, key: bytes) -> BlockCipherAlgorithm:
    if family == "aes":
        return algorithms.AES(key)
    if family == "sm4":
        return algorithms.SM4(key)
    assert family == "cast5"
    return CAST5(key)


def _blockwise_xts(family: str, key: bytes, tweak: bytes, piece: bytes, encrypt: bool) -> bytes:
    """IEEE 1619 XTS of one data unit written out block by block, for what cryptography's XTS
    does not take (AES-192, SM4)."""
    half = len(key) // 2
    data_key = Cipher(_algorithm(family, key[:half]), modes.ECB())
    t = int.from_bytes(
        Cipher(_algorithm(family, key[half:]), modes.ECB()).encryptor().update(tweak), "little"
    )
    out = b""
    for at in range(0, len(piece), 16):
        mask = t.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(piece[at : at + 16], mask, strict=True))
        ctx = data_key.encryptor() if encrypt else data_key.decryptor()
        block = ctx.update(block)
        out += bytes(a ^ b for a, b in zip(block, mask, strict=True))
        t <<= 1
        if t >> 128:
            t ^= (1 << 128) | 0x87
    return out


def _blockwise_ctr(family: str, key: bytes, iv: bytes, piece: bytes) -> bytes:
    """CTR with a big-endian counter over the whole block, block by block (cryptography has
    no CTR for 64-bit block ciphers)."""
    ecb = Cipher(_algorithm(family, key), modes.ECB())
    bs = len(iv)
    counter = int.from_bytes(iv, "big")
    out = b""
    for at in range(0, len(piece), bs):
        pad = ecb.encryptor().update(counter.to_bytes(bs, "big"))
        out += bytes(a ^ b for a, b in zip(piece[at : at + bs], pad, strict=True))
        counter = (counter + 1) % (1 << (8 * bs))
    return out


def _reference(family: str, mode: str, key: bytes) -> Callable[[bytes, int, bool], bytes]:
    """Sector by sector, a new cryptography Cipher per sector: slow, obviously right."""
    name, _, ivspec = mode.partition("-")
    half = len(key) // 2
    main_key = key[:half] if name == "xts" else key
    bs = _algorithm(family, main_key).block_size // 8

    def iv(sector: int) -> bytes:
        if ivspec == "plain":
            return (sector % (1 << 32)).to_bytes(4, "little").ljust(bs, b"\0")
        plain64 = sector.to_bytes(8, "little").ljust(bs, b"\0")
        if ivspec.startswith("essiv:"):
            salt = hashlib.new(ivspec[6:], key).digest()
            ecb = Cipher(_algorithm(family, salt), modes.ECB()).encryptor()
            return ecb.update(plain64)
        assert ivspec == "plain64" or name == "ecb"
        return plain64

    def one(piece: bytes, sector: int, encrypt: bool) -> bytes:
        mode_obj: modes.CBC | modes.CTR | modes.ECB
        c: Cipher[modes.XTS | modes.CBC | modes.CTR | modes.ECB]
        if name == "xts":
            if family != "aes" or half == 24:
                return _blockwise_xts(family, key, iv(sector), piece, encrypt)
            c = Cipher(algorithms.AES(key), modes.XTS(iv(sector)))
        elif name == "ctr" and bs != 16:
            return _blockwise_ctr(family, key, iv(sector), piece)
        else:
            if name == "cbc":
                mode_obj = modes.CBC(iv(sector))
            elif name == "ctr":
                mode_obj = modes.CTR(iv(sector))
            else:
                mode_obj = modes.ECB()
            c = Cipher(_algorithm(family, key), mode_obj)
        ctx = c.encryptor() if encrypt else c.decryptor()
        return ctx.update(piece) + ctx.finalize()

    def run(data: bytes, sector: int, encrypt: bool) -> bytes:
        return b"".join(
            one(data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE], sector + i, encrypt)
            for i in range(len(data) // SECTOR_SIZE)
        )

    return run


ROUND_TRIP = [
    ("aes", "xts-plain64", 64),
    ("aes", "xts-plain64", 48),
    ("aes", "xts-plain64", 32),
    ("aes", "xts-plain", 64),
    ("aes", "xts-essiv:sha256", 64),
    ("aes", "cbc-plain64", 16),
    ("aes", "cbc-plain64", 24),
    ("aes", "cbc-plain64", 32),
    ("aes", "cbc-plain", 32),
    ("aes", "cbc-essiv:sha256", 32),
    ("aes", "cbc-essiv:sha256", 16),
    ("aes", "cbc-essiv:md5", 32),
    ("aes", "ctr-plain64", 32),
    ("aes", "ctr-essiv:sha256", 32),
    ("aes", "ecb", 32),
    ("cast5", "cbc-plain64", 16),
    ("cast5", "cbc-essiv:md5", 16),
    ("cast5", "ctr-plain64", 16),
    ("cast5", "ctr-essiv:md5", 16),
    ("sm4", "xts-plain64", 32),
    ("sm4", "cbc-essiv:md5", 16),
]


@pytest.mark.parametrize(("family", "mode", "key_size"), ROUND_TRIP)
@pytest.mark.parametrize("sector", [0, 7, (1 << 32) - 5, (1 << 64) - 40])
def test_round_trip_matches_reference(family: str, mode: str, key_size: int, sector: int) -> None:
    rng = random.Random(f"{family}-{mode}-{key_size}-{sector}")
    key = rng.randbytes(key_size)
    cipher = sector_cipher(family, mode, key)
    reference = _reference(family, mode, key)
    for count in (1, 2, 33):
        data = rng.randbytes(count * SECTOR_SIZE)
        sealed = cipher.encrypt(data, sector)
        assert sealed != data
        assert cipher.decrypt(sealed, sector) == data
        assert cipher.decrypt(bytearray(sealed), sector) == data
        assert cipher.decrypt(memoryview(sealed), sector) == data
        assert sealed == reference(data, sector, True)
        assert reference(sealed, sector, False) == data
        # A run is the concatenation of its sectors.
        pieces = [
            cipher.encrypt(data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE], sector + i)
            for i in range(count)
        ]
        assert b"".join(pieces) == sealed
    assert cipher.encrypt(b"", sector) == b""


def test_ctr_counter_carry() -> None:
    """The counter is a big-endian integer over the whole block and wraps inside it."""
    key = bytes(range(32))
    cipher = sector_cipher("aes", "ctr-essiv:sha256", key)
    reference = _reference("aes", "ctr-essiv:sha256", key)
    data = bytes(600 * SECTOR_SIZE)
    assert cipher.encrypt(data, 1000) == reference(data, 1000, True)


def test_plain_iv_wraps_at_32_bits() -> None:
    data = bytes(2 * SECTOR_SIZE)
    plain = sector_cipher("aes", "cbc-plain", bytes(32))
    plain64 = sector_cipher("aes", "cbc-plain64", bytes(32))
    assert plain.encrypt(data, 1 << 32) == plain.encrypt(data, 0)
    assert plain64.encrypt(data, 1 << 32) != plain64.encrypt(data, 0)
    wrapped = plain.encrypt(data, (1 << 32) - 1)
    assert wrapped[SECTOR_SIZE:] == plain.encrypt(data[:SECTOR_SIZE], 0)


def test_sector_run_checks() -> None:
    cipher = qcow_aes_cipher(b"x")
    with pytest.raises(ValueError, match="whole 512-byte sectors"):
        cipher.decrypt(bytes(100), 0)
    with pytest.raises(ValueError, match="64 bits"):
        cipher.decrypt(bytes(1024), (1 << 64) - 1)
    with pytest.raises(ValueError, match="64 bits"):
        cipher.encrypt(bytes(512), -1)
    assert cipher.decrypt(bytes(512), (1 << 64) - 1)


@pytest.mark.parametrize(
    ("family", "mode", "key_size", "message"),
    [
        ("twofish", "xts-plain64", 64, "no Twofish implementation"),
        ("serpent", "cbc-plain64", 32, "no Serpent implementation"),
        ("aes", "xts-plain64", 33, "even key size"),
        ("aes", "cbc-essiv:sha1", 32, "essiv with sha1 gives a 160-bit aes key"),
        ("aes", "cbc-essiv", 32, "unknown IV generator"),
        ("aes", "cbc", 32, "unknown IV generator"),
        ("cast5", "xts-plain64", 32, "128-bit block cipher"),
        ("aes", "cbc-plain64", 20, "not 160-bit"),
    ],
)
def test_unsupported_ciphers(family: str, mode: str, key_size: int, message: str) -> None:
    with pytest.raises(UnsupportedCipherError, match=message) as error:
        sector_cipher(family, mode, bytes(key_size))
    assert isinstance(error.value, FormatError)


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512", "ripemd160", "md5"])
@pytest.mark.parametrize("key_size", [16, 32, 64, 33])
def test_af_split_merge(hash_name: str, key_size: int) -> None:
    key = os.urandom(key_size)
    material = af_split(key, 4000, hash_name)
    assert len(material) == key_size * 4000
    assert af_merge(material, key_size, 4000, hash_name) == key
    assert af_merge(material[:key_size], key_size, 1, hash_name) != key
    assert af_split(key, 1, hash_name) == key


def _sha1_diffuse_reference(data: bytes) -> bytes:
    """The LUKS1 spec's H1 diffusion for SHA-1 written out: 20-byte pieces, index prefix."""
    out = b""
    for i in range(0, len(data), 20):
        piece = data[i : i + 20]
        out += hashlib.sha1(struct.pack(">I", i // 20) + piece).digest()[: len(piece)]
    return out


def test_af_merge_two_stripes_by_hand() -> None:
    s0, s1 = os.urandom(32), os.urandom(32)
    diffused = _sha1_diffuse_reference(s0)
    expected = bytes(a ^ b for a, b in zip(diffused, s1, strict=True))
    assert af_merge(s0 + s1, 32, 2, "sha1") == expected


@pytest.mark.parametrize(
    ("family", "mode", "key_size"),
    [("aes", "xts-plain64", 64), ("aes", "cbc-essiv:sha256", 32), ("aes", "cbc-plain64", 16)],
)
def test_bulk_speed(family: str, mode: str, key_size: int) -> None:
    """No per-byte Python work: 8 MiB each way well within a couple of seconds."""
    cipher = sector_cipher(family, mode, os.urandom(key_size))
    data = os.urandom(8 * MiB)
    start = time.perf_counter()
    sealed = cipher.encrypt(data, 1 << 20)
    assert cipher.decrypt(sealed, 1 << 20) == data
    assert time.perf_counter() - start < 6.0
